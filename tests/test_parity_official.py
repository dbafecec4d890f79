"""Acceptance: our LGUR heads reproduce the official implementation (fixture README, steps 1-6).

The official weights in heads.safetensors / idloss16.safetensors are loaded through the converter's
name mapping into a full-width (paper) LGUR built without backbones; the saved V and BERT states go
in, and every captured tensor must come out within 1e-5 (the fixture's own float32 headroom is ~3x).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lgur.config import load_config
from lgur.losses import part_id_losses
from lgur.models.convert import map_official_state
from lgur.models.lgur import LGUR, retrieval_embedding

FIXTURES = Path(os.environ.get("LGUR_FIXTURES", Path(__file__).resolve().parents[2] / "shared/fixtures/official_lgur"))
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (FIXTURES / "heads.safetensors").is_file(),
                                reason=f"official LGUR fixture not found in {FIXTURES} (set LGUR_FIXTURES)")


def _text_encoder_stub() -> nn.Module:
    """The real TextEncoder around a 1-layer BERT of hidden 768: only its BiLSTM path is exercised
    (encode_hidden on the saved BERT states); the BERT weights stay random and unused."""
    from transformers import BertConfig, BertModel

    from lgur.models.backbones import TextEncoder

    bert = BertModel(BertConfig(num_hidden_layers=1, hidden_size=768, num_attention_heads=12,
                                intermediate_size=32, vocab_size=8), add_pooling_layer=False)
    return TextEncoder(bert, tokenizer=None, dim=384, use_lstm=True, freeze=True, dropout_in_train=True)


@pytest.fixture(scope="module")
def official():
    from safetensors.torch import load_file

    torch.manual_seed(0)
    heads, tensors, idloss = (load_file(str(FIXTURES / f)) for f in
                              ("heads.safetensors", "tensors.safetensors", "idloss16.safetensors"))
    mapped, ignored, unmapped = map_official_state(heads, idloss)
    assert unmapped == [] and ignored == ["pos_embed_image"]
    cfg = load_config()  # defaults = the official widths
    model = LGUR(cfg.model, image=nn.Identity(), text=_text_encoder_stub(), num_classes=16).eval()
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert unexpected == []
    assert all(k.startswith("text.backbone.") for k in missing), missing
    return model, tensors


def close(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    err = (ours - ref).abs().max().item()
    assert err <= TOL, f"{name}: max abs difference {err:.3g} > {TOL}"


@torch.no_grad()
def test_heads_reproduce_every_official_tensor(official):
    model, t = official
    V, mask = t["V"], t["text_key_mask"]
    T = model.text.encode_hidden(t["bert_last_hidden"], t["input.caption_mask"].sum(1))
    close(T, t["T"], "T")
    dga = model.dga
    M = dga.foreground(V)
    close(M, t["M"], "M")
    close(dga.recon(V, dga.dictionary()), t["R_V_dict_premask"], "R_V_dict_premask")
    V_re = dga.reconstruct_image(V, M)
    close(V_re, t["V_re"], "V_re")
    T_re = dga.reconstruct_text(T)
    close(T_re, t["T_re"], "T_re")
    close(dga.recon(V, T, mask), t["R_V_text_premask"], "R_V_text_premask")
    V_g = dga.cross_modal_guidance(V, T, mask, M)
    close(V_g, t["V_g"], "V_g")
    for name, tokens, key_mask in (("V_g", V_g, None), ("V_re", V_re, None), ("T", T, mask), ("T_re", T_re, mask)):
        close(model.decoder(tokens, key_mask), t[f"H_{name}"], f"H_{name}")
    branches = model.heads(V, T, mask)  # the training forward, PGU batched over branches
    assert sorted(branches) == ["T", "T_re", "V_g", "V_re"]
    for name, parts in branches.items():
        close(parts.transpose(0, 1), t[f"branch_{name}"], f"branch_{name}")
    close(model.proj(model.decoder(V)).transpose(0, 1), t["test_branch_V_plain"], "test_branch_V_plain")
    emb_img, emb_txt = model.embed_image_tokens(V), model.embed_text_tokens(T, mask)
    close(emb_img, t["emb_img"], "emb_img")
    close(emb_txt, t["emb_txt"], "emb_txt")
    close(emb_img @ emb_txt.T, t["similarity_img_txt"], "similarity_img_txt")
    # the fixture's own embeddings from its branch tensors (checks the concat order and the +1e-8)
    close(retrieval_embedding(t["branch_V_re"].transpose(0, 1)), t["emb_img"], "emb_img from fixture branches")


@pytest.mark.parametrize("source", ["fixture", "ours"])
@torch.no_grad()
def test_id_loss_matches_official(official, source):
    model, t = official
    if source == "fixture":
        b = {k: t[f"branch_{k}"].transpose(0, 1) for k in ("V_g", "V_re", "T", "T_re")}
    else:
        T = model.text.encode_hidden(t["bert_last_hidden"], t["input.caption_mask"].sum(1))
        b = model.heads(t["V"], T, t["text_key_mask"])
    ce, acc = part_id_losses(model.classifiers, [b["V_re"], b["T_re"], b["V_g"], b["T"]], t["input.id_labels"])
    for name, (img, txt) in {"dict": (0, 1), "guided": (2, 3)}.items():
        per_part = ce[img] + ce[txt]
        close(per_part, t[f"idloss.{name}_per_part"], f"idloss.{name}_per_part ({source})")
        close(per_part.mean(), t[f"idloss.{name}"], f"idloss.{name} ({source})")
        close(acc[img], t[f"idloss.{name}_acc_img"], f"idloss.{name}_acc_img ({source})")
        close(acc[txt], t[f"idloss.{name}_acc_txt"], f"idloss.{name}_acc_txt ({source})")
