"""Why a crop matches a description, read off LGUR's own structure (no second model, no gradients).

The retrieval embedding is concat_k(part_k) / (norm + 1e-8) for both modalities, so the cosine score of an image
and a caption is a sum over the K prototype parts:

    score = sum_k <img_k, txt_k>          img_k, txt_k: part k's slice of the normalised embeddings

`part_contributions` returns these K terms; they add up to the score (float rounding only).

Where each part looks is the prototype decoder's (PGU) cross-attention: prototype k's query attends over the
image tokens (one per patch of the backbone's grid) or over the caption's tokens. Reduction: the MEAN over the
decoder's layers and heads. Every layer and head attends over the same keys, so each is a distribution and so is
their mean; padded caption tokens get the official -finfo.max logit, hence exactly zero probability. Word pieces
are summed back into the caption's words; the mass on [CLS]/[SEP] is reported apart and the word distribution is
renormalised over the words. The foreground gate M (FCR) is a per-patch value in (0, 1), reshaped to the grid.

The image-side maps do not depend on the query (LGUR is a dual encoder at test time), so they can be recorded
once, when a gallery is indexed, by the same forward that computes the embeddings.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from lgur.models.base import RetrievalModel, retrieval_embedding


def token_grid(num_tokens: int, image_size: Sequence[int]) -> tuple[int, int]:
    """(h, w) of the backbone's token grid for an (H, W) image: h * w = tokens and h / w = H / W
    (DeiT/CLIP/ResNet-50 at 384x128: 24x8; EfficientNet-Lite0: 12x4)."""
    H, W = image_size
    h = round(math.sqrt(num_tokens * H / W))
    if h < 1 or num_tokens % h or abs(h / (num_tokens // h) - H / W) > 1e-6:
        raise ValueError(f"{num_tokens} tokens do not form a grid with the aspect of a {H}x{W} image")
    return h, num_tokens // h


def part_contributions(image_embeddings: torch.Tensor, text_embedding: torch.Tensor, num_parts: int) -> torch.Tensor:
    """(N, K*E) normalised image embeddings, (K*E,) normalised text embedding -> (N, K) per-part terms whose
    row sums are the cosine scores."""
    n = image_embeddings.shape[0]
    img = image_embeddings.float().view(n, num_parts, -1)
    txt = text_embedding.float().view(num_parts, -1)
    return torch.einsum("nke,ke->nk", img, txt)


@contextmanager
def record_attention(model: RetrievalModel) -> Iterator[list[list[torch.Tensor]]]:
    """Inside the block, every forward of the prototype decoder appends, per layer, its attention probabilities
    (B, heads, K, tokens). Yields the per-layer lists ([] when the model has no decoder)."""
    if model.decoder is None:
        yield []
        return
    attns = [layer.attn for layer in model.decoder.block.layers]
    if attns[0].attention_log is not None:  # nested inside another recording: share its logs
        yield [attn.attention_log for attn in attns]
        return
    logs: list[list[torch.Tensor]] = [[] for _ in attns]
    for attn, log in zip(attns, logs):
        attn.attention_log = log
    try:
        yield logs
    finally:
        for attn in attns:
            attn.attention_log = None


def _mean_attention(logs: list[list[torch.Tensor]]) -> torch.Tensor | None:
    """Last recorded forward of each layer -> mean over layers and heads, (B, K, tokens)."""
    if not logs or not all(logs):
        return None
    return torch.stack([log[-1].float().mean(dim=1) for log in logs]).mean(dim=0)


@dataclass
class ImageEvidence:
    embeddings: torch.Tensor             # (B, K*E) retrieval embeddings (exactly what encode_images returns)
    part_attention: torch.Tensor | None  # (B, K, h, w) prototype attention over patches; None without PGU
    foreground: torch.Tensor | None      # (B, h, w) gate M in (0, 1); None without FCR
    grid: tuple[int, int]


@dataclass
class TextEvidence:
    embeddings: torch.Tensor                  # (B, K*E)
    words: list[list[str]]                    # per caption, its words as written
    word_attention: list[torch.Tensor] | None  # per caption (K, n_words), rows sum to 1; None without PGU
    special_mass: torch.Tensor | None         # (B, K) attention mass on [CLS]/[SEP] before renormalising


@torch.no_grad()
def image_evidence(model: RetrievalModel, images: torch.Tensor) -> ImageEvidence:
    """One forward of normalised images (B, 3, H, W) that returns the embeddings and the maps."""
    V = model.image(images)
    grid = token_grid(V.shape[1], images.shape[-2:])
    with record_attention(model) as logs:
        tokens, M = model._image_retrieval_tokens(V)
        emb = retrieval_embedding(model._parts(tokens, None, text=False))
    attn = _mean_attention(logs)
    b = V.shape[0]
    return ImageEvidence(
        embeddings=emb,
        part_attention=None if attn is None else attn.view(b, -1, *grid),
        foreground=None if M is None else M.float().view(b, *grid),
        grid=grid)


# ---- maps stored in a gallery index (lgur.search.index: maps.npy, manifest "explain_maps")
# One row per image, (K + 1, h * w): the K part maps then the foreground gate, fp16; a component the model does
# not have is NaN (the manifest says which exist); a row that is NaN throughout has no maps (it was reused from an
# index built without them) and is explained by a recorded forward instead.

def pack_maps(ev: ImageEvidence, num_parts: int) -> torch.Tensor | None:
    """ImageEvidence -> (B, K + 1, h * w) fp32 rows for the index, or None when the model has no maps."""
    if ev.part_attention is None and ev.foreground is None:
        return None
    b, (h, w) = ev.embeddings.shape[0], ev.grid
    out = torch.full((b, num_parts + 1, h * w), float("nan"))
    if ev.part_attention is not None:
        out[:, :num_parts] = ev.part_attention.float().reshape(b, num_parts, h * w).cpu()
    if ev.foreground is not None:
        out[:, num_parts] = ev.foreground.float().reshape(b, h * w).cpu()
    return out


def maps_layout(ev: ImageEvidence, num_parts: int) -> dict:
    """The manifest's "explain_maps" entry for rows packed from `ev`."""
    return {"grid": list(ev.grid), "parts": num_parts, "part_attention": ev.part_attention is not None,
            "foreground": ev.foreground is not None}


def unpack_maps(rows, layout: dict) -> tuple:
    """Stored rows (n, K + 1, h * w) -> (part attention (n, K, h, w) | None, foreground (n, h, w) | None) as fp32
    numpy, None for a component the layout lacks."""
    rows = np.asarray(rows, dtype=np.float32)
    (h, w), k = layout["grid"], layout["parts"]
    pa = rows[:, :k].reshape(len(rows), k, h, w) if layout.get("part_attention") else None
    fg = rows[:, k].reshape(len(rows), h, w) if layout.get("foreground") else None
    return pa, fg


def _words(tokenizer, caption: str, max_tokens: int) -> tuple[list[str], list[int | None]]:
    """The caption's words (as written) and, per token position, the index of its word (None for specials)."""
    enc = tokenizer(caption, truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    word_ids = enc.word_ids()
    spans: dict[int, list[int]] = {}
    for (start, end), w in zip(enc["offset_mapping"], word_ids):
        if w is not None:
            span = spans.setdefault(w, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    order = sorted(spans)
    index = {w: i for i, w in enumerate(order)}
    return [caption[spans[w][0]:spans[w][1]] for w in order], [None if w is None else index[w] for w in word_ids]


@torch.no_grad()
def text_evidence(model: RetrievalModel, captions: list[str]) -> TextEvidence:
    """One forward of a batch of captions that returns the embeddings and each part's attention over words."""
    tok = model.tokenizer
    batch = tok(list(captions), padding=True, truncation=True, max_length=model.max_caption_tokens,
                return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    T = model.text(ids, mask)
    key_mask = mask[:, : T.shape[1]]
    with record_attention(model) as logs:
        emb = retrieval_embedding(model._parts(model._text_retrieval_tokens(T), key_mask, text=True))
    attn = _mean_attention(logs)
    words, per_caption, special = [], [] if attn is not None else None, []
    for b, caption in enumerate(captions):
        ws, word_of_token = _words(tok, caption, model.max_caption_tokens)
        words.append(ws)
        if attn is None:
            continue
        a = attn[b, :, : len(word_of_token)].cpu()  # (K, tokens of this caption); padding beyond is exactly 0
        onto = torch.zeros(len(word_of_token), len(ws))
        for t, w in enumerate(word_of_token):
            if w is not None:
                onto[t, w] = 1.0
        on_words = a @ onto
        special.append(a.sum(dim=1) - on_words.sum(dim=1))
        per_caption.append(on_words / on_words.sum(dim=1, keepdim=True).clamp_min(1e-12))
    return TextEvidence(embeddings=emb, words=words, word_attention=per_caption,
                        special_mass=torch.stack(special) if special else None)


def limitations(model: RetrievalModel) -> list[str]:
    """What this model cannot explain (ablations / baseline), in words for the user."""
    out = []
    if model.decoder is None:
        out.append("no prototype decoder (PGU off or baseline): parts have no attention maps")
    if model.dga is None or model.dga.gate is None:
        out.append("no foreground gate (FCR off or baseline): no foreground map")
    return out
