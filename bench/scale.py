"""Benchmark: a gallery of N synthetic crops on one machine (not a test).

    .venv/bin/python bench/scale.py build  --n 1000000 --out /tmp/scale.lgidx              # writes the index
    .venv/bin/python bench/scale.py search --out /tmp/scale.lgidx [--nprobe 128,256,512]  # a fresh process
    .venv/bin/python bench/scale.py indexing [--images 256]                               # 2 processes vs 1
    .venv/bin/python bench/scale.py retune --out /tmp/scale.lgidx   # the build's nprobe tuning again, current settings

build: N L2-normalised clustered embeddings (`lgur.search.ann.synthetic_embeddings`, identities of ~8 crops
in a rank-128 subspace; default width 1536 = lgur-small's 6 x 256), generated block by block straight into
the index's memory-mapped shards (never whole in memory), with metadata columns camera = row % 100 (so
`camera=3` keeps 1 % of the rows) and time; then what `lgur index --pca 256 --ann ivfpq` does
(lgur.search.ann.attach_reduction: PCA fitted on a sample, IVF-PQ trained on a sample and filled block by
block, nprobe tuned to recall@10 >= search.ann_recall_target). --pca 128 by default: the rows have rank 128
plus isotropic noise, and 128 keeps ~93 % of their energy (the build prints it) where 256 adds only noise
while doubling the IVF-PQ codes scanned per row (d / search.pq_dims 4-bit codes). Reports build time, peak
RSS, disk and bytes per crop. It also stores held-out queries (perturbed gallery rows, cos ~0.71) and their exact top-10
(fp32 scan of the full-dim rows, unfiltered and within the 1 % filter) for `search`.

search: in a fresh process, loads the index as `lgur search` does (embeddings and columns memory-mapped),
then single-query latency (median/p95 wall time and median CPU time over the stored queries, one at a
time, first and second pass)
and recall@10 against the exact top-10, unfiltered and with `camera=3`; unfiltered again with a query's IVF
lists scanned on one thread instead of split over the cores (search.ann_threads); the time of stage 1 alone
(PCA projection + faiss) and, with --nprobe, the recall/latency of other probe counts; peak RSS and peak anonymous
memory (RSS minus the file pages of the memory maps, which the kernel may drop) while searching.

retune: what the build's last step does (lgur.search.ann.tune_ann: nprobe tuned to the recall target with the
current search.rerank / search.refine, on the build's own held-out queries) on an index already built, keeping its
rows and faiss index; rewrites its manifest's `ann` entry. For comparing search settings at 10 M without the
~17 min build.

indexing: images/s of `lgur index` with 1 process vs `--nproc 2`, each process on 1 thread
(OMP_NUM_THREADS=1: the same CPU budget per process), on synthetic images with lgur-small (random
weights: the same cost). Both runs in this invocation; the ratio is what to read.

The machine may be shared: the load average is printed with every result, and `search` also prints one core's
memory read speed (a query's scans are bound by it, and it drifts on a shared virtual machine).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lgur  # noqa: F401  (sets the OpenMP policy before torch loads)
import numpy as np
import torch


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def memory_gbps() -> float:
    """One core's streaming read speed (GB/s, best of 5 sums over 256 MB): a query's scans are bound by memory,
    and on a shared virtual machine its speed drifts (on this 2-core box a 33 MB fp32 matrix-vector product
    took 6.6 ms one hour and 4.1 ms the next), so results from different runs compare only beside it."""
    from lgur.search.topk import torch_threads

    x = torch.ones(1 << 26)
    best = float("inf")
    with torch_threads(1):
        for _ in range(5):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def anon_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2 ** 20
    return float("nan")


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build(args) -> None:
    from lgur.config import defaults
    from lgur.search.ann import ExactSearch, attach_reduction, recall_queries
    from lgur.search.index import IndexWriter, Rows
    from lgur.search.topk import Shards

    out = Path(args.out)
    n, d, block = args.n, args.dim, 1 << 18
    scfg = defaults().search
    scfg.recall_queries = args.tune_queries
    t0 = time.perf_counter()
    with IndexWriter(out) as w:
        g0 = torch.Generator().manual_seed(0)
        rank = 128  # as lgur.search.ann.synthetic_embeddings, with one subspace for every block
        basis = torch.linalg.qr(torch.randn(d, rank, generator=g0))[0].T * (d / rank) ** 0.5

        def blocks():
            for i in range(0, n, block):  # identities of ~8 crops, drawn block by block
                m = min(block, n - i)
                g = torch.Generator().manual_seed(1000 + i // block)
                centres = torch.randn(max(1, m // 8), rank, generator=g)
                z = centres[torch.randint(len(centres), (m,), generator=g)] + 0.5 * torch.randn(m, rank, generator=g)
                x = z @ basis + 0.3 * torch.randn(m, d, generator=g)
                yield torch.nn.functional.normalize(x, dim=1).half()
                if i // block % 8 == 0:
                    print(f"  generated {min(n, i + block)} / {n} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
        w.write_embeddings(blocks(), "fp16", total=n)
        t_gen = time.perf_counter() - t0
        ids = np.arange(n)
        paths = w.open_array("col-path.npy", (n,), "S22")
        for i in range(0, n, 1 << 20):
            j = ids[i:i + (1 << 20)]
            paths[i:i + len(j)] = np.char.add(np.char.add(np.char.mod(b"cam%02d/", j % 100), np.char.mod(b"%012d", j)),
                                              b".jpg")
        cols = {"path": paths, "size": np.full(n, 4096, np.int64), "mtime_ns": np.zeros(n, np.int64),
                "camera": (ids % 100).astype(np.int64), "time": 1.7643e9 + ids * 0.01}
        for name in ("size", "mtime_ns", "camera", "time"):
            w.write_array(f"col-{name}.npy", cols[name])
        w.columns = {"path": "str", "size": "int", "mtime_ns": "int", "camera": "int", "time": "float"}
        del cols
        store = Shards.of_mapped([np.load(w.data / s["file"], mmap_mode="c") for s in w.shards])
        manifest = {"fingerprint": "synthetic", "checkpoint": "none", "images_root": "/synthetic", "dtype": "fp16",
                    "dim": d, "model": {"name": "synthetic"}, "skipped": [], "pca": None, "ann": None}
        t1 = time.perf_counter()
        notes = attach_reduction(store, manifest, w, args.pca, "ivfpq", scfg)
        t_ann = time.perf_counter() - t1
        manifest = w.commit(manifest)
    t_build = time.perf_counter() - t0
    # held-out queries and their exact answers, for `search`
    t2 = time.perf_counter()
    queries = recall_queries(store, args.queries, seed=7)
    truth = ExactSearch(store, "fp32").search(queries, 10)[1]
    subset = np.flatnonzero(np.arange(n) % 100 == 3)
    truth_f = ExactSearch(store, "fp32").search(queries, 10, subset=subset)[1]
    np.save(out / "bench_queries.npy", queries.numpy())
    np.save(out / "bench_truth.npy", truth.numpy())
    np.save(out / "bench_truth_camera3.npy", truth_f.numpy())
    t_truth = time.perf_counter() - t2
    size = du(out / manifest["data"])
    per = {"embeddings": d * 2, "pca_reduced": args.pca * 2}
    ann_bytes = (out / manifest["data"] / "ann.faiss").stat().st_size
    result = {"n": n, "dim": d, "pca": args.pca, "build_s": round(t_build, 1), "generate_and_write_s": round(t_gen, 1),
              "pca_ann_s": round(t_ann, 1), "truth_s": round(t_truth, 1), "peak_rss_gb": round(peak_rss_gb(), 2),
              "disk_gb": round(size / 1e9, 2), "bytes_per_crop_disk": round(size / n, 1),
              "bytes_per_crop": {**per, "ann": round(ann_bytes / n, 1)}, "ann": manifest["ann"], "notes": notes,
              "load": load()}
    print(json.dumps(result, indent=1))
    (out / "bench_build.json").write_text(json.dumps(result, indent=1))


def search(args) -> None:
    from lgur.config import defaults
    from lgur.search.ann import faiss_nlist, recall_at
    from lgur.search.index import GalleryIndex
    from lgur.search.searcher import make_engine
    from lgur.search.filters import Filter
    from lgur.search.topk import torch_threads

    out = Path(args.out)
    t0 = time.perf_counter()
    index = GalleryIndex.load(out)
    t_load = time.perf_counter() - t0
    scfg = defaults().search
    engine = make_engine(index, "ann", scfg, torch.device("cpu"))  # as `lgur search` for N >= ann_threshold
    queries = torch.from_numpy(np.load(out / "bench_queries.npy"))
    truth = torch.from_numpy(np.load(out / "bench_truth.npy"))
    truth_f = torch.from_numpy(np.load(out / "bench_truth_camera3.npy"))
    anon_after_load = anon_gb()
    flt = Filter.parse(["camera=3"])
    t = time.perf_counter()
    subset = flt.select(index.files)
    t_select = (time.perf_counter() - t) * 1e3
    rows = {}

    def one_by_one(fn, want=None) -> dict:
        """fn(query) for every query alone: median/p95 wall time and the median CPU time of this process
        (process_time: what the query costs a free core; the wall time also holds the waits of a shared
        machine), and recall@10 against `want`."""
        wall, cpu, found = [], [], []
        for q in queries:
            t, c = time.perf_counter(), time.process_time()
            found.append(fn(q[None]))
            wall.append((time.perf_counter() - t) * 1e3)
            cpu.append((time.process_time() - c) * 1e3)
        out = {"median_ms": round(statistics.median(wall), 2), "p95_ms": round(float(np.percentile(wall, 95)), 2),
               "cpu_median_ms": round(statistics.median(cpu), 2)}
        if want is not None:
            out["recall@10"] = round(recall_at(torch.cat(found), want), 4)
        return out

    with torch_threads(int(scfg.single_query_threads)):
        for name, kw, want in (("unfiltered", {}, truth), ("camera=3 (1 %)", {"subset": subset}, truth_f)):
            for rnd in ("first pass", "second pass"):
                rows[f"{name}, {rnd}"] = one_by_one(lambda q: engine.search(q, 10, **kw)[1], want)
        first, comps = engine.engine.first, engine.engine.components
        # the same on one thread: faiss scans a query's lists on one core; search.ann_threads splits them
        threads = first.threads
        first.threads = 1
        rows["unfiltered, one thread (search.ann_threads=1)"] = one_by_one(lambda q: engine.search(q, 10)[1], truth)
        first.threads = threads
        # where an unfiltered query's time goes: stage 1 alone (PCA projection + faiss, the candidates it
        # proposes: k x refine, or k x rerank without refining)
        wanted = 10 * max(engine.engine.rerank, engine.engine.refine)
        rows["unfiltered: stage 1 alone (projection + faiss)"] = one_by_one(lambda q: first.search(q @ comps, wanted))
        # the recall/latency trade-off around the tuned value (same queries, one at a time)
        tuned = first.value
        for v in (int(x) for x in args.nprobe.split(",") if x) if args.nprobe else ():
            first.set_param(v)
            rows[f"unfiltered, {first.param}={v}"] = one_by_one(lambda q: engine.search(q, 10)[1], truth)
        first.set_param(tuned)
    result = {"n": len(index), "engine": type(engine).__name__, "ann_threads": first.threads,
              "ann": index.manifest["ann"]["param"] + "=" + str(index.manifest["ann"]["value"]),
              "lists": faiss_nlist(index.ann), "load_s": round(t_load, 2),
              "filter_select_ms (camera=3, once, then cached by Searcher)": round(t_select, 1),
              "queries": len(queries), "results": rows, "peak_rss_gb": round(peak_rss_gb(), 2),
              "anon_gb_after_load": round(anon_after_load, 2), "anon_gb_end": round(anon_gb(), 2), "load": load(),
              "memory_gbps_one_core": round(memory_gbps(), 1)}
    print(json.dumps(result, indent=1))


def retune(args) -> None:
    from lgur.config import defaults
    from lgur.models.checkpoint import atomic_write
    from lgur.search.ann import ann_settings, exact_truth, recall_queries, tune_ann
    from lgur.search.index import GalleryIndex

    out = Path(args.out)
    index = GalleryIndex.load(out)
    scfg = defaults().search
    ann = index.manifest["ann"]
    t = time.perf_counter()
    queries = recall_queries(index.store, min(args.tune_queries, len(index)))  # seed 0, as attach_reduction
    truth = exact_truth(index.store, queries)
    t_truth = time.perf_counter() - t
    tuning, refine = tune_ann(index.ann, ann["param"], ann["kind"], index.store, index.components, index.reduced,
                              scfg, queries, truth)
    before = {k: ann.get(k) for k in ("value", "recall@10", "rerank", "refine")}
    manifest = {**index.manifest, "ann": {**ann, **ann_settings(tuning, refine, scfg)}}

    def write(tmp: str) -> None:
        Path(tmp).write_text(json.dumps(manifest), encoding="utf-8")

    atomic_write(out / "manifest.json", write)
    print(json.dumps({"n": len(index), "before": before, "after": tuning.describe(), "refine": refine,
                      "rerank": int(scfg.rerank), "truth_s": round(t_truth, 1),
                      "tune_s": round(time.perf_counter() - t - t_truth, 1), "load": load()}, indent=1))


def indexing(args) -> None:
    from lgur.checkpoint import save_model
    from lgur.config import load_config
    from lgur.data.synth import generate
    from lgur.models import build_model

    work = Path(tempfile.mkdtemp(prefix="lgur_bench_idx_"))
    try:
        cfg = load_config("lgur_small_synth")
        save_model(build_model(cfg, 0, pretrained=False), cfg, work / "small.safetensors", 0)
        generate(work / "synth", num_ids=max(1, args.images // 4), seed=0, images_per_id=4, workers=1, progress=False)
        images = work / "synth" / "imgs"
        count = sum(1 for _ in images.rglob("*.jpg"))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        res = {}
        for label, extra in (("1 process", []), ("2 processes", ["--nproc", "2"]), ("1 process again", [])):
            out = work / f"{label.replace(' ', '_')}.lgidx"
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "lgur", "index", *extra, "--checkpoint",
                                   str(work / "small.safetensors"), "--images", str(images), "--out", str(out),
                                   "--workers", "0", "--quiet", "--batch-size", "32"], env=env, capture_output=True,
                                  text=True)
            wall = time.perf_counter() - t
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            encode_s = float(proc.stdout.split("unreadable (")[1].split(" s")[0])
            res[label] = {"wall_s": round(wall, 1), "build_s": round(encode_s, 1),
                          "images_per_s": round(count / encode_s, 2), "load": load()}
        one = (res["1 process"]["images_per_s"] + res["1 process again"]["images_per_s"]) / 2
        print(json.dumps({"images": count, "model": "lgur-small (random init)", "runs": res,
                          "ratio_2proc_vs_1proc": round(res["2 processes"]["images_per_s"] / one, 2)}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["build", "search", "indexing", "retune"])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--pca", type=int, default=128, help="PCA width: the rows' rank (128); `build` prints the "
                    "energy it keeps")
    ap.add_argument("--queries", type=int, default=200, help="held-out queries for latency/recall")
    ap.add_argument("--tune-queries", type=int, default=200, help="queries `lgur index` tunes nprobe on")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "lgur_scale.lgidx"))
    ap.add_argument("--images", type=int, default=256, help="indexing: synthetic images")
    ap.add_argument("--nprobe", default="", help="search: also measure these nprobe values (e.g. 128,256,512)")
    args = ap.parse_args()
    print(load(), flush=True)
    {"build": build, "search": search, "indexing": indexing, "retune": retune}[args.what](args)


if __name__ == "__main__":
    main()
