"""Explanations (lgur.models.explain): the part decomposition of the score and the recorded attention maps."""
from __future__ import annotations

import pytest
import torch

from lgur.config import load_config
from lgur.models import build_model
from lgur.models.explain import (image_evidence, limitations, part_contributions, record_attention,
                                 text_evidence, token_grid)

CAPTIONS = ["a woman in a red t-shirt and blue jeans carrying a black backpack", "a man in grey"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model(load_config("lgur_tiny"), num_classes=0, pretrained=False).eval()


def test_token_grid_of_every_backbone_shape():
    assert token_grid(192, (384, 128)) == (24, 8)   # DeiT-S / CLIP / ResNet-50 (output stride 16)
    assert token_grid(48, (384, 128)) == (12, 4)    # EfficientNet-Lite0
    assert token_grid(32, (128, 64)) == (8, 4)      # lgur_tiny's ViT
    with pytest.raises(ValueError):
        token_grid(50, (384, 128))


def test_recording_changes_no_number(tiny):
    images = torch.randn(3, 3, 128, 64)
    plain = tiny.encode_images(images)
    ev = image_evidence(tiny, images)
    torch.testing.assert_close(ev.embeddings, plain, atol=1e-6, rtol=0)
    txt = text_evidence(tiny, CAPTIONS)
    torch.testing.assert_close(txt.embeddings, tiny.encode_captions(CAPTIONS), atol=1e-6, rtol=0)
    assert all(a.attention_log is None for a in (layer.attn for layer in tiny.decoder.block.layers))


def test_contributions_add_up_to_the_score(tiny):
    images = torch.randn(5, 3, 128, 64)
    img = image_evidence(tiny, images).embeddings
    txt = text_evidence(tiny, CAPTIONS[:1]).embeddings[0]
    contrib = part_contributions(img, txt, tiny.num_parts)
    assert contrib.shape == (5, tiny.num_parts)
    torch.testing.assert_close(contrib.sum(dim=1), img @ txt, atol=1e-5, rtol=0)
    assert contrib.std() > 0  # parts really differ (a decomposition into K equal shares would pass the sum)


def test_image_maps_are_distributions_over_the_patches(tiny):
    ev = image_evidence(tiny, torch.randn(2, 3, 128, 64))
    assert ev.grid == (8, 4)
    assert ev.part_attention.shape == (2, tiny.num_parts, 8, 4)
    torch.testing.assert_close(ev.part_attention.sum(dim=(2, 3)), torch.ones(2, tiny.num_parts))
    assert (ev.part_attention >= 0).all()
    assert ev.foreground.shape == (2, 8, 4) and ((ev.foreground > 0) & (ev.foreground < 1)).all()


def test_word_attention_covers_the_words_and_never_the_padding(tiny):
    ev = text_evidence(tiny, CAPTIONS)
    assert ev.words[0][:3] == ["a", "woman", "in"] and ev.words[1] == ["a", "man", "in", "grey"]
    assert "backpack" in ev.words[0]
    for words, att in zip(ev.words, ev.word_attention):
        assert att.shape == (tiny.num_parts, len(words))
        torch.testing.assert_close(att.sum(dim=1), torch.ones(tiny.num_parts))
    # padding: the short caption is padded to the long one's length; its padded keys get exactly 0
    with record_attention(tiny) as logs:
        text_evidence(tiny, CAPTIONS)
    short_len = len(tiny.tokenizer(CAPTIONS[1])["input_ids"])
    for log in logs:
        probs = log[-1][1]  # (heads, K, tokens) of the short caption
        assert probs.shape[-1] > short_len
        assert torch.count_nonzero(probs[..., short_len:]) == 0
        torch.testing.assert_close(probs[..., :short_len].sum(-1), torch.ones(probs.shape[:2]))


def test_ablations_say_what_they_cannot_explain():
    cfg = load_config("lgur_tiny", ["model.use_pgu=false", "model.use_fcr=false"])
    model = build_model(cfg, num_classes=0, pretrained=False).eval()
    notes = limitations(model)
    assert any("PGU" in n for n in notes) and any("foreground" in n for n in notes)
    ev = image_evidence(model, torch.randn(1, 3, 128, 64))
    assert ev.part_attention is None and ev.foreground is None
    assert text_evidence(model, CAPTIONS[:1]).word_attention is None
    base = build_model(load_config("ablation_baseline", ["model.image_backbone=vit_tiny",
                                                         "model.text_backbone=bert_tiny", "model.dim=64",
                                                         "model.embed_dim=32", "data.image_size=[128, 64]"]),
                       num_classes=0, pretrained=False)
    assert len(limitations(base)) == 2
    assert limitations(build_model(load_config("lgur_tiny"), 0, pretrained=False)) == []


@pytest.fixture(scope="module")
def tiny_searcher(tmp_path_factory, synth_root):
    from lgur.checkpoint import save_model
    from lgur.search.index import build_index
    from lgur.search.searcher import Searcher

    d = tmp_path_factory.mktemp("explain")
    cfg = load_config("lgur_tiny")
    torch.manual_seed(0)
    save_model(build_model(cfg, 0, pretrained=False), cfg, d / "tiny.safetensors", 0)
    build_index(d / "tiny.safetensors", synth_root / "imgs", d / "g.lgidx", num_workers=0, progress=False)
    return Searcher(d / "g.lgidx")


def test_search_hits_explained(tiny_searcher):
    from PIL import Image

    from lgur.search.explain import explain_result, overlay

    [result] = tiny_searcher.search("a woman in a red coat with a black backpack", k=4)
    ex = explain_result(tiny_searcher, result)
    assert [h.id for h in ex.hits] == [h.id for h in result.hits]
    for hit, h in zip(result.hits, ex.hits):
        assert sum(p.contribution for p in h.parts) == pytest.approx(h.score, abs=1e-5)
        assert h.score == pytest.approx(hit.score, abs=2e-2)  # the scan may run in fp16; the parts in fp32
        assert [p.contribution for p in h.parts] == sorted((p.contribution for p in h.parts), reverse=True)
        assert h.part_attention.shape == (6, 8, 4) and h.foreground.shape == (8, 4)
        crop = Image.open(hit.file)
        assert overlay(crop, h.part_attention[h.strongest]).size == crop.size
        assert overlay(crop, h.foreground, color="#ff7f0e").size == crop.size
    assert ex.words[:2] == ["a", "woman"] and len(ex.word_part) == len(ex.words)
    d = ex.to_dict()
    assert len(d["hits"]) == 4 and len(d["hits"][0]["part_attention"]) == 6
    import json

    json.dumps(d)  # JSON-ready for the web API


def test_explanation_picture(tiny_searcher, tmp_path):
    from PIL import Image

    from lgur.search.explain import explain_result, hit_panels, words_html, write_explanation_png

    [result] = tiny_searcher.search("a man in a blue jacket", k=3)
    ex = explain_result(tiny_searcher, result)
    crops = [Image.open(h.file) for h in result.hits]
    panels = hit_panels(crops[0], ex.hits[0])
    assert [name for name, _ in panels] == ["crop", "foreground", f"part {ex.hits[0].strongest}"]
    assert all(p.size == crops[0].size for _, p in panels)
    assert all(p.tobytes() != crops[0].convert("RGB").tobytes() for _, p in panels[1:])
    png = write_explanation_png(ex, crops, tmp_path / "ex.png")
    assert Image.open(png).width >= 640
    assert words_html(ex).count("<span") == len(ex.words)
