"""DGA (models/dga.py) checked on values: a 2-wide, 1-head, 2-atom case with hand-set weights whose
outputs are derived by hand below (no fixture needed; the official-parity tests check the same module
at real widths when the official fixture is present).

The block R (docs/reference.md §1.4): x <- x + W_o softmax(q k^T / sqrt(2)) v, q = W_q LN(x),
[k, v] = W_kv LN(y); then x <- x + fc2(relu(fc1(LN_b(x)))). The gate M = sigmoid(w . V + b).

Why the numbers are simple: LayerNorm over 2 features maps (a, b) to sign(a - b) * (1, -1), up to the
factor |a - b|/2 / sqrt(((a - b)/2)^2 + 1e-5) = 1 - O(1e-5) (checked to 1e-4 below). With
    W_q = c I, c = ln 3 / (2 sqrt 2)        W_k = I        W_v = [[1, 0], [0, 0]]        W_o = I, bias 0
a query normalised to +-(1, -1) against keys normalised to (1, -1) and (-1, 1) has logits
+-c * 2 / sqrt 2 = +-ln(3)/2, so softmax = (3/4, 1/4) or (1/4, 3/4); the values are (1, 0) and (-1, 0).
    FFN: fc1 = [[1, 0]], fc2 = [[0.5], [-0.5]], biases 0: adds (0.5, -0.5) when LN_b(x) = (1, -1)
         (x[0] > x[1]), nothing when LN_b(x) = (-1, 1).
    Gate: w = (ln 3 / 2, -ln 3 / 2), b = 0: M = sigmoid(ln3/2 * (x0 - x1)).
"""
from __future__ import annotations

import math

import pytest
import torch

from lgur.config import load_config
from lgur.models.dga import DictionaryGranularityAlignment

LN3 = math.log(3)
TINY2 = ["model.dim=2", "model.recon_depth=1", "model.recon_heads=1", "model.recon_head_dim=2",
         "model.recon_ffn=1", "model.dict_size=2"]

# one image with 2 patch tokens, one caption with 2 word tokens (the second is padding in the mask)
V = torch.tensor([[[3.0, 1.0], [0.0, 2.0]]])
T = torch.tensor([[[1.0, -1.0], [-5.0, 5.0]]])
MASK = torch.tensor([[1, 0]])


def hand_set_dga(*switches: str) -> DictionaryGranularityAlignment:
    dga = DictionaryGranularityAlignment(load_config("lgur_tiny", TINY2 + list(switches)).model)
    with torch.no_grad():
        if dga.recon is not None:
            [layer] = dga.recon.layers
            attn, ffn = layer.attn, layer.ffn
            for norm in (attn.norm, ffn.norm):  # the default affine LayerNorm, set explicitly
                norm.weight.fill_(1.0)
                norm.bias.zero_()
            attn.to_q.weight.copy_(LN3 / (2 * math.sqrt(2)) * torch.eye(2))
            attn.to_kv.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 0]]))  # rows: K (I), then V
            attn.to_out.weight.copy_(torch.eye(2))
            attn.to_out.bias.zero_()
            ffn.fc1.weight.copy_(torch.tensor([[1.0, 0.0]]))
            ffn.fc1.bias.zero_()
            ffn.fc2.weight.copy_(torch.tensor([[0.5], [-0.5]]))
            ffn.fc2.bias.zero_()
        if dga.dictionary is not None:
            dga.dictionary.atoms.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))  # LN: (1,-1) and (-1,1)
        if dga.gate is not None:
            dga.gate.proj.weight.copy_(torch.tensor([[LN3 / 2, -LN3 / 2]]))
            dga.gate.proj.bias.zero_()
    return dga.eval()


def close(got: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(got, torch.tensor([expected]), atol=1e-4, rtol=0)


def test_foreground_gate_by_hand():
    # patch (3, 1): sigmoid(ln3/2 * 2) = sigmoid(ln 3) = 3/4; patch (0, 2): sigmoid(-ln 3) = 1/4
    close(hand_set_dga().foreground(V), [[0.75], [0.25]])


def test_dictionary_reconstruction_of_image_and_text_by_hand():
    dga = hand_set_dga()
    with torch.no_grad():
        M = dga.foreground(V)
        # patch (3, 1): LN -> (1, -1), attention (3/4, 1/4) over the atoms -> + (3/4 - 1/4, 0) = (3.5, 1);
        #   LN_b -> (1, -1): FFN adds (0.5, -0.5) -> (4, 0.5); times M = 3/4 -> (3, 0.375)
        # patch (0, 2): LN -> (-1, 1), attention (1/4, 3/4) -> + (-0.5, 0) = (-0.5, 2);
        #   LN_b -> (-1, 1): FFN adds 0 -> (-0.5, 2); times M = 1/4 -> (-0.125, 0.5)
        close(dga.reconstruct_image(V, M), [[3.0, 0.375], [-0.125, 0.5]])
        # text: no gate, no key mask (the dictionary is never padded), padded words reconstructed too
        # word (1, -1): + (0.5, 0) = (1.5, -1); FFN adds (0.5, -0.5) -> (2, -1.5)
        # word (-5, 5): LN -> (-1, 1): + (-0.5, 0) = (-5.5, 5); FFN adds 0 -> (-5.5, 5)
        close(dga.reconstruct_text(T), [[2.0, -1.5], [-5.5, 5.0]])


def test_cross_modal_guidance_by_hand_masks_padded_words():
    dga = hand_set_dga()
    with torch.no_grad():
        M = dga.foreground(V)
        # keys = the caption's words; word 2 is padding, so every patch attends to word 1 only (prob 1),
        # whose value is LN(1, -1) -> (1, 0):
        # patch (3, 1): (4, 1); FFN adds (0.5, -0.5) -> (4.5, 0.5); times 3/4 -> (3.375, 0.375)
        # patch (0, 2): (1, 2); LN_b -> (-1, 1): FFN adds 0 -> (1, 2); times 1/4 -> (0.25, 0.5)
        close(dga.cross_modal_guidance(V, T, MASK, M), [[3.375, 0.375], [0.25, 0.5]])
        # without the mask word 2 (LN -> (-1, 1)) takes 1/4 of patch 1's attention: (3.5, 1) -> (4, 0.5)
        # -> x 3/4 = (3, 0.375), so the mask changes the result
        close(dga.cross_modal_guidance(V, T, torch.ones_like(MASK), M), [[3.0, 0.375], [-0.125, 0.5]])


@pytest.mark.parametrize("switches, expected", [
    # FCR off: no gate, V_re = R(V, D) = (4, 0.5), (-0.5, 2) (the values above before the gate)
    (["model.use_fcr=false"], [[4.0, 0.5], [-0.5, 2.0]]),
    # MSD off: no dictionary; the "reconstruction" is the gated tokens V * M
    (["model.use_msd=false"], [[3.0 * 0.75, 1.0 * 0.75], [0.0, 2.0 * 0.25]]),
])
def test_ablation_switches_by_hand(switches, expected):
    dga = hand_set_dga(*switches)
    with torch.no_grad():
        close(dga.reconstruct_image(V, dga.foreground(V)), expected)
