"""Synthetic pedestrian dataset: the embedded default for the demo and the tests.

Each identity is a combination of attributes (gender, hair, upper and lower garment type and colour,
shoes, bag) that its captions mention, so a text->image model can learn to match them; the images of
one identity differ only in nuisances (pose, view, background, scale/position, lighting, blur, noise,
JPEG artefacts, a passer-by partly in front or behind). The nuisances imitate fixed-camera footage, so
that a model trained here transfers to real crops (tests/data/vtest_real): most backgrounds are windows
of a real empty plaza (backgrounds/vtest_plaza.jpg: the median over time of OpenCV's vtest.avi, made by
tools/vtest_real.py), the rest procedural street clutter; most images go through a camera model (the
walker rendered at a low native resolution, sensor noise, video-grade JPEG, then upscaled) with muted
colours. The output uses the CUHK-PEDES layout, so the real reader reads it:

    OUT/reid_raw.json      [{file_path, captions, processed_tokens, id, split}, ...]
    OUT/imgs/<split>/<id>_<k>.jpg
    OUT/attributes.json    [{id, split, attributes, images}, ...] (ground truth for tests)
    OUT/preview.png        contact sheet of the first identities with one caption each

Everything is drawn from numpy generators seeded by (seed, id, image), so a seed gives the same bytes
regardless of the number of worker processes.
"""
from __future__ import annotations

import functools
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont
from tqdm import tqdm

from lgur.errors import DataError

IMAGE_SIZE = (384, 128)  # H, W (CUHK-PEDES resize size)
_SS = 2  # supersampling factor of the drawing canvas (smooth edges after the downscale)
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train/val/test identities, in id order like CUHK-PEDES
JPEG_QUALITY = 90
BACKGROUNDS = Path(__file__).with_name("backgrounds")  # real empty-scene photos (*.jpg), see the docstring
REAL_BACKGROUND_P = 0.65  # images on a window of a real background (else procedural clutter)
CAMERA_P = 0.75           # images through the low-resolution camera model
OCCLUDER_P = 0.3          # images with a second walker partly in front of or behind the person

COLORS = {
    "red": (200, 30, 35), "blue": (35, 75, 195), "green": (40, 140, 60), "yellow": (235, 205, 40),
    "black": (28, 28, 32), "white": (236, 236, 236), "gray": (128, 128, 132), "pink": (240, 140, 185),
    "purple": (120, 50, 155), "orange": (240, 120, 25), "brown": (120, 75, 40), "navy": (28, 34, 74),
}
# words a caption may use for a colour
COLOR_WORDS = {c: ([c, "grey"] if c == "gray" else [c]) for c in COLORS}
HAIR_COLORS = {"black": (22, 20, 20), "brown": (95, 58, 30), "blond": (215, 180, 100)}
SKIN_TONES = [(241, 200, 170), (226, 176, 140), (198, 136, 98), (158, 106, 72), (108, 72, 50)]

# type -> caption synonyms (the first is the canonical name); plural types take no article
UPPER = {
    "t-shirt": ["t-shirt", "tee shirt", "short-sleeved shirt", "short sleeve top"],
    "shirt": ["long-sleeved shirt", "long sleeve shirt", "button-up shirt", "shirt with long sleeves"],
    "jacket": ["jacket", "zip-up jacket", "light jacket"],
    "coat": ["coat", "long coat", "overcoat"],
    "hoodie": ["hoodie", "hooded sweatshirt", "hooded top"],
    "tank top": ["tank top", "sleeveless top", "sleeveless shirt"],
}
LOWER = {
    "trousers": ["pants", "trousers", "long pants", "slacks", "jeans"],
    "shorts": ["shorts", "short pants"],
    "skirt": ["skirt", "short skirt", "knee-length skirt"],
    "long skirt": ["long skirt", "maxi skirt", "ankle-length skirt"],
}
SHOES = {"sneakers": ["sneakers", "shoes", "trainers", "running shoes"], "boots": ["boots", "ankle boots"]}
BAGS = {"backpack": ["backpack", "rucksack"], "shoulder bag": ["shoulder bag", "messenger bag", "bag"],
        "handbag": ["handbag", "purse", "hand bag"]}
PLURAL = {"trousers", "shorts", "sneakers", "boots"}
HAIR_STYLES = ("short", "long", "ponytail")
NOUNS = {"male": ["man", "guy", "male", "gentleman", "young man"],
         "female": ["woman", "lady", "girl", "female", "young woman"],
         None: ["person", "pedestrian", "individual"]}

# how often a caption mentions an optional attribute (the upper garment is always mentioned)
MENTION = {"gender": 0.85, "lower": 0.9, "shoes": 0.55, "bag": 0.8, "hair": 0.55}


def _pick(rng: np.random.Generator, seq, p=None):
    return seq[int(rng.choice(len(seq), p=p))]


# ---------------------------------------------------------------------------------------------------
# identities


def sample_identity(rng: np.random.Generator) -> dict:
    """Attributes of one identity (everything the captions may mention, plus unmentioned body shape)."""
    male = rng.random() < 0.5
    colors = list(COLORS)
    upper_color = _pick(rng, colors)
    lower_color = _pick(rng, colors)
    while lower_color == upper_color and rng.random() < 0.8:  # mostly contrasting outfits
        lower_color = _pick(rng, colors)
    has_bag = rng.random() < 0.7
    return {
        "gender": "male" if male else "female",
        "hair_style": _pick(rng, HAIR_STYLES, [0.85, 0.1, 0.05] if male else [0.2, 0.5, 0.3]),
        "hair_color": _pick(rng, list(HAIR_COLORS), [0.6, 0.3, 0.1]),
        "upper_type": _pick(rng, list(UPPER)),
        "upper_color": upper_color,
        "lower_type": _pick(rng, list(LOWER), [0.7, 0.3, 0, 0] if male else [0.4, 0.15, 0.25, 0.2]),
        "lower_color": lower_color,
        "shoes_type": _pick(rng, list(SHOES), [0.75, 0.25]),
        "shoes_color": _pick(rng, ["black", "white", "brown", "gray", "red", "blue"]),
        "bag_type": _pick(rng, list(BAGS)) if has_bag else "none",
        "bag_color": _pick(rng, colors) if has_bag else None,
        "skin": int(rng.integers(len(SKIN_TONES))),
        "build": float(rng.uniform(0.9, 1.12)),
    }


_CORE = ("gender", "upper_type", "upper_color", "lower_type", "lower_color", "bag_type", "bag_color")
_DESCRIBED = _CORE + ("hair_style", "hair_color", "shoes_type", "shoes_color")


def sample_identities(num_ids: int, seed: int) -> list[dict]:
    """Distinct identities: the described attributes never repeat, and the main outfit (gender, garments,
    bag) repeats only when the attempts to find a new one run out."""
    rng = np.random.default_rng([seed, 0x5EED])
    seen_core, seen_all, out = set(), set(), []
    while len(out) < num_ids:
        for _ in range(50):
            a = sample_identity(rng)
            core, full = tuple(a[k] for k in _CORE), tuple(a[k] for k in _DESCRIBED)
            if core not in seen_core and full not in seen_all:
                break
        if full in seen_all:
            continue
        seen_core.add(core)
        seen_all.add(full)
        out.append(a)
    return out


# ---------------------------------------------------------------------------------------------------
# captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(rng: np.random.Generator, color: str, kind: str, synonyms: list[str]) -> str:
    """'a red t-shirt', 'blue pants', 'an orange hoodie'."""
    phrase = f"{_pick(rng, COLOR_WORDS[color])} {_pick(rng, synonyms)}"
    return phrase if kind in PLURAL else f"{_article(phrase)} {phrase}"


def _hair_phrase(rng: np.random.Generator, a: dict) -> str:
    color = a["hair_color"]
    if a["hair_style"] == "ponytail":
        return _pick(rng, [f"{color} hair in a ponytail", f"{_article(color)} {color} ponytail"])
    return f"{a['hair_style']} {color} hair"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def describe(a: dict, rng: np.random.Generator) -> str:
    """One natural caption: a subject sentence with the garments, then optional sentences in random
    order. Templates, synonyms, word order and which optional attributes appear all vary."""
    gender = a["gender"] if rng.random() < MENTION["gender"] else None
    noun = _pick(rng, NOUNS[gender])
    he, his = {"male": ("he", "his"), "female": ("she", "her"), None: (f"the {noun}", "their")}[gender]
    upper = _np(rng, a["upper_color"], a["upper_type"], UPPER[a["upper_type"]])
    garments = [upper]
    if rng.random() < MENTION["lower"]:
        lower = _np(rng, a["lower_color"], a["lower_type"], LOWER[a["lower_type"]])
        garments.insert(int(rng.random() < 0.4), lower)
    shoes = f"{_pick(rng, COLOR_WORDS[a['shoes_color']])} {_pick(rng, SHOES[a['shoes_type']])}"
    say_shoes = rng.random() < MENTION["shoes"]
    if say_shoes and rng.random() < 0.5:
        garments.append(shoes)
        say_shoes = False
    hair = _hair_phrase(rng, a) if rng.random() < MENTION["hair"] else None

    det = _pick(rng, ["a", "the", "this"])
    subject = f"{_article(noun) if det == 'a' else det} {noun}"
    if hair and rng.random() < 0.5:
        subject, hair = f"{subject} with {hair}", None
    verb = _pick(rng, ["wearing", "is wearing", "is dressed in", "in", "wears", "is walking in"])
    sentences = [_cap(f"{subject} {verb} {_join(garments)}.")]

    extras = []
    if hair:
        extras.append(_pick(rng, [f"{he} has {hair}.", f"{he} has got {hair}."]))
    if say_shoes:
        extras.append(_pick(rng, [f"{he} is wearing {shoes}.", f"{he} has on {shoes}.",
                                  f"on {his} feet are {shoes}."]))
    if a["bag_type"] != "none" and rng.random() < MENTION["bag"]:
        bag = _np(rng, a["bag_color"], a["bag_type"], BAGS[a["bag_type"]])
        where = {"backpack": f" on {his} back", "shoulder bag": f" over {his} shoulder",
                 "handbag": f" in {his} hand"}[a["bag_type"]]
        extras.append(_pick(rng, [f"{he} is carrying {bag}{where}.", f"{he} carries {bag}.",
                                  f"{he} has {bag}{where}."]))
    elif a["bag_type"] == "none" and rng.random() < 0.3:
        extras.append(_pick(rng, [f"{he} is not carrying a bag.", f"{he} has nothing in {his} hands."]))
    if rng.random() < 0.15:
        extras.append(_pick(rng, [f"{he} is walking down the street.", f"{he} seems to be in a hurry."]))
    rng.shuffle(extras)
    return " ".join(sentences + [_cap(s) for s in extras])


def tokens(caption: str) -> list[str]:
    """CUHK-PEDES style processed_tokens: lower-cased words without punctuation."""
    return re.findall(r"[a-z0-9]+", caption.lower())


# ---------------------------------------------------------------------------------------------------
# rendering


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 14) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.normal(0, amount), 0, 255)) for c in rgb)


def _shade(rgb, f: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


def _muted(rng: np.random.Generator, lo: float, hi: float) -> tuple[int, ...]:
    """A random clutter colour, half-way to grey so that garments stand out from the scene."""
    c = rng.uniform(lo, hi, 3)
    return tuple(int(v) for v in (c + c.mean()) / 2)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Street-like clutter: a muted wall with windows/signs/poles, a ground plane, a few blobs."""
    wall = rng.uniform(60, 200, 3) * rng.uniform(0.7, 1.0) + rng.uniform(-25, 25)
    ground = rng.uniform(60, 170, 3)
    horizon = int(h * rng.uniform(0.55, 0.78))
    ys = np.linspace(0, 1, h)[:, None, None]
    column = np.where(np.arange(h)[:, None, None] < horizon, wall * (0.85 + 0.3 * ys), ground * (0.8 + 0.35 * ys))
    canvas = Image.fromarray(np.clip(column, 0, 255).astype(np.uint8)).resize((w, h), Image.NEAREST)
    d = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 9))):  # windows, doors, signs
        x0, y0 = rng.uniform(-0.2 * w, w), rng.uniform(0, horizon)
        bw, bh = rng.uniform(0.1, 0.6) * w, rng.uniform(0.03, 0.25) * h
        d.rectangle([x0, y0, x0 + bw, y0 + bh], fill=_muted(rng, 30, 230))
    for _ in range(int(rng.integers(0, 3))):  # poles
        x0 = rng.uniform(0, w)
        d.rectangle([x0, rng.uniform(0, 0.4) * h, x0 + rng.uniform(3, 10), h], fill=_muted(rng, 40, 160))
    for _ in range(int(rng.integers(0, 4))):  # bushes, cars, passers-by at the edges
        cx, cy, r = rng.uniform(0, w), rng.uniform(horizon - 0.1 * h, h), rng.uniform(0.1, 0.35) * w
        d.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], fill=_muted(rng, 30, 200))
    return canvas


class _Body:
    """Maps body coordinates (x: fraction of body height from the centre line, y: fraction of body height
    from the top of the head) to canvas pixels."""

    def __init__(self, cx: float, top: float, height: float):
        self.cx, self.top, self.h = cx, top, height

    def p(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.h, self.top + y * self.h)

    def poly(self, d: ImageDraw.ImageDraw, pts, fill) -> None:
        d.polygon([self.p(x, y) for x, y in pts], fill=fill)

    def ellipse(self, d: ImageDraw.ImageDraw, x0, y0, x1, y1, fill) -> None:
        (a, b), (c, e) = self.p(x0, y0), self.p(x1, y1)
        d.ellipse([min(a, c), min(b, e), max(a, c), max(b, e)], fill=fill)

    def line(self, d: ImageDraw.ImageDraw, pts, fill, width: float) -> None:
        d.line([self.p(x, y) for x, y in pts], fill=fill, width=max(1, int(width * self.h)))


def _limb(x0, y0, x1, y1, w0, w1):
    """Quadrilateral from (x0, y0) to (x1, y1), width w0 at the start and w1 at the end."""
    dx, dy = x1 - x0, y1 - y0
    n = (dx * dx + dy * dy) ** 0.5 or 1.0
    nx, ny = -dy / n, dx / n
    return [(x0 + nx * w0 / 2, y0 + ny * w0 / 2), (x1 + nx * w1 / 2, y1 + ny * w1 / 2),
            (x1 - nx * w1 / 2, y1 - ny * w1 / 2), (x0 - nx * w0 / 2, y0 - ny * w0 / 2)]


def _along(x0, y0, x1, y1, t):
    return x0 + (x1 - x0) * t, y0 + (y1 - y0) * t


def _draw_person(d: ImageDraw.ImageDraw, b: _Body, a: dict, rng: np.random.Generator) -> None:
    """Head, hair, neck, torso garment, arms with sleeves and hands, legs with the lower garment, shoes
    and the bag, in front or back view with a random walking pose. Colours get a little per-image shift."""
    front = rng.random() < 0.6
    male = a["gender"] == "male"
    skin = _jitter(rng, SKIN_TONES[a["skin"]], 6)
    upper = _jitter(rng, COLORS[a["upper_color"]])
    lower = _jitter(rng, COLORS[a["lower_color"]])
    shoes = _jitter(rng, COLORS[a["shoes_color"]], 10)
    hair = _jitter(rng, HAIR_COLORS[a["hair_color"]], 8)
    bag = _jitter(rng, COLORS[a["bag_color"]]) if a["bag_color"] else None
    k = a["build"]
    sw = (0.112 if male else 0.098) * k  # half shoulder width
    hw = (0.080 if male else 0.090) * k  # half hip width
    ys, yw, yh, yk, ya = 0.165, 0.42, 0.49, 0.71, 0.935  # shoulders, waist, hips, knees, ankles
    stance = rng.uniform(0.0, 0.06)
    swing = rng.uniform(0.02, 0.09, 2)
    utype, ltype = a["upper_type"], a["lower_type"]
    hem = {"coat": 0.6, "jacket": 0.5, "hoodie": 0.5}.get(utype, 0.48)

    # behind the body: long hair, hood, backpack seen from the front
    if a["hair_style"] == "long":
        b.poly(d, [(-0.065, 0.04), (0.065, 0.04), (0.075, 0.26), (-0.075, 0.26)], hair)
    if utype == "hoodie":
        b.ellipse(d, -0.08, 0.09, 0.08, 0.19, _shade(upper, 0.85))
    if a["bag_type"] == "backpack" and front:
        b.poly(d, [(-sw - 0.02, 0.19), (sw + 0.02, 0.19), (sw + 0.025, 0.43), (-sw - 0.025, 0.43)], _shade(bag, 0.8))

    # legs: (hip x, ankle x) per leg; the lower garment covers them down to `cover`
    legs = [(-hw * 0.5, -hw * 0.5 - stance), (hw * 0.5, hw * 0.5 + stance)]
    cover = {"trousers": ya, "shorts": 0.65}.get(ltype, 0.0)
    for x0, x1 in legs:
        b.poly(d, _limb(x0, yh - 0.03, x1, ya, 0.085 * k, 0.05), skin)
        if cover:
            xc, _ = _along(x0, yh - 0.03, x1, ya, (cover - yh + 0.03) / (ya - yh + 0.03))
            b.poly(d, _limb(x0, yh - 0.03, xc, cover, 0.09 * k, 0.06 if cover == ya else 0.08), lower)
    if cover:  # seat of the trousers/shorts
        b.poly(d, [(-hw, yw), (hw, yw), (hw * 1.02, yh + 0.03), (-hw * 1.02, yh + 0.03)], lower)
    # shoes
    for _, x1 in legs:
        if a["shoes_type"] == "boots":
            b.poly(d, _limb(x1, 0.87, x1, 0.975, 0.058, 0.058), shoes)
        b.ellipse(d, x1 - 0.035, 0.945, x1 + 0.04, 0.995, shoes)
    # skirts over the legs
    if ltype in ("skirt", "long skirt"):
        end, flare = (0.71, 0.05) if ltype == "skirt" else (0.9, 0.07)
        b.poly(d, [(-hw * 0.95, yw), (hw * 0.95, yw), (hw + flare, end), (-hw - flare, end)], lower)

    # neck and torso garment
    b.poly(d, [(-0.022, 0.12), (0.022, 0.12), (0.025, ys + 0.01), (-0.025, ys + 0.01)], skin)
    top_w = sw * (0.72 if utype == "tank top" else 1.0)
    if utype == "tank top":  # bare shoulders
        b.poly(d, [(-sw, ys + 0.005), (sw, ys + 0.005), (sw, ys + 0.04), (-sw, ys + 0.04)], skin)
    flare = 0.03 if utype == "coat" else 0.0
    b.poly(d, [(-top_w, ys), (top_w, ys), (hw * 0.98, yw), (hw + flare, hem), (-hw - flare, hem), (-hw * 0.98, yw)], upper)
    if front:
        b.ellipse(d, -0.03, ys - 0.012, 0.03, ys + 0.02, skin)  # neckline
        if utype in ("jacket", "coat"):
            b.line(d, [(0, ys + 0.02), (0, hem)], _shade(upper, 0.6), 0.006)
        if utype == "hoodie":
            b.poly(d, [(-0.055, 0.36), (0.055, 0.36), (0.065, 0.45), (-0.065, 0.45)], _shade(upper, 0.8))
        if utype == "shirt":
            for y in (0.22, 0.28, 0.34, 0.40):
                b.ellipse(d, -0.006, y, 0.006, y + 0.01, _shade(upper, 0.65))

    # arms: sleeve length depends on the upper garment; hands at the wrists
    sleeve = {"t-shirt": 0.35, "tank top": 0.0}.get(utype, 1.0)
    hand_pos = []
    for side, sw_ in ((-1, swing[0]), (1, swing[1])):
        x0, y0 = side * (sw - 0.012), ys + 0.012
        x1, y1 = x0 + side * sw_ * 0.9, 0.5 - sw_ * 0.3
        b.poly(d, _limb(x0, y0, x1, y1, 0.055 * k, 0.04), skin)
        if sleeve:
            xs, ys_ = _along(x0, y0, x1, y1, sleeve)
            b.poly(d, _limb(x0, y0, xs, ys_, 0.062 * k, 0.05 if sleeve == 1 else 0.058), upper)
        b.ellipse(d, x1 - 0.022, y1 - 0.01, x1 + 0.022, y1 + 0.04, skin)
        hand_pos.append((x1, y1 + 0.03))

    # head and hair: the hair is a slightly larger head behind the face, so a hairline shows
    long_hair = a["hair_style"] == "long"
    if front:
        b.ellipse(d, -0.061, -0.004, 0.061, 0.125 if a["hair_style"] == "short" else 0.15, hair)
        if long_hair:
            b.poly(d, [(-0.064, 0.05), (0.064, 0.05), (0.07, 0.22), (-0.07, 0.22)], hair)
        if a["hair_style"] == "ponytail":
            b.ellipse(d, 0.04, 0.03, 0.085, 0.15, hair)
        b.ellipse(d, -0.052, 0.03 if a["hair_style"] == "short" else 0.038, 0.052, 0.14, skin)
        for ex in (-0.022, 0.022):
            b.ellipse(d, ex - 0.007, 0.07, ex + 0.007, 0.082, (35, 30, 30))
        b.line(d, [(-0.014, 0.112), (0.014, 0.112)], _shade(skin, 0.7), 0.005)
    else:
        b.ellipse(d, -0.055, 0.01, 0.055, 0.14, skin)
        b.ellipse(d, -0.06, 0.0, 0.06, 0.12 if a["hair_style"] == "short" else 0.14, hair)
        if long_hair:
            b.poly(d, [(-0.062, 0.06), (0.062, 0.06), (0.075, 0.26), (-0.075, 0.26)], hair)
        if a["hair_style"] == "ponytail":
            b.ellipse(d, -0.025, 0.1, 0.025, 0.24, hair)

    # bag
    if a["bag_type"] == "backpack":
        if front:
            for s in (-1, 1):
                b.line(d, [(s * sw * 0.62, ys), (s * sw * 0.68, 0.36)], _shade(bag, 0.85), 0.018)
        else:
            b.poly(d, [(-sw * 0.85, 0.19), (sw * 0.85, 0.19), (sw * 0.9, 0.45), (-sw * 0.9, 0.45)], bag)
            b.poly(d, [(-sw * 0.6, 0.33), (sw * 0.6, 0.33), (sw * 0.62, 0.43), (-sw * 0.62, 0.43)], _shade(bag, 0.8))
    elif a["bag_type"] == "shoulder bag":
        s = 1 if rng.random() < 0.5 else -1
        b.line(d, [(-s * sw * 0.7, ys), (s * (hw + 0.03), 0.44)], _shade(bag, 0.85), 0.012)
        b.poly(d, [(s * (hw - 0.01), 0.42), (s * (hw + 0.085), 0.42), (s * (hw + 0.085), 0.52),
                   (s * (hw - 0.01), 0.52)], bag)
    elif a["bag_type"] == "handbag":
        hx, hy = hand_pos[int(rng.random() < 0.5)]
        b.line(d, [(hx - 0.02, hy + 0.02), (hx, hy - 0.01), (hx + 0.02, hy + 0.02)], _shade(bag, 0.7), 0.008)
        b.poly(d, [(hx - 0.045, hy + 0.02), (hx + 0.045, hy + 0.02), (hx + 0.05, hy + 0.1), (hx - 0.05, hy + 0.1)], bag)


@functools.lru_cache(maxsize=None)
def _real_backgrounds() -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(Image.open(p).convert("RGB")) for p in sorted(BACKGROUNDS.glob("*.jpg")))


def _real_background(rng: np.random.Generator, h: int, w: int) -> Image.Image | None:
    """A random window of a real background at the canvas's aspect ratio, as tall as a detector's box
    around a walker in that scene is (vtest.avi: walkers ~25 % of the frame height), maybe mirrored."""
    images = _real_backgrounds()
    if not images:
        return None
    img = images[int(rng.integers(len(images)))]
    H, W = img.shape[:2]
    ch = int(min(rng.uniform(0.2, 0.55) * H, W * h / w))
    cw = max(int(ch * w / h), 1)
    y0, x0 = int(rng.integers(0, H - ch + 1)), int(rng.integers(0, W - cw + 1))
    crop = Image.fromarray(img[y0:y0 + ch, x0:x0 + cw])
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return crop.resize((w, h), Image.BILINEAR)


def _camera(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Fixed-camera footage: the walker is seen at a low native resolution (a box 90-260 px tall), with
    sensor noise and video-grade JPEG at that resolution, then upscaled to the image size."""
    w, h = img.size
    nh = int(rng.uniform(90, 260))
    nw = max(int(round(nh * w / h)), 8)
    small = np.asarray(img.resize((nw, nh), Image.BILINEAR), dtype=np.float32)
    small = small + rng.standard_normal(small.shape, dtype=np.float32) * rng.uniform(2, 8)
    buf = io.BytesIO()
    Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=int(rng.integers(25, 80)))
    buf.seek(0)
    with Image.open(buf) as jpeg:
        return jpeg.convert("RGB").resize((w, h), Image.BICUBIC)


def render(a: dict, rng: np.random.Generator, size: tuple[int, int] = IMAGE_SIZE) -> Image.Image:
    """One image of an identity with random pose, view, background, placement, passer-by, lighting,
    colour, blur and camera degradation."""
    h, w = size[0] * _SS, size[1] * _SS
    canvas = _real_background(rng, h, w) if rng.random() < REAL_BACKGROUND_P else None
    if canvas is None:
        canvas = _background(rng, h, w)
    height = h * rng.uniform(0.72, 0.94)
    top = rng.uniform(0.01 * h, max(h - height - 0.005 * h, 0.011 * h))
    body = _Body(w / 2 + rng.uniform(-0.1, 0.1) * w, top, height)
    draw = ImageDraw.Draw(canvas)
    occluder = None
    if rng.random() < OCCLUDER_P:  # another walker, off-centre, of similar size, behind or in front
        side = 1 if rng.random() < 0.5 else -1
        other = _Body(w / 2 + side * rng.uniform(0.45, 0.8) * w, top + rng.uniform(-0.08, 0.08) * h,
                      height * rng.uniform(0.85, 1.1))
        occluder = (other, sample_identity(rng), rng.random() < 0.4)
        if not occluder[2]:
            _draw_person(draw, other, occluder[1], rng)
    _draw_person(draw, body, a, rng)
    if occluder is not None and occluder[2]:
        _draw_person(draw, occluder[0], occluder[1], rng)
    img = np.asarray(canvas.resize((size[1], size[0]), Image.BOX), dtype=np.float32)
    gain = rng.uniform(0.72, 1.22) * rng.uniform(0.95, 1.05, 3)  # brightness and colour cast
    contrast = rng.uniform(0.8, 1.15)
    img = (img - img.mean()) * contrast + img.mean()
    img = img * gain.astype(np.float32) + rng.standard_normal(img.shape, dtype=np.float32) * rng.uniform(1, 6)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.55, 1.05))  # footage has muted colours
    radius = rng.uniform(0, 1.2)
    out = out.filter(ImageFilter.GaussianBlur(radius)) if radius > 0.3 else out
    return _camera(out, rng) if rng.random() < CAMERA_P else out


# ---------------------------------------------------------------------------------------------------
# dataset


def _split_of(k: int, n: int) -> str:
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * SPLIT_FRACTIONS[1])
    return "train" if k < n_train else "val" if k < n_train + n_val else "test"


def _make_identity(job: tuple) -> list[dict]:
    """Render and write the images of one identity; returns its annotation records."""
    out, seed, pid, split, attrs, images_per_id, size = job
    records = []
    for k in range(images_per_id):
        rng = np.random.default_rng([seed, pid, k])
        rel = f"{split}/{pid:05d}_{k}.jpg"
        render(attrs, rng, size).save(Path(out) / "imgs" / rel, quality=JPEG_QUALITY)
        captions = [describe(attrs, rng)]
        while len(captions) < 2:
            c = describe(attrs, rng)
            if c not in captions:
                captions.append(c)
        records.append({"file_path": rel, "captions": captions, "processed_tokens": [tokens(c) for c in captions],
                        "id": pid, "split": split})
    return records


def generate(out: str | Path, num_ids: int, seed: int = 0, images_per_id: int = 4, workers: int | None = None,
             overwrite: bool = False, progress: bool = True, image_size: tuple[int, int] = IMAGE_SIZE) -> Path:
    """Write a synthetic dataset in the CUHK-PEDES layout to `out` and return its annotation file.
    `image_size` (H, W): the stored images' size (CUHK-PEDES-like 384x128 by default; a model's input size
    saves decoding and resizing when only that model trains on it, as `lgur demo` does)."""
    out = Path(out)
    if num_ids < 3 or images_per_id < 1:
        raise DataError(f"synthetic dataset needs at least 3 ids and 1 image per id (got {num_ids}, {images_per_id})")
    if (out / "reid_raw.json").exists() and not overwrite:
        raise DataError(f"{out} already holds a dataset (reid_raw.json); pass --overwrite to replace it")
    identities = sample_identities(num_ids, seed)
    splits = [_split_of(k, num_ids) for k in range(num_ids)]
    for s in set(splits):
        (out / "imgs" / s).mkdir(parents=True, exist_ok=True)
    size = (int(image_size[0]), int(image_size[1]))
    jobs = [(str(out), seed, pid, splits[pid - 1], identities[pid - 1], images_per_id, size)
            for pid in range(1, num_ids + 1)]
    workers = min(workers or os.cpu_count() or 1, num_ids)
    bar = dict(total=num_ids, desc="rendering identities", unit="id", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            per_id = list(tqdm(pool.map(_make_identity, jobs, chunksize=8), **bar))
    else:
        per_id = [_make_identity(j) for j in tqdm(jobs, **bar)]
    records = [r for rs in per_id for r in rs]
    (out / "reid_raw.json").write_text(json.dumps(records))
    meta = [{"id": pid, "split": splits[pid - 1], "attributes": identities[pid - 1],
             "images": [r["file_path"] for r in per_id[pid - 1]]} for pid in range(1, num_ids + 1)]
    (out / "attributes.json").write_text(json.dumps(meta, indent=1))
    contact_sheet(out, records).save(out / "preview.png")
    return out / "reid_raw.json"


def contact_sheet(out: Path, records: list[dict], ids: int = 8) -> Image.Image:
    """Grid of the first `ids` identities (one row each: all their images and the first caption)."""
    by_id: dict[int, list[dict]] = {}
    for r in records:
        by_id.setdefault(r["id"], []).append(r)
    rows = list(by_id.values())[:ids]
    h, w = IMAGE_SIZE[0] // 2, IMAGE_SIZE[1] // 2
    cols = max(len(r) for r in rows)
    text_w = 420
    sheet = Image.new("RGB", (cols * (w + 4) + text_w, len(rows) * (h + 4)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, recs in enumerate(rows):
        for j, r in enumerate(recs):
            with Image.open(out / "imgs" / r["file_path"]) as im:
                sheet.paste(im.convert("RGB").resize((w, h)), (j * (w + 4), i * (h + 4)))
        words, lines, line = recs[0]["captions"][0].split(), [], ""
        for word in words:  # wrap the caption to the text column
            if len(line) + len(word) > 62:
                lines.append(line)
                line = ""
            line += word + " "
        lines.append(line)
        d.multiline_text((cols * (w + 4) + 6, i * (h + 4) + 6), f"id {recs[0]['id']}\n" + "\n".join(lines),
                         fill=(0, 0, 0), font=font)
    return sheet
