"""Benchmark: the cost of explaining a query's top-10 hits against a plain search of that query (not a test).

    .venv/bin/python bench/explain.py [--index demo_out/gallery.lgidx] [--k 10] [--repeats 20]

Uses the index `make demo` writes (the demo model, lgur-small, over the synthetic test gallery) unless told
otherwise. "search" = Searcher.search of one query (encode + scan); "explain" = explain_result of its top-k
(one recorded text forward + the part maps stored in the index); "explain, no stored maps" = the same with the
index's maps hidden, i.e. one recorded image forward of the k crops (an index built with --no-explain-maps).
Medians over --repeats runs, same process, same threads, interleaved per query; the load average is printed
because the machine may be shared.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import lgur  # noqa: F401  (OpenMP policy before torch)
from lgur.search.explain import explain_result
from lgur.search.searcher import Searcher

QUERIES = ["a woman in a red coat with a black backpack", "a man in a blue jacket and black pants",
           "a person wearing a white t-shirt and grey shorts carrying a bag"]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default="demo_out/gallery.lgidx")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    searcher = Searcher(args.index)
    print(f"index {args.index}: {len(searcher)} rows, model {searcher.index.manifest.get('model')}, "
          f"maps stored: {searcher.index.manifest.get('explain_maps') is not None}")
    print(f"load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'query':<46} {'search ms':>10} {'explain ms':>11} {'ratio':>6} {'no-maps ms':>11} {'ratio':>6}")
    ratios, fallback = [], []
    index = searcher.index
    for q in QUERIES:
        [result] = searcher.search(q, k=args.k)
        s = median_ms(lambda: searcher.search(q, k=args.k), args.repeats)
        e = median_ms(lambda: explain_result(searcher, result), args.repeats)
        stored, index.maps = index.maps, None  # as an index without maps: one image forward of the k crops
        try:
            f = median_ms(lambda: explain_result(searcher, result), args.repeats)
        finally:
            index.maps = stored
        ratios.append(e / s)
        fallback.append(f / s)
        print(f"{q[:44]:<46} {s:10.1f} {e:11.1f} {e / s:6.2f} {f:11.1f} {f / s:6.2f}")
    print(f"explain top-{args.k} / search (median over queries): {statistics.median(ratios):.2f}x with stored maps, "
          f"{statistics.median(fallback):.2f}x without   load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
