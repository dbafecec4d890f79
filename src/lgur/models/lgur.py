"""The LGUR model: backbones + DGA + PGU + per-part ID classifiers (lgur-reference §1).

Training path (`forward`) returns the four branch part stacks, each (B, K, embed_dim):

    V_g  = PGU(R(V, T) * M)     text-guided image branch (CMG)
    V_re = PGU(R(V, D) * M)     image retrieval branch (MSD + FCR)
    T    = PGU(T)               raw text branch
    T_re = PGU(R(T, D))         text retrieval branch (MSD)

Test path (`encode_*`) computes only V_re / T_re and returns concat_k(parts) / (norm + 1e-8).

Ablations (model.use_*; model.name=baseline): "V_re"/"T_re" always name the *retrieval* branch, i.e.
the reconstruction when MSD is on and otherwise the (gated) backbone tokens. The raw branches exist
when something distinguishes them from the retrieval branch: with CMG the image raw branch is V_g,
with MSD but no CMG it is the plain tokens ("V", the official `image_DETR(None, V)` path); without
MSD the text raw branch "T" is the same tensor as "T_re". Without PGU the masked token mean feeds the
K part projections. The baseline (issue #4) mean-pools the backbone tokens, projects each modality
with its own 1x1 projection (one part) and shares one ID classifier.
"""
from __future__ import annotations

import torch
from torch import nn

from lgur.errors import ConfigError
from lgur.models.dga import DictionaryGranularityAlignment
from lgur.models.pgu import PartClassifier, PartProjection, PrototypeDecoder

MODEL_NAMES = ("lgur", "baseline")


def retrieval_embedding(parts: torch.Tensor) -> torch.Tensor:
    """(B, K, E) part stack -> (B, K*E), part 0 first, divided by (L2 norm + 1e-8) as the official test."""
    flat = parts.flatten(1)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-8)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over valid tokens: (B, N, d), (B, N) or None -> (B, d)."""
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def check_model_config(mcfg) -> None:
    """Refuse head settings that cannot build, with the offending key named."""
    if mcfg.name not in MODEL_NAMES:
        raise ConfigError(f"model.name must be one of {', '.join(MODEL_NAMES)}, got {mcfg.name!r}")
    for key in ("dim", "embed_dim", "dict_size", "num_prototypes", "recon_heads", "recon_head_dim",
                "recon_ffn", "recon_depth", "pgu_heads", "pgu_head_dim", "pgu_ffn", "pgu_depth"):
        value = mcfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")


class LGUR(nn.Module):
    """Holds `image`, `text` (backbones), the enabled heads and `classifiers` (None if num_classes=0)."""

    def __init__(self, mcfg, image: nn.Module, text: nn.Module, num_classes: int = 0,
                 max_caption_tokens: int = 100):
        super().__init__()
        check_model_config(mcfg)
        self.image, self.text = image, text
        self.max_caption_tokens = max_caption_tokens
        self.baseline = mcfg.name == "baseline"
        self.use_msd = self.use_cmg = self.use_fcr = False
        self.dga = self.decoder = self.text_proj = None
        if self.baseline:
            self.num_parts = 1
            self.proj = PartProjection(1, mcfg.dim, mcfg.embed_dim)       # image 1x1 projection
            self.text_proj = PartProjection(1, mcfg.dim, mcfg.embed_dim)  # text 1x1 projection
        else:
            self.num_parts = mcfg.num_prototypes
            self.use_msd, self.use_cmg, self.use_fcr = bool(mcfg.use_msd), bool(mcfg.use_cmg), bool(mcfg.use_fcr)
            if self.use_msd or self.use_cmg or self.use_fcr:
                self.dga = DictionaryGranularityAlignment(mcfg)
            if mcfg.use_pgu:
                self.decoder = PrototypeDecoder(mcfg.dim, mcfg.num_prototypes, mcfg.pgu_depth, mcfg.pgu_heads,
                                                mcfg.pgu_head_dim, mcfg.pgu_ffn)
            self.proj = PartProjection(mcfg.num_prototypes, mcfg.dim, mcfg.embed_dim)
        self.embedding_dim = self.num_parts * mcfg.embed_dim  # width of encode_* outputs
        self.classifiers = PartClassifier(self.num_parts, mcfg.embed_dim, num_classes) if num_classes > 0 else None

    # pass-throughs the data/search areas need
    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def image_mean(self) -> tuple:
        return tuple(self.image.mean)

    @property
    def image_std(self) -> tuple:
        return tuple(self.image.std)

    # ---- shared pieces of the training and test paths
    def _parts(self, tokens: torch.Tensor, key_mask: torch.Tensor | None, text: bool) -> torch.Tensor:
        """PGU (or masked mean pooling) + part projections: (B, N, d) -> (B, K, embed)."""
        if self.decoder is not None:
            H = self.decoder(tokens, key_mask)
        else:
            H = masked_mean(tokens, key_mask)[:, None].expand(-1, self.num_parts, -1)
        proj = self.text_proj if text and self.text_proj is not None else self.proj
        return proj(H)

    def _branches(self, tokens: dict[str, torch.Tensor], key_mask: torch.Tensor | None,
                  text: bool) -> dict[str, torch.Tensor]:
        """Run several same-modality branches through PGU as ONE batch (they share every weight)."""
        n = len(tokens)
        if n == 1:
            return {k: self._parts(v, key_mask, text) for k, v in tokens.items()}
        mask = key_mask.repeat(n, 1) if key_mask is not None else None
        parts = self._parts(torch.cat(list(tokens.values())), mask, text)
        return dict(zip(tokens, parts.chunk(n)))

    def _image_retrieval_tokens(self, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.dga is None:
            return V, None
        M = self.dga.foreground(V)
        return self.dga.reconstruct_image(V, M), M

    def _text_retrieval_tokens(self, T: torch.Tensor) -> torch.Tensor:
        return self.dga.reconstruct_text(T) if self.dga is not None else T

    # ---- training path
    def heads(self, V: torch.Tensor, T: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """All training branches from backbone tokens V (B, P, d), T (B, L, d), text_mask (B, L)."""
        V_re, M = self._image_retrieval_tokens(V)
        images = {"V_re": V_re}
        texts = {"T_re": self._text_retrieval_tokens(T)}
        if self.use_cmg:
            images["V_g"] = self.dga.cross_modal_guidance(V, T, text_mask, M)
        elif self.use_msd:
            images["V"] = V
        if self.use_msd:
            texts["T"] = T
        out = {**self._branches(images, None, text=False), **self._branches(texts, text_mask, text=True)}
        if self.use_cmg and not self.use_msd:
            out["T"] = out["T_re"]  # no dictionary: the raw text branch IS the retrieval branch
        return out

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: torch.Tensor | None = None, text_hidden: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Training path: dict of (B, K, embed_dim) branch part stacks (see the module docstring).
        `lengths`: the batch's caption lengths on the CPU (no device->host sync; see backbones.text).
        `text_hidden`: the frozen text backbone's output for these captions, precomputed
        (train.cache_text, lgur.engine.text_cache); then only the text encoder's trainable part runs."""
        if text_hidden is None:
            T = self.text(input_ids, attention_mask, lengths)
        else:
            from lgur.models.backbones.text import host_lengths

            T = self.text.encode_hidden(text_hidden, host_lengths(attention_mask, lengths))
        return self.heads(self.image(images), T, attention_mask[:, : T.shape[1]])

    # ---- test path (dual encoder: no CMG, no V_g)
    def embed_image_tokens(self, V: torch.Tensor) -> torch.Tensor:
        return retrieval_embedding(self._parts(self._image_retrieval_tokens(V)[0], None, text=False))

    def embed_text_tokens(self, T: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return retrieval_embedding(self._parts(self._text_retrieval_tokens(T), text_mask, text=True))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K*embed_dim) L2-normalised retrieval embeddings."""
        return self.embed_image_tokens(self.image(images))

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids + mask (B, L) [+ CPU lengths (B,)] -> (B, K*embed_dim) L2-normalised retrieval embeddings."""
        T = self.text(input_ids, attention_mask, lengths)
        return self.embed_text_tokens(T, attention_mask[:, : T.shape[1]])

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Raw caption strings -> embeddings (tokenised like the datasets: [CLS]/[SEP], truncated)."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True,
                               max_length=self.max_caption_tokens, return_tensors="pt")
        device = next(self.parameters()).device
        lengths = batch["attention_mask"].sum(1)  # counted on the CPU, before the copy to the device
        return self.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device), lengths)


def build_model(cfg, num_classes: int, pretrained: bool = True) -> LGUR:
    """The model described by cfg.model (backbones from lgur.models.backbones). num_classes=0: no classifiers."""
    from lgur.models.backbones import build_image_backbone, build_text_encoder

    mcfg = cfg.model
    check_model_config(mcfg)
    image = build_image_backbone(mcfg, cfg.data.image_size, pretrained)
    return LGUR(mcfg, image, build_text_encoder(mcfg, pretrained),
                num_classes=num_classes, max_caption_tokens=cfg.data.max_caption_tokens)
