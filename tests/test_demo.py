"""`lgur demo` end to end at a tiny size: the same pipeline `make demo` runs (synth -> train -> metrics vs
chance and untrained -> index -> searches -> sheets), with the tiny random model so it fits in CI."""
import json

import pytest

from lgur.cli import main
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
    assert set(summary) >= {"chance", "before", "after", "r1_over_chance", "run_dir", "index"}
    assert 0 < summary["chance"]["R@1"] < 1 and 0 <= summary["after"]["R@1"] <= 1
    html = (out / "results.html").read_text()
    assert html.count("<img") >= 3 * 3  # three queries, each with its top hits (30 ids -> 3 test ids)
    assert (out / "results.png").stat().st_size > 1000
    assert (out / "gallery.lgidx").is_dir()
