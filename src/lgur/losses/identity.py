"""Identity (ID) loss with one classifier per prototype part (docs/reference.md §2.1, official Id_Loss).

L_ID(A, B) = (1/K) sum_k [CE(C_k a_k, y) + CE(C_k b_k, y)], C_k shared by modality and branch, plain
CE on the un-normalised part vectors. All branches of a step go through the K classifiers in ONE
batched op; the per-branch, per-part values come back for the caller to combine.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def part_id_losses(classifier: nn.Module, branches: Sequence[torch.Tensor],
                   labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """n branch part stacks (B, K, E) -> (CE per branch and part (n, K), top-1 accuracy per branch (n,)).

    CE is averaged over the batch (the official reduction='mean'); accuracy over batch and parts
    (the official per-part accuracy averaged over parts).
    """
    x = torch.stack(list(branches))
    n, b, k, _ = x.shape
    logits = classifier(x.flatten(0, 1)).float()  # (n*B, K, C)
    target = labels.repeat(n)[:, None].expand(n * b, k)
    ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").view(n, b, k).mean(dim=1)
    acc = (logits.argmax(dim=-1) == target).float().view(n, b * k).mean(dim=1)
    return ce, acc
