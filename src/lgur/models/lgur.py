"""The LGUR model: backbones + DGA + PGU + per-part ID classifiers (docs/reference.md §1).

Training path (`forward`) returns the four branch part stacks, each (B, K, embed_dim):

    V_g  = PGU(R(V, T) * M)     text-guided image branch (CMG)
    V_re = PGU(R(V, D) * M)     image retrieval branch (MSD + FCR)
    T    = PGU(T)               raw text branch
    T_re = PGU(R(T, D))         text retrieval branch (MSD)

Test path (`encode_*`) computes only V_re / T_re and returns concat_k(parts) / (norm + 1e-8).

Ablations (model.use_*): `LGUR.describe` decides which modules are built (lgur.models.parts.lgur_heads),
which branches the training forward returns and which loss terms pair them (lgur.models.parts).
"V_re"/"T_re" always name the *retrieval* branch, i.e. the reconstruction when MSD is on and otherwise the (gated)
backbone tokens. The raw branches exist when something distinguishes them from the retrieval branch:
with CMG the image raw branch is V_g, with MSD but no CMG it is the plain tokens ("V", the official
`image_DETR(None, V)` path); without MSD the text raw branch "T" is the same tensor as "T_re". Without
PGU the masked token mean feeds the K part projections. The baseline is its own model
(lgur.models.baseline.Baseline, model.name=baseline).
"""
from __future__ import annotations

import torch

from lgur.models.base import MODELS, RetrievalModel, masked_mean, retrieval_embedding  # noqa: F401  (re-exported)
from lgur.models.dga import DictionaryGranularityAlignment
from lgur.models.parts import (BILSTM, CATALOGUE, CLASSIFIERS, GATE, IMAGE_BACKBONE, PDEC, PROJECTIONS, TEXT_BACKBONE,
                               TEXT_PROJECTION, Branch, ModelParts, R, Term, lgur_heads)
from lgur.models.pgu import PartProjection, PrototypeDecoder


@MODELS.register("lgur")
class LGUR(RetrievalModel):
    """Holds `image`, `text` (backbones), the enabled heads (`dga`, `decoder`), `proj` and `classifiers`."""

    name = "lgur"

    @classmethod
    def describe(cls, mcfg, classifiers: bool = True) -> ModelParts:
        msd, cmg = bool(mcfg.use_msd), bool(mcfg.use_cmg)
        built = {m.key for m in (IMAGE_BACKBONE, TEXT_BACKBONE, BILSTM if mcfg.lstm else TEXT_PROJECTION, PROJECTIONS)}
        built |= lgur_heads(mcfg) | ({CLASSIFIERS.key} if classifiers else set())
        # the raw image branch: text-guided with CMG, the plain tokens with MSD alone, none otherwise
        raw = "V_g" if cmg else "V" if msd else None
        branches = [Branch("V_re", "image")] + ([Branch(raw, "image")] if raw else []) + [Branch("T_re", "text")]
        if msd:
            branches.append(Branch("T", "text"))
        elif cmg:
            branches.append(Branch("T", "text", same_as="T_re"))  # no dictionary: T_re is T
        terms = [Term("id_guided", "id", raw, "T"), Term("rank_guided", "rank", raw, "T")] if raw else []
        terms += [Term("id_dict", "id", "V_re", "T_re"), Term("rank_dict", "rank", "V_re", "T_re")]
        if cmg:  # L_G; its text term only when the dictionary makes T_re differ from T
            terms += ([Term("guide_text", "guide", "T", "T_re")] if msd else []) + [
                Term("guide_image", "guide", "V_g", "V_re")]
        return ModelParts(cls.name, tuple(m for m in CATALOGUE if m.key in built), tuple(branches), tuple(terms))

    def _build_heads(self, mcfg) -> int:
        parts = self.parts
        self.use_msd, self.use_cmg, self.use_fcr = bool(mcfg.use_msd), bool(mcfg.use_cmg), bool(mcfg.use_fcr)
        if parts.builds(R.key) or parts.builds(GATE.key):
            self.dga = DictionaryGranularityAlignment(mcfg)
        if parts.builds(PDEC.key):
            self.decoder = PrototypeDecoder(mcfg.dim, mcfg.num_prototypes, mcfg.pgu_depth, mcfg.pgu_heads,
                                            mcfg.pgu_head_dim, mcfg.pgu_ffn)
        self.proj = PartProjection(mcfg.num_prototypes, mcfg.dim, mcfg.embed_dim)
        return mcfg.num_prototypes

    def _image_retrieval_tokens(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dga is None:
            return V, None
        M = self.dga.foreground(V)
        return self.dga.reconstruct_image(V, M), M

    def _text_retrieval_tokens(self, T: torch.Tensor) -> torch.Tensor:
        return self.dga.reconstruct_text(T) if self.dga is not None else T

    def _guided_tokens(self, V: torch.Tensor, T: torch.Tensor, text_mask: torch.Tensor,
                       M: torch.Tensor | None) -> torch.Tensor:
        return self.dga.cross_modal_guidance(V, T, text_mask, M)
