"""lgur.eval.metrics against a plain full-sort reference and hand-computed cases."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lgur.errors import LgurError
from lgur.eval import retrieval_metrics, similarity_metrics, text_image_metrics


def reference_metrics(sim: np.ndarray, qids: np.ndarray, gids: np.ndarray, ks=(1, 5, 10),
                      exclude: np.ndarray | None = None) -> dict[str, float]:
    """The obvious way: per query, a stable descending argsort of the whole row, then walk the hits.

    Excluded items are deleted from the row (what LGUR's official t2i_wm does with np.delete);
    queries without a relevant item are skipped.
    """
    sums = {f"R@{k}": 0.0 for k in ks} | {"mAP": 0.0, "mINP": 0.0, "mAP_lgur_trapezoid": 0.0}
    kept = 0
    for q in range(len(sim)):
        row, ids = sim[q], gids
        if exclude is not None and exclude[q] >= 0:
            row, ids = np.delete(row, exclude[q]), np.delete(ids, exclude[q])
        order = np.argsort(-row, kind="stable")
        hits = np.flatnonzero(ids[order] == qids[q])      # 0-based ranks of the relevant items
        if len(hits) == 0:
            continue
        kept += 1
        n = len(hits)
        for k in ks:
            sums[f"R@{k}"] += float(hits[0] < k)
        sums["mAP"] += np.mean([(i + 1) / (r + 1) for i, r in enumerate(hits)])
        sums["mINP"] += n / (hits[-1] + 1)
        sums["mAP_lgur_trapezoid"] += sum(0.5 * ((i / r if r else 1.0) + (i + 1) / (r + 1)) / n
                                          for i, r in enumerate(hits))
    out = {name: total / kept for name, total in sums.items()}
    out["num_queries"] = kept
    out["num_dropped"] = len(sim) - kept
    return out


def assert_same(ours: dict, ref: dict, tol: float = 1e-6) -> None:
    assert ours.keys() == ref.keys()
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=tol), name


def quantised_problem(seed: int, num_queries: int, num_gallery: int, num_ids: int, dim: int = 8):
    """Features on a coarse grid so that many scores tie exactly (float32 sums of small integers)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (num_queries, dim), generator=g).float()
    x = torch.randint(-2, 3, (num_gallery, dim), generator=g).float()
    qids = torch.randint(0, num_ids, (num_queries,), generator=g)
    gids = torch.randint(0, num_ids, (num_gallery,), generator=g)
    return q, x, qids, gids


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_matches_full_sort_reference_with_ties(chunk_size):
    q, x, qids, gids = quantised_problem(0, 61, 83, 9)
    sim = (q @ x.T).numpy()
    assert len(np.unique(sim)) < sim.size / 10                   # the data really has ties
    ref = reference_metrics(sim, qids.numpy(), gids.numpy(), ks=(1, 3, 5, 10))
    ours = retrieval_metrics(q, x, qids, gids, ks=(1, 3, 5, 10), chunk_size=chunk_size)
    assert_same(ours, ref)
    assert_same(similarity_metrics(torch.from_numpy(sim), qids, gids, ks=(1, 3, 5, 10), chunk_size=chunk_size), ref)


def test_ties_follow_gallery_index_order():
    """All scores equal: the ranking is the gallery order itself (stable descending sort)."""
    sim = torch.zeros(2, 5)
    gids = torch.tensor([0, 1, 0, 1, 1])
    # query id 0: hits at ranks 0, 2 -> AP = (1/1 + 2/3)/2 ; query id 1: hits at 1, 3, 4
    ours = similarity_metrics(sim, torch.tensor([0, 1]), gids, ks=(1,))
    assert ours["R@1"] == pytest.approx(0.5)
    assert ours["mAP"] == pytest.approx(((1 + 2 / 3) / 2 + (1 / 2 + 2 / 4 + 3 / 5) / 3) / 2)


def test_continuous_scores_and_uneven_chunks():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    x = torch.nn.functional.normalize(torch.randn(257, 32, generator=g), dim=1)
    qids, gids = torch.randint(0, 40, (300,), generator=g), torch.randint(0, 40, (257,), generator=g)
    ref = reference_metrics((q @ x.T).numpy(), qids.numpy(), gids.numpy())
    assert_same(retrieval_metrics(q, x, qids, gids, chunk_size=128), ref)
    # half-precision features: scores are still computed in float32
    ours16 = retrieval_metrics(q.bfloat16(), x.bfloat16(), qids, gids, chunk_size=97)
    ref16 = reference_metrics((q.bfloat16().float() @ x.bfloat16().float().T).numpy(), qids.numpy(), gids.numpy())
    assert_same(ours16, ref16)


def test_hand_computed_toy():
    """3 queries x 5 gallery items, every value below worked out by hand.

    gallery ids: [0, 1, 0, 2, 1]
    q0 (id 0) scores [.9 .8 .1 .3 .2] -> order g0 g1 g3 g4 g2 ; relevant g0, g2 at ranks 0, 4
        R@1 1, R@5 1 ; AP = (1/1 + 2/5)/2 = 0.7 ; INP = 2/5 = 0.4
        trapezoid = 1/2 [ 1/2 (1 + 1/1) + 1/2 (1/4 + 2/5) ] = 1/2 [1 + 0.325] = 0.6625
    q1 (id 1) scores [.5 .2 .4 .1 .3] -> order g0 g2 g4 g1 g3 ; relevant g4, g1 at ranks 2, 3
        R@1 0, R@5 1 ; AP = (1/3 + 2/4)/2 = 5/12 ; INP = 2/4 = 0.5
        trapezoid = 1/2 [ 1/2 (0/2 + 1/3) + 1/2 (1/3 + 2/4) ] = 1/2 [1/6 + 5/12] = 7/24
    q2 (id 2) scores [.1 .2 .3 .9 .4] -> order g3 g4 g2 g1 g0 ; relevant g3 at rank 0
        R@1 1, R@5 1 ; AP = 1 ; INP = 1 ; trapezoid = 1/2 (1 + 1) = 1
    means: R@1 2/3, R@5 1, mAP (0.7 + 5/12 + 1)/3, mINP (0.4 + 0.5 + 1)/3, trapezoid (0.6625 + 7/24 + 1)/3
    """
    sim = torch.tensor([[.9, .8, .1, .3, .2], [.5, .2, .4, .1, .3], [.1, .2, .3, .9, .4]])
    qids, gids = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0, 2, 1])
    ours = similarity_metrics(sim, qids, gids, ks=(1, 5), chunk_size=2)
    assert ours["R@1"] == pytest.approx(2 / 3)
    assert ours["R@5"] == pytest.approx(1.0)
    assert ours["mAP"] == pytest.approx((0.7 + 5 / 12 + 1) / 3)
    assert ours["mINP"] == pytest.approx((0.4 + 0.5 + 1) / 3)
    assert ours["mAP_lgur_trapezoid"] == pytest.approx((0.6625 + 7 / 24 + 1) / 3)
    assert (ours["num_queries"], ours["num_dropped"]) == (3, 0)

    # t2i_wm by hand: remove g0 for q0, g4 for q1, g3 for q2 (each query's "own" image).
    # q0: order g1 g3 g4 g2 -> relevant g2 at rank 3: AP 1/4, INP 1/4, trapezoid 1/2 (0/3 + 1/4) = 1/8
    # q1: order g0 g2 g1 g3 -> relevant g1 at rank 2: AP 1/3, INP 1/3, trapezoid 1/2 (0 + 1/3) = 1/6
    # q2: id 2 has no other image -> dropped
    wm = similarity_metrics(sim, qids, gids, ks=(1, 5), exclude=torch.tensor([0, 4, 3]))
    assert (wm["num_queries"], wm["num_dropped"]) == (2, 1)
    assert (wm["R@1"], wm["R@5"]) == (0.0, 1.0)
    assert wm["mAP"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert wm["mINP"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    assert wm["mAP_lgur_trapezoid"] == pytest.approx((1 / 8 + 1 / 6) / 2)


@pytest.mark.parametrize("chunk_size", [5, 64])
def test_t2i_wm_matches_np_delete_reference(chunk_size):
    q, x, qids, gids = quantised_problem(2, 70, 40, 25)
    own = torch.randint(-1, 40, (70,), generator=torch.Generator().manual_seed(3))
    own[::3] = -1                                              # some queries exclude nothing
    ref = reference_metrics((q @ x.T).numpy(), qids.numpy(), gids.numpy(), exclude=own.numpy())
    assert_same(retrieval_metrics(q, x, qids, gids, chunk_size=chunk_size, exclude=own), ref)


def test_text_image_protocols_and_i2t():
    g = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    image_ids = torch.arange(30) // 2                          # 2 images per id
    own = torch.arange(60) // 2                                # 2 captions per image
    texts = torch.nn.functional.normalize(images[own] + 0.1 * torch.randn(60, 16, generator=g), dim=1)
    text_ids = image_ids[own]
    out = text_image_metrics(texts, images, text_ids, image_ids, ("t2i", "t2i_wm", "i2t"), own, chunk_size=16)
    sim = (texts @ images.T).numpy()
    assert_same(out["t2i"], reference_metrics(sim, text_ids.numpy(), image_ids.numpy()))
    assert_same(out["t2i_wm"], reference_metrics(sim, text_ids.numpy(), image_ids.numpy(), exclude=own.numpy()))
    i2t_ref = reference_metrics((images @ texts.T).numpy(), image_ids.numpy(), text_ids.numpy())
    assert_same(out["i2t"], i2t_ref)
    # a transposed (non-contiguous) similarity matrix is read correctly too
    assert_same(similarity_metrics((texts @ images.T).T, image_ids, text_ids, chunk_size=7), i2t_ref)
    assert out["t2i"]["R@1"] > 0.5 > out["t2i_wm"]["R@1"]      # chance is 1/15; wm is harder


def test_bad_input_is_refused():
    q, x, qids, gids = quantised_problem(5, 4, 6, 3)
    with pytest.raises(LgurError, match="non-finite"):
        retrieval_metrics(torch.full_like(q, float("nan")), x, qids, gids)
    with pytest.raises(LgurError, match="none of the 4 queries"):
        retrieval_metrics(q, x, qids + 100, gids)
    with pytest.raises(ValueError, match="one id per row"):
        retrieval_metrics(q, x, qids[:3], gids)
    with pytest.raises(ValueError, match="outside"):
        retrieval_metrics(q, x, qids, gids, exclude=torch.tensor([0, 1, 2, 6]))
