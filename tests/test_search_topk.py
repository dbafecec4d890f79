"""Exact top-k against a plain brute-force reference; PCA and faiss two-stage search recall."""
from __future__ import annotations

import pytest
import torch

from lgur.search.ann import (FaissSearch, TwoStageSearch, build_faiss, exact_truth, faiss_or_none, fit_pca, measure,
                             project, recall_at, recall_queries, synthetic_embeddings, tune)
from lgur.search.topk import ExactSearch, merge_topk, rescore


def reference_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> torch.Tensor:
    """Full fp32 score matrix + full sort: the definition of exact search."""
    return (queries.float() @ gallery.float().T).argsort(dim=1, descending=True)[:, :k]


@pytest.mark.parametrize("store", [torch.float32, torch.float16])
@pytest.mark.parametrize("compute", ["auto", "fp32", "bf16", "fp16"])
@pytest.mark.parametrize("num_queries", [1, 7])
def test_exact_topk_equals_brute_force(store, compute, num_queries):
    gallery = synthetic_embeddings(3000, 96, rank=24, dtype=store)
    queries = recall_queries(gallery, num_queries, seed=1)
    engine = ExactSearch(gallery, compute_dtype=compute, chunk_rows=700)  # several chunks, a ragged last one
    scores, ids = engine.search(queries, 10)
    ref = reference_topk(queries, gallery, 10)
    assert ids.shape == (num_queries, 10) and scores.dtype == torch.float32
    assert torch.equal(ids, ref)
    exact_scores = (queries @ gallery.float().T).gather(1, ref)
    torch.testing.assert_close(scores, exact_scores, rtol=0, atol=1e-5)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_exact_k_larger_than_gallery_and_query_chunks(monkeypatch):
    import lgur.search.topk as topk

    gallery = synthetic_embeddings(40, 16, rank=8, dtype=torch.float32)
    queries = recall_queries(gallery, 9, seed=2)
    monkeypatch.setattr(topk, "_MAX_SCORES", 4 * 40)  # forces query chunks of 4 (3 chunks for 9 queries)
    scores, ids = ExactSearch(gallery, "fp32", chunk_rows=16).search(queries, 100)
    assert ids.shape == (9, 40)
    assert torch.equal(ids, reference_topk(queries, gallery, 40))


def test_merge_and_rescore_basics():
    best = merge_topk(None, torch.tensor([[0.9, 0.1]]), torch.tensor([[5, 6]]), 2)
    best = merge_topk(best, torch.tensor([[0.5, 0.95]]), torch.tensor([[7, 8]]), 2)
    assert best[1].tolist() == [[8, 5]]
    store = torch.eye(4)
    q = torch.tensor([[0.1, 0.7, 0.2, 0.0]])
    top, ids = rescore(q, store, torch.tensor([[0, -1, 2, 1]]), 3)  # -1 = an ANN 'no result'
    assert ids.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(top, torch.tensor([[0.7, 0.2, 0.1]]))
    top, ids = rescore(q, store, torch.tensor([[3, -1]]), 2)
    assert ids.tolist() == [[3, -1]] and top[0, 1] == float("-inf")


def test_recall_at_hand_computed():
    found = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    truth = torch.tensor([[4, 3, 9, 10], [5, 6, 7, 8]])
    assert recall_at(found, truth) == pytest.approx((0.5 + 1.0) / 2)


def test_pca_two_stage_recall():
    """PCA to 16 of 64 dims: the re-ranked pipeline keeps most of exact recall, more than stage 1 alone."""
    gallery = synthetic_embeddings(4000, 64, rank=12, noise=0.05)
    queries = recall_queries(gallery, 200, seed=3)
    truth = exact_truth(gallery, queries)
    components = fit_pca(gallery, 16)
    assert components.shape == (64, 16)
    torch.testing.assert_close(components.T @ components, torch.eye(16), atol=1e-4, rtol=0)
    reduced = project(gallery, components).half()
    first = ExactSearch(reduced)
    reranked, _ = measure(TwoStageSearch(first, gallery, components, 4), queries, truth)
    bare, _ = measure(TwoStageSearch(first, gallery, components, 0), queries, truth)
    assert reranked >= 0.97
    assert reranked >= bare
    # a PCA that throws the structure away (1 dim) must lose recall: the measurement can fail
    c1 = fit_pca(gallery, 1)
    poor, _ = measure(TwoStageSearch(ExactSearch(project(gallery, c1).half()), gallery, c1, 1), queries, truth)
    assert poor < 0.6


@pytest.mark.skipif(faiss_or_none() is None, reason="faiss is not installed (pip install faiss-cpu)")
@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_faiss_ann_recall_tuned(kind):
    gallery = synthetic_embeddings(6000, 64, rank=16)
    queries = recall_queries(gallery, 200, seed=4)
    truth = exact_truth(gallery, queries)
    index, param = build_faiss(gallery, kind)
    assert index.ntotal == 6000
    tuning = tune(FaissSearch(index, param, 1), gallery, None, 10, queries, truth, target=0.95)
    assert tuning.recall >= 0.95
    assert tuning.recall >= tuning.recall_no_rerank - 1e-9
    engine = TwoStageSearch(FaissSearch(index, param, tuning.value), gallery, None, 10)
    assert recall_at(engine.search(queries, 10)[1], truth) == pytest.approx(tuning.recall)
