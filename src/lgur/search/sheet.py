"""Results sheets: each query's text above a row of its top-k gallery crops with rank and score.

Hits from a video index (`lgur index --video`) show the crop beside a thumbnail of its whole frame with
the box drawn and the time stamped, and say which video, when, and the time span of the person's track.

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
from lgur.search.explain import explanation_image, hit_panels, part_color, words_html
from lgur.search.paths import OutsideGallery
from lgur.search.searcher import Hit, QueryResult, fmt_time

THUMB_H, THUMB_W = 160, 80  # person crops are ~2:1
FRAME_W = 214                # frame thumbnails: fitted into FRAME_W x THUMB_H (4:3 fits exactly)
BORDER = 4
COLORS = {True: (22, 163, 74), False: (220, 38, 38), None: (180, 180, 180)}
BOX_COLOR = (255, 40, 40)


def thumbnail(hit: Hit) -> Image.Image:
    """The hit's image fitted into THUMB_W x THUMB_H (a labelled grey box if it cannot be read)."""
    try:
        im = hit.image()  # read inside the gallery only
    except (*DECODE_ERRORS, OutsideGallery):
        im = Image.new("RGB", (THUMB_W, THUMB_H), (200, 200, 200))
        ImageDraw.Draw(im).text((8, THUMB_H // 2), "missing", fill=(90, 90, 90))
        return im
    # fit, enlarging small crops too (people cut from footage are often 30x80 px)
    scale = min(THUMB_W / im.width, THUMB_H / im.height)
    return im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BICUBIC)


def frame_thumbnail(hit: Hit) -> Image.Image | None:
    """A video hit's frame fitted into FRAME_W x THUMB_H, its box drawn and its time stamped; None for
    hits that are not video crops (or whose frame image is gone)."""
    m = hit.video
    if m is None or hit.frame_file is None:
        return None
    try:
        im = load_rgb(hit.frame_file)
    except DECODE_ERRORS:
        return None
    fw, fh = (a or b for a, b in zip(m["frame_size"], im.size))
    im.thumbnail((FRAME_W, THUMB_H), Image.Resampling.BICUBIC)
    sx, sy = im.width / max(fw, 1), im.height / max(fh, 1)
    x1, y1, x2, y2 = (float(v) for v in m["box"])
    d = ImageDraw.Draw(im)
    d.rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=BOX_COLOR, width=2)
    font = ImageFont.load_default(size=12)
    stamp = fmt_time(m["t"])
    tw = d.textlength(stamp, font=font)
    d.rectangle([0, im.height - 16, tw + 6, im.height], fill=(0, 0, 0))
    d.text((3, im.height - 15), stamp, fill="white", font=font)
    return im


def _jpeg_src(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _video_caption(h: Hit) -> str:
    m = h.video
    span = m["span"]
    return f"{m['video']} {fmt_time(m['t'])} (track {fmt_time(span[0])}-{fmt_time(span[1])})"


def _css_color(correct: bool | None) -> str:
    return "#%02x%02x%02x" % COLORS[correct]


def write_html(results: Sequence[QueryResult], out: str | Path, embed: bool = True, title: str = "lgur search") -> Path:
    """One section per query: the text, then a row of the hits (thumbnail, rank, score, path)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:16px}.row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:24px}"
             "figure{margin:0;text-align:center;font-size:12px;width:96px}"
             f"figure.video{{width:{THUMB_W + FRAME_W + 24}px}}"
             f"img{{height:{THUMB_H}px;max-width:{THUMB_W + 8}px;object-fit:contain;border:{BORDER}px solid}}"
             f"img.frame{{max-width:{FRAME_W + 8}px;margin-left:4px}}"
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
            frame = frame_thumbnail(h)  # embedded even when embed=False: the box and time are drawn into it
            video = " video" if frame is not None else ""
            frame_img = (f"<img class='frame' src='{_jpeg_src(frame)}' style='border-color:{_css_color(h.correct)}' "
                         f"alt='frame'>" if frame is not None else "")
            where = f"<br>{html.escape(_video_caption(h))}" if frame is not None else ""
            parts.append(f"<figure class='hit{mark}{video}'><img src='{html.escape(src, quote=True)}' "
                         f"style='border-color:{_css_color(h.correct)}' alt='{html.escape(h.path, quote=True)}'>"
                         f"{frame_img}<figcaption>#{h.rank} {h.score:.3f}{where}<br>{html.escape(h.path)}"
                         f"</figcaption></figure>")
        parts.append("</div>")
    parts.append("</body></html>")
    out.write_text("".join(parts), encoding="utf-8")
    return out


def write_png(results: Sequence[QueryResult], out: str | Path, max_chars: int = 110) -> Path:
    """The same sheet as one PNG: per query a wrapped text line, then the crops with '#rank score'."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    frames = [[frame_thumbnail(h) for h in r.hits] for r in results]
    video = any(f is not None for fs in frames for f in fs)
    cell_w, line_h, pad = THUMB_W + 2 * BORDER + 8 + (FRAME_W + 2 * BORDER + 4 if video else 0), 18, 10
    k = max((len(r.hits) for r in results), default=0)
    wrapped = [textwrap.wrap(r.query, max_chars) or [""] for r in results]
    width = max(pad * 2 + k * cell_w, 480)
    caption_lines = 3 if video else 1
    row_h = [len(w) * line_h + THUMB_H + 2 * BORDER + caption_lines * line_h + 2 * pad for w in wrapped]
    sheet = Image.new("RGB", (width, max(sum(row_h), 1)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for r, lines, h_row, fthumbs in zip(results, wrapped, row_h, frames):
        ty = y + pad
        for line in lines:
            draw.text((pad, ty), line, fill="black", font=font)
            ty += line_h
        for j, (h, fim) in enumerate(zip(r.hits, fthumbs)):
            x = pad + j * cell_w
            draw.rectangle([x, ty, x + THUMB_W + 2 * BORDER - 1, ty + THUMB_H + 2 * BORDER - 1], fill=COLORS[h.correct])
            im = thumbnail(h)
            sheet.paste(im, (x + BORDER + (THUMB_W - im.width) // 2, ty + BORDER + (THUMB_H - im.height) // 2))
            draw.text((x, ty + THUMB_H + 2 * BORDER + 2), f"#{h.rank} {h.score:.3f}", fill="black", font=font)
            if fim is not None:
                fx = x + THUMB_W + 2 * BORDER + 4
                draw.rectangle([fx, ty, fx + fim.width + 2 * BORDER - 1, ty + fim.height + 2 * BORDER - 1],
                               fill=COLORS[h.correct])
                sheet.paste(fim, (fx + BORDER, ty + BORDER))
                m = h.video
                span = m["span"]
                base = ty + THUMB_H + 2 * BORDER + 2
                draw.text((x, base + line_h), f"{m['video']} @ {fmt_time(m['t'])}", fill="black", font=small)
                draw.text((x, base + 2 * line_h), f"track {fmt_time(span[0])}-{fmt_time(span[1])}", fill="black",
                          font=small)
        y += h_row
    sheet.save(out)
    return out


# ------------------------------------------------------------------------------------------ explained sheets
# (`lgur search --explain --html/--png`; the explanations come from lgur.search.explain.explain_result)

def _crop(hit: Hit) -> Image.Image:
    try:
        return hit.image()
    except (*DECODE_ERRORS, OutsideGallery):
        im = Image.new("RGB", (THUMB_W, THUMB_H), (200, 200, 200))
        ImageDraw.Draw(im).text((8, THUMB_H // 2), "missing", fill=(90, 90, 90))
        return im


def write_explained_html(results: Sequence[QueryResult], explanations: Sequence, out: str | Path,
                         title: str = "lgur search: explained") -> Path:
    """Per query: its words coloured by the prototype part that attends to them most; per hit the crop, the
    foreground map and the attention map of its strongest part (each at the crop's size), then the parts ranked
    by their share of the score with each part's top words. Self-contained (images embedded)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:sans-serif;margin:16px}.row{display:flex;flex-wrap:wrap;gap:18px;margin-bottom:28px}"
             "figure{margin:0;font-size:12px}.panels{display:flex;gap:4px}.panels div{text-align:center}"
             f"img{{height:{THUMB_H}px;border:{BORDER}px solid}}.q{{font-size:17px}}.lim{{color:#a16207}}"
             "table{border-collapse:collapse;font-size:12px}td{padding:0 6px 0 0}</style></head><body>"]
    for r, ex in zip(results, explanations):
        parts.append(f"<h3 class='q'>{words_html(ex)}</h3>")
        if ex.limitations:
            parts.append("<p class='lim'>" + "; ".join(html.escape(x) for x in ex.limitations) + "</p>")
        parts.append("<div class='row'>")
        for h, hx in zip(r.hits, ex.hits):
            panels = "".join(f"<div><img src='{_jpeg(im)}' style='border-color:{_css_color(h.correct)}' "
                             f"alt='{html.escape(name, quote=True)}'><br>{html.escape(name)}</div>"
                             for name, im in hit_panels(_crop(h), hx))
            rows = "".join(f"<tr style='color:{part_color(p.part)}'><td>part {p.part}</td>"
                           f"<td>{p.contribution:+.3f}</td><td>{html.escape(', '.join(w for w, _ in p.top_words))}"
                           f"</td></tr>" for p in hx.parts)
            parts.append(f"<figure class='hit'><div class='panels'>{panels}</div><figcaption>#{h.rank} "
                         f"score {h.score:.3f} &middot; {html.escape(h.path)}<table>{rows}</table>"
                         f"</figcaption></figure>")
        parts.append("</div>")
    parts.append(f"<p>Part maps: {html.escape(explanations[0].reduction) if explanations else ''}; "
                 "contributions add up to the score.</p></body></html>")
    out.write_text("".join(parts), encoding="utf-8")
    return out


def _jpeg(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def write_explained_png(results: Sequence[QueryResult], explanations: Sequence, out: str | Path,
                        height: int = 200) -> Path:
    """The explained sheet as one PNG: per query lgur.search.explain.explanation_image, stacked."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    images = [explanation_image(ex, [_crop(h) for h in r.hits], height, [f"#{h.rank}" for h in r.hits],
                                [_css_color(h.correct) if h.correct is not None else None for h in r.hits])
              for r, ex in zip(results, explanations)]
    sheet = Image.new("RGB", (max([im.width for im in images] or [1]), max(sum(im.height for im in images), 1)),
                      "white")
    y = 0
    for im in images:
        sheet.paste(im, (0, y))
        y += im.height
    sheet.save(out)
    return out
