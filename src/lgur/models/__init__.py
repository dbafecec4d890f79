"""LGUR models: backbones, the paper's heads (DGA, PGU), the assembled model and the official converter.

    from lgur.models import build_model
    model = build_model(cfg, num_classes)  # LGUR or Baseline (cfg.model.name); num_classes=0: no ID classifiers
    model.parts                            # its modules, training branches and loss terms (lgur.models.parts)

Names resolve lazily so `import lgur.models.cli` (the `lgur` command) does not import torch/timm.
"""
from __future__ import annotations

from lgur._lazy import lazy_exports

__all__, __getattr__ = lazy_exports(__name__, {
    "LGUR": "lgur", "Baseline": "baseline", "MODELS": "base", "RetrievalModel": "base", "ModelParts": "parts",
    "build_model": "build", "model_parts": "variants", "retrieval_embedding": "base"})
