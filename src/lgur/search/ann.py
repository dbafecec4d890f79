"""Approximate search for large galleries: PCA reduction and faiss IVF-PQ / HNSW, with full-dim re-ranking.

Every approximate path is two-stage: stage 1 (exact scan of PCA-reduced vectors, or a faiss index over
the full or reduced vectors) proposes k*rerank candidates; stage 2 re-scores them exactly (fp32) from the
stored full-dim embeddings. IVF-PQ over PCA rows adds a refine step between them (TwoStageSearch.refine:
k*refine candidates re-scored on the stored PCA rows first). Recall is always measured against exact
full-dim search, with and without the re-ranking, and the ANN search parameter (nprobe / efSearch) is tuned
at build time to the smallest value reaching the recall target.

Recall queries (`recall_queries`): held-out perturbations of gallery vectors, q = normalise(g + n) with
|n| = |g| (cos(q, g) ~ 0.71, roughly a matching text-image pair), NOT the gallery vectors themselves
(they would trivially find themselves). faiss is imported lazily: the GPU machine has none.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from lgur.config import defaults
from lgur.errors import LgurError, SearchError
from lgur.runtime import cpu_cores
from lgur.search.topk import ExactSearch, Shards, rescore

ANN_KINDS = ("ivfpq", "hnsw")
# filtered ANN search: with a fraction f < FILTER_PROBE_GROWTH of the rows allowed, nprobe/efSearch is
# multiplied by sqrt(FILTER_PROBE_GROWTH / f) (bench/scale.py measures recall with a 1 % filter)
FILTER_PROBE_GROWTH = 0.1
_FAISS_THREADS_SET = False
TUNE_STEPS = 3  # bisection steps of `tune` below the first power of two reaching the recall target
# an IVF query's lists are split over threads (FaissSearch.threads) only when it scans at least this many
# codes: below, handing work to the threads costs more than it saves (100k rows, nprobe 64 of 316 lists,
# 20k codes: 0.21 ms on one thread, 0.64 on two)
SPLIT_MIN_CODES = 100_000
PCA_SAMPLE = 20000  # rows used to fit the PCA (the D x D second moment of more rows costs minutes on 2 cores)


def faiss_or_none():
    """The faiss module, or None where it is not installed (e.g. the GPU box).

    Its OpenMP thread count is set from search.faiss_threads on import: faiss-cpu bundles its own libgomp,
    which competes with torch's: on a busy small CPU a second faiss thread made an IVF-PQ build tens of times
    slower (unless OMP_WAIT_POLICY=PASSIVE was set before the process started; figures in the README).
    """
    try:
        import faiss  # optional (pip install faiss-cpu): exact search works without it
    except ImportError:
        return None
    global _FAISS_THREADS_SET
    if not _FAISS_THREADS_SET:
        threads = int(defaults().search.faiss_threads)
        if threads > 0:
            faiss.omp_set_num_threads(threads)
        _FAISS_THREADS_SET = True
    return faiss


def require_faiss():
    faiss = faiss_or_none()
    if faiss is None:
        raise LgurError("an ANN index needs faiss: pip install faiss-cpu (exact search works without it)")
    return faiss


def fit_pca(embeddings: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """(D, dim) orthonormal projection: the top right singular vectors of a sample of the *uncentred* rows
    (randomised SVD, `torch.svd_lowrank`, about 25 times faster than an exact eigh of the D x D second
    moment at 20k x 3072; figures in the README).

    Uncentred on purpose: we need inner products q.g ~ (W^T q).(W^T g), and the best rank-r approximation of
    the gallery rows (truncated SVD) gives that; centring would drop the g.mean term that varies per item.
    """
    n, d = embeddings.shape
    if not 0 < dim < d:
        raise ValueError(f"PCA dim must be in 1..{d - 1}, got {dim}")
    rows = sample_rows(n, PCA_SAMPLE, seed)
    x = Shards.of(embeddings).take(rows).float()
    with torch.random.fork_rng(devices=[]):  # svd_lowrank draws from the global generator: seed it locally
        torch.manual_seed(seed)
        _, _, v = torch.svd_lowrank(x, q=min(dim + 16, min(x.shape)), niter=4)
    return v[:, :dim].contiguous()


def pca_energy(embeddings, components: torch.Tensor, rows: int = 4096, seed: int = 1) -> float:
    """Share of a row sample's squared norm that the projection keeps (sum |W^T g|^2 / sum |g|^2): how much of
    the embedding a PCA of this width sees. Trained embeddings put most of it in few directions; the lower the
    width that keeps ~all of it, the cheaper the IVF-PQ codes (d / search.pq_dims per row)."""
    store = Shards.of(embeddings)
    x = store.take(sample_rows(store.shape[0], rows, seed)).float()
    return float((x @ components).pow(2).sum() / x.pow(2).sum().clamp_min(1e-12))


def sample_rows(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` distinct row ids of n (all of them when n <= count), sorted (sequential reads on a memmap)."""
    if n <= count:
        return torch.arange(n)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.sort(rng.choice(n, size=count, replace=False)))


def project(vectors, components: torch.Tensor, chunk: int = 65536, out: torch.Tensor | None = None) -> torch.Tensor:
    """(N, D) -> (N, r), chunked so an fp16 store is never fully converted to fp32 at once; written into
    `out` (e.g. a memory-mapped fp16 array) when given, else returned in fp32."""
    blocks = Shards.of(vectors).enumerate_blocks(chunk)
    if out is None:
        return torch.cat([b.float() @ components for _, b in blocks])
    for r0, b in blocks:
        out[r0:r0 + b.shape[0]] = (b.float() @ components).to(out.dtype)
    return out


def synthetic_embeddings(n: int, d: int, rank: int = 128, per_cluster: int = 8, spread: float = 0.5,
                         noise: float = 0.3, seed: int = 0, dtype: torch.dtype = torch.float16,
                         chunk: int = 65536) -> torch.Tensor:
    """L2-normalised stand-ins for a re-id gallery, for benchmarks and tests: identities (clusters of about
    `per_cluster` images) whose centres and within-identity variation live in a random rank-`rank`
    subspace (trained embeddings have a low intrinsic dimension), plus a little isotropic noise. Uniform
    random vectors would be unrealistically hard for PCA and ANN. Built chunk by chunk in `dtype`
    (1M x 3072 is 6 GB in fp16; fp32 all at once would need 12)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g))[0].T * (d / rank) ** 0.5  # (rank, d)
    centres = torch.randn(max(1, n // per_cluster), rank, generator=g)
    out = torch.empty(n, d, dtype=dtype)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        z = centres[torch.randint(len(centres), (m,), generator=g)] + spread * torch.randn(m, rank, generator=g)
        x = z @ basis + noise * torch.randn(m, d, generator=g)  # signal ~1 per coordinate, noise `noise`
        out[i:i + m] = torch.nn.functional.normalize(x, dim=1).to(dtype)
    return out


def recall_queries(embeddings: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Held-out perturbations of `count` random gallery rows (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    n, d = embeddings.shape
    rows = torch.randperm(n, generator=g)[:count] if n <= (1 << 24) else sample_rows(n, count, seed)
    base = torch.nn.functional.normalize(Shards.of(embeddings).take(rows).float(), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(len(rows), d, generator=g), dim=1)
    return torch.nn.functional.normalize(base + noise, dim=1)


def recall_at(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean |found_q ∩ truth_q| / |truth_q| over queries (found and truth: (Q, k) ids)."""
    hits = (found[:, :, None] == truth[:, None, :]).any(1).float().sum(1)
    return float((hits / truth.shape[1]).mean())


class FaissSearch:
    """A faiss index over (reduced) vectors with its tuned search parameter; ids -1 mean 'no result'."""

    def __init__(self, index, param: str, value: int, threads: int = 1):
        """threads: an IVF query's probed lists are split over this many threads (0 = one per core); faiss
        runs one query on one thread, and `search_preassigned` lets each thread scan a share of its lists."""
        self.index, self.param, self.value = index, param, int(value)
        self.threads = max(1, int(threads) or cpu_cores())
        self._ivf = index if param == "nprobe" and isinstance(index, require_faiss().IndexIVF) else None
        self.min_split_codes = SPLIT_MIN_CODES
        # its threads start on the first split search (ThreadPoolExecutor starts them on demand)
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="lgur-ivf")
                      if self._ivf is not None and self.threads > 1 else None)
        self.set_param(self.value)

    def set_param(self, value: int) -> None:
        self.value = int(value)
        faiss = require_faiss()
        faiss.ParameterSpace().set_index_parameter(self.index, self.param, self.value)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: torch.Tensor, k: int, subset: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """subset: sorted row ids to search among, applied inside faiss by an ID selector (a bitmap over the
        rows); the probe count grows as the subset shrinks (FILTER_PROBE_GROWTH), since the nearest
        allowed rows lie further out than the nearest rows."""
        x = np.ascontiguousarray(queries.float().cpu().numpy())
        faiss = require_faiss()
        sel, value, bitmap = None, self.value, None
        if subset is not None:
            n = self.index.ntotal
            bitmap = np.zeros((n + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(bitmap, subset >> 3, (1 << (subset & 7)).astype(np.uint8))
            sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(bitmap))
            frac = max(len(subset) / max(n, 1), 1e-9)
            value = int(min(self._max_value(), np.ceil(self.value * max(1.0, FILTER_PROBE_GROWTH / frac) ** 0.5)))
        if self._splits(value):
            scores, ids = self._split_lists(x, int(k), value, sel)
        elif sel is None:
            scores, ids = self.index.search(x, int(k))
        elif self.param == "nprobe":
            scores, ids = self.index.search(x, int(k), params=faiss.SearchParametersIVF(sel=sel, nprobe=value))
        else:
            scores, ids = self.index.search(x, int(k), params=faiss.SearchParametersHNSW(sel=sel, efSearch=max(value, int(k))))
        del bitmap  # after the search: `sel` points into it
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def _splits(self, nprobe: int) -> bool:
        """Whether a search with this nprobe is split over threads (see SPLIT_MIN_CODES)."""
        if self._ivf is None or self.threads < 2 or nprobe < 2 * self.threads:
            return False
        return nprobe * self._ivf.ntotal / max(1, self._ivf.nlist) >= self.min_split_codes

    def _split_lists(self, x: np.ndarray, k: int, nprobe: int, sel) -> tuple[np.ndarray, np.ndarray]:
        """IVF search with the `nprobe` nearest lists of each query split into `threads` shares, each scanned
        by faiss (`search_preassigned`, GIL released) on its own thread; the shares' top-k are merged. The
        same rows are scored as by one `index.search` (tests/test_search_scale.py compares them); on 2 idle
        cores a query of 1M random 128-d rows (PQ64x4fs, nprobe 334 of 1000 lists) took 2.1 instead of 3.1 ms
        (bench/scale.py search prints both)."""
        faiss, ivf = require_faiss(), self._ivf
        centroid_scores, lists = ivf.quantizer.search(x, nprobe)
        shares = np.array_split(np.arange(nprobe), self.threads)
        n = len(x)

        def scan(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            assign = np.ascontiguousarray(lists[:, cols])
            dis = np.ascontiguousarray(centroid_scores[:, cols])
            scores, ids = np.empty((n, k), np.float32), np.empty((n, k), np.int64)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=len(cols))  # sel None: every row
            ivf.search_preassigned_c(n, faiss.swig_ptr(x), k, faiss.swig_ptr(assign), faiss.swig_ptr(dis),
                                     faiss.swig_ptr(scores), faiss.swig_ptr(ids), False, params)
            return scores, ids

        parts = list(self._pool.map(scan, shares))
        scores = np.concatenate([p[0] for p in parts], axis=1)
        ids = np.concatenate([p[1] for p in parts], axis=1)
        scores[ids < 0] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def _max_value(self) -> int:
        return faiss_nlist(self.index) if self.param == "nprobe" else 4096


class TwoStageSearch:
    """Stage 1 (`first`, over vectors projected by `components` or the full vectors) proposes candidates;
    stage 2 re-scores k*rerank of them exactly from `store` (rerank=0: stage 1 alone, no re-ranking).

    refine > 0 (with `reduced`, the stored PCA rows): stage 1 proposes k*refine candidates, which are first
    re-scored exactly in PCA space from `reduced` (fp16 rows, 2r bytes each, read through their memory map:
    ~300 B per crop stays in the page cache); the best k*rerank of those go on to the full-row re-ranking.
    This is faiss's IndexRefine idea over rows the index already stores: IVF-PQ's 4-bit codes rank the rows
    of the lists it scans coarsely, so without it the recall target is reached only by probing lists beyond
    the ones holding the answers. On the 10 M benchmark (bench/scale.py) the lists probed held 0.958 of the
    true top-10 at nprobe 640; the PQ scores' top 100 got 0.944 of them, the PCA-refined top 100 of 300
    candidates 0.954."""

    def __init__(self, first, store: torch.Tensor, components: torch.Tensor | None, rerank: int,
                 reduced: "torch.Tensor | Shards | None" = None, refine: int = 0):
        self.first, self.store, self.components, self.rerank = first, store, components, int(rerank)
        self.reduced = reduced if components is not None else None
        self.refine = int(refine) if self.reduced is not None else 0

    def __len__(self) -> int:
        return self.store.shape[0]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, subset: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.float()
        reduced = queries @ self.components.to(queries.device) if self.components is not None else queries
        kw = {} if subset is None else {"subset": subset}
        if not self.rerank:
            return self.first.search(reduced, k, **kw)
        wanted = min(len(self), k * self.rerank)
        if self.refine > self.rerank:
            _, cand = self.first.search(reduced, min(len(self), k * self.refine), **kw)
            _, cand = rescore(reduced, self.reduced, cand, wanted)
        else:
            _, cand = self.first.search(reduced, wanted, **kw)
        return rescore(queries, self.store, cand, k)


def build_faiss(vectors, kind: str, seed: int = 0, hnsw_m: int = 32, pq_dims: int = 2, add_rows: int = 262144):
    """Build (train + add) a faiss inner-product index over (N, d) vectors.

    ivfpq: `IVF{nlist},PQ{d/pq_dims}x4fs` (4-bit fast-scan PQ, the fastest IVF-PQ on CPU), nlist =
           `ivf_nlist(N)`; searched with nprobe. Measured at 100k x 256: PQ128x4fs reaches recall 0.97 where
           PQ64x4fs stalls at 0.93, and 8-bit PQ64 builds 40x slower.
    hnsw:  `HNSW{hnsw_m}` over the (reduced) float vectors; searched with efSearch.
    Trained on a sample, then filled block by block (`add_rows` at a time) from `vectors` (a tensor or
    Shards, e.g. memory-mapped reduced rows): the full matrix is never converted to fp32 at once.
    Returns (index, search parameter name).
    """
    faiss = require_faiss()
    vectors = Shards.of(vectors)
    n, d = vectors.shape

    def fill(index):
        for b in vectors.blocks(add_rows):
            index.add(np.ascontiguousarray(b.float().cpu().numpy()))

    if kind == "ivfpq":
        nlist = ivf_nlist(n)
        m = max(1, d // pq_dims)
        while d % m:
            m -= 1
        index = faiss.index_factory(d, f"IVF{nlist},PQ{m}x4fs", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = seed
        # spherical k-means (unit centroids): with inner-product assignment, plain k-means centroids (means,
        # of varying norm) draw rows to the longest centroid rather than the nearest. On the 1M benchmark
        # (bench/scale.py, 100 queries) recall@10 at nprobe 128 of 1000 lists: 0.920 vs 0.914, at 256: equal
        ivf.cp.spherical = True
        train = vectors.take(sample_rows(n, 64 * nlist + 4096, seed)).float().cpu().numpy()
        index.train(np.ascontiguousarray(train))
        fill(index)
        return index, "nprobe"
    if kind == "hnsw":
        index = faiss.index_factory(d, f"HNSW{hnsw_m}", faiss.METRIC_INNER_PRODUCT)
        fill(index)
        return index, "efSearch"
    raise ValueError(f"ANN kind must be one of {', '.join(ANN_KINDS)}, got {kind!r}")


@dataclass
class Tuning:
    """What the build measured: the chosen parameter, recall@10 with and without re-ranking, latency."""

    param: str
    value: int
    recall: float           # recall@10 of the full pipeline (with re-ranking) vs exact full-dim search
    recall_no_rerank: float  # stage 1 alone
    ms_per_query: float     # batch of the recall queries, per query
    queries: int

    def describe(self) -> str:
        return (f"{self.param}={self.value}: recall@10 {self.recall:.3f} with re-ranking, "
                f"{self.recall_no_rerank:.3f} without (vs exact full-dim, {self.queries} perturbed gallery "
                f"vectors as queries), {self.ms_per_query:.2f} ms/query")


def exact_truth(store: torch.Tensor, queries: torch.Tensor, k: int = 10) -> torch.Tensor:
    return ExactSearch(store).search(queries, k)[1]


def measure(engine, queries: torch.Tensor, truth: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """(recall@k vs truth, ms per query) of engine.search on the whole query batch."""
    t = time.perf_counter()
    ids = engine.search(queries, k)[1]
    return recall_at(ids, truth), (time.perf_counter() - t) * 1e3 / len(queries)


def tune(first: FaissSearch, store: torch.Tensor, components: torch.Tensor | None, rerank: int,
         queries: torch.Tensor, truth: torch.Tensor, target: float, steps: int = TUNE_STEPS,
         reduced: "torch.Tensor | Shards | None" = None, refine: int = 0) -> Tuning:
    """Smallest nprobe/efSearch whose re-ranked recall@10 (TwoStageSearch with `rerank`, and `refine` over
    `reduced`) reaches `target`: the first power of two that does, then `steps` bisection steps between it
    and the power below (the search time grows about linearly with nprobe: on the 1M benchmark nprobe 512
    was needed among powers of two while ~300 reached the target)."""
    cap = max(1, faiss_nlist(first.index)) if first.param == "nprobe" else 4096
    values = [v for v in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096) if v < cap] + [cap]
    engine = TwoStageSearch(first, store, components, rerank, reduced, refine)
    bare = TwoStageSearch(first, store, components, 0)
    below = None  # the largest value known to miss the target
    for v in values:
        first.set_param(v)
        recall, ms = measure(engine, queries, truth)
        if recall >= target or v == values[-1]:
            break
        below = v
    best = (v, recall, ms)
    if best[1] >= target and below is not None:
        lo, hi = below, v
        for _ in range(int(steps)):
            mid = (lo + hi) // 2
            if mid <= lo:
                break
            first.set_param(mid)
            recall, ms = measure(engine, queries, truth)
            if recall >= target:
                hi, best = mid, (mid, recall, ms)
            else:
                lo = mid
    v, recall, ms = best
    first.set_param(v)
    return Tuning(first.param, v, recall, measure(bare, queries, truth)[0], ms, len(queries))


def tune_ann(faiss_index, param: str, kind: str, store, components, reduced, scfg, queries,
             truth) -> tuple[Tuning, int]:
    """`tune` a freshly built faiss index with the search settings `scfg` (rerank, refine, recall target), as
    `lgur index` does; returns the tuning and the refine factor it used."""
    refine = ann_refine(kind, components, scfg)
    tuning = tune(FaissSearch(faiss_index, param, 1), store, components, int(scfg.rerank), queries, truth,
                  float(scfg.ann_recall_target), reduced=reduced, refine=refine)
    return tuning, refine


def ann_settings(tuning: Tuning, refine: int, scfg) -> dict:
    """The manifest's record of a tuning (its `ann` entry, beside kind/dim/build time): what the searcher uses."""
    return {"param": tuning.param, "value": tuning.value, "recall@10": tuning.recall,
            "recall@10_no_rerank": tuning.recall_no_rerank, "rerank": int(scfg.rerank), "refine": refine,
            "queries": tuning.queries}


def ann_refine(ann_kind: str, components, scfg) -> int:
    """search.refine where it helps: IVF-PQ over PCA rows (the rows its codes approximate are stored);
    HNSW scores its stage exactly already, and an ANN over the full rows has no cheaper rows to refine on."""
    return int(scfg.refine) if ann_kind == "ivfpq" and components is not None else 0


def ivf_nlist(n: int) -> int:
    """IVF list count for n rows: round(sqrt(n)), capped so every list gets >= 39 training points (faiss's
    minimum) and at least 1. Measured on the 1M benchmark (bench/scale.py, 256-d PCA rows, PQ64x4fs):
    4 sqrt(N) lists reached the same recall@10 only by scanning the same share of the rows (12.8 % of the
    lists: 0.902 with 4000 lists, 0.903 with 1000) while their k-means took 4x longer; re-id neighbours
    of a query spread over many lists, so finer lists do not cut the rows scanned."""
    return int(max(1, min(round(max(int(n), 0) ** 0.5), int(n) // 39)))


def faiss_nlist(index) -> int:
    return int(require_faiss().extract_index_ivf(index).nlist)


def attach_reduction(store, manifest: dict, writer, pca_dim: int | None, ann_kind: str | None, scfg) -> list[str]:
    """Fit the PCA and/or build the ANN index over `store` (the new index's embeddings, Shards), writing
    `pca.npy`, `reduced.npy` and `ann.faiss` through `writer` (an IndexWriter) and their settings with the
    recall@10 measured against exact full-dim search into `manifest`; returns the lines `lgur index` prints."""
    store = Shards.of(store)
    n, d = store.shape
    if not pca_dim and not ann_kind:
        return []
    queries = recall_queries(store, min(int(scfg.recall_queries), n))
    truth = exact_truth(store, queries)
    notes = []
    components = reduced = None
    if pca_dim:
        if not 0 < int(pca_dim) < d:
            raise SearchError(f"--pca must be between 1 and {d - 1} (the embedding has {d} dims), got {pca_dim}")
        components = fit_pca(store, int(pca_dim))
        energy = pca_energy(store, components)
        writer.write_array("pca.npy", components.numpy())
        reduced = torch.from_numpy(writer.open_array("reduced.npy", (n, int(pca_dim)), np.float16))
        project(store, components, out=reduced)
        first = ExactSearch(Shards([reduced], mapped=True))
        recall, ms = measure(TwoStageSearch(first, store, components, scfg.rerank), queries, truth)
        bare = measure(TwoStageSearch(first, store, components, 0), queries, truth)[0]
        manifest["pca"] = {"dim": int(pca_dim), "fit_rows": min(n, PCA_SAMPLE), "energy": energy, "recall@10": recall,
                           "recall@10_no_rerank": bare, "rerank": int(scfg.rerank), "queries": len(queries)}
        notes.append(f"PCA {d} -> {pca_dim} keeps {100 * energy:.1f} % of the rows' energy: recall@10 {recall:.3f} with re-ranking x{scfg.rerank}, {bare:.3f} "
                     f"without (vs exact full-dim, {len(queries)} perturbed gallery vectors as queries)")
    if ann_kind:
        vectors = reduced if components is not None else store
        t = time.perf_counter()
        faiss_index, param = build_faiss(vectors, ann_kind, hnsw_m=int(scfg.hnsw_m), pq_dims=int(scfg.pq_dims))
        built = time.perf_counter() - t
        tuning, refine = tune_ann(faiss_index, param, ann_kind, store, components, reduced, scfg, queries, truth)
        writer.write_faiss(faiss_index)
        manifest["ann"] = {"kind": ann_kind, "dim": int(vectors.shape[1]), **ann_settings(tuning, refine, scfg),
                           "build_seconds": round(built, 2)}
        how = (f"k x {refine} candidates re-scored on the PCA rows, then k x {scfg.rerank} on the full rows"
               if refine > int(scfg.rerank) else f"k x {scfg.rerank} candidates re-scored on the full rows")
        notes.append(f"ANN {ann_kind} over {vectors.shape[1]}-d vectors, built in {built:.1f} s ({how}); "
                     f"{tuning.describe()}")
        if n < int(scfg.ann_threshold):
            notes.append(f"note: {n} images < search.ann_threshold={scfg.ann_threshold}: `lgur search` scans "
                         f"{'the PCA vectors' if components is not None else 'exactly'} unless given --mode ann")
        if tuning.recall < float(scfg.ann_recall_target):
            notes.append(f"warning: ANN recall@10 {tuning.recall:.3f} is below the target "
                         f"{scfg.ann_recall_target} even at the largest {tuning.param}")
    return notes
