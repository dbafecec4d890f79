"""The residual cross-attention block used by every LGUR head (docs/reference.md §1.4).

One layer = cross-attention sub-layer + FFN sub-layer, both pre-norm with residuals:

    x <- x + W_o · MHA(LN_a(x) W_q, LN_a(y) W_k, LN_a(y) W_v)      (ONE LayerNorm for x and y)
    x <- x + Linear(ReLU(Linear(LN_b(x))))

No self-attention, no final norm, q/kv projections without bias, padded keys get the logit
-finfo.max before the softmax (the official convention, so a fully padded row degrades to a uniform
average instead of NaN). Two instances exist in LGUR: R (the DGA reconstruction block, depth 1,
6 heads x 64) and the PGU decoder (depth 2, 6 heads x 512).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def key_padding_bias(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, M) mask (nonzero = valid key) -> (B, 1, 1, M) additive logit bias: 0 or -finfo(dtype).max.

    An additive bias (rather than a boolean mask) keeps the official behaviour on fully masked rows.
    """
    valid = key_mask.to(torch.bool)[:, None, None, :]
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(
        ~valid, torch.finfo(dtype).min)


class CrossAttention(nn.Module):
    """Multi-head cross-attention whose single LayerNorm normalises queries and keys/values alike.

    `to_kv` is fused: rows [0, inner) give K, rows [inner, 2*inner) give V (the official layout, so
    official weights load without reshuffling). Heads are head-major blocks of `head_dim` columns.
    """

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm = nn.LayerNorm(dim)  # eps 1e-5, shared by x and y
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # set to a list by lgur.models.explain.record_attention: forward then appends its attention
        # probabilities (B, heads, N, M), computed explicitly instead of by the fused kernel
        self.attention_log: list[torch.Tensor] | None = None

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim) queries; y (B or 1, M, dim) keys/values (batch 1 is broadcast: the dictionary is
        projected once, not once per sample); key_mask (B, M) or None. Returns the update (B, N, dim)."""
        b, n, _ = x.shape
        q = self._split_heads(self.to_q(self.norm(x)))
        k, v = self.to_kv(self.norm(y)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        bias = None if key_mask is None else key_padding_bias(key_mask, q.dtype)
        if self.attention_log is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale = head_dim ** -0.5
        else:  # the same softmax(q k^T / sqrt(d) + bias) v, written out so the probabilities can be kept
            logits = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5
            probs = (logits if bias is None else logits + bias).softmax(dim=-1)
            self.attention_log.append(probs.detach())
            out = probs @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class FeedForward(nn.Module):
    """Pre-norm Linear-ReLU-Linear (dropout 0 in the official model, so none here)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(self.norm(x))))


class CrossAttentionLayer(nn.Module):
    """x <- x + attn(x, y); x <- x + ffn(x)."""

    def __init__(self, dim: int, heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.attn = CrossAttention(dim, heads, head_dim)
        self.ffn = FeedForward(dim, ffn)

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(x, y, key_mask)
        return x + self.ffn(x)


class CrossAttentionBlock(nn.Module):
    """`depth` cross-attention layers over the same keys/values; no self-attention, no final norm."""

    def __init__(self, dim: int, depth: int, heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.layers = nn.ModuleList(CrossAttentionLayer(dim, heads, head_dim, ffn) for _ in range(depth))

    def forward(self, x: torch.Tensor, y: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:  # depth 1-2: a loop over layers, not over parts/anchors
            x = layer(x, y, key_mask)
        return x
