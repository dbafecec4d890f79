"""The ablation baseline (the LGUR author's answer in the official repository's issue #4).

Backbone tokens are mean-pooled (masked for text), each modality has its own 1x1 projection (`proj`
for images, `text_proj` for text; one part, K=1) and one ID classifier is shared; trained with the ID
and ranking losses on the retrieval pair (V_re, T_re) = the pooled backbone tokens. No DGA, no PGU:
the use_* switches do not apply to it. Registered as model.name=baseline.
"""
from __future__ import annotations

from dataclasses import replace

from lgur.models.base import MODELS, RetrievalModel
from lgur.models.parts import (BILSTM, CLASSIFIERS, IMAGE_BACKBONE, PROJECTIONS, TEXT_BACKBONE, TEXT_PROJECTION,
                               Branch, ModelParts, Term)
from lgur.models.pgu import PartProjection

# the image projection `proj` and the text projection `text_proj`, one module as in `lgur info`
PROJECTIONS_PER_MODALITY = replace(PROJECTIONS, paths=("proj", "text_proj"))


@MODELS.register("baseline")
class Baseline(RetrievalModel):
    """Holds `image`, `text` (backbones), `proj` / `text_proj` (one part each) and `classifiers`."""

    name = "baseline"

    @classmethod
    def describe(cls, mcfg, classifiers: bool = True) -> ModelParts:
        modules = (IMAGE_BACKBONE, TEXT_BACKBONE, BILSTM if mcfg.lstm else TEXT_PROJECTION,
                   PROJECTIONS_PER_MODALITY) + ((CLASSIFIERS,) if classifiers else ())
        return ModelParts(cls.name, modules, (Branch("V_re", "image"), Branch("T_re", "text")),
                          (Term("id_dict", "id", "V_re", "T_re"), Term("rank_dict", "rank", "V_re", "T_re")))

    def _build_heads(self, mcfg) -> int:
        self.proj = PartProjection(1, mcfg.dim, mcfg.embed_dim)       # image 1x1 projection
        self.text_proj = PartProjection(1, mcfg.dim, mcfg.embed_dim)  # text 1x1 projection
        return 1
