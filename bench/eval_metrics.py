"""Benchmark: lgur.eval.retrieval_metrics vs an official-style per-query numpy loop (not a test).

    .venv/bin/python bench/eval_metrics.py [--dim 3072] [--threads 2] [--icfg-loop-queries 2000]

Sizes are the test splits of CUHK-PEDES (6,156 captions x 3,074 images) and ICFG-PEDES
(19,848 x 19,848), with 1,000 identities and L2-normalised synthetic features shaped like a trained
model's (identity centre + image noise + caption noise), so ranks are neither trivial nor random.

"official-style" is the algorithm of LGUR's test_during_train.evaluate, written out plainly: the full
Q x G similarity matrix, then per query np.argsort(row)[::-1], np.in1d for the relevant items, a
length-G CMC vector and a Python loop over the hits for the trapezoidal AP (standard t2i protocol).
When that loop would take too long it is timed on the first --icfg-loop-queries queries and
extrapolated linearly to all queries (printed as such).

Times are single runs (after one warm-up chunk). Memory: a background thread samples the process RSS
(/proc/self/statm) every 5 ms; "peak extra" is the highest sample during the call minus the RSS just
before it (the inputs are already resident).
The machine may be shared: besides wall time, each line gives the process CPU time ("cpu", all
threads summed), which other processes do not inflate as much. The GEMMs use all --threads threads, so
their CPU time is about threads x their wall time on an idle machine; the ranking work is mostly one
thread (numpy's sort).
"""
from __future__ import annotations

import argparse
import os
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

from lgur.eval import retrieval_metrics, similarity_metrics

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextmanager
def peak_rss(result: dict):
    """Wall seconds, process CPU seconds (all threads) and peak RSS growth (bytes, sampled every 5 ms)."""
    start, peak, stop = rss(), [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        result["seconds"] = time.perf_counter() - t0
        result["cpu"] = time.process_time() - c0
        stop.set()
        thread.join()
        result["peak_extra"] = max(peak[0], rss()) - start


def synthetic(num_queries: int, num_gallery: int, dim: int, num_ids: int = 1000, seed: int = 0):
    """(queries, gallery, query ids, gallery ids): gallery image i has id i % num_ids; each caption
    describes one image (caption q -> image q % num_gallery) plus noise. The noise levels give a CUHK-size
    R@1 of ~0.65 at 3072-d (LGUR's level). Built in place to keep RSS flat."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_ids, dim, generator=g)
    gallery_ids = torch.arange(num_gallery) % num_ids
    gallery = torch.randn(num_gallery, dim, generator=g).add_(centres[gallery_ids])
    own = torch.arange(num_queries) % num_gallery
    queries = torch.randn(num_queries, dim, generator=g).mul_(20.0).add_(gallery[own])
    gallery.div_(gallery.norm(dim=1, keepdim=True))
    queries.div_(queries.norm(dim=1, keepdim=True))
    return queries, gallery, gallery_ids[own], gallery_ids


def official_style(similarity: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-query loop in the manner of LGUR's evaluate(): (CMC vector, trapezoidal mAP)."""
    cmc = np.zeros(len(gallery_ids))
    ap_sum = 0.0
    for q in range(len(query_ids)):
        order = np.argsort(similarity[q])[::-1]
        good = np.argwhere(gallery_ids == query_ids[q])
        hits = np.argwhere(np.isin(order, good)).reshape(-1)
        cmc_q = np.zeros(len(gallery_ids))
        cmc_q[hits[0]:] = 1
        cmc += cmc_q
        ap = 0.0
        for i, r in enumerate(hits):
            precision = (i + 1) / (r + 1)
            old_precision = i / r if r != 0 else 1.0
            ap += (old_precision + precision) / 2 / len(hits)
        ap_sum += ap
    return cmc / len(query_ids), ap_sum / len(query_ids)


def bench(name: str, num_queries: int, num_gallery: int, dim: int, loop_queries: int, chunk: int) -> None:
    print(f"\n== {name}: {num_queries:,} queries x {num_gallery:,} gallery, {dim}-d float32 ==")
    queries, gallery, qids, gids = synthetic(num_queries, num_gallery, dim)
    retrieval_metrics(queries[:chunk], gallery, qids[:chunk], gids)            # warm-up (MKL, numpy sort)

    ours: dict = {}
    with peak_rss(ours):
        metrics = retrieval_metrics(queries, gallery, qids, gids, chunk_size=chunk)
    print(f"ours, features -> metrics (similarities + all metrics): {ours['seconds']:.2f} s (cpu {ours['cpu']:.2f} s), "
          f"peak extra RSS {ours['peak_extra'] / 2**20:.0f} MiB  [chunk {chunk}]")
    print("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))

    full: dict = {}
    with peak_rss(full):
        similarity = queries @ gallery.T
    flops = 2 * num_queries * num_gallery * dim
    print(f"full float32 similarity matrix (both need these FLOPs): {full['seconds']:.2f} s (cpu {full['cpu']:.2f} s) "
          f"({flops / full['seconds'] / 1e9:.0f} GFLOP/s), {similarity.numel() * 4 / 2**30:.2f} GiB")
    ranking: dict = {}
    with peak_rss(ranking):
        similarity_metrics(similarity, qids, gids, chunk_size=chunk)
    print(f"ours, ready similarity -> metrics: {ranking['seconds']:.2f} s (cpu {ranking['cpu']:.2f} s), "
          f"peak extra RSS {ranking['peak_extra'] / 2**20:.0f} MiB")

    n = min(loop_queries, num_queries)
    loop: dict = {}
    with peak_rss(loop):
        cmc, trapezoid = official_style(similarity[:n].numpy(), qids[:n].numpy(), gids.numpy())
    loop_seconds, loop_cpu = (loop[key] * num_queries / n for key in ("seconds", "cpu"))
    note = f" (timed on {n:,} queries, extrapolated x{num_queries / n:.2f})" if n < num_queries else ""
    print(f"official-style per-query loop, ready similarity -> t2i metrics: {loop_seconds:.2f} s "
          f"(cpu {loop_cpu:.2f} s){note}, peak extra RSS {loop['peak_extra'] / 2**20:.0f} MiB (+ the full matrix)")
    check = similarity_metrics(similarity[:n], qids[:n], gids, chunk_size=chunk)
    diff = max(abs(check["mAP_lgur_trapezoid"] - trapezoid),
               *(abs(check[f"R@{k}"] - cmc[k - 1]) for k in (1, 5, 10)))
    print(f"  agreement on those queries (R@1/5/10, trapezoid mAP): max |diff| {diff:.1e}")
    official_total = full["seconds"] + loop_seconds
    print(f"ratio official-style / ours: metric step from ready similarities {loop_seconds / ranking['seconds']:.1f}x "
          f"(cpu {loop_cpu / ranking['cpu']:.1f}x); "
          f"features -> metrics {official_total / ours['seconds']:.2f}x "
          f"({official_total:.2f} s with the full matrix vs {ours['seconds']:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=3072, help="feature width (LGUR: 6 parts x 512)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--chunk", type=int, default=1024, help="queries per chunk")
    parser.add_argument("--icfg-loop-queries", type=int, default=2000,
                        help="queries the official-style loop is timed on at ICFG size (extrapolated)")
    parser.add_argument("--only", choices=("cuhk", "icfg"), help="run one size only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.threads} threads, cpu count {os.cpu_count()}, "
          f"load average {os.getloadavg()[0]:.1f} (other processes share the cores when > 0)")
    if args.only != "icfg":
        bench("CUHK-PEDES", 6156, 3074, args.dim, 6156, args.chunk)
    if args.only != "cuhk":
        bench("ICFG-PEDES", 19848, 19848, args.dim, args.icfg_loop_queries, args.chunk)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
