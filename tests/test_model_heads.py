"""LGUR heads and the assembled model: shapes, attention vs a plain reference, masks, gradients,
test path == training path, ablation switches, learning on a tiny batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lgur.config import load_config
from lgur.errors import ConfigError
from lgur.losses import build_criterion, loss_terms
from lgur.models import build_model
from lgur.models.blocks import CrossAttention, CrossAttentionBlock
from lgur.models.dga import DictionaryGranularityAlignment, ForegroundGate, SharedDictionary
from lgur.models.lgur import LGUR, masked_mean
from lgur.models.pgu import PartClassifier, PartProjection, PrototypeDecoder

CAPTIONS = ["a man in a red shirt and blue jeans", "a woman with a long black coat and a bag", "short hair",
            "a girl in a white dress walking", "an old man with a cane", "a boy in a green jacket",
            "a woman carrying a yellow umbrella and wearing boots", "black shoes"]
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


def plain_attention(attn: CrossAttention, x, y, key_mask=None):
    """The official Attention_mydecoder arithmetic written out: explicit softmax, -finfo.max fill."""
    h, d = attn.heads, attn.head_dim
    q = attn.to_q(attn.norm(x))
    k, v = attn.to_kv(attn.norm(y)).chunk(2, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], h, d).permute(0, 2, 1, 3)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-1, -2) * d ** -0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask.bool()[:, None, None, :], -torch.finfo(logits.dtype).max)
    out = (logits.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], h * d)
    return attn.to_out(out)


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, num_classes=4)
    tok = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    images = torch.randn(len(CAPTIONS), 3, *tiny_cfg.data.image_size)
    return model, images, tok["input_ids"], tok["attention_mask"]


# ------------------------------------------------------------------------------------------ blocks

@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_attention_matches_plain_reference(masked):
    torch.manual_seed(0)
    attn = CrossAttention(dim=24, heads=3, head_dim=16)
    x, y = torch.randn(3, 5, 24), torch.randn(3, 7, 24)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [0] * 7]) if masked else None  # row 3: all padded
    ours, ref = attn(x, y, mask), plain_attention(attn, x, y, mask)
    assert (ours - ref).abs().max() <= 1e-6
    # a broadcast key/value batch (the dictionary) equals the explicitly repeated one
    d = torch.randn(1, 7, 24)
    assert (attn(x, d) - plain_attention(attn, x, d.expand(3, -1, -1))).abs().max() <= 1e-6


def test_cross_attention_block_structure_and_residual():
    torch.manual_seed(0)
    block = CrossAttentionBlock(dim=16, depth=2, heads=2, head_dim=8, ffn=32)
    x, y = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    out = block(x, y)
    assert out.shape == (2, 4, 16)
    layer = block.layers[0]
    assert layer.attn.to_q.bias is None and layer.attn.to_kv.bias is None and layer.attn.to_out.bias is not None
    assert layer.attn.to_kv.weight.shape == (2 * 16, 16) and layer.attn.norm.eps == 1e-5
    # no self-attention: each query's output depends only on itself and the keys
    assert torch.allclose(block(x[:, :1], y), out[:, :1], atol=1e-6)
    # residual: zeroing the output projections and the FFN makes the block the identity
    with torch.no_grad():
        for lay in block.layers:
            for p in (lay.attn.to_out.weight, lay.attn.to_out.bias, lay.ffn.fc2.weight, lay.ffn.fc2.bias):
                p.zero_()
    assert torch.equal(block(x, y), x)


def test_dga_and_pgu_module_shapes_and_inits(tiny_cfg):
    torch.manual_seed(0)
    D = SharedDictionary(400, 384)
    assert D().shape == (1, 400, 384) and abs(D.atoms.std().item() - 1) < 0.02
    V = torch.randn(2, 10, 384)
    M = ForegroundGate(384)(V)
    assert M.shape == (2, 10, 1) and ((M > 0) & (M < 1)).all()
    dec = PrototypeDecoder(384, 6, depth=2, heads=6, head_dim=512, ffn=512)
    assert dec(V).shape == (2, 6, 384) and dec.block.layers[0].attn.to_q.weight.shape == (3072, 384)
    assert abs(dec.prototypes.std().item() - 1) < 0.1
    proj = PartProjection(6, 384, 512)
    assert abs(proj.weight.std().item() - math.sqrt(2 / 512)) < 0.002  # Kaiming normal, fan_out = 512
    cls = PartClassifier(6, 512, 11)
    assert abs(cls.weight.std().item() - 0.001) < 1e-4 and not cls.bias.any()
    mcfg = tiny_cfg.model
    dga = DictionaryGranularityAlignment(mcfg)
    V, T = torch.randn(2, 12, mcfg.dim), torch.randn(2, 5, mcfg.dim)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    M = dga.foreground(V)
    assert dga.reconstruct_image(V, M).shape == V.shape and dga.reconstruct_text(T).shape == T.shape
    assert dga.cross_modal_guidance(V, T, mask, M).shape == V.shape


def test_batched_part_ops_equal_per_part_loops():
    torch.manual_seed(0)
    H = torch.randn(3, 6, 20)
    proj, cls = PartProjection(6, 20, 12), PartClassifier(6, 12, 5)
    with torch.no_grad():
        cls.bias.normal_()
    parts = proj(H)
    for k in range(6):
        assert torch.allclose(parts[:, k], H[:, k] @ proj.weight[k].T, atol=1e-6)
        assert torch.allclose(cls(parts)[:, k], F.linear(parts[:, k], cls.weight[k], cls.bias[k]), atol=1e-6)


def test_masked_mean_ignores_padding():
    x = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = masked_mean(x, mask)
    assert torch.allclose(out[0], x[0, :2].mean(0)) and torch.allclose(out[1], x[1].mean(0))


# ------------------------------------------------------------------------------------- full model

def test_model_contract_shapes(tiny, tiny_cfg):
    model, images, ids, mask = tiny
    model.eval()
    with torch.no_grad():
        out = model(images, ids, mask)
        emb_i, emb_t = model.encode_images(images), model.encode_texts(ids, mask)
    K, E = tiny_cfg.model.num_prototypes, tiny_cfg.model.embed_dim
    assert sorted(out) == ["T", "T_re", "V_g", "V_re"]
    assert all(v.shape == (len(CAPTIONS), K, E) for v in out.values())
    assert emb_i.shape == emb_t.shape == (len(CAPTIONS), K * E) == (len(CAPTIONS), model.embedding_dim)
    assert torch.allclose(emb_i.norm(dim=1), torch.ones(len(CAPTIONS)), atol=1e-5)
    assert torch.allclose(model.encode_captions(CAPTIONS[:2]), emb_t[:2], atol=1e-6)
    assert len(model.image_mean) == len(model.image_std) == 3 and model.tokenizer is model.text.tokenizer
    assert model.classifiers.weight.shape == (K, 4, E)
    assert build_model(tiny_cfg, num_classes=0, pretrained=False).classifiers is None


def test_test_path_equals_training_retrieval_branches(tiny):
    model, images, ids, mask = tiny
    model.eval()
    with torch.no_grad():
        out = model(images, ids, mask)
        flat = lambda p: p.flatten(1) / (p.flatten(1).norm(dim=1, keepdim=True) + 1e-8)  # noqa: E731
        assert (model.encode_images(images) - flat(out["V_re"])).abs().max() <= 1e-6
        assert (model.encode_texts(ids, mask) - flat(out["T_re"])).abs().max() <= 1e-6


def test_padding_changes_nothing(tiny):
    model, _, ids, mask = tiny
    model.eval()
    short = min(range(len(CAPTIONS)), key=lambda i: int(mask[i].sum()))
    n = int(mask[short].sum())
    with torch.no_grad():
        alone = model.encode_texts(ids[short:short + 1, :n], mask[short:short + 1, :n])
        in_batch = model.encode_texts(ids, mask)[short:short + 1]  # padded to the longest caption
        assert (alone - in_batch).abs().max() <= 1e-6
        # garbage at padded token positions (official T_re is non-zero there) must not leak into PGU
        T = model.text(ids, mask)
        noisy = T + 100 * torch.randn_like(T) * (1 - mask[:, : T.shape[1], None].float())
        assert (model.embed_text_tokens(noisy, mask) - model.embed_text_tokens(T, mask)).abs().max() <= 1e-6


def test_gradients_reach_every_trainable_group_but_not_frozen_bert(tiny, tiny_cfg):
    model, images, ids, mask = tiny
    model.train()
    model.zero_grad(set_to_none=True)
    loss, _ = build_criterion(tiny_cfg)(model(images, ids, mask), LABELS, model)
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("text.backbone."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for prefix in ("image.", "text.lstm.", "dga.recon.", "dga.dictionary.", "dga.gate.", "decoder.prototypes",
                   "decoder.block.", "proj.", "classifiers."):
        norm = sum(p.grad.norm() for n, p in model.named_parameters() if n.startswith(prefix))
        assert norm > 0, prefix
    model.zero_grad(set_to_none=True)


def test_training_steps_lower_the_loss(tiny_cfg):
    torch.manual_seed(0)
    model = build_model(tiny_cfg, num_classes=4, pretrained=False).train()
    tok = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    images = torch.randn(len(CAPTIONS), 3, *tiny_cfg.data.image_size)
    criterion = build_criterion(tiny_cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss, logged = criterion(model(images, tok["input_ids"], tok["attention_mask"]), LABELS, model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.65 * losses[0], losses
    assert logged["id_dict"] < math.log(4) * 2  # ID terms below chance (2 ln C)


# ---------------------------------------------------------------------------------------- ablations

SWITCHES = ("name", "use_msd", "use_cmg", "use_fcr", "use_pgu")


def recipe_switches(recipe: str) -> list[str]:
    """The model switches of a recipe (configs/ablation_*.yaml, lgur_cuhk.yaml) as overrides for lgur_tiny."""
    m = load_config(recipe).model
    return [f"model.{k}={str(m[k]).lower() if isinstance(m[k], bool) else m[k]}" for k in SWITCHES]


ABLATIONS = {  # the paper's chain (recipes baseline -> +MSD -> +CMG -> +FCR -> +PGU), then one-off combinations
    "baseline": recipe_switches("ablation_baseline"),
    "msd": recipe_switches("ablation_msd"),
    "msd_cmg": recipe_switches("ablation_msd_cmg"),
    "dga": recipe_switches("ablation_dga"),
    "full_s8_k3": recipe_switches("lgur_cuhk") + ["model.dict_size=8", "model.num_prototypes=3"],
    "cmg_only": ["model.use_msd=false", "model.use_fcr=false"],
    "fcr_pgu": ["model.use_msd=false", "model.use_cmg=false"],
    "all_off": ["model.use_msd=false", "model.use_cmg=false", "model.use_fcr=false", "model.use_pgu=false"],
}
BUILT = {  # which head modules exist per ablation
    "baseline": {"text_proj"}, "msd": {"dga.recon", "dga.dictionary"},
    "msd_cmg": {"dga.recon", "dga.dictionary"}, "dga": {"dga.recon", "dga.dictionary", "dga.gate"},
    "full_s8_k3": {"dga.recon", "dga.dictionary", "dga.gate", "decoder"}, "cmg_only": {"dga.recon", "decoder"},
    "fcr_pgu": {"dga.gate", "decoder"}, "all_off": set(),
}

PAIR = {"id_dict", "rank_dict"}
GUIDED = PAIR | {"id_guided", "rank_guided"}
TERMS = {  # loss terms per ablation: L_G only with CMG, its text term only with MSD too
    "baseline": PAIR, "msd": GUIDED, "msd_cmg": GUIDED | {"guide_text", "guide_image"},
    "dga": GUIDED | {"guide_text", "guide_image"}, "full_s8_k3": GUIDED | {"guide_text", "guide_image"},
    "cmg_only": GUIDED | {"guide_image"}, "fcr_pgu": PAIR, "all_off": PAIR,
}


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_ablation_builds_only_what_it_uses_and_trains_a_step(name):
    cfg = load_config("lgur_tiny", ABLATIONS[name])
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4, pretrained=False).train()
    present = {n for n in ("text_proj", "dga.recon", "dga.dictionary", "dga.gate", "decoder")
               if any(k.startswith(n + ".") for k in model.state_dict())}
    assert present == BUILT[name]
    tok = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    images = torch.randn(len(CAPTIONS), 3, *cfg.data.image_size)
    out = model(images, tok["input_ids"], tok["attention_mask"])
    K = 1 if name == "baseline" else cfg.model.num_prototypes
    assert all(v.shape == (len(CAPTIONS), K, cfg.model.embed_dim) for v in out.values())
    criterion = build_criterion(cfg)
    loss, logged = criterion(out, LABELS, model)
    assert {t.name for t in loss_terms(cfg.model)} == TERMS[name]
    assert set(logged) == TERMS[name] | {"loss", "acc_img", "acc_txt"}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in model.parameters())  # a fresh model: every grad below is this loss's
    loss.backward()
    for n, p in model.named_parameters():  # nothing built that the step does not train (DDP-safe)
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {n} unused"
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    with torch.no_grad():  # the test path works without any training-only branch
        emb = model.eval().encode_texts(tok["input_ids"], tok["attention_mask"])
        assert emb.shape == (len(CAPTIONS), model.embedding_dim)


def test_bad_model_config_is_refused(tiny_cfg):
    for override in ("model.name=transformer", "model.dict_size=0"):
        cfg = load_config("lgur_tiny", [override])
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            LGUR(cfg.model, image=torch.nn.Identity(), text=torch.nn.Identity())
    with pytest.raises(ConfigError, match="model.recon_heads"):  # a wrong type stops at the config already
        load_config("lgur_tiny", ["model.recon_heads=2.5"])
