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
from lgur.losses import build_criterion, cosine_similarity, part_id_losses, ranking_loss, select_negatives
from lgur.models.pgu import PartClassifier

MARGIN = 0.3


def reference_direction(sim, labels, margin, negative, reduction, uniform):
    """The official get_triplets loop (loss/RankingLoss.py), one anchor at a time in Python, with the
    random pick made as 'the candidate with the largest uniform draw' so it can share our draws."""
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
    losses = torch.stack([F.relu(margin - sim[i, i] + sim[i, j]) for i, j in triplets])
    return losses.sum() if reduction == "sum" else losses.mean()


def reference_ranking(sim, labels, margin, negative, reduction, uniform):
    return (reference_direction(sim, labels, margin, negative, reduction, uniform[0])
            + reference_direction(sim.T, labels, margin, negative, reduction, uniform[1]))


def random_similarity(B, D=4, seed=0, corr=0.5):
    """Correlated pairs; at D=4, corr=0.5 most anchors have semi-hard AND hard candidates, at
    D=16, corr=0.9 almost none do (the fallback path)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    return cosine_similarity(a, corr * a + (1 - corr) * b)


@pytest.mark.parametrize("negative", ["semi_hard", "hard", "batch_hard"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_vectorised_ranking_equals_per_anchor_reference(negative, reduction):
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    for seed in range(6):
        sim = random_similarity(len(labels), seed=seed, **({"D": 16, "corr": 0.9} if seed == 5 else {}))
        uniform = torch.rand((2, *sim.shape), generator=torch.Generator().manual_seed(100 + seed))
        ours = ranking_loss(sim, labels, MARGIN, negative, reduction, uniform=uniform)
        ref = reference_ranking(sim, labels, MARGIN, negative, reduction, uniform)
        assert torch.allclose(ours, ref, atol=1e-6), (seed, ours, ref)


def test_stacked_similarities_equal_separate_calls():
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    sims = torch.stack([random_similarity(6, seed=s) for s in range(4)])
    uniform = torch.rand((2, 4, 6, 6), generator=torch.Generator().manual_seed(0))
    stacked = ranking_loss(sims, labels, uniform=uniform)
    for n in range(4):
        assert torch.allclose(stacked[n], ranking_loss(sims[n], labels, uniform=uniform[:, n]), atol=1e-6)


def test_official_fallback_triplet_when_no_anchor_has_a_semi_hard_negative():
    # all negatives far below the positive (hinge <= 0) except one HARD negative: no semi-hard anywhere
    labels = torch.tensor([0, 1, 2])
    sim = torch.tensor([[0.9, -0.5, -0.5],
                        [-0.5, 0.9, -0.5],
                        [0.95, -0.5, 0.9]])  # row 2: column 0 is harder than the positive
    uniform = torch.rand(2, 3, 3)
    # rows: no semi-hard -> fallback (last anchor 2, first other-id column 0): relu(0.3 - 0.9 + 0.95)
    # columns (sim.T): anchor 0 sees 0.95 - 0.9 + 0.3 = 0.35 > margin: also hard, not semi-hard -> fallback
    # (anchor 2 of sim.T, first other-id column 0): sim.T[2, 0] = sim[0, 2] = -0.5 -> relu(0.3 - 0.9 - 0.5) = 0
    loss = ranking_loss(sim, labels, MARGIN, "semi_hard", "sum", uniform=uniform)
    assert torch.allclose(loss, torch.tensor(0.35))
    index, selected = select_negatives(sim, labels, MARGIN, "semi_hard", uniform[0])
    assert selected.tolist() == [False, False, True] and index[2] == 0


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


def test_gradient_flows_only_through_chosen_pairs():
    labels = torch.tensor([0, 1, 2, 3])
    sim = random_similarity(4, seed=3).requires_grad_()
    uniform = torch.rand((2, 4, 4), generator=torch.Generator().manual_seed(1))
    ranking_loss(sim, labels, uniform=uniform).backward()
    index_r, sel_r = select_negatives(sim, labels, MARGIN, "semi_hard", uniform[0])
    index_c, sel_c = select_negatives(sim.T, labels, MARGIN, "semi_hard", uniform[1])
    touched = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        if sel_r[i]:
            touched[i, i] = touched[i, index_r[i]] = True
        if sel_c[i]:
            touched[i, i] = touched[index_c[i], i] = True
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
    cfg = load_config("configs/lgur_tiny.yaml", ["loss.id_weight=0.5", "loss.rank_weight=2", "loss.guide_weight=3"])
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


def test_criterion_refuses_bad_options_and_missing_pieces():
    with pytest.raises(ConfigError, match="loss.negative"):
        build_criterion(load_config("configs/lgur_tiny.yaml", ["loss.negative=hardest"]))
    with pytest.raises(ConfigError, match="loss.reduction"):
        build_criterion(load_config("configs/lgur_tiny.yaml", ["loss.reduction=median"]))
    criterion = build_criterion(load_config("configs/lgur_tiny.yaml"))
    with pytest.raises(ValueError, match="V_g"):
        criterion(_outputs(["V_re", "T_re"]), torch.arange(6), _Holder(PartClassifier(3, 8, 6)))
    with pytest.raises(ValueError, match="num_classes=0"):
        criterion(_outputs(["V_g", "V_re", "T", "T_re"]), torch.arange(6), _Holder(None))


def test_criterion_computes_in_float32_under_autocast():
    cfg = load_config("configs/lgur_tiny.yaml")
    outputs = _outputs(["V_g", "V_re", "T", "T_re"])
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    model = _Holder(PartClassifier(3, 8, 4))
    plain, _ = build_criterion(cfg)(outputs, labels, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, _ = build_criterion(cfg)(outputs, labels, model)
    assert amp.dtype == torch.float32 and torch.equal(amp, plain)
