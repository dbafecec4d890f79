"""`lgur demo` end to end at a tiny size: the same pipeline `make demo` runs (synth -> train -> metrics vs
chance and untrained -> index -> searches -> sheets), with the tiny random model so it fits in CI."""
import json
from pathlib import Path

import pytest
from PIL import Image

from lgur.cli import main
from lgur.data.annotations import load_annotations
from lgur.demo import chance_metrics


def test_chance_metrics_hand_computed():
    # gallery: id 1 x2, id 2 x1, id 3 x1 (G=4); queries: one of id 1, one of id 2
    ch = chance_metrics([1, 2], [1, 1, 2, 3], ks=(1, 2))
    # R@1: id1 2/4, id2 1/4 -> mean 3/8.  R@2: id1 1 - C(2,2)/C(4,2) = 5/6, id2 1 - C(3,2)/C(4,2) = 1/2
    assert ch["R@1"] == pytest.approx(3 / 8)
    assert ch["R@2"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert ch["mAP"] == pytest.approx(3 / 8)
    assert chance_metrics([1], [1, 2], ks=(10,))["R@10"] == 1.0  # k beyond the gallery size


@pytest.mark.slow
def test_demo_pipeline_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--ids", "30", "--config", "lgur_tiny",
               "optim.epochs=1", "train.max_steps_per_epoch=2", "optim.batch_size=8"])
    assert rc == 0
    printed = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "chance level", "before training", "lgur serve"):
        assert step in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary) >= {"chance", "before", "after", "r1_over_chance", "run_dir", "index", "real"}
    # the reported numbers are the run's own: results.json's test metrics, chance from the test split
    results = json.loads((Path(summary["run_dir"]) / "results.json").read_text())
    assert summary["after"] == results["test"]["t2i"]
    ann = load_annotations(out / "data")
    queries = [r.person_id for r in ann.test for _ in r.captions]
    assert summary["chance"] == pytest.approx(chance_metrics(queries, [r.person_id for r in ann.test]))
    assert summary["r1_over_chance"] == pytest.approx(summary["after"]["R@1"] / summary["chance"]["R@1"])
    # the synthetic images are rendered at the model's input size (nothing to resize when decoding)
    with Image.open(ann.test[0].image_path) as im:
        assert im.size == (64, 128)
    # the real set (a checkout) is measured with the trained model: 30 captions against 15 crops
    real = summary["real"]
    assert real["chance"]["R@1"] == pytest.approx(2 / 15 * 28 / 30 + 1 / 15 * 2 / 30)
    assert real["after"]["R@1"] <= real["after"]["R@5"] <= real["after"]["R@10"] and real["after"]["R@5"] > 0
    html = (out / "results.html").read_text()
    assert html.count("<img") >= 3 * 3  # three queries, each with its top hits (30 ids -> 3 test ids)
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "gallery.lgidx").is_dir()
    assert Image.open(out / "explain.png").width >= 640  # the first query's top 3 explained


def test_demo_recipe_is_the_fast_one():
    """The settings that make `make demo` fit in 8 minutes on 2 AVX2 cores in fp32 (README, demo section):
    the frozen MiniLM runs once per caption, the first image blocks are frozen, images are decoded once."""
    from lgur.config import load_config
    from lgur.models import build_model

    cfg = load_config("lgur_small_synth")
    assert cfg.train.cache_text and not cfg.model.text_dropout_in_train and cfg.data.cache_images
    assert cfg.model.channels_last and cfg.model.image_frozen_blocks == 3
    model = build_model(cfg, 2, pretrained=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_image = sum(p.numel() for m in model.image.frozen for p in m.parameters())
    assert frozen_image > 0 and not any(p.requires_grad for p in model.text.backbone.parameters())
    assert cfg.optim.epochs * 1920 // cfg.optim.batch_size <= 240  # 300 ids: 1,920 training captions
    assert trainable < 8e6
