"""Bidirectional ranking (triplet) loss on cosine similarity, vectorised (docs/reference.md §2.1).

Official rule (loss/RankingLoss.py of ZhiyinShao-H/LGUR @ c203cc7), per direction, for a B x B
similarity S whose rows are images (or the first argument of the pair) and columns texts:
- image direction: anchor i is row i of S; the positive is the diagonal pair (i, i) only;
  candidate negatives are the columns j with y_j != y_i;
- `semi_hard` (official code): candidates with 0 < s_ij - s_ii + margin < margin, ONE chosen uniformly
  at random; `hard` (the paper's wording): random among s_ij > s_ii; `batch_hard`: the most similar
  candidate;
- text direction: the SAME selection on S^T (text anchor a, candidate images n, judged on s_na);
- anchors without a candidate are skipped;
- official fallback: when NO anchor of a direction has a candidate, the single triplet
  (last anchor, its positive, its first other-id column) is used instead (its hinge may be 0 or
  large); when even the last anchor has no other-id column (one identity in the batch) the
  official code crashes and we return 0;
- loss relu(margin - s_aa + s_an) summed (official) or averaged over the chosen triplets; the two
  directions are added.

Which entry the text-direction hinge reads (`text_hinge`):
- `official` (default): the official code selects the text triplets on S^T but indexes the hinge on
  the UNtransposed S, `similarity[text_triplets[:, 0], text_triplets[:, 2]]`, i.e.
  relu(margin - s_aa + s_an) with n chosen by the text anchor's rule on s_na. These hinges are not
  confined to the semi-hard window. The fallback triplet is read the same way. Measured against one
  official training step (tests/test_parity_trainstep.py), this reading reproduces every loss term
  and gradient; the other does not.
- `paper`: the symmetric reading relu(margin - s_aa + s_na), both choice and hinge on S^T.

Random choice without a CPU round-trip: a uniform matrix U (one value per anchor/candidate, drawn
from a seeded torch.Generator on the device) picks argmax_j U_ij over the candidates, which is a
uniform choice among them. Given draws (`uniform=`) replace the generator: a one-hot row forces a
recorded choice, which is how the parity test replays the official negatives through this same code.
Everything works on stacks of similarity matrices (..., B, B), so all the ranking terms of a step
share one set of kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEGATIVES = ("semi_hard", "hard", "batch_hard")
REDUCTIONS = ("sum", "mean")
TEXT_HINGES = ("official", "paper")


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., B, D) x (..., B, D) -> (..., B, B). Training-time cosine: divides by the norm WITHOUT the
    +1e-8 of the test-time embedding (official, docs/reference.md §9.5)."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return a @ b.transpose(-1, -2)


def candidate_mask(sim: torch.Tensor, labels: torch.Tensor, margin: float, negative: str) -> torch.Tensor:
    """(..., B, B) bool: column j is a candidate negative of anchor row i under the `negative` rule
    (other identity; and for semi_hard 0 < s_ij - s_ii + margin < margin, for hard > margin)."""
    s = sim.detach()
    different = (labels[:, None] != labels[None, :]).expand_as(s)
    if negative == "batch_hard":
        return different
    violation = s - s.diagonal(dim1=-2, dim2=-1)[..., None] + margin  # the hinge each j would give
    window = (violation > 0) & (violation < margin) if negative == "semi_hard" else violation > margin
    return different & window


def select_negatives(sim: torch.Tensor, labels: torch.Tensor, margin: float, negative: str,
                     uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative column per anchor row and whether that anchor has a triplet (fallback applied).

    sim (..., B, B), labels (B,), uniform (..., B, B) in [0, 1). Returns index (..., B) long and
    selected (..., B) bool. No gradient flows through the choice (as in the official NumPy code).
    """
    candidates = candidate_mask(sim, labels, margin, negative)
    score = sim.detach() if negative == "batch_hard" else uniform
    index = score.masked_fill(~candidates, float("-inf")).argmax(dim=-1)
    selected = candidates.any(dim=-1)
    # official fallback: (last anchor, first other-id column) when no anchor has a candidate
    none = ~selected.any(dim=-1, keepdim=True)
    last = torch.zeros_like(selected)
    last[..., -1] = True
    last_other = labels != labels[-1]
    fallback_index = last_other.float().argmax().expand_as(index)  # first True
    index = torch.where(none & last, fallback_index, index)
    selected = torch.where(none, last & last_other.any(), selected)
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
                 generator: torch.Generator | None = None, text_hinge: str = "official") -> torch.Tensor:
    """Bidirectional ranking loss of one or a stack of similarity matrices (..., B, B) -> (...).

    Rows of `sim` are the image-direction anchors. `uniform` (2, ..., B, B): the random draws of the
    two directions (rows of S, then rows of S^T as anchors); drawn from `generator` when not given.
    `text_hinge`: official | paper, which entry the text-direction hinge reads (module docstring).
    """
    if negative not in NEGATIVES:
        raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if text_hinge not in TEXT_HINGES:
        raise ValueError(f"text_hinge must be one of {TEXT_HINGES}, got {text_hinge!r}")
    if uniform is None:
        uniform = torch.rand((2, *sim.shape), generator=generator, device=sim.device)
    elif uniform.shape != (2, *sim.shape):
        raise ValueError(f"uniform must have shape {(2, *sim.shape)}, got {tuple(uniform.shape)}")
    total = sim.new_zeros(sim.shape[:-2])
    for direction, s in enumerate((sim, sim.transpose(-1, -2))):  # the two directions, not anchors
        index, selected = select_negatives(s, labels, margin, negative, uniform[direction])
        # the official code reads the text-direction hinge from S (s_an), the paper's reading from S^T
        read = sim if text_hinge == "official" else s
        total = total + triplet_hinge(read, index, selected, margin, reduction)
    return total
