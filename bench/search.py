"""Benchmark: gallery search latency, throughput and recall at 10k / 100k / 1M (not a test).

    .venv/bin/python bench/search.py [--sizes 10000 100000 1000000] [--dim 3072] [--threads 2]

Gallery: `lgur.search.ann.synthetic_embeddings` (identities of ~8 images in a rank-128 subspace of the
3072-d space + isotropic noise, L2-normalised, stored fp16 like `lgur index`); uniform random vectors would
be unrealistically hard for PCA/ANN. Queries: perturbed gallery vectors (cos ~0.71 to their source), not
the gallery vectors themselves. Recall@10 is always against an exact fp32 scan of the full-dim store.

Rows:
  exact        ExactSearch (compute auto: 1 query scans the fp16 store, batches a bf16 copy; fp32 re-score)
  pca-R        exact scan of PCA-R reduced vectors (fp16) -> k*rerank candidates -> fp32 full-dim re-score
  ivfpq/pca-R  faiss IVF-PQ 4-bit fast-scan over PCA-R vectors, nprobe tuned to recall >= 0.95 as `lgur index`
               does (k*search.refine candidates re-scored on the PCA rows, then k*rerank on the full rows)
  hnsw/pca-R   faiss HNSW32 over PCA-R vectors, efSearch tuned likewise (100k only: a 1M build on one
               thread takes tens of minutes)
"single" = median latency of one query at a time (on search.single_query_threads threads, as Searcher runs
it; one exact row repeats it on --threads threads); "batch" = per-query time of a batch of --queries queries.
--encode RECIPE... adds the other half of a query's latency: encoding one caption with that recipe's model
(random weights, same cost), on search.single_query_threads threads as Searcher does.
The machine may be shared with other jobs; the load average is printed with the results.
At 1M the exact batch row is skipped (its bf16 working copy would add 6 GB to the 6 GB fp16 store); the
fp32 reference scan time is shown instead.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lgur.config import defaults
from lgur.search.ann import (FaissSearch, TwoStageSearch, build_faiss, faiss_or_none, fit_pca, project, recall_at,
                             recall_queries, synthetic_embeddings, tune_ann)
from lgur.search.topk import ExactSearch, merge_topk, torch_threads


def reference(store: torch.Tensor, queries: torch.Tensor, k: int = 10, chunk: int = 32768) -> torch.Tensor:
    """Exact top-k ids: fp32 scores chunk by chunk (no full fp32 copy of the store)."""
    best = None
    for r0 in range(0, store.shape[0], chunk):
        s = queries @ store[r0:r0 + chunk].float().T
        top, pos = s.topk(min(k, s.shape[1]), dim=1)
        best = merge_topk(best, top, pos + r0, k)
    return best[1]


def single_ms(engine, queries: torch.Tensor, threads: int, k: int = 10, n: int = 20) -> float:
    """Median latency of one query at a time, on `threads` torch threads (as Searcher does)."""
    with torch_threads(threads):
        engine.search(queries[:1], k)  # warm-up (and lazy copies)
        times = []
        for q in queries[:n]:
            t = time.perf_counter()
            engine.search(q[None], k)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def batch_ms(engine, queries: torch.Tensor, k: int = 10) -> float:
    engine.search(queries[:2], k)
    t = time.perf_counter()
    engine.search(queries, k)
    return (time.perf_counter() - t) * 1e3 / len(queries)


def row(name: str, n: int, d: int, single: float | None, batch: float | None, recall: float | None,
        extra: str = "") -> None:
    fmt = lambda v, f: f.format(v) if v is not None else "-"  # noqa: E731
    print(f"| {n:>9,} | {d:>4} | {name:<12} | {fmt(single, '{:8.2f}'):>8} | {fmt(batch, '{:7.3f}'):>7} | "
          f"{fmt(recall, '{:.3f}'):>6} | {extra}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--pca", type=int, nargs="+", default=[512, 256])
    ap.add_argument("--queries", type=int, default=200, help="recall queries (and the batch size)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery that gets an HNSW build")
    ap.add_argument("--encode", nargs="*", default=["lgur_cuhk", "lgur_small_synth"],
                    help="recipes whose one-caption text encoding is timed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scfg = defaults().search
    rerank = int(scfg.rerank)
    one = int(scfg.single_query_threads)
    has_faiss = faiss_or_none() is not None
    print(f"torch {torch.__version__}, {args.threads} threads, faiss {'yes' if has_faiss else 'absent'}, "
          f"rerank x{rerank}, single queries on {one} thread(s) (search.single_query_threads), "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print("| gallery   |  dim | method       | single ms | batch ms/q | R@10 | notes")
    print("|-----------|------|--------------|-----------|------------|------|------")
    for n in args.sizes:
        t = time.perf_counter()
        store = synthetic_embeddings(n, args.dim)
        queries = recall_queries(store, args.queries, seed=1)
        made = time.perf_counter() - t
        t = time.perf_counter()
        truth = reference(store, queries)
        ref_ms = (time.perf_counter() - t) * 1e3 / len(queries)
        exact = ExactSearch(store, scfg.compute_dtype, scfg.chunk_rows)
        s_ms = single_ms(exact, queries, one)
        row("exact", n, args.dim, single_ms(exact, queries, args.threads), None, None,
            f"single query on {args.threads} threads instead of {one}")
        if n <= 200_000:
            b_ms = batch_ms(exact, queries)
            rec = recall_at(exact.search(queries, 10)[1], truth)
            row("exact", n, args.dim, s_ms, b_ms, rec, f"fp32 reference scan {ref_ms:.2f} ms/q; data {made:.0f} s")
        else:
            rec = recall_at(torch.cat([exact.search(q[None], 10)[1] for q in queries[:50]]), truth[:50])
            row("exact", n, args.dim, s_ms, None, rec, f"batch: fp32 reference scan {ref_ms:.2f} ms/q; R@10 on 50 "
                                                       f"single queries; data {made:.0f} s")
        del exact
        for r in args.pca:
            t = time.perf_counter()
            comps = fit_pca(store, r)
            reduced = project(store, comps).half()
            fit = time.perf_counter() - t
            engine = TwoStageSearch(ExactSearch(reduced, scfg.compute_dtype, scfg.chunk_rows), store, comps, rerank)
            bare = TwoStageSearch(engine.first, store, comps, 0)
            row(f"pca-{r}", n, r, single_ms(engine, queries, one), batch_ms(engine, queries),
                recall_at(engine.search(queries, 10)[1], truth),
                f"no re-rank R@10 {recall_at(bare.search(queries, 10)[1], truth):.3f}; fit+project {fit:.0f} s")
            if not has_faiss or r != min(args.pca):
                continue
            for kind in ("ivfpq", "hnsw"):
                if kind == "hnsw" and n > args.hnsw_max:
                    continue
                t = time.perf_counter()
                index, param = build_faiss(reduced, kind, hnsw_m=int(scfg.hnsw_m), pq_dims=int(scfg.pq_dims))
                built = time.perf_counter() - t
                tuning, refine = tune_ann(index, param, kind, store, comps, reduced, scfg, queries, truth)
                engine = TwoStageSearch(FaissSearch(index, param, tuning.value), store, comps, rerank, reduced, refine)
                row(f"{kind}/pca-{r}", n, r, single_ms(engine, queries, one), batch_ms(engine, queries), tuning.recall,
                    f"{param}={tuning.value}; refine x{refine}; no re-rank R@10 {tuning.recall_no_rerank:.3f}; "
                    f"build {built:.0f} s")
        del store, queries
    for recipe in args.encode:
        encode_row(recipe, one)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


def encode_row(recipe: str, threads: int) -> None:
    """Median time to encode one caption with the recipe's model (weights random: the cost is the same)."""
    from lgur.config import load_config
    from lgur.models import build_model

    cfg = load_config(recipe)
    model = build_model(cfg, 0, pretrained=False).eval()
    caption = "a young man with short black hair wearing a grey hooded jacket, blue jeans and a red backpack"
    with torch_threads(threads), torch.no_grad():
        model.encode_captions([caption])
        times = []
        for _ in range(20):
            t = time.perf_counter()
            model.encode_captions([caption])
            times.append((time.perf_counter() - t) * 1e3)
    print(f"text encoding, {recipe} ({cfg.model.text_backbone}, {model.embedding_dim}-d), 1 caption, {threads} "
          f"thread(s): {statistics.median(times):.1f} ms median")


if __name__ == "__main__":
    main()
