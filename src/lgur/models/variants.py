"""Every registered model class, and a model's parts description by name without building it.

    model_parts(cfg.model)    # ModelParts of MODELS.get(cfg.model.name) for these switches

Importing this module registers the variants in lgur.models.base.MODELS: lgur.models.lgur.LGUR
("lgur", the default) and lgur.models.baseline.Baseline ("baseline"). It imports no backbone library,
so the losses can read descriptions cheaply; lgur.models.build creates the models.
"""
from __future__ import annotations

from lgur.models.base import MODELS
from lgur.models.lgur import LGUR  # noqa: F401, I001  (registers "lgur", the default: listed first)
from lgur.models.baseline import Baseline  # noqa: F401  (registers "baseline")
from lgur.models.parts import ModelParts


def model_parts(mcfg, classifiers: bool = True) -> ModelParts:
    """The modules, branches and loss terms of the model cfg.model describes (lgur.models.parts)."""
    return MODELS.get(mcfg.name).describe(mcfg, classifiers)
