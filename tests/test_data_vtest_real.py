"""The small real test set (tests/data/vtest_real: crops of walkers in OpenCV's vtest.avi with hand-written
captions, tools/vtest_real.py) is intact, readable by the CUHK-PEDES reader, and evaluable. Measuring how
well the demo model transfers to it takes a trained model: `lgur demo` prints it (README, demo section)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

REAL = Path(__file__).parent / "data" / "vtest_real"


def test_real_set_integrity():
    from lgur.data.annotations import load_annotations

    records = json.loads((REAL / "reid_raw.json").read_text())
    ann = load_annotations(REAL, max_bad_fraction=None)
    ann.raise_if_unusable(0.0, splits=("test",))
    assert ann.layout == "cuhk-pedes" and len(ann.problems) == 0
    assert ann.counts()["test"] == {"images": 15, "captions": 30, "ids": 8}
    assert not ann.train and not ann.val
    total = 0
    frames = {}
    for r in records:
        path = REAL / "imgs" / r["file_path"]
        total += path.stat().st_size
        with Image.open(path) as im:
            assert im.format == "JPEG" and 40 <= im.width <= 120 and 100 <= im.height <= 220
            assert abs(im.width - r["box"][2]) <= 1 and abs(im.height - r["box"][3]) <= 1
        x, y, w, h = r["box"]
        assert 0 <= x and 0 <= y and x + w <= 768 and y + h <= 576 and 0 <= r["frame"] < 795
        assert len(r["captions"]) == 2 and all(len(c.split()) >= 8 for c in r["captions"])
        frames.setdefault(r["id"], set()).add(r["frame"])
    assert total < 1_000_000
    # two images of one person come from different moments of the video
    assert all(len(f) == n for f, n in ((frames[i], sum(r["id"] == i for r in records)) for i in frames))


def test_real_set_background_shipped_with_the_renderer():
    from lgur.data.synth import BACKGROUNDS, _real_backgrounds

    files = sorted(BACKGROUNDS.glob("*.jpg"))
    assert [f.name for f in files] == ["vtest_plaza.jpg"]
    (bg,) = _real_backgrounds()
    assert bg.shape == (288, 384, 3) and bg.std() > 20


@pytest.mark.parametrize("seed", [0])
def test_real_set_evaluates_with_chance_levels(seed):
    """A cheap end-to-end check: the tiny random model evaluates on the set (every caption ranked
    against the 15 crops) and the demo's chance levels are the hand-computed ones."""
    import torch

    from lgur.config import load_config
    from lgur.data.annotations import load_annotations
    from lgur.demo import chance_metrics
    from lgur.data.datasets import build_eval_split
    from lgur.engine.evaluation import evaluate
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    torch.manual_seed(seed)
    model = build_model(cfg, 0, pretrained=False).eval()
    ann = load_annotations(REAL, max_bad_fraction=None)
    ann.raise_if_unusable(0.0, splits=("test",))
    split = build_eval_split("real", ann.test, model.tokenizer, cfg, model.image_mean, model.image_std, batch_size=16,
                             num_workers=0)
    m = evaluate(model, split, torch.device("cpu"), None, lambda x, train: x, ("t2i",), progress=False)["t2i"]
    assert len(split.caption_pids) == 30 and len(split.image_pids) == 15
    assert 0 < m["R@5"] <= 1 and m["R@1"] <= m["R@5"] <= m["R@10"]
    chance = chance_metrics(split.caption_pids.tolist(), split.image_pids.tolist())
    # 7 people with 2 crops (28 captions) and one with 1 crop (2 captions) in a gallery of 15
    assert chance["R@1"] == pytest.approx((28 * 2 / 15 + 2 * 1 / 15) / 30)
