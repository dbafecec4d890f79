"""Engine: training loop, evaluation, DDP, checkpoints/resume, logs and curves (`lgur train`, `lgur eval`).

    from lgur.config import load_config
    from lgur.engine import train
    results = train(load_config("lgur_cuhk", ["data.root=/data/CUHK-PEDES"]))

Names resolve lazily so `import lgur.engine.cli` (the `lgur` command) does not import torch.
"""
from __future__ import annotations

import importlib

_LAZY = {"train": "lgur.engine.trainer", "build_trainer": "lgur.engine.trainer", "Trainer": "lgur.engine.trainer",
         "TrainStep": "lgur.engine.trainer", "evaluate": "lgur.engine.evaluation",
         "build_optimizer": "lgur.engine.optim", "build_scheduler": "lgur.engine.optim",
         "param_groups": "lgur.engine.optim"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lgur.engine' has no attribute {name!r}")
