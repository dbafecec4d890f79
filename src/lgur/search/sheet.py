"""Results sheets: each query's text above a row of its top-k gallery crops with rank and score.

HTML is self-contained (thumbnails embedded as base64 JPEG) unless `embed=False`, which links the images by
paths relative to the sheet. PNG is drawn with PIL. Hits whose correctness is known get a green (correct)
or red (wrong) border; unknown ones a grey border. A gallery image deleted since indexing is drawn as a
grey placeholder named "missing" instead of failing the sheet.
"""
from __future__ import annotations

import base64
import html
import io
import os
import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from lgur.data.images import DECODE_ERRORS, load_rgb
from lgur.search.searcher import Hit, QueryResult

THUMB_H, THUMB_W = 160, 80  # person crops are ~2:1
BORDER = 4
COLORS = {True: (22, 163, 74), False: (220, 38, 38), None: (180, 180, 180)}


def thumbnail(hit: Hit) -> Image.Image:
    """The hit's image fitted into THUMB_W x THUMB_H (a labelled grey box if it cannot be read)."""
    try:
        im = load_rgb(hit.file)
    except DECODE_ERRORS:
        im = Image.new("RGB", (THUMB_W, THUMB_H), (200, 200, 200))
        ImageDraw.Draw(im).text((8, THUMB_H // 2), "missing", fill=(90, 90, 90))
        return im
    im.thumbnail((THUMB_W, THUMB_H), Image.Resampling.BICUBIC)
    return im


def _css_color(correct: bool | None) -> str:
    return "#%02x%02x%02x" % COLORS[correct]


def write_html(results: Sequence[QueryResult], out: str | Path, embed: bool = True, title: str = "lgur search") -> Path:
    """One section per query: the text, then a row of the hits (thumbnail, rank, score, path)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:16px}.row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:24px}"
             "figure{margin:0;text-align:center;font-size:12px;width:96px}"
             f"img{{height:{THUMB_H}px;max-width:{THUMB_W + 8}px;object-fit:contain;border:{BORDER}px solid}}"
             "figcaption{overflow-wrap:anywhere}</style></head><body>"]
    for r in results:
        parts.append(f"<h3>{html.escape(r.query)}</h3><div class='row'>")
        for h in r.hits:
            if embed:
                buf = io.BytesIO()
                thumbnail(h).save(buf, "JPEG", quality=88)
                src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
            else:
                src = Path(os.path.relpath(h.file, out.parent.resolve())).as_posix()
            mark = {True: " correct", False: " wrong", None: ""}[h.correct]
            parts.append(f"<figure class='hit{mark}'><img src='{html.escape(src, quote=True)}' "
                         f"style='border-color:{_css_color(h.correct)}' alt='{html.escape(h.path, quote=True)}'>"
                         f"<figcaption>#{h.rank} {h.score:.3f}<br>{html.escape(h.path)}</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    out.write_text("".join(parts), encoding="utf-8")
    return out


def write_png(results: Sequence[QueryResult], out: str | Path, max_chars: int = 110) -> Path:
    """The same sheet as one PNG: per query a wrapped text line, then the crops with '#rank score'."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=14)
    cell_w, line_h, pad = THUMB_W + 2 * BORDER + 8, 18, 10
    k = max((len(r.hits) for r in results), default=0)
    wrapped = [textwrap.wrap(r.query, max_chars) or [""] for r in results]
    width = max(pad * 2 + k * cell_w, 480)
    row_h = [len(w) * line_h + THUMB_H + 2 * BORDER + line_h + 2 * pad for w in wrapped]
    sheet = Image.new("RGB", (width, max(sum(row_h), 1)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r, lines, h_row in zip(results, wrapped, row_h):
        ty = y + pad
        for line in lines:
            draw.text((pad, ty), line, fill="black", font=font)
            ty += line_h
        for j, h in enumerate(r.hits):
            x = pad + j * cell_w
            draw.rectangle([x, ty, x + THUMB_W + 2 * BORDER - 1, ty + THUMB_H + 2 * BORDER - 1], fill=COLORS[h.correct])
            im = thumbnail(h)
            sheet.paste(im, (x + BORDER + (THUMB_W - im.width) // 2, ty + BORDER + (THUMB_H - im.height) // 2))
            draw.text((x, ty + THUMB_H + 2 * BORDER + 2), f"#{h.rank} {h.score:.3f}", fill="black", font=font)
        y += h_row
    sheet.save(out)
    return out
