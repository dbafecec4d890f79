"""Synthetic pedestrian dataset: determinism, counts, splits, caption/attribute agreement, learnability."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from lgur.cli import main
from lgur.data.annotations import load_annotations
from lgur.data.synth import (BAGS, COLOR_WORDS, LOWER, MENTION, NOUNS, SHOES, UPPER, describe, generate,
                             sample_identities)
from lgur.errors import DataError

IDS, PER_ID = 10, 3


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    generate(out, IDS, seed=7, images_per_id=PER_ID, workers=1, progress=False)
    return out


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_counts_and_reader(synth):
    recs = json.loads((synth / "reid_raw.json").read_text())
    assert len(recs) == IDS * PER_ID
    assert all(set(r) == {"file_path", "captions", "processed_tokens", "id", "split"} for r in recs)
    assert all(len(r["captions"]) == 2 and r["captions"][0] != r["captions"][1] for r in recs)
    assert all(r["processed_tokens"][0] == re.findall(r"[a-z0-9]+", r["captions"][0].lower()) for r in recs)
    with Image.open(synth / "imgs" / recs[0]["file_path"]) as im:
        assert (im.format, im.size) == ("JPEG", (128, 384))
    assert (synth / "preview.png").is_file()
    ann = load_annotations(synth, verify_images=True)
    assert ann.layout == "cuhk-pedes" and len(ann.problems) == 0
    assert ann.counts() == {"train": {"images": 24, "captions": 48, "ids": 8},
                            "val": {"images": 3, "captions": 6, "ids": 1},
                            "test": {"images": 3, "captions": 6, "ids": 1}}
    # splits are by identity: no id in two splits, ids in order like CUHK-PEDES
    splits = {s: {r["id"] for r in recs if r["split"] == s} for s in ("train", "val", "test")}
    assert splits == {"train": set(range(1, 9)), "val": {9}, "test": {10}}


def test_deterministic_per_seed_and_worker_count(synth, tmp_path):
    again = tmp_path / "again"
    generate(again, IDS, seed=7, images_per_id=PER_ID, workers=2, progress=False)
    assert _files(again) == _files(synth)  # same bytes, whatever the number of processes
    other = tmp_path / "other"
    generate(other, IDS, seed=8, images_per_id=PER_ID, workers=1, progress=False)
    assert _files(other)["reid_raw.json"] != _files(synth)["reid_raw.json"]
    with pytest.raises(DataError, match="already holds a dataset"):
        generate(other, IDS, seed=8, images_per_id=PER_ID, workers=1, progress=False)


def test_identities_are_distinct():
    ids = sample_identities(500, seed=0)
    described = {tuple(v for k, v in a.items() if k not in ("skin", "build")) for a in ids}
    assert len(described) == 500
    assert {a["gender"] for a in ids} == {"male", "female"}
    assert all(a["lower_type"] in ("trousers", "shorts") for a in ids if a["gender"] == "male")


def _allowed_phrases(a: dict) -> list[tuple[str, str]]:
    """(category, 'colour word + item words') pairs a caption of identity `a` may contain."""
    items = [("upper", a["upper_color"], UPPER[a["upper_type"]]), ("lower", a["lower_color"], LOWER[a["lower_type"]]),
             ("shoes", a["shoes_color"], SHOES[a["shoes_type"]]),
             ("hair", a["hair_color"], ["hair", "ponytail"] if a["hair_style"] == "ponytail" else ["hair"])]
    if a["bag_type"] != "none":
        items.append(("bag", a["bag_color"], BAGS[a["bag_type"]]))
    colors = {"blond": ["blond"]} | COLOR_WORDS
    return [(cat, f"{w} {s}") for cat, color, syns in items for w in colors[color] for s in syns]


def _check_caption(caption: str, a: dict) -> set[str]:
    """Asserts the caption agrees with the attributes; returns the categories it mentions."""
    text = caption.lower()
    allowed = _allowed_phrases(a)
    color_words = sorted({w for ws in COLOR_WORDS.values() for w in ws} | {"blond"})
    for m in re.finditer(r"\b(" + "|".join(color_words) + r")\b", text):
        rest = text[m.start():]
        assert any(rest.startswith(p) and not rest[len(p):len(p) + 1].isalpha() for _, p in allowed), \
            f"colour word at '{rest[:30]}' matches no attribute of {a} in: {caption}"
    mentioned = {cat for cat, p in allowed if re.search(rf"\b{re.escape(p)}\b", text)}
    assert "upper" in mentioned, caption
    other = "female" if a["gender"] == "male" else "male"
    assert not any(re.search(rf"\b{n}\b", text) for n in NOUNS[other]), caption
    style = a["hair_style"]
    assert ("ponytail" in text) == (style == "ponytail" and "hair" in mentioned), caption
    assert not re.search(r"\blong \w+ hair", text) or style == "long", caption
    assert not re.search(r"\bshort \w+ hair", text) or style == "short", caption
    if a["bag_type"] == "none":
        assert not any(re.search(rf"\b{b}\b", text) for syns in BAGS.values() for b in syns if b != "bag"), caption
    return mentioned


def test_captions_agree_with_attributes(synth):
    meta = {m["id"]: m["attributes"] for m in json.loads((synth / "attributes.json").read_text())}
    for r in json.loads((synth / "reid_raw.json").read_text()):
        for c in r["captions"]:
            _check_caption(c, meta[r["id"]])


def test_caption_variety_and_optional_attributes():
    rng = np.random.default_rng(0)
    identities = sample_identities(200, seed=1)
    captions, mentions = [], {k: 0 for k in ("lower", "shoes", "hair")}
    for a in identities:
        for _ in range(5):
            c = describe(a, rng)
            captions.append(c)
            got = _check_caption(c, a)
            for k in mentions:
                mentions[k] += k in got
    n = len(captions)
    assert len(set(captions)) == n  # no two captions alike
    for k, count in mentions.items():  # optional attributes are sometimes left out
        assert 0.25 < count / n < 0.97, (k, count / n, MENTION[k])
    starts = {" ".join(c.split()[:2]).lower() for c in captions}
    assert len(starts) > 20  # many different openings (templates, determiners, nouns)
    lengths = [len(c.split()) for c in captions]
    assert 8 <= np.mean(lengths) <= 40 and max(lengths) < 80


def test_images_of_an_identity_look_alike(synth_root):
    """Leave-one-out 1-NN on colour histograms finds the same identity far above chance: the identity's
    attributes, not the nuisances, dominate its appearance (the shared 24 ids x 4 images set)."""
    feats, ids = [], []
    for r in json.loads((synth_root / "reid_raw.json").read_text()):
        x = np.asarray(Image.open(synth_root / "imgs" / r["file_path"]).convert("RGB"))[40:360, 32:96] // 64
        h = np.bincount((x[..., 0] * 16 + x[..., 1] * 4 + x[..., 2]).ravel(), minlength=64).astype(float)
        feats.append(np.sqrt(h / h.sum()))
        ids.append(r["id"])
    f, ids = np.stack(feats), np.array(ids)
    sim = f @ f.T
    np.fill_diagonal(sim, -1)
    accuracy = (ids[sim.argmax(1)] == ids).mean()
    chance = 3 / 95  # each image's 3 same-id images among the 95 others
    assert accuracy > 5 * chance, accuracy


def test_synth_cli(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "d"), "--ids", "3", "--images-per-id", "1", "--seed", "1", "--workers", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "d" / "reid_raw.json").read_text())) == 3
    assert main(["synth", str(tmp_path / "d"), "--ids", "3"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "e"), "--ids", "2"]) == 2
