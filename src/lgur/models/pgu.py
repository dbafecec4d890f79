"""Prototype-based Granularity Unification (PGU, docs/reference.md §1.6) and the per-part heads.

    H   = Pdec(q = P (K x d), kv = F [, text key mask])      PrototypeDecoder, shared by all branches
    f_k = W_k h_k  (d -> embed_dim, no bias)                  PartProjection, all K parts in one einsum
    logits_k = C_k f_k                                        PartClassifier (ID loss), K classifiers

The K projections / classifiers are stored as one (K, out, in) tensor so every part is computed by a
single batched op instead of the official Python loop over parts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lgur.models.blocks import CrossAttentionBlock


class PrototypeDecoder(nn.Module):
    """K learnable prototypes (N(0, 1) init) cross-attend to a token sequence; no self-attention."""

    def __init__(self, dim: int, num_prototypes: int, depth: int, heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim))
        self.block = CrossAttentionBlock(dim, depth, heads, head_dim, ffn)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, d), key_mask (B, N) or None -> H (B, K, d)."""
        queries = self.prototypes[None].expand(tokens.shape[0], -1, -1)
        return self.block(queries, tokens, key_mask)


class PartProjection(nn.Module):
    """K bias-free d -> out projections (the official 1x1 convs), Kaiming-normal fan_out init."""

    def __init__(self, num_parts: int, in_dim: int, out_dim: int):
        super().__init__()
        # kaiming_normal_(mode='fan_out', relu) of a Conv2d(in, out, 1): std = sqrt(2 / out)
        self.weight = nn.Parameter(torch.randn(num_parts, out_dim, in_dim) * math.sqrt(2.0 / out_dim))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        """(B, K, in) -> (B, K, out); part k uses weight[k]."""
        return torch.einsum("bki,koi->bko", parts, self.weight)


class PartClassifier(nn.Module):
    """K identity classifiers Linear(embed -> num_classes), weight N(0, 0.001^2), bias 0.

    Classifier k sees part k of every modality and branch (shared, as in the official code).
    """

    def __init__(self, num_parts: int, in_dim: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_parts, num_classes, in_dim) * 0.001)
        self.bias = nn.Parameter(torch.zeros(num_parts, num_classes))

    def forward(self, parts: torch.Tensor) -> torch.Tensor:
        """(B, K, embed) -> logits (B, K, num_classes)."""
        return torch.einsum("bke,kce->bkc", parts, self.weight) + self.bias
