"""Choices that make large galleries fast: IVF list count vs N, nprobe refined below a power of two, IVF-PQ
candidates refined on the PCA rows, the filtered subset's gathered rows kept between queries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lgur.errors import SearchError
from lgur.search.ann import (FaissSearch, TwoStageSearch, build_faiss, exact_truth, faiss_nlist, faiss_or_none,
                             fit_pca, ivf_nlist, measure, project, recall_queries, synthetic_embeddings, tune)
from lgur.search.topk import SUBSET_THREAD_ROWS, ExactSearch, RowReader, Shards, row_reader, torch_threads

needs_faiss = pytest.mark.skipif(faiss_or_none() is None, reason="faiss is not installed (pip install faiss-cpu)")


def test_ivf_nlist_grows_as_sqrt_n_with_39_points_per_list():
    assert ivf_nlist(1_000_000) == 1000
    assert ivf_nlist(10_000_000) == 3162
    assert ivf_nlist(100_000) == 316
    assert ivf_nlist(6000) == 77
    assert ivf_nlist(1000) == 25  # sqrt = 32 lists would get < 39 training points each
    assert ivf_nlist(39) == 1 and ivf_nlist(10) == 1 and ivf_nlist(0) == 1
    sizes = [ivf_nlist(n) for n in range(0, 20000, 37)]
    assert sizes == sorted(sizes)  # never fewer lists for more rows


@needs_faiss
def test_ivfpq_index_uses_ivf_nlist_and_spherical_centroids():
    gallery = synthetic_embeddings(6000, 64, rank=16)
    index, param = build_faiss(gallery, "ivfpq")
    assert param == "nprobe" and faiss_nlist(index) == ivf_nlist(6000) == 77
    import faiss

    centroids = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 77)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-4)


@needs_faiss
def test_tune_refines_below_the_first_power_of_two():
    gallery = synthetic_embeddings(20000, 64, rank=32)
    queries = recall_queries(gallery, 200, seed=4)
    truth = exact_truth(gallery, queries)
    index, param = build_faiss(gallery, "ivfpq")
    coarse = tune(FaissSearch(index, param, 1), gallery, None, 10, queries, truth, target=0.95, steps=0)
    first = FaissSearch(index, param, 1)
    fine = tune(first, gallery, None, 10, queries, truth, target=0.95, steps=3)
    assert coarse.recall >= 0.95 and fine.recall >= 0.95
    assert coarse.value & (coarse.value - 1) == 0  # without refinement: a power of two
    # this gallery (141 lists): 32 probes give recall ~0.94, 48 ~0.97, 64 ~0.98 -> refined below 64
    assert coarse.value // 2 < fine.value < coarse.value
    assert first.value == fine.value  # the searcher is left at the chosen value
    from lgur.search.ann import TwoStageSearch, measure

    again, _ = measure(TwoStageSearch(first, gallery, None, 10), queries, truth)
    assert again == pytest.approx(fine.recall)


@pytest.fixture(scope="module")
def pq_over_pca():
    """30k rows of rank 64 in 256 dims, PCA-64 rows (fp16, as stored) and IVF-PQ (PQ32x4fs) over them."""
    gallery = synthetic_embeddings(30000, 256, rank=64)
    components = fit_pca(gallery, 64)
    reduced = project(gallery, components).half()
    index, param = build_faiss(reduced, "ivfpq")
    queries = recall_queries(gallery, 200, seed=4)
    return gallery, components, reduced, index, param, queries, exact_truth(gallery, queries)


@needs_faiss
def test_refine_on_pca_rows_recovers_the_pq_codes_ranking(pq_over_pca):
    gallery, components, reduced, index, param, queries, truth = pq_over_pca
    first = FaissSearch(index, param, faiss_nlist(index))  # every list: what is lost is the codes' ranking
    plain, _ = measure(TwoStageSearch(first, gallery, components, 2), queries, truth)
    refined, _ = measure(TwoStageSearch(first, gallery, components, 2, reduced, 20), queries, truth)
    # measured: 0.952 from the PQ scores' top 20, 0.998 from the PCA-rescored top 20 of 200
    assert plain < 0.97 and refined > 0.99
    # refine <= rerank, or no stored PCA rows: the plain pipeline
    for off in (TwoStageSearch(first, gallery, components, 2, reduced, 2),
                TwoStageSearch(first, gallery, components, 2, None, 20)):
        assert off.refine == 0 or off.refine <= off.rerank
        assert measure(off, queries, truth)[0] == plain


@needs_faiss
def test_refine_matches_a_plain_reference(pq_over_pca):
    gallery, components, reduced, index, param, queries, truth = pq_over_pca
    first = FaissSearch(index, param, 24, threads=1)
    subset = np.flatnonzero(np.arange(len(gallery)) % 7 == 2)
    for kw in ({}, {"subset": subset}):
        scores, ids = TwoStageSearch(first, gallery, components, 3, reduced, 25).search(queries[:40], 10, **kw)
        q_red = queries[:40] @ components
        _, cand = first.search(q_red, 250, **kw)  # what faiss proposes
        for q, qr, c, got, got_s in zip(queries[:40], q_red, cand.numpy(), ids, scores):
            c = c[c >= 0]
            if kw:
                assert np.isin(c, subset).all()
            pca_scores = reduced[c].float().numpy() @ qr.numpy()
            best = c[np.argsort(-pca_scores, kind="stable")[:30]]
            full = gallery[best].float().numpy() @ q.numpy()
            want = best[np.argsort(-full, kind="stable")[:10]]
            assert got.tolist() == want.tolist()
            np.testing.assert_allclose(got_s.numpy(), np.sort(full)[::-1][:10], rtol=1e-5, atol=1e-6)


@needs_faiss
def test_tune_with_refine_needs_no_more_probes(pq_over_pca):
    gallery, components, reduced, index, param, queries, truth = pq_over_pca
    plain = tune(FaissSearch(index, param, 1), gallery, components, 2, queries, truth, 0.95)
    refined = tune(FaissSearch(index, param, 1), gallery, components, 2, queries, truth, 0.95, reduced=reduced,
                   refine=20)
    assert refined.recall >= 0.95 and plain.recall >= 0.95
    assert refined.value < plain.value  # measured: fewer lists probed for the same target


class CountingShards(Shards):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.taken = 0

    def take(self, ids):
        self.taken += torch.as_tensor(ids).numel()
        return super().take(ids)


def test_filtered_scan_keeps_the_subset_rows_for_the_next_query():
    gallery = synthetic_embeddings(5000, 48, rank=12)
    queries = recall_queries(gallery, 3, seed=2)
    subset = np.arange(7, 5000, 10, dtype=np.int64)
    plain = ExactSearch(gallery, chunk_rows=128).search(queries, 10, subset=subset)
    store = CountingShards([gallery], mapped=True)
    cached = ExactSearch(store, chunk_rows=128, subset_cache_bytes=1 << 20)
    for _ in range(3):
        got = cached.search(queries, 10, subset=subset)
        assert torch.equal(got[1], plain[1])
        torch.testing.assert_close(got[0], plain[0])
    gathered = store.taken
    assert gathered >= len(subset)
    cached.search(queries, 10, subset=subset)
    assert store.taken - gathered < len(subset)  # only the re-scored rows, not the subset again
    other = subset.copy()  # an equal but different array: gathered anew (the cache keys on the object)
    cached.search(queries, 10, subset=other)
    assert store.taken - gathered >= len(subset)
    # a budget smaller than the subset's rows: nothing kept, every query gathers again
    store2 = CountingShards([gallery], mapped=True)
    small = ExactSearch(store2, chunk_rows=128, subset_cache_bytes=1000)
    small.search(queries, 10, subset=subset)
    first = store2.taken
    small.search(queries, 10, subset=subset)
    assert store2.taken - first >= len(subset) and not small._subset_cache


@needs_faiss
def test_ivf_lists_split_over_threads_score_the_same_rows_as_one_search(monkeypatch):
    """FaissSearch.threads > 1 scans shares of a query's probed lists on threads (search_preassigned) and
    merges their top-k: the same scores as one faiss search, unfiltered and through an ID selector."""
    gallery = synthetic_embeddings(20000, 64, rank=32)
    queries = recall_queries(gallery, 40, seed=5)
    index, param = build_faiss(gallery, "ivfpq")
    one, split = FaissSearch(index, param, 24, threads=1), FaissSearch(index, param, 24, threads=2)
    split.min_split_codes = 0
    calls = []
    real = split._split_lists
    monkeypatch.setattr(split, "_split_lists", lambda *a: calls.append(a[2]) or real(*a))
    subset = np.sort(np.random.default_rng(0).choice(20000, 1000, replace=False))  # 5 %: 1.4x the probes
    for kw in ({}, {"subset": subset}):
        s1, i1 = one.search(queries, 30, **kw)
        s2, i2 = split.search(queries, 30, **kw)
        torch.testing.assert_close(s2, s1)  # fast-scan scores are quantised: ties may swap ids, never scores
        overlap = np.mean([len(set(a.tolist()) & set(b.tolist())) / 30 for a, b in zip(i1, i2)])
        assert overlap > 0.97
        if kw:
            assert np.isin(i2.numpy(), subset).all()
    assert len(calls) == 2 and calls[1] > 24  # the filtered search probes more lists (FILTER_PROBE_GROWTH)
    # one thread, or a query scanning few codes, is not split
    assert not one._splits(24)
    small = FaissSearch(index, param, 24, threads=2)
    assert small.min_split_codes == 100_000 and not small._splits(24)  # 24 of 141 lists: ~3.4k codes
    assert FaissSearch(index, param, 24, threads=0).threads >= 1  # 0 = one per core


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_mapped_store_gathers_rows_with_pread_not_through_the_mapping(tmp_path):
    """Gathers (re-ranking's candidate rows) read each row with pread (RowReader) instead of faulting the
    mapping: a fault reads ~128 KiB around its page and maps page cache folios into the process. The marker:
    after gathering 300 rows spread over a 16 MiB shard, this process maps (nearly) none of the file."""
    rows = np.random.default_rng(0).standard_normal((8192, 1024)).astype(np.float16)  # 16 MiB, 2 KiB rows
    half = 4096
    np.save(tmp_path / "emb.npy", rows[:half])
    np.save(tmp_path / "emb2.npy", rows[half:])
    store = Shards.of_mapped([np.load(tmp_path / f, mmap_mode="c") for f in ("emb.npy", "emb2.npy")])
    assert all(isinstance(v, RowReader) for v in store._np)
    ids = torch.from_numpy(np.random.default_rng(1).choice(8192, 300, replace=False)).reshape(3, 100)
    np.testing.assert_array_equal(store.take(ids).numpy(), rows[ids.numpy()])  # both shards, any order
    assert _mapped_kib(tmp_path / "emb.npy") + _mapped_kib(tmp_path / "emb2.npy") < 256
    np.testing.assert_array_equal(torch.cat(list(store.blocks(1000))).numpy(), rows)  # scans use the mapping
    with pytest.raises(IndexError):
        store._np[0][np.array([half])]  # out of the shard's rows: an error, not another file's bytes
    whole = np.load(tmp_path / "emb.npy", mmap_mode="r")
    assert row_reader(whole[10:]) is not None and not isinstance(row_reader(whole[10:]), RowReader)  # a slice
    # the file as loaded stays readable after a newer index's commit removes it, as through the mapping,
    # also when nothing was gathered from it before
    np.save(tmp_path / "emb3.npy", rows[:64])
    unread = Shards.of_mapped([np.load(tmp_path / "emb3.npy", mmap_mode="c")])
    (tmp_path / "emb3.npy").unlink()
    np.testing.assert_array_equal(unread.take(torch.tensor([7, 63])).numpy(), rows[[7, 63]])
    # a shard truncated after loading: a readable error, not a traceback from inside the read
    with open(tmp_path / "emb.npy", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    with pytest.raises(SearchError, match="truncated"):
        store.take(torch.tensor([half - 1]))


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, current = 0, False
    for line in open("/proc/self/smaps"):
        first = line.split(maxsplit=1)[0]
        if "-" in first and not first.endswith(":"):  # a mapping's header line: address range ... path
            current = line.rstrip("\n").endswith(str(path))
        elif first == "Rss:" and current:
            total += int(line.split()[1])
    return total


@needs_faiss
def test_ivfpq_index_stores_refine_and_the_engine_uses_it(tmp_path):
    """`lgur index --pca --ann ivfpq` (attach_reduction) tunes with search.refine and records it; the searcher
    reads it back; an index written before refine existed (no key) searches without it."""
    import json

    from lgur.config import defaults
    from lgur.search.ann import attach_reduction
    from lgur.search.index import GalleryIndex, IndexWriter, Rows
    from lgur.search.searcher import make_engine

    n, d = 4000, 96
    gallery = synthetic_embeddings(n, d, rank=24)
    scfg = defaults().search
    scfg.recall_queries = 100
    path = tmp_path / "g.lgidx"
    with IndexWriter(path) as w:
        w.write_embeddings([gallery], "fp16")
        w.write_rows(Rows.from_dicts([{"path": f"c/{i}.jpg", "size": 1, "mtime_ns": 0} for i in range(n)]))
        manifest = {"fingerprint": "f", "checkpoint": "ck", "images_root": "/nowhere", "dtype": "fp16", "dim": d,
                    "skipped": [], "pca": None, "ann": None}
        notes = attach_reduction(Shards([gallery]), manifest, w, 24, "ivfpq", scfg)
        w.commit(manifest)
    assert manifest["ann"]["refine"] == scfg.refine == 30
    assert any(f"k x 30 candidates re-scored on the PCA rows, then k x {scfg.rerank} on the full rows" in s
               for s in notes)
    engine = make_engine(GalleryIndex.load(path), "ann", scfg, torch.device("cpu")).engine
    assert engine.refine == 30 and engine.reduced is not None
    queries = recall_queries(gallery, 100)  # the build's own queries (seed 0): the recall it recorded
    assert measure(engine, queries, exact_truth(gallery, queries))[0] == pytest.approx(manifest["ann"]["recall@10"],
                                                                                      abs=0.011)
    mpath = path / "manifest.json"
    old = json.loads(mpath.read_text())
    del old["ann"]["refine"]
    mpath.write_text(json.dumps(old))
    assert make_engine(GalleryIndex.load(path), "ann", scfg, torch.device("cpu")).engine.refine == 0
    old["ann"]["refine"] = -1
    mpath.write_text(json.dumps(old))
    with pytest.raises(SearchError, match="refine"):
        GalleryIndex.load(path)


def test_large_filtered_subset_is_scanned_on_subset_threads():
    class Recording(ExactSearch):
        def _subset_blocks(self, subset, dtype):
            self.seen = torch.get_num_threads()
            return super()._subset_blocks(subset, dtype)

    gallery = synthetic_embeddings(SUBSET_THREAD_ROWS + 8000, 32, rank=8)
    queries = recall_queries(gallery, 5, seed=2)
    big = np.arange(SUBSET_THREAD_ROWS + 100, dtype=np.int64)
    small = big[::50]
    with torch_threads(1):  # as a single query runs (search.single_query_threads)
        for subset, want, threads_in_scan in ((big, 2, 2), (small, 2, 1), (big, 1, 1)):
            plain = ExactSearch(gallery).search(queries, 10, subset=subset)
            threaded = Recording(gallery, subset_threads=want)
            got = threaded.search(queries, 10, subset=subset)
            assert threaded.seen == threads_in_scan and torch.get_num_threads() == 1
            # same candidates (the fp16 scan's margin of 16 absorbs any rounding), same exact fp32 re-scores
            assert torch.equal(got[1], plain[1]) and torch.allclose(got[0], plain[0])
    with torch_threads(3):  # a caller already on more threads keeps them
        threaded = Recording(gallery, subset_threads=2)
        threaded.search(queries, 10, subset=big)
        assert threaded.seen == 3
