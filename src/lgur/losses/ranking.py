"""Bidirectional ranking (triplet) loss on cosine similarity, vectorised (lgur-reference §2.1).

Official rule (loss/RankingLoss.py), per direction, for a B x B similarity S whose rows are anchors:
- the positive of anchor i is the diagonal pair (i, i) only;
- candidate negatives are the columns j with y_j != y_i;
- `semi_hard` (official code): candidates with 0 < s_ij - s_ii + margin < margin, ONE chosen uniformly
  at random; `hard` (the paper's wording): random among s_ij > s_ii; `batch_hard`: the most similar
  candidate;
- anchors without a candidate are skipped;
- official fallback: when NO anchor of the direction has a candidate, the single triplet
  (last anchor, its positive, its first other-id column) is used instead (its hinge may be 0 or
  large); when even the last anchor has no other-id column (one identity in the batch) the
  official code crashes and we return 0;
- loss relu(margin - s_ii + s_ij) summed (official) or averaged over the chosen triplets; the two
  directions (S and S^T) are added.

Random choice without a CPU round-trip: a uniform matrix U (one value per anchor/candidate, drawn
from a seeded torch.Generator on the device) picks argmax_j U_ij over the candidates, which is a
uniform choice among them. Everything works on stacks of similarity matrices (..., B, B), so all the
ranking terms of a step share one set of kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("semi_hard", "hard", "batch_hard")
REDUCTIONS = ("sum", "mean")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., B, D) x (..., B, D) -> (..., B, B). Training-time cosine: divides by the norm WITHOUT the
    +1e-8 of the test-time embedding (official, lgur-reference §9.5)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.transpose(-1, -2)


def select_negatives(sim: torch.Tensor, labels: torch.Tensor, margin: float, negative: str,
                     uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative column per anchor row and whether that anchor has a triplet (fallback applied).

    sim (..., B, B), labels (B,), uniform (..., B, B) in [0, 1). Returns index (..., B) long and
    selected (..., B) bool. No gradient flows through the choice (as in the official NumPy code).
    """
    s = sim.detach()
    violation = s - s.diagonal(dim1=-2, dim2=-1)[..., None] + margin  # the hinge each j would give
    different = (labels[:, None] != labels[None, :]).expand_as(s)
    if negative == "batch_hard":
        candidates, score = different, s
    else:
        window = (violation > 0) & (violation < margin) if negative == "semi_hard" else violation > margin
        candidates, score = different & window, uniform
    index = score.masked_fill(~candidates, float("-inf")).argmax(dim=-1)
    selected = candidates.any(dim=-1)
    # official fallback: (last anchor, first other-id column) when no anchor has a candidate
    none = ~selected.any(dim=-1, keepdim=True)
    last = torch.zeros_like(selected)
    last[..., -1] = True
    last_other = different[..., -1, :]
    fallback_index = last_other.float().argmax(dim=-1, keepdim=True)  # first True
    use_fallback = none & last & last_other.any(dim=-1, keepdim=True)
    index = torch.where(none & last, fallback_index, index)
    selected = torch.where(none, use_fallback, selected)
    return index, selected


def triplet_hinge(sim: torch.Tensor, index: torch.Tensor, selected: torch.Tensor, margin: float,
                  reduction: str) -> torch.Tensor:
    """Sum (or mean) over selected anchors of relu(margin - s_ii + s_i,index_i): (..., B, B) -> (...)."""
    pos = sim.diagonal(dim1=-2, dim2=-1)
    neg = sim.gather(-1, index[..., None]).squeeze(-1)
    hinge = F.relu(margin - pos + neg) * selected
    total = hinge.sum(dim=-1)
    if reduction == "mean":
        total = total / selected.sum(dim=-1).clamp(min=1)
    return total


def ranking_loss(sim: torch.Tensor, labels: torch.Tensor, margin: float = 0.3, negative: str = "semi_hard",
                 reduction: str = "sum", uniform: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Bidirectional ranking loss of one or a stack of similarity matrices (..., B, B) -> (...).

    `uniform` (2, ..., B, B): the random draws of the two directions (rows, then columns as anchors);
    drawn from `generator` when not given.
    """
    if negative not in NEGATIVES:
        raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if uniform is None:
        uniform = torch.rand((2, *sim.shape), generator=generator, device=sim.device)
    total = sim.new_zeros(sim.shape[:-2])
    for direction, s in enumerate((sim, sim.transpose(-1, -2))):  # the two directions, not anchors
        index, selected = select_negatives(s, labels, margin, negative, uniform[direction])
        total = total + triplet_hinge(s, index, selected, margin, reduction)
    return total
