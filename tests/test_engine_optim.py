"""Optimiser parameter groups (by module, explicit) and the learning-rate schedule of the official recipe."""
from __future__ import annotations

import pytest
import torch

from lgur.config import load_config
from lgur.engine.optim import build_optimizer, build_scheduler, lr_key_of, param_groups
from lgur.errors import ConfigError
from lgur.models import build_model

NUM_IDS = 5


def _model(*overrides):
    torch.manual_seed(0)
    cfg = load_config("lgur_tiny", list(overrides))
    return build_model(cfg, NUM_IDS, pretrained=False), cfg


def _expected_key(name: str) -> str:
    """The official recipe, written out independently of the model's parts description."""
    if name.startswith("image.") or name.startswith("text.backbone."):
        return "lr_backbone"
    if name.startswith(("text.lstm.", "text.proj.", "proj.", "text_proj.", "classifiers.")):
        return "lr"
    if name.startswith(("dga.", "decoder.")):
        return "lr_heads"
    raise AssertionError(name)


@pytest.mark.parametrize("overrides", [(), ("model.lstm=false",), ("model.name=baseline",),
                                       ("model.use_msd=false", "model.use_pgu=false")])
def test_every_trainable_parameter_in_exactly_one_group(overrides):
    model, cfg = _model(*overrides)
    groups = param_groups(model, cfg.optim)
    seen = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(seen) == len(set(seen)) and set(seen) == trainable
    for g in groups:
        assert g["lr"] == cfg.optim[g["name"]]
        assert all(_expected_key(n) == g["name"] for n in g["param_names"])
    names = [n for g in groups for n in g["param_names"]]
    assert not any(n.startswith("text.backbone.") for n in names)  # frozen BERT never reaches Adam
    assert any(n.startswith("classifiers.") for n in names)


def test_official_learning_rates_by_module():
    model, cfg = _model()
    by_name = {n: g["name"] for g in param_groups(model, cfg.optim) for n in g["param_names"]}
    assert by_name["decoder.prototypes"] == "lr_heads" and by_name["dga.dictionary.atoms"] == "lr_heads"
    assert by_name["dga.gate.proj.weight"] == "lr_heads" and by_name["proj.weight"] == "lr"
    assert by_name["text.lstm.weight_ih_l0"] == "lr" and by_name["classifiers.weight"] == "lr"
    assert all(by_name[n] == "lr_backbone" for n in by_name if n.startswith("image."))
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, torch.optim.Adam)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"lr_backbone": 1e-4, "lr_heads": 1e-4, "lr": 1e-3}
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)


def test_unfrozen_text_backbone_joins_the_backbone_group():
    model, cfg = _model("model.freeze_text=false")
    groups = {g["name"]: g["param_names"] for g in param_groups(model, cfg.optim)}
    assert any(n.startswith("text.backbone.") for n in groups["lr_backbone"])


def test_unknown_module_is_refused():
    model, cfg = _model()
    assert lr_key_of("dga.recon.layers.0.attn.to_q.weight", model.parts) == "lr_heads"
    model.extra_head = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="extra_head.weight"):
        param_groups(model, cfg.optim)


def _lrs(cfg, epochs):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([{"params": [p], "lr": 1.0}])
    sched = build_scheduler(opt, cfg.optim)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_multistep_schedule_and_official_early_decay():
    cfg = load_config(None)  # 60 epochs, milestones [20, 40, 50], gamma 0.1
    lrs = _lrs(cfg, 60)
    expect = [1.0] * 20 + [0.1] * 20 + [0.01] * 10 + [0.001] * 10
    assert lrs == pytest.approx(expect)
    early = _lrs(load_config(None, ["optim.official_early_decay=true"]), 60)
    # official: 1-based epochs 1-19 base, 20-39 x0.1, 40-49 x0.01, 50-60 x0.001
    assert early == pytest.approx([1.0] * 19 + [0.1] * 20 + [0.01] * 10 + [0.001] * 11)


def test_warmup_then_steps():
    cfg = load_config(None, ["optim.warmup_epochs=2", "optim.milestones=[3]"])
    assert _lrs(cfg, 5) == pytest.approx([0.1, 0.55, 1.0, 0.1, 0.1])
