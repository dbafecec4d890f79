"""Explain search hits: which prototype part matched which words, and where on the crop (lgur.models.explain).

    from lgur.search.explain import explain_result
    [result] = searcher.search("a woman in a red coat", k=10)
    ex = explain_result(searcher, result)          # one recorded text forward + the index's stored maps
    ex.hits[0].parts[0]                            # the part that contributed most: contribution, top words

Per hit: the K part contributions (they add up to the hit's score), each part's attention over the crop's
patches and the foreground gate M (maps on the backbone's token grid). Per query: each part's attention over
the query's words. `overlay` draws a map over the crop at the crop's own size.

The image-side maps do not depend on the query: `lgur index` records them with the embeddings (maps.npy, fp16)
and they are read from the index like the embeddings; only rows without stored maps (an index built with
--no-explain-maps or by an older lgur) cost one recorded image forward of those crops.
"""
from __future__ import annotations

import contextlib
import html
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import matplotlib  # colour maps only (no pyplot, no backend choice)
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lgur.checkpoint import read_metadata
from lgur.data.images import DECODE_ERRORS
from lgur.data.transforms import build_test_transform
from lgur.models.explain import image_evidence, limitations, part_contributions, text_evidence, unpack_maps
from lgur.search.paths import OutsideGallery, load_gallery_image
from lgur.search.topk import torch_threads

# one colour per prototype part (tab10's first colours), used by the sheets and the web page alike
PART_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
TOP_WORDS = 3


def part_color(k: int) -> str:
    return PART_COLORS[k % len(PART_COLORS)]


@dataclass
class PartExplanation:
    part: int
    contribution: float                 # this part's share of the cosine score
    top_words: list[tuple[str, float]]  # the query words this part attends to most, with their weights

    def to_dict(self) -> dict:
        return {"part": self.part, "contribution": round(self.contribution, 6), "color": part_color(self.part),
                "top_words": [[w, round(a, 4)] for w, a in self.top_words]}


@dataclass
class HitExplanation:
    id: int
    score: float
    parts: list[PartExplanation]            # sorted by contribution, largest first
    part_attention: np.ndarray | None       # (K, h, w), each part's attention over the patches (sums to 1)
    foreground: np.ndarray | None           # (h, w), gate M in (0, 1)

    @property
    def strongest(self) -> int | None:
        return self.parts[0].part if self.parts else None

    def to_dict(self) -> dict:
        def grid(a):
            return None if a is None else np.round(a.astype(np.float64), 5).tolist()
        return {"id": self.id, "score": round(self.score, 6), "parts": [p.to_dict() for p in self.parts],
                "strongest": self.strongest, "part_attention": grid(self.part_attention),
                "foreground": grid(self.foreground)}


@dataclass
class QueryExplanation:
    query: str
    words: list[str]
    word_attention: np.ndarray | None  # (K, n_words), each part's attention over the words (rows sum to 1)
    word_part: list[int | None]        # per word, the part that attends to it most (its colour)
    hits: list[HitExplanation] = field(default_factory=list)
    limitations: list[str] = field(default_factory=list)
    reduction: str = "mean over the prototype decoder's layers and heads"

    def to_dict(self) -> dict:
        return {"query": self.query, "words": self.words, "word_part": self.word_part,
                "word_attention": None if self.word_attention is None
                else np.round(self.word_attention.astype(np.float64), 5).tolist(),
                "hits": [h.to_dict() for h in self.hits], "limitations": self.limitations,
                "reduction": self.reduction, "part_colors": PART_COLORS}


def _image_batch(searcher, ids: Sequence[int], load=None) -> tuple[torch.Tensor, list[bool]]:
    """The hits' crops through the model's test transform (a blank image where a file cannot be read).
    load(id) -> PIL image (default: the index's file; the server passes one that stays inside the gallery)."""
    cfg = read_metadata(searcher.checkpoint)["config"]
    transform = build_test_transform(cfg.data.image_size, searcher.model.image_mean, searcher.model.image_std,
                                     cfg.data.interpolation)
    tensors, ok = [], []
    for i in ids:
        try:
            im = (load(i) if load is not None
                  else load_gallery_image(searcher.index.images_root, searcher.index.files.path(i)))
            ok.append(True)
        except (*DECODE_ERRORS, OSError, ValueError, OutsideGallery):
            im = Image.new("RGB", tuple(cfg.data.image_size[::-1]), (128, 128, 128))
            ok.append(False)
        tensors.append(transform(im))
    return torch.stack(tensors), ok


@torch.no_grad()
def hit_maps(searcher, ids: Sequence[int], load=None) -> tuple[list, list]:
    """Per id: its part attention (K, h, w) and foreground (h, w) as fp32 numpy (None where the model has none):
    read from the index's stored maps; rows without stored maps from one recorded forward of their crops."""
    model, index = searcher.model, searcher.index
    pas: list = [None] * len(ids)
    fgs: list = [None] * len(ids)
    if not ids or (model.decoder is None and (model.dga is None or model.dga.gate is None)):
        return pas, fgs
    missing = list(range(len(ids)))
    layout = index.manifest.get("explain_maps")
    if index.maps is not None and layout:
        rows = np.asarray(index.maps[np.asarray(ids, dtype=np.int64)], dtype=np.float32)
        have = ~np.isnan(rows).all(axis=(1, 2))
        pa, fg = unpack_maps(rows, layout)
        for j in np.flatnonzero(have):
            pas[j] = None if pa is None else pa[j]
            fgs[j] = None if fg is None else fg[j]
        missing = np.flatnonzero(~have).tolist()
    if missing:
        images, _ = _image_batch(searcher, [ids[j] for j in missing], load)
        ev = image_evidence(model, images.to(next(model.parameters()).device))
        for n, j in enumerate(missing):
            pas[j] = None if ev.part_attention is None else ev.part_attention[n].float().cpu().numpy()
            fgs[j] = None if ev.foreground is None else ev.foreground[n].float().cpu().numpy()
    return pas, fgs


@torch.no_grad()
def explain_hits(searcher, query: str, ids: Sequence[int], load=None) -> QueryExplanation:
    """Explanations of gallery rows `ids` for `query`. Contributions come from the stored embeddings (so they
    add up to the score the search reported); maps from the index (see hit_maps)."""
    model = searcher.model
    with _model_turn(searcher):
        text = text_evidence(model, [query])
        pas, fgs = hit_maps(searcher, list(ids), load)
    txt_emb = text.embeddings[0].float().cpu()
    ids = list(ids)
    # only the hits' rows are read (the store may be many memory-mapped shards)
    stored = searcher.index.store.take(torch.tensor(ids, dtype=torch.long)).float().cpu() if ids \
        else torch.empty(0, txt_emb.numel())
    contrib = part_contributions(stored, txt_emb, model.num_parts)
    words = text.words[0]
    wa = text.word_attention[0].numpy() if text.word_attention is not None else None
    word_part = [int(wa[:, j].argmax()) for j in range(len(words))] if wa is not None else [None] * len(words)
    top = []
    for k in range(model.num_parts):
        order = np.argsort(-wa[k])[:TOP_WORDS] if wa is not None else []
        top.append([(words[j], float(wa[k, j])) for j in order])
    out = QueryExplanation(query, words, wa, word_part, limitations=limitations(model))
    for j, i in enumerate(ids):
        c = contrib[j].tolist()
        parts = sorted((PartExplanation(k, c[k], top[k]) for k in range(model.num_parts)),
                       key=lambda p: -p.contribution)
        pa, fg = pas[j], fgs[j]
        # the score recomputed in fp32 from the stored row: exactly the sum of the parts (the search's own score
        # may come from an fp16/bf16 scan and differ in the 3rd-4th digit)
        out.hits.append(HitExplanation(int(i), float(contrib[j].sum()), parts, pa, fg))
    return out


def explain_result(searcher, result, load=None) -> QueryExplanation:
    """Explain every hit of a QueryResult."""
    return explain_hits(searcher, result.query, [h.id for h in result.hits], load)


def _model_turn(searcher):
    """The searcher's model lock (recording attention sets state on shared modules: no other forward may run
    meanwhile, e.g. a search from another server thread) and its single-query thread count."""
    stack = contextlib.ExitStack()
    lock = getattr(searcher, "_lock", None)
    if lock is not None:
        stack.enter_context(lock)
    cfg = getattr(searcher, "cfg", None)
    if cfg is not None:
        stack.enter_context(torch_threads(int(cfg.single_query_threads)))
    return stack


def write_result_explanation(searcher, result, out, k: int = 3) -> "Path":
    """One PNG explaining a QueryResult's top `k` hits (what `lgur demo` writes as demo_out/explain.png)."""
    top = replace(result, hits=result.hits[:k])
    ex = explain_result(searcher, top)
    crops = []
    for h in top.hits:
        try:
            crops.append(h.image())
        except (*DECODE_ERRORS, OutsideGallery):
            crops.append(Image.new("RGB", (64, 128), (200, 200, 200)))
    labels = [f"#{h.rank}" + {True: " (correct)", False: " (wrong)", None: ""}[h.correct] for h in top.hits]
    return write_explanation_png(ex, crops, out, labels=labels)


def overlay(image: Image.Image, grid_map: np.ndarray, color: str | None = None, alpha: float = 0.55) -> Image.Image:
    """The crop with `grid_map` (h, w) drawn over it at the crop's own size: bilinear upsampling, scaled to its
    maximum; a heat colour map, or shades of `color` (hex) when given."""
    m = np.asarray(grid_map, dtype=np.float32)
    m = m / m.max() if m.max() > 0 else m
    heat = Image.fromarray((m * 255).astype(np.uint8), "L").resize(image.size, Image.Resampling.BILINEAR)
    h = np.asarray(heat, dtype=np.float32) / 255.0
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if color is None:
        rgb = matplotlib.colormaps["inferno"](h)[..., :3]
    else:
        c = np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255.0
        rgb = np.broadcast_to(c, base.shape)
    a = (alpha * h)[..., None]
    out = base * (1 - a) + rgb * a
    return Image.fromarray(np.clip(out * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")


# ------------------------------------------------------------------------------------------- pictures

def hit_panels(crop: Image.Image, hit: HitExplanation) -> list[tuple[str, Image.Image]]:
    """The pictures of one explained hit, each at the crop's size: the crop, the foreground gate over it, and
    the attention of its strongest part (in that part's colour)."""
    panels = [("crop", crop)]
    if hit.foreground is not None:
        panels.append(("foreground", overlay(crop, hit.foreground)))
    if hit.part_attention is not None and hit.strongest is not None:
        k = hit.strongest
        panels.append((f"part {k}", overlay(crop, hit.part_attention[k], color=part_color(k), alpha=0.75)))
    return panels


def words_html(ex: QueryExplanation) -> str:
    """The query with each word coloured by the part that attends to it most."""
    out = []
    for w, k in zip(ex.words, ex.word_part):
        style = f" style='color:{part_color(k)};font-weight:600' title='part {k}'" if k is not None else ""
        out.append(f"<span class='w'{style}>{html.escape(w)}</span>")
    return " ".join(out)


def parts_text(hit: HitExplanation, limit: int = 3) -> list[str]:
    """'part 2  +0.214  red, shirt' lines, strongest first."""
    return [f"part {p.part}  {p.contribution:+.3f}  " + ", ".join(w for w, _ in p.top_words)
            for p in hit.parts[:limit]]


def write_explanation_png(ex: QueryExplanation, crops: Sequence[Image.Image], out, height: int = 192,
                          labels: Sequence[str] | None = None) -> "Path":
    """One picture for a query: its words coloured by part, then per hit its panels (crop, foreground,
    strongest part) and its parts ranked by contribution."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    explanation_image(ex, crops, height, labels).save(out)
    return out


def explanation_image(ex: QueryExplanation, crops: Sequence[Image.Image], height: int = 192,
                      labels: Sequence[str] | None = None, borders: Sequence[str | None] | None = None) -> Image.Image:
    """The picture write_explanation_png saves (borders: an optional outline colour per hit, e.g. correct/wrong)."""
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    resized = [c.convert("RGB").resize((max(1, round(c.width * height / c.height)), height)) for c in crops]
    cols = [hit_panels(c, h) for c, h in zip(resized, ex.hits)]
    pad, gap, line = 12, 6, 16
    col_w = [max(sum(p.width for _, p in panels) + gap * (len(panels) - 1), 200) for panels in cols]
    width = max(pad * 2 + sum(col_w) + 3 * pad * max(len(cols) - 1, 0), 640)
    text_lines = 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    placed, x, y = [], pad, pad  # the query, word by word in its part's colour, wrapped
    for w, k in zip(ex.words, ex.word_part):
        if x > pad and x + measure.textlength(w, font=font) > width - pad:
            x, y = pad, y + line + 2
        placed.append((x, y, w, part_color(k) if k is not None else "black"))
        x += measure.textlength(w + " ", font=font)
    y0 = y + line + pad
    sheet = Image.new("RGB", (width, y0 + pad + line + height + (text_lines + 1) * line), "white")
    draw = ImageDraw.Draw(sheet)
    for x, y, w, fill in placed:
        draw.text((x, y), w, fill=fill, font=font)
    x = pad
    for j, (panels, hit, cw) in enumerate(zip(cols, ex.hits, col_w)):
        if borders is not None and borders[j] is not None:
            pw = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
            draw.rectangle([x - 3, y0 + line - 3, x + pw + 2, y0 + line + height + 2], outline=borders[j], width=3)
        px = x
        for name, im in panels:
            sheet.paste(im, (px, y0 + line))
            draw.text((px, y0), name, fill="black", font=small)
            px += im.width + gap
        ty = y0 + line + height + 4
        label = labels[j] if labels is not None else f"#{j + 1}"
        draw.text((x, ty), f"{label}  score {hit.score:.3f}", fill="black", font=font)
        for i, (text, p) in enumerate(zip(parts_text(hit, text_lines - 1), hit.parts)):
            draw.text((x, ty + (i + 1) * line), text, fill=part_color(p.part), font=small)
        x += cw + 3 * pad
    return sheet
