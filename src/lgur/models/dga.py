"""Dictionary-based Granularity Alignment (DGA, docs/reference.md §1.5).

    M    = sigmoid(Linear_d->1(V))              ForegroundGate (FCR): one scalar per patch, unsupervised
    V_re = R(q=V, kv=D) * M                     SharedDictionary (MSD) reconstruction of the image
    T_re = R(q=T, kv=D)                         ... of the text (no key mask: D is never padded)
    V_g  = R(q=V, kv=T, key mask) * M           cross_modal_guidance (CMG), training only

R is ONE CrossAttentionBlock shared by all three paths. The ablation switches remove a box and its
parameters entirely: without MSD the "reconstruction" is the (gated) backbone tokens themselves.
"""
from __future__ import annotations

import torch
from torch import nn

from lgur.models.blocks import CrossAttentionBlock
from lgur.models.parts import DICTIONARY, GATE, R, lgur_heads


class SharedDictionary(nn.Module):
    """The multi-modality shared dictionary D (s atoms x d), N(0, 1) init as in the official code."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.atoms = nn.Parameter(torch.randn(size, dim))

    def forward(self) -> torch.Tensor:
        """(1, s, d): batch 1, broadcast by the attention (K/V of D are projected once per step)."""
        return self.atoms[None]


class ForegroundGate(nn.Module):
    """M = sigmoid(Linear(V)): the paper's "Conv(1x1) -> Sigmoid" foreground map, (B, P, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(tokens))


class DictionaryGranularityAlignment(nn.Module):
    """R + D + M, with the paper's three boxes as methods; only the enabled boxes are built."""

    def __init__(self, mcfg):
        super().__init__()
        self.use_msd, self.use_cmg, self.use_fcr = bool(mcfg.use_msd), bool(mcfg.use_cmg), bool(mcfg.use_fcr)
        heads = lgur_heads(mcfg)  # the switches -> modules decision of the model's parts description
        self.recon = (CrossAttentionBlock(mcfg.dim, mcfg.recon_depth, mcfg.recon_heads, mcfg.recon_head_dim,
                                          mcfg.recon_ffn) if R.key in heads else None)
        self.dictionary = SharedDictionary(mcfg.dict_size, mcfg.dim) if DICTIONARY.key in heads else None
        self.gate = ForegroundGate(mcfg.dim) if GATE.key in heads else None

    def foreground(self, V: torch.Tensor) -> torch.Tensor | None:
        """The FCR gate M (B, P, 1), or None when FCR is off."""
        return self.gate(V) if self.gate is not None else None

    def reconstruct_image(self, V: torch.Tensor, M: torch.Tensor | None) -> torch.Tensor:
        """V_re = R(V, D) * M (MSD + FCR); each factor dropped when its switch is off."""
        out = self.recon(V, self.dictionary()) if self.dictionary is not None else V
        return out * M if M is not None else out

    def reconstruct_text(self, T: torch.Tensor) -> torch.Tensor:
        """T_re = R(T, D). Padded steps are reconstructed too (official); PGU masks them later."""
        return self.recon(T, self.dictionary()) if self.dictionary is not None else T

    def cross_modal_guidance(self, V: torch.Tensor, T: torch.Tensor, text_mask: torch.Tensor,
                             M: torch.Tensor | None) -> torch.Tensor:
        """V_g = R(V, T, padded words masked) * M: image tokens rebuilt from the paired caption."""
        out = self.recon(V, T, text_mask)
        return out * M if M is not None else out
