"""Benchmark: how a model trained on the synthetic set ranks real people (not a test).

    .venv/bin/python bench/real_transfer.py CHECKPOINT [CHECKPOINT ...] [--data tests/data/vtest_real]

The real set is tests/data/vtest_real: 15 crops of 8 walkers cut from OpenCV's vtest.avi, two
hand-written CUHK-PEDES-style captions each (tools/vtest_real.py). Every caption is ranked against the
15 crops (t2i, the standard protocol); chance is the expected metric of a random ranking. Several
checkpoints (e.g. the demo model trained on the plain and on the camera-like synthetic renderer) are
measured in one run. `lgur demo` prints the same table for the model it trains.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import lgur  # noqa: F401  (sets the OpenMP policy before torch is imported)
from lgur.demo import REAL_SET, _table, real_set_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, default=REAL_SET)
    args = ap.parse_args()
    rows = {}
    for ck in args.checkpoints:
        metrics, chance = real_set_metrics(ck, args.data)
        rows.setdefault("chance level", chance)
        rows[ck.parent.name[-22:] + "/" + ck.stem] = metrics
    print(f"{args.data}: t2i, {len(args.checkpoints)} model(s)\n" + _table(rows))
    for name, m in rows.items():
        if name != "chance level":
            print(f"{name}: R@1 {m['R@1'] / rows['chance level']['R@1']:.1f}x chance, "
                  f"R@5 {m['R@5'] / rows['chance level']['R@5']:.1f}x chance")


if __name__ == "__main__":
    main()
