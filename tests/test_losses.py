"""Losses: vectorised ranking loss vs a plain per-anchor reference (same random draws), the official
fallback, uniform random choice, ID loss vs per-part classifiers, and the criterion's terms/weights."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lgur.config import load_config
from lgur.errors import ConfigError
from lgur.losses import (build_criterion, candidate_mask, cosine_similarity, part_id_losses, ranking_loss,
                         select_negatives)
from lgur.models.pgu import PartClassifier

MARGIN = 0.3


def reference_direction(sim, labels, margin, negative, reduction, uniform, read=None):
    """The official get_triplets loop (loss/RankingLoss.py), one anchor at a time in Python, with the
    random pick made as 'the candidate with the largest uniform draw' so it can share our draws.
    Triplets are chosen on `sim`; their hinge relu(margin - r_ii + r_ij) is read from `read` (default
    `sim`), as the official forward indexes the untransposed similarity for both directions."""
    read = sim if read is None else read
    B = sim.shape[0]
    triplets = []
    for i in range(B):
        negatives = [j for j in range(B) if labels[j] != labels[i]]
        if negative == "batch_hard":
            chosen = max(negatives, key=lambda j: sim[i, j].item()) if negatives else None
        else:
            cands = []
            for j in negatives:
                v = sim[i, j].item() - sim[i, i].item() + margin
                if (0 < v < margin) if negative == "semi_hard" else v > margin:
                    cands.append(j)
            chosen = max(cands, key=lambda j: uniform[i, j].item()) if cands else None
        if chosen is not None:
            triplets.append((i, chosen))
    if not triplets:  # official: [idx, idx, negative[0]] with idx, negative of the LAST anchor
        last_neg = [j for j in range(B) if labels[j] != labels[B - 1]]
        if not last_neg:
            return sim.new_zeros(())
        triplets.append((B - 1, last_neg[0]))
    losses = torch.stack([F.relu(margin - read[i, i] + read[i, j]) for i, j in triplets])
    return losses.sum() if reduction == "sum" else losses.mean()


def reference_ranking(sim, labels, margin, negative, reduction, uniform, text_hinge="official"):
    """Image direction on S; text direction chosen on S^T, read from S (official) or S^T (paper)."""
    text_read = sim if text_hinge == "official" else sim.T
    return (reference_direction(sim, labels, margin, negative, reduction, uniform[0])
            + reference_direction(sim.T, labels, margin, negative, reduction, uniform[1], read=text_read))


def random_similarity(B, D=4, seed=0, corr=0.5):
    """Correlated pairs; at D=4, corr=0.5 most anchors have semi-hard AND hard candidates, at
    D=16, corr=0.9 almost none do (the fallback path)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    return cosine_similarity(a, corr * a + (1 - corr) * b)


@pytest.mark.parametrize("text_hinge", ["official", "paper"])
@pytest.mark.parametrize("negative", ["semi_hard", "hard", "batch_hard"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_vectorised_ranking_equals_per_anchor_reference(negative, reduction, text_hinge):
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    differ = 0
    for seed in range(6):
        sim = random_similarity(len(labels), seed=seed, **({"D": 16, "corr": 0.9} if seed == 5 else {}))
        uniform = torch.rand((2, *sim.shape), generator=torch.Generator().manual_seed(100 + seed))
        ours = ranking_loss(sim, labels, MARGIN, negative, reduction, uniform=uniform, text_hinge=text_hinge)
        ref = reference_ranking(sim, labels, MARGIN, negative, reduction, uniform, text_hinge)
        assert torch.allclose(ours, ref, atol=1e-6), (seed, ours, ref)
        other = reference_ranking(sim, labels, MARGIN, negative, reduction, uniform,
                                  "paper" if text_hinge == "official" else "official")
        differ += not torch.allclose(ref, other, atol=1e-4)
    assert differ >= 4  # the two readings are different losses on these matrices: the check can fail


def test_stacked_similarities_equal_separate_calls():
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    sims = torch.stack([random_similarity(6, seed=s) for s in range(4)])
    uniform = torch.rand((2, 4, 6, 6), generator=torch.Generator().manual_seed(0))
    for text_hinge in ("official", "paper"):
        stacked = ranking_loss(sims, labels, uniform=uniform, text_hinge=text_hinge)
        for n in range(4):
            single = ranking_loss(sims[n], labels, uniform=uniform[:, n], text_hinge=text_hinge)
            assert torch.allclose(stacked[n], single, atol=1e-6)


def test_text_hinge_readings_by_hand():
    # two identities; image anchor 0 has semi-hard column 1 (hinge 0.1), image anchor 1 none (0.5 > margin);
    # text anchors (rows of S^T = [[0.8, 0.9], [0.6, 0.7]]): anchor 0 none (0.4), anchor 1 picks image 0
    # (s_10... on S^T: 0.6 - 0.7 + 0.3 = 0.2, semi-hard)
    labels = torch.tensor([0, 1])
    sim = torch.tensor([[0.8, 0.6],
                        [0.9, 0.7]])
    uniform = torch.rand(2, 2, 2)
    # official: text hinge read from S: relu(0.3 - s_11 + s_10) = 0.5, beyond the semi-hard window
    official = ranking_loss(sim, labels, MARGIN, "semi_hard", "sum", uniform=uniform)
    paper = ranking_loss(sim, labels, MARGIN, "semi_hard", "sum", uniform=uniform, text_hinge="paper")
    assert torch.allclose(official, torch.tensor(0.1 + 0.5)) and torch.allclose(paper, torch.tensor(0.1 + 0.2))
    with pytest.raises(ValueError, match="text_hinge"):
        ranking_loss(sim, labels, uniform=uniform, text_hinge="transposed")
    with pytest.raises(ValueError, match="uniform"):
        ranking_loss(sim, labels, uniform=uniform[0])


def test_official_fallback_triplet_when_no_anchor_has_a_semi_hard_negative():
    # all negatives far below the positive (hinge <= 0) except one HARD negative: no semi-hard anywhere
    labels = torch.tensor([0, 1, 2])
    sim = torch.tensor([[0.9, -0.5, -0.5],
                        [-0.5, 0.9, -0.5],
                        [0.95, -0.5, 0.9]])  # row 2: column 0 is harder than the positive
    uniform = torch.rand(2, 3, 3)
    # rows: no semi-hard -> fallback (last anchor 2, first other-id column 0): relu(0.3 - 0.9 + 0.95) = 0.35
    # columns (sim.T): anchor 0 sees 0.95 - 0.9 + 0.3 = 0.35 > margin: also hard, not semi-hard -> fallback
    # (anchor 2 of sim.T, first other-id column 0), read from S (official): sim[2, 0] = 0.95 -> 0.35;
    # read from S^T (paper): sim.T[2, 0] = sim[0, 2] = -0.5 -> relu(0.3 - 0.9 - 0.5) = 0
    loss = ranking_loss(sim, labels, MARGIN, "semi_hard", "sum", uniform=uniform)
    assert torch.allclose(loss, torch.tensor(0.70))
    loss = ranking_loss(sim, labels, MARGIN, "semi_hard", "sum", uniform=uniform, text_hinge="paper")
    assert torch.allclose(loss, torch.tensor(0.35))
    index, selected = select_negatives(sim, labels, MARGIN, "semi_hard", uniform[0])
    assert selected.tolist() == [False, False, True] and index[2] == 0
    index, selected = select_negatives(sim.T, labels, MARGIN, "semi_hard", uniform[1])
    assert selected.tolist() == [False, False, True] and index[2] == 0


def test_given_one_hot_draws_force_the_recorded_negatives():
    """A one-hot draw row selects that column whenever it is a candidate (how recorded official
    negatives are replayed through the production code)."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    sim = 0.5 - 0.4 * torch.rand(6, 6, generator=torch.Generator().manual_seed(2))
    sim.fill_diagonal_(0.5)  # hinge of (i, j) = 0.3 - 0.4 u: a candidate where u < 0.75
    cands = candidate_mask(sim, labels, MARGIN, "semi_hard")
    assert cands.sum() >= 12 and (cands.sum(1) >= 2).sum() >= 3
    for trial in range(4):
        g = torch.Generator().manual_seed(trial)
        pick = torch.full((6,), -1)
        for i in range(6):
            cols = cands[i].nonzero().flatten()
            if len(cols):
                pick[i] = cols[torch.randint(len(cols), (1,), generator=g)]
        draws = F.one_hot(pick.clamp(min=0), 6).float()
        index, selected = select_negatives(sim, labels, MARGIN, "semi_hard", draws)
        assert selected.tolist() == (pick >= 0).tolist() and (index[pick >= 0] == pick[pick >= 0]).all()


def test_single_identity_batch_gives_zero_not_a_crash():
    sim = random_similarity(4)
    loss = ranking_loss(sim, torch.zeros(4, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert loss.item() == 0.0


def test_random_choice_is_uniform_over_semi_hard_candidates():
    labels = torch.tensor([0, 1, 2, 3, 4])
    sim = torch.full((5, 5), -1.0)
    sim.fill_diagonal_(0.5)
    sim[0, 1:4] = torch.tensor([0.3, 0.35, 0.4])  # semi-hard for anchor 0: hinge in (0, margin)
    draws = 3000
    uniform = torch.rand((draws, 5, 5), generator=torch.Generator().manual_seed(0))
    index, selected = select_negatives(sim.expand(draws, 5, 5), labels, MARGIN, "semi_hard", uniform)
    assert selected[:, 0].all() and not selected[:, 1:].any()
    freq = torch.bincount(index[:, 0], minlength=5).float() / draws
    assert freq[0] == freq[4] == 0
    assert (freq[1:4] - 1 / 3).abs().max() < 0.04, freq


@pytest.mark.parametrize("text_hinge", ["official", "paper"])
def test_gradient_flows_only_through_chosen_pairs(text_hinge):
    labels = torch.tensor([0, 1, 2, 3])
    sim = random_similarity(4, seed=3).requires_grad_()
    uniform = torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(1))
    ranking_loss(sim, labels, uniform=uniform, text_hinge=text_hinge).backward()
    index_r, sel_r = select_negatives(sim, labels, MARGIN, "semi_hard", uniform[0])
    index_c, sel_c = select_negatives(sim.T, labels, MARGIN, "semi_hard", uniform[1])
    touched = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        if sel_r[i]:
            touched[i, i] = touched[i, index_r[i]] = True
        if sel_c[i]:  # text anchor i: official reads s_i,n (row i of S), the paper s_n,i
            touched[i, i] = True
            touched[(i, index_c[i]) if text_hinge == "official" else (index_c[i], i)] = True
    assert (sim.grad[~touched] == 0).all() and (sim.grad[touched] != 0).any()


def test_seeded_generator_reproduces_draws():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    sim = random_similarity(6, seed=5)
    a = ranking_loss(sim, labels, generator=torch.Generator().manual_seed(7))
    b = ranking_loss(sim, labels, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_training_cosine_has_no_epsilon():
    a, b = torch.randn(3, 8) * 1e-6, torch.randn(3, 8)  # tiny norms: an epsilon would show
    expected = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    assert torch.allclose(cosine_similarity(a, b), expected, atol=1e-6)
    assert torch.allclose(cosine_similarity(a, b).diagonal(), F.cosine_similarity(a, b), atol=1e-5)


def test_part_id_losses_equal_per_part_official_loop():
    torch.manual_seed(0)
    K, B, E, C = 6, 5, 12, 7
    cls = PartClassifier(K, E, C)
    with torch.no_grad():
        cls.weight.normal_()
        cls.bias.normal_()
    img, txt = torch.randn(B, K, E), torch.randn(B, K, E)
    labels = torch.randint(0, C, (B,))
    ce, acc = part_id_losses(cls, [img, txt], labels)
    for k in range(K):  # official Id_Loss: Linear per part, CE(mean) on image and on text
        linear = nn.Linear(E, C)
        with torch.no_grad():
            linear.weight.copy_(cls.weight[k]), linear.bias.copy_(cls.bias[k])
        assert torch.allclose(ce[0, k], F.cross_entropy(linear(img[:, k]), labels), atol=1e-5)
        assert torch.allclose(ce[1, k], F.cross_entropy(linear(txt[:, k]), labels), atol=1e-5)
    hits = torch.stack([(cls(img)[:, k].argmax(-1) == labels).float().mean() for k in range(K)])
    assert torch.allclose(acc[0], hits.mean())


class _Holder(nn.Module):
    def __init__(self, classifiers):
        super().__init__()
        self.classifiers = classifiers


def _outputs(keys, B=6, K=3, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, K, E, generator=g) for k in keys}


def test_criterion_total_is_the_weighted_sum_of_six_terms():
    cfg = load_config("lgur_tiny", ["loss.id_weight=0.5", "loss.rank_weight=2", "loss.guide_weight=3"])
    criterion = build_criterion(cfg)
    outputs = _outputs(["V_g", "V_re", "T", "T_re"])
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    model = _Holder(PartClassifier(3, 8, 4))
    loss, logged = criterion(outputs, labels, model)
    names = ["id_guided", "id_dict", "rank_guided", "rank_dict", "guide_text", "guide_image"]
    assert set(names) <= set(logged) and not any(v.requires_grad for v in logged.values())
    expected = (0.5 * (logged["id_guided"] + logged["id_dict"]) + 2 * (logged["rank_guided"] + logged["rank_dict"])
                + 3 * (logged["guide_text"] + logged["guide_image"]))
    assert torch.allclose(loss, expected) and torch.allclose(logged["loss"], expected)
    # the ID terms are 2 ln C at a zero classifier
    with torch.no_grad():
        model.classifiers.weight.zero_()
    _, logged = criterion(outputs, labels, model)
    assert torch.allclose(logged["id_dict"], torch.tensor(2 * math.log(4)))
    # the guided ranking term is the ranking loss of S(V_g, T), continuing the criterion's own stream
    fresh = build_criterion(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    _, logged = fresh(outputs, labels, model)
    sims = torch.stack([cosine_similarity(outputs[a].flatten(1), outputs[b].flatten(1)) for a, b in
                        [("V_g", "T"), ("V_re", "T_re"), ("T", "T_re"), ("V_g", "V_re")]])
    assert torch.allclose(ranking_loss(sims, labels, generator=g)[0], logged["rank_guided"])
    # given draws replace the generator; loss.text_hinge picks the reading
    draws = torch.rand((2, 4, 6, 6), generator=torch.Generator().manual_seed(5))
    for reading in ("official", "paper"):
        crit = build_criterion(load_config("lgur_tiny", [f"loss.text_hinge={reading}"]))
        _, logged = crit(outputs, labels, model, draws=draws)
        expected = ranking_loss(sims, labels, uniform=draws, text_hinge=reading)
        got = torch.stack([logged[n] for n in ("rank_guided", "rank_dict", "guide_text", "guide_image")])
        assert torch.allclose(got, expected)


def test_criterion_refuses_bad_options_and_missing_pieces(tiny_cfg):
    with pytest.raises(ConfigError, match="loss.negative"):
        build_criterion(load_config("lgur_tiny", ["loss.negative=hardest"]))
    with pytest.raises(ConfigError, match="loss.reduction"):
        build_criterion(load_config("lgur_tiny", ["loss.reduction=median"]))
    with pytest.raises(ConfigError, match="loss.text_hinge"):
        build_criterion(load_config("lgur_tiny", ["loss.text_hinge=transposed"]))
    criterion = build_criterion(tiny_cfg)
    with pytest.raises(ValueError, match="V_g"):
        criterion(_outputs(["V_re", "T_re"]), torch.arange(6), _Holder(PartClassifier(3, 8, 6)))
    with pytest.raises(ValueError, match="num_classes=0"):
        criterion(_outputs(["V_g", "V_re", "T", "T_re"]), torch.arange(6), _Holder(None))


def test_criterion_computes_in_float32_under_autocast(tiny_cfg):
    cfg = tiny_cfg
    outputs = _outputs(["V_g", "V_re", "T", "T_re"])
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    model = _Holder(PartClassifier(3, 8, 4))
    plain, _ = build_criterion(cfg)(outputs, labels, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, _ = build_criterion(cfg)(outputs, labels, model)
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
