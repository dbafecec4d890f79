"""Create a registered model by name: `build_model(cfg, num_classes)`, and its parts description.

    from lgur.models import build_model
    model = build_model(cfg, num_classes)          # cfg.model.name picks the class in MODELS
    model_parts(cfg.model)                         # what that model is made of, without building it

The registered classes (lgur.models.variants): lgur.models.lgur.LGUR ("lgur") and
lgur.models.baseline.Baseline ("baseline"); backbones come from their own registries (lgur.models.backbones).
"""
from __future__ import annotations

from lgur.models.backbones import build_image_backbone, build_text_encoder
from lgur.models.base import MODELS, RetrievalModel, check_model_config
from lgur.models.variants import model_parts  # noqa: F401  (re-exported; registers every model class)


def build_model(cfg, num_classes: int, pretrained: bool = True) -> RetrievalModel:
    """The model described by cfg.model (backbones from lgur.models.backbones). num_classes=0: no classifiers."""
    mcfg = cfg.model
    check_model_config(mcfg)
    image = build_image_backbone(mcfg, cfg.data.image_size, pretrained)
    return MODELS.get(mcfg.name)(mcfg, image, build_text_encoder(mcfg, pretrained),
                                 num_classes=num_classes, max_caption_tokens=cfg.data.max_caption_tokens)
