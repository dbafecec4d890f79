"""The model's parts description (lgur.models.parts) drives what it claims: for every shipped recipe the
built model's parameters are each claimed by exactly one declared module, every declared module is
built, the optimiser groups, `lgur info` rows, the criterion's terms and the training forward's
branches are the description's; the baseline is its own registered class; model and loss cannot
disagree; the registries refuse unknown names with the choices."""
from __future__ import annotations

import pytest
import torch

from lgur.config import RECIPES, load_config
from lgur.engine.optim import param_groups
from lgur.errors import ConfigError
from lgur.losses import build_criterion, loss_terms
from lgur.models import build_model
from lgur.models.backbones import IMAGE_BACKBONES, TEXT_BACKBONES
from lgur.models.base import MODELS
from lgur.models.baseline import Baseline
from lgur.models.variants import model_parts
from lgur.models.convert import map_official_state
from lgur.models.info import parameter_counts
from lgur.models.lgur import LGUR
from lgur.models.parts import CATALOGUE, Branch, ModelParts, Term

RECIPE_NAMES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
SWITCHES = ("name", "use_msd", "use_cmg", "use_fcr", "use_pgu", "lstm")
CAPTIONS = ["a man in a red shirt", "a woman with a long black coat and a bag", "short hair", "a girl in white"]
LABELS = torch.tensor([0, 0, 1, 1])


def test_every_recipe_is_covered():
    assert {"lgur_cuhk", "lgur_tiny", "ablation_baseline", "ablation_msd", "ablation_msd_cmg",
            "ablation_dga"} <= set(RECIPE_NAMES)


@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_recipe_model_is_exactly_its_description(recipe):
    cfg = load_config(recipe)
    with torch.device("meta"):  # shapes only: no weights read, no memory
        model = build_model(cfg, num_classes=7, pretrained=False)
    parts = model.parts
    assert isinstance(model, MODELS.get(cfg.model.name)) and parts.model == cfg.model.name
    assert parts == model_parts(cfg.model)  # the description does not need the model built
    names = [n for n, _ in model.named_parameters()]
    for n in names:  # each parameter claimed by exactly one path of one declared module
        owners = [(m.key, p) for m in parts.modules for p in m.paths if n == p or n.startswith(p + ".")]
        assert len(owners) == 1, (n, owners)
    for m in parts.modules:  # nothing declared that is not built
        assert any(m.owns(n) for n in names), m.key
    keys = [m.key for m in parts.modules]
    assert keys == [m.key for m in CATALOGUE if m.key in keys]  # paper order

    # the optimiser's groups are the declared modules' learning rates
    groups = param_groups(model, cfg.optim)
    by_name = {n: g["name"] for g in groups for n in g["param_names"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable
    assert all(by_name[n] == parts.module_of(n).lr for n in trainable)

    # `lgur info` counts exactly the declared modules (classifiers apart)
    counts = parameter_counts(model)
    assert list(counts["modules"]) == [m.key for m in parts.modules if m.key != "classifiers"]
    assert counts["classifiers"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("classifiers."))

    # the criterion computes the declared terms (all weights are non-zero in the recipes)
    criterion = build_criterion(cfg)
    assert criterion.terms_for(model) == list(parts.terms) == criterion.terms == loss_terms(cfg.model)


def _tiny_with_switches_of(recipe: str, *extra: str):
    m = load_config(recipe).model
    overrides = [f"model.{k}={str(m[k]).lower() if isinstance(m[k], bool) else m[k]}" for k in SWITCHES]
    return load_config("lgur_tiny", overrides + list(extra))


@pytest.mark.parametrize("recipe,extra", [(r, ()) for r in RECIPE_NAMES if r.startswith(("ablation_", "lgur_cuhk"))]
                         + [("lgur_tiny", ("model.use_msd=false", "model.use_fcr=false")),
                            ("lgur_tiny", ("model.use_msd=false", "model.use_cmg=false"))])
def test_forward_returns_the_declared_branches_and_the_loss_reads_them(recipe, extra):
    cfg = _tiny_with_switches_of(recipe, *extra)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=2, pretrained=False).train()
    tok = model.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    out = model(torch.randn(len(CAPTIONS), 3, *cfg.data.image_size), tok["input_ids"], tok["attention_mask"])
    assert tuple(out) == model.parts.branch_keys()
    for b in model.parts.branches:
        if b.same_as is not None:
            assert out[b.key] is out[b.same_as]
    _, logged = build_criterion(cfg)(out, LABELS, model)
    assert set(logged) - {"loss", "acc_img", "acc_txt"} == {t.name for t in model.parts.terms}


def test_the_criterion_follows_the_model_it_is_handed():
    """A criterion configured for full LGUR applied to the baseline trains the baseline's terms: the terms
    come from the model, so a model/loss mismatch cannot happen."""
    full = load_config("lgur_tiny")
    criterion = build_criterion(full)
    assert {t.name for t in criterion.terms} == {"id_guided", "id_dict", "rank_guided", "rank_dict",
                                                  "guide_text", "guide_image"}
    torch.manual_seed(0)
    baseline = build_model(_tiny_with_switches_of("ablation_baseline"), num_classes=2, pretrained=False).train()
    tok = baseline.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    out = baseline(torch.randn(4, 3, *full.data.image_size), tok["input_ids"], tok["attention_mask"])
    _, logged = criterion(out, LABELS, baseline)
    assert set(logged) == {"id_dict", "rank_dict", "loss", "acc_img", "acc_txt"}
    weightless = build_criterion(load_config("lgur_tiny", ["loss.guide_weight=0"]))
    assert {t.kind for t in weightless.terms_for(baseline)} == {"id", "rank"}
    assert "guide" not in {t.kind for t in weightless.terms}


def test_a_description_cannot_pair_a_missing_branch():
    branches = (Branch("V_re", "image"), Branch("T_re", "text"))
    ok = ModelParts("x", (), branches, (Term("rank_dict", "rank", "V_re", "T_re"),))
    assert ok.branch_keys("text") == ("T_re",)
    with pytest.raises(ValueError, match="V_g"):
        ModelParts("x", (), branches, (Term("guide_image", "guide", "V_g", "V_re"),))
    with pytest.raises(ValueError, match="T_raw"):
        ModelParts("x", (), branches + (Branch("T", "text", same_as="T_raw"),), ())
    with pytest.raises(ValueError, match="claimed twice"):
        ModelParts("x", (CATALOGUE[0], CATALOGUE[0]), branches, ())


def test_a_model_that_builds_an_undeclared_module_is_refused(monkeypatch):
    cfg = load_config("lgur_tiny")
    describe = LGUR.describe

    def describe_without_r(cls, mcfg, classifiers=True):
        parts = describe(mcfg, classifiers)
        return ModelParts(parts.model, tuple(m for m in parts.modules if m.key != "R"), parts.branches, parts.terms)

    monkeypatch.setattr(LGUR, "describe", classmethod(describe_without_r))
    with pytest.raises(ValueError, match="dga.recon"):
        build_model(cfg, num_classes=0, pretrained=False)


def test_baseline_is_its_own_registered_model():
    assert MODELS.get("lgur") is LGUR and MODELS.get("baseline") is Baseline and not issubclass(Baseline, LGUR)
    cfg = _tiny_with_switches_of("ablation_baseline")
    model = build_model(cfg, num_classes=3, pretrained=False)
    assert type(model) is Baseline and model.num_parts == 1 and model.dga is None and model.decoder is None
    assert [m.key for m in model.parts.modules] == ["image_backbone", "text_backbone", "bilstm", "projections",
                                                    "classifiers"]
    with pytest.raises(ConfigError, match="model.name='baseline'"):
        LGUR(cfg.model, image=torch.nn.Identity(), text=torch.nn.Identity())
    with pytest.raises(ConfigError, match=r"model.name='transformer' is not one of .*lgur.*baseline"):
        build_model(load_config("lgur_tiny", ["model.name=transformer"]), num_classes=0, pretrained=False)


def test_backbone_registries_refuse_unknown_names_with_the_choices():
    assert list(IMAGE_BACKBONES) == ["deit_small", "vit_tiny", "clip_vit_b16", "resnet50", "efficientnet_lite0"]
    assert list(TEXT_BACKBONES) == ["bert_base", "minilm", "bert_tiny"]
    for key, registry in (("model.image_backbone", IMAGE_BACKBONES), ("model.text_backbone", TEXT_BACKBONES)):
        with pytest.raises(ConfigError, match=f"{key}='nope' is not one of {', '.join(registry)}"):
            build_model(load_config("lgur_tiny", [f"{key}=nope"]), num_classes=0, pretrained=False)


def test_converter_writes_into_the_declared_modules():
    """The official names land on the paths the full model declares, module by module."""
    t = torch.zeros
    official = {"dict_feature": t(1, 4, 8), "query_embed_image": t(1, 3, 8), "mask.0.weight": t(1, 8),
                "mask.0.bias": t(1), "conv_1X1_2.0.block.0.weight": t(5, 8, 1, 1),
                "TXTDecoder_2.transformer.layers.0.0.fn.fn.to_q.weight": t(8, 8),
                "TXTDecoder.transformer.layers.0.1.fn.fn.net.0.weight": t(8, 8),
                "TextExtract.lstm.weight_ih_l0": t(8, 8), "TextExtract.text_embed.embeddings.word_embeddings.weight":
                t(8, 8), "ImageExtract.model.blocks.0.norm1.weight": t(8)}
    classifiers = {"0.W.block.weight": t(2, 5), "0.W.block.bias": t(2)}
    mapped, ignored, unmapped = map_official_state(official, classifiers)
    assert not ignored and not unmapped
    parts = model_parts(load_config("lgur_tiny").model)
    owner = {k: parts.module_of(k).key for k in mapped}
    assert owner == {"dga.dictionary.atoms": "dictionary", "decoder.prototypes": "prototypes",
                     "dga.gate.proj.weight": "gate", "dga.gate.proj.bias": "gate", "proj.weight": "projections",
                     "dga.recon.layers.0.attn.to_q.weight": "R", "decoder.block.layers.0.ffn.fc1.weight": "Pdec",
                     "text.lstm.weight_ih_l0": "bilstm",
                     "text.backbone.embeddings.word_embeddings.weight": "text_backbone",
                     "image.model.blocks.0.norm1.weight": "image_backbone", "classifiers.weight": "classifiers",
                     "classifiers.bias": "classifiers"}
