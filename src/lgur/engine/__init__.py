"""Engine: training loop, evaluation, DDP, checkpoints/resume, logs and curves (`lgur train`, `lgur eval`).

    from lgur.config import load_config
    from lgur.engine import train
    results = train(load_config("lgur_cuhk", ["data.root=/data/CUHK-PEDES"]))

Names resolve lazily so `import lgur.engine.cli` (the `lgur` command) does not import torch.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "train": "trainer", "build_trainer": "trainer", "Trainer": "trainer", "TrainStep": "trainer",
    "evaluate": "evaluation", "build_optimizer": "optim", "build_scheduler": "optim", "param_groups": "optim"})
