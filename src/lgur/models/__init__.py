"""LGUR models: backbones, the paper's heads (DGA, PGU), the assembled model and the official converter.

    from lgur.models import build_model
    model = build_model(cfg, num_classes)          # LGUR; num_classes=0 -> no ID classifiers

Names resolve lazily so `import lgur.models.cli` (the `lgur` command) does not import torch/timm.
"""
from __future__ import annotations

import importlib

_LAZY = {"LGUR": "lgur.models.lgur", "build_model": "lgur.models.lgur",
         "retrieval_embedding": "lgur.models.lgur"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lgur.models' has no attribute {name!r}")
