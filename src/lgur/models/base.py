"""What the registered models share: backbones in, part stacks out, and the retrieval embedding.

`RetrievalModel` holds `image`, `text` (backbones), the heads a subclass builds, the K part
projections (`proj`) and `classifiers` (K ID classifiers, None if num_classes=0). It describes itself
with `describe(mcfg)` (lgur.models.parts.ModelParts) and keeps that description as `self.parts`.
The training path (`forward` -> `heads`) returns the branches the description lists; the test path
(`encode_*`) returns concat_k(parts) / (L2 norm + 1e-8) of the retrieval branch (V_re / T_re).

Subclasses register under their `model.name` in `MODELS` (lgur.models.lgur.LGUR: "lgur",
lgur.models.baseline.Baseline: "baseline"); lgur.models.build.build_model creates one by name.
"""
from __future__ import annotations

import torch
from torch import nn

from lgur.errors import ConfigError
from lgur.models.lengths import host_lengths
from lgur.models.parts import ModelParts
from lgur.models.pgu import PartClassifier
from lgur.models.registry import Registry

# model.name -> model class (a RetrievalModel subclass)
MODELS = Registry("model.name")

GUIDED = "V_g"  # the one branch that needs both modalities (CMG): computed only when declared


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
    MODELS.get(mcfg.name)
    for key in ("dim", "embed_dim", "dict_size", "num_prototypes", "recon_heads", "recon_head_dim",
                "recon_ffn", "recon_depth", "pgu_heads", "pgu_head_dim", "pgu_ffn", "pgu_depth"):
        value = mcfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be a positive integer, got {value!r}")


class RetrievalModel(nn.Module):
    """Backbones + the heads of a subclass + part projections + ID classifiers (see the module docstring).

    Subclasses set `name` (their model.name), implement `describe` and `_build_heads`, and may
    replace the hooks `_image_retrieval_tokens`, `_text_retrieval_tokens` and `_guided_tokens`.
    """

    name = ""

    def __init__(self, mcfg, image: nn.Module, text: nn.Module, num_classes: int = 0,
                 max_caption_tokens: int = 100):
        super().__init__()
        check_model_config(mcfg)
        if mcfg.name != self.name:
            raise ConfigError(f"model.name={mcfg.name!r}: {type(self).__name__} is the model named "
                              f"{self.name!r} (lgur.models.build_model picks the class by name)")
        self.parts: ModelParts = self.describe(mcfg, classifiers=num_classes > 0)
        # what `heads` computes, read off the description once (plain tuples: nothing to trace per step)
        self._plan = (self.parts.branch_keys("image", computed=True), self.parts.branch_keys("text", computed=True),
                      tuple((b.key, b.same_as) for b in self.parts.branches if b.same_as is not None))
        self.image, self.text = image, text
        self.max_caption_tokens = max_caption_tokens
        self.use_msd = self.use_cmg = self.use_fcr = False
        self.dga = self.decoder = self.text_proj = None
        self.num_parts = self._build_heads(mcfg)
        self.embedding_dim = self.num_parts * mcfg.embed_dim  # width of encode_* outputs
        self.classifiers = PartClassifier(self.num_parts, mcfg.embed_dim, num_classes) if num_classes > 0 else None
        self._check_parts()

    def _check_parts(self) -> None:
        """The built model is its description: every parameter belongs to a declared module, and every
        declared head module (all but the backbones, which are handed in) has parameters."""
        names = [n for n, _ in self.named_parameters()]
        unclaimed = self.parts.unclaimed(names)
        empty = [m.key for m in self.parts.modules if m.path.split(".")[0] not in ("image", "text")
                 and not any(m.owns(n) for n in names)]
        if unclaimed or empty:
            raise ValueError(f"{type(self).__name__} does not match its parts description: parameters no "
                             f"module claims {unclaimed[:6]}, declared modules not built {empty}")

    @classmethod
    def describe(cls, mcfg, classifiers: bool = True) -> ModelParts:
        """The modules, branches and loss terms of this model for the config's switches."""
        raise NotImplementedError

    def _build_heads(self, mcfg) -> int:
        """Build the heads and the part projections (`proj`); return the number of parts K."""
        raise NotImplementedError

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
        """(tokens of V_re, foreground gate M or None)."""
        return V, None

    def _text_retrieval_tokens(self, T: torch.Tensor) -> torch.Tensor:
        return T

    def _guided_tokens(self, V: torch.Tensor, T: torch.Tensor, text_mask: torch.Tensor,
                       M: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no {GUIDED} branch")

    # ---- training path
    def heads(self, V: torch.Tensor, T: torch.Tensor, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training branches of `self.parts` from backbone tokens V (B, P, d), T (B, L, d), text_mask
        (B, L): same-modality branches through PGU as one batch, then the declared aliases."""
        image_keys, text_keys, aliases = self._plan
        V_re, M = self._image_retrieval_tokens(V)
        tokens = {"V_re": V_re, "T_re": self._text_retrieval_tokens(T), "V": V, "T": T}
        if GUIDED in image_keys:
            tokens[GUIDED] = self._guided_tokens(V, T, text_mask, M)
        images = {k: tokens[k] for k in image_keys}
        texts = {k: tokens[k] for k in text_keys}
        out = {**self._branches(images, None, text=False), **self._branches(texts, text_mask, text=True)}
        for key, same_as in aliases:
            out[key] = out[same_as]
        return out

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                lengths: torch.Tensor | None = None, text_hidden: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """Training path: dict of (B, K, embed_dim) branch part stacks (self.parts.branches).
        `lengths`: the batch's caption lengths on the CPU (no device->host sync; see backbones.text).
        `text_hidden`: the frozen text backbone's output for these captions, precomputed
        (train.cache_text, lgur.engine.text_cache); then only the text encoder's trainable part runs."""
        if text_hidden is None:
            T = self.text(input_ids, attention_mask, lengths)
        else:
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
                     lengths: torch.Tensor | None = None, static: bool = False) -> torch.Tensor:
        """Token ids + mask (B, L) [+ CPU lengths (B,)] -> (B, K*embed_dim) L2-normalised retrieval embeddings.
        static: the text encoder's static-shape path (the same numbers; what ONNX export traces)."""
        T = self.text.forward_static(input_ids, attention_mask) if static else self.text(input_ids, attention_mask,
                                                                                          lengths)
        return self.embed_text_tokens(T, attention_mask[:, : T.shape[1]])

    @torch.no_grad()
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        """Raw caption strings -> embeddings (tokenised like the datasets: [CLS]/[SEP], truncated)."""
        batch = self.tokenizer(list(captions), padding=True, truncation=True,
                               max_length=self.max_caption_tokens, return_tensors="pt")
        device = next(self.parameters()).device
        lengths = batch["attention_mask"].sum(1)  # counted on the CPU, before the copy to the device
        return self.encode_texts(batch["input_ids"].to(device), batch["attention_mask"].to(device), lengths)
