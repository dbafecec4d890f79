"""Acceptance: one whole LGUR training step reproduces one step of the official code (fixture
trainstep.safetensors, its README section "one official training step").

The official heads and 16-class ID classifiers are loaded through the converter's name mapping into a
full-width LGUR; the backbones are replayed as the official step did: `V` is fed through an identity
image module and `bert_last_hidden` through a stand-in BERT that returns it, both leaves that require
grad. lgur's own training forward (`model(images, ids, mask)`) and criterion run with the official
negatives: they are drawn here exactly as the official code draws them (numpy's global RNG seeded with
the fixture's np_seed, one `np.random.choice` over each anchor's candidate columns, in the official
call order) and handed to the criterion as one-hot draws, the production sampler's own input. Then:

- the six loss terms and the total within 1e-5 relative;
- the four similarities, every candidate set, choice, fallback flag and triplet equal;
- every gradient within 1e-4 of its tensor's max abs, incl. those of V and bert_last_hidden; tensors
  stored as summaries: first 4096 values within 1e-4 of the max, max abs within 1e-4 relative, and
  norm and the 32 seeded projections within 1e-4 * max * sqrt(n) (the bound that an element-wise error
  of 1e-4 * max gives for the norm; for a projection on a standard-normal vector it is sqrt(n) times
  looser in the worst case and about equal to the typical size);
- exception: the FCR gate's linear layer (official `mask.0.weight`), whose gradient nearly cancels
  (max 5.6e-6): the official code's own float32 result differs from its float64 result by 3.95e-4 of
  the max there (fixture README), so no float32 re-implementation can be held to 1e-4; it is held to 5e-4
  (measured here: 1.1e-4);
- the paper's reading of the ranking loss (`loss.text_hinge: paper`) does NOT reproduce the terms;
- one Adam step with lgur's parameter groups equals one step of the official script's five groups.
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from lgur.config import load_config
from lgur.losses import build_criterion, candidate_mask, cosine_similarity, select_negatives
from lgur.models.backbones import TextEncoder
from lgur.models.convert import map_official_state
from lgur.models.lgur import LGUR

FIXTURES = Path(os.environ.get("LGUR_FIXTURES", Path(__file__).resolve().parents[2] / "shared/fixtures/official_lgur"))
LOSS_TOL = 1e-5   # relative, per loss term
GRAD_TOL = 1e-4   # of each gradient tensor's max abs
GATE_TOL = 5e-4   # official mask.0.weight: the official float32 vs float64 difference is 3.95e-4 there

pytestmark = pytest.mark.skipif(not (FIXTURES / "trainstep.safetensors").is_file(),
                                reason=f"official LGUR fixture not found in {FIXTURES} (set LGUR_FIXTURES)")

# lgur's ranking terms -> the official script's names (same pair order: rows = first argument)
OFFICIAL_TERM = {"id_guided": "id_loss", "id_dict": "id_loss_dict", "rank_guided": "ranking_loss",
                 "rank_dict": "ranking_loss_dict", "guide_text": "ranking_loss_dict_text",
                 "guide_image": "ranking_loss_dict_image", "loss": "total"}
DIRECTIONS = ("image", "text")  # rows of S as anchors, then rows of S^T


class ReplayedBert(nn.Module):
    """Stands in for BERT: returns the recorded last hidden state (a leaf), cut like BERT's output."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        self.config = types.SimpleNamespace(hidden_size=hidden.shape[-1])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return types.SimpleNamespace(last_hidden_state=self.hidden[:, : input_ids.shape[1]])


def official_draws(sims: torch.Tensor, labels: torch.Tensor, margin: float, seed: int):
    """The official negatives: numpy's global RNG seeded with `seed`, then for each ranking loss in call
    order, each direction (S, then S^T) and each anchor with candidates, one np.random.choice over its
    candidate columns (loss/RankingLoss.py). Returns the one-hot draws (2, n, B, B), the candidate
    masks (n, 2, B, B) and the chosen columns (n, 2, B), -1 where an anchor has none."""
    import numpy as np

    np.random.seed(seed)
    n, B, _ = sims.shape
    draws = torch.zeros(2, n, B, B)
    cands = torch.stack([torch.stack([candidate_mask(s, labels, margin, "semi_hard") for s in (sim, sim.T)])
                         for sim in sims])
    choice = torch.full((n, 2, B), -1)
    for t in range(n):
        for d in range(2):
            for i in range(B):
                columns = cands[t, d, i].nonzero().flatten().numpy()
                if len(columns):
                    choice[t, d, i] = int(np.random.choice(columns))
                    draws[d, t, i, choice[t, d, i]] = 1.0
    return draws, cands, choice


@pytest.fixture(scope="module")
def step():
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.manual_seed(0)
    heads, tensors, idloss, ts = (load_file(str(FIXTURES / f)) for f in (
        "heads.safetensors", "tensors.safetensors", "idloss16.safetensors", "trainstep.safetensors"))
    with safe_open(str(FIXTURES / "trainstep.safetensors"), "pt") as f:
        meta = f.metadata()
    mapped, ignored, unmapped = map_official_state(heads, idloss)
    assert unmapped == [] and ignored == ["pos_embed_image"]

    cfg = load_config()  # defaults = the official recipe, loss.text_hinge official
    assert cfg.loss.text_hinge == "official" and cfg.loss.negative == "semi_hard"
    V = tensors["V"].clone().requires_grad_()
    hidden = tensors["bert_last_hidden"].clone().requires_grad_()
    # not frozen: the stand-in has no weights, and the recorded states must carry a gradient
    text = TextEncoder(ReplayedBert(hidden), None, dim=384, use_lstm=True, freeze=False, dropout_in_train=True)
    model = LGUR(cfg.model, image=nn.Identity(), text=text, num_classes=16).train()
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert missing == [] and unexpected == []

    criterion = build_criterion(cfg)
    labels = tensors["input.id_labels"]
    assert labels.tolist() == json.loads(meta["labels"])
    outputs = model(V, tensors["input.caption_ids"], tensors["input.caption_mask"])
    rank_terms = [t for t in criterion.terms if t.kind != "id"]
    sims = torch.stack([cosine_similarity(outputs[t.a].flatten(1), outputs[t.b].flatten(1))
                        for t in rank_terms]).detach()
    draws, cands, choice = official_draws(sims, labels, criterion.margin, int(meta["np_seed"]))
    loss, logged = criterion(outputs, labels, model, draws=draws)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    grads["input.V"], grads["input.bert_last_hidden"] = V.grad, hidden.grad
    return types.SimpleNamespace(ts=ts, meta=meta, cfg=cfg, model=model, outputs=outputs, labels=labels,
                                 logged=logged, rank_terms=rank_terms, sims=sims, draws=draws, cands=cands,
                                 choice=choice, grads=grads, mapped=mapped)


def test_every_loss_term_matches(step):
    errors = {}
    for ours, theirs in OFFICIAL_TERM.items():
        ref = step.ts[f"loss.{theirs}"].double()
        errors[ours] = ((step.logged[ours].double() - ref).abs() / ref.abs()).item()
    assert max(errors.values()) <= LOSS_TOL, errors


def test_outputs_similarities_and_triplets_match(step):
    for name in ("V_g", "V_re", "T", "T_re"):  # ours (B, K, E), official part-major (K, B, E)
        assert (step.outputs[name].detach().transpose(0, 1) - step.ts[f"out.{name}"]).abs().max() <= 1e-5, name
    assert [OFFICIAL_TERM[t.name] for t in step.rank_terms] == [
        "ranking_loss", "ranking_loss_dict", "ranking_loss_dict_text", "ranking_loss_dict_image"]
    rank = json.loads(step.meta["rank"])
    for n, term in enumerate(step.rank_terms):
        name = OFFICIAL_TERM[term.name]
        assert (step.sims[n] - step.ts[f"sim.{name}"]).abs().max() <= 1e-5, name
        for d, direction in enumerate(DIRECTIONS):
            key = f"rank.{name}.{direction}"
            assert torch.equal(step.cands[n, d].long(), step.ts[f"{key}.candidates"]), key
            assert torch.equal(step.choice[n, d], step.ts[f"{key}.choice"]), key
            s = step.sims[n] if d == 0 else step.sims[n].T
            index, selected = select_negatives(s, step.labels, step.cfg.loss.margin, "semi_hard", step.draws[d, n])
            anchors = selected.nonzero().flatten()
            triplets = torch.stack([anchors, anchors, index[anchors]], dim=1)
            assert torch.equal(triplets, step.ts[f"{key}.triplets"]), key
            assert triplets.tolist() == rank[f"{name}.{direction}"]["triplets"], key
            fallback = not bool(step.cands[n, d].any())
            assert int(fallback) == step.ts[f"{key}.fallback"].item() == int(rank[f"{name}.{direction}"]["fallback"])


def _official_grad_names(meta) -> dict:
    info = json.loads(meta["grad_info"])
    assert json.loads(meta["grad_none"]) == ["pos_embed_image"]
    return info


def _ours_of(official: str, shape) -> str:
    """lgur's parameter name of an official one, through the converter's mapping."""
    if official.startswith("idloss16."):
        mapped, _, _ = map_official_state({}, {official[len("idloss16."):]: torch.zeros(shape)})
    else:
        mapped, _, _ = map_official_state({official: torch.zeros(shape)})
    (name,) = mapped
    return name


def test_every_full_gradient_matches(step):
    ts = step.ts
    full_net = {k[len("grad.full."):]: v for k, v in ts.items()
                if k.startswith("grad.full.") and not k.startswith(("grad.full.idloss16.", "grad.full.input."))}
    full_id = {k[len("grad.full.idloss16."):]: v for k, v in ts.items() if k.startswith("grad.full.idloss16.")}
    reference, _, unmapped = map_official_state(full_net, full_id)  # the same mapping as the weights
    assert unmapped == []
    reference["input.V"], reference["input.bert_last_hidden"] = ts["grad.full.input.V"], ts["grad.full.input.bert_last_hidden"]
    errors = {}
    for name, ref in reference.items():
        ours = step.grads[name]
        assert ours.shape == ref.shape, name
        errors[name] = ((ours - ref).abs().max() / ref.abs().max()).item()
    gate = errors.pop("dga.gate.proj.weight")
    assert gate <= GATE_TOL, f"FCR gate weight: {gate:.3g}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= GRAD_TOL, f"{worst}: {errors[worst]:.3g} of its max (all: {errors})"
    # every trainable parameter of ours that the official step trains has been compared here or below
    info = _official_grad_names(step.meta)
    summary = {_ours_of(k, v["shape"]) for k, v in info.items() if v["stored"] != "full"}
    assert set(step.grads) == set(reference) | summary | {"dga.gate.proj.weight"}


def test_every_summarised_gradient_matches(step):
    ts, info = step.ts, _official_grad_names(step.meta)
    keys = [k for k, v in info.items() if v["stored"] != "full"]
    assert len(keys) == 8
    by_size: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for key in keys:
        g = step.grads[_ours_of(key, info[key]["shape"])]
        assert list(g.shape) == info[key]["shape"], key
        maxabs = ts[f"grad.maxabs.{key}"].item()
        head = ts[f"grad.head.{key}"]
        assert (g.flatten()[: head.numel()] - head).abs().max().item() <= GRAD_TOL * maxabs, key
        assert abs(g.abs().max().item() - maxabs) <= GRAD_TOL * maxabs, key
        flat = g.flatten().double()
        bound = GRAD_TOL * maxabs * flat.numel() ** 0.5
        assert abs(flat.norm().item() - ts[f"grad.norm.{key}"].item()) <= bound, key
        by_size.setdefault(flat.numel(), []).append((key, flat))
    # proj[r] = <g, v_r>, v_r = randn(n, float64, Generator.manual_seed(1000 + r)): one v_r per size
    for n, group in by_size.items():
        G = torch.stack([flat for _, flat in group])
        proj = torch.stack([G @ torch.randn(n, generator=torch.Generator().manual_seed(1000 + r), dtype=torch.float64)
                            for r in range(32)], dim=1)
        for (key, _), p in zip(group, proj):
            bound = GRAD_TOL * ts[f"grad.maxabs.{key}"].item() * n ** 0.5
            assert (p - ts[f"grad.proj.{key}"]).abs().max().item() <= bound, key


def test_paper_reading_does_not_reproduce_the_official_step(step):
    """The fixture resolves the two readings: with loss.text_hinge=paper every ranking term is off by
    at least 10x the tolerance (measured 1.7e-4 to 3.5e-3 relative; the ID terms stay equal)."""
    cfg = load_config(None, ["loss.text_hinge=paper"])
    outputs = {k: v.detach() for k, v in step.outputs.items()}
    with torch.no_grad():
        _, logged = build_criterion(cfg)(outputs, step.labels, step.model, draws=step.draws)
    for term in ("rank_guided", "rank_dict", "guide_text", "guide_image"):
        ref = step.ts[f"loss.{OFFICIAL_TERM[term]}"]
        assert ((logged[term] - ref).abs() / ref).item() > 10 * LOSS_TOL, term
    assert torch.equal(logged["id_dict"], step.logged["id_dict"])


def test_one_adam_step_matches_the_official_parameter_groups(step):
    """The official script's optimiser (train_mydecoder_pixelvit_txtimg_3_bert.py): Adam, betas
    (0.9, 0.999), eps 1e-8, no weight decay, five groups by module:
    everything else ("DETR_params": R, Pdec, D, P, mask) 1e-4; ImageExtract 0.1 * 1e-3; TextExtract 1e-3;
    conv_1X1_2 1e-3; the ID classifiers 1e-3. The fixture's full gradients (a DeiT-Small at random init
    gets seeded ones) go into both; every updated tensor must agree."""
    from lgur.engine.optim import build_optimizer
    from lgur.models.backbones import build_image_backbone

    cfg, ts = step.cfg, step.ts
    torch.manual_seed(0)
    image = build_image_backbone(cfg.model, cfg.data.image_size, pretrained=False)
    text = TextEncoder(ReplayedBert(torch.zeros(1, 1, 768)), None, dim=384, use_lstm=True, freeze=True,
                       dropout_in_train=True)
    model = LGUR(cfg.model, image=image, text=text, num_classes=16)
    missing, _ = model.load_state_dict(step.mapped, strict=False)
    assert all(k.startswith("image.") for k in missing)

    # official-named tensors and gradients
    values = {k: v.clone() for k, v in load_heads().items() if k != "pos_embed_image"}
    values.update({f"idloss16.{k}": v.clone() for k, v in load_idloss().items()})
    values.update({f"ImageExtract.model.{k[len('model.'):]}": v.detach().clone()
                   for k, v in image.named_parameters()})
    g = torch.Generator().manual_seed(1)
    grads = {k[len("grad.full."):]: v for k, v in ts.items()
             if k.startswith("grad.full.") and not k.startswith("grad.full.input.")}
    grads.update({k: 1e-3 * torch.randn(v.shape, generator=g) for k, v in values.items() if k.startswith("ImageExtract.")})
    official = {k: nn.Parameter(v.clone()) for k, v in values.items()}
    for k, p in official.items():
        p.grad = grads.get(k)

    def group(prefix):
        return [p for k, p in official.items() if k.startswith(prefix)]

    detr = [p for k, p in official.items() if not k.startswith(("ImageExtract.", "TextExtract.", "conv_1X1_2.", "idloss16."))]
    lr = 1e-3
    reference = torch.optim.Adam([{"params": detr, "lr": 1e-4}, {"params": group("ImageExtract."), "lr": lr * 0.1},
                                  {"params": group("TextExtract."), "lr": lr}, {"params": group("conv_1X1_2."), "lr": lr},
                                  {"params": group("idloss16."), "lr": lr}], betas=(0.9, 0.999))
    reference.step()

    # ours: the same gradients, mapped by the converter, through build_optimizer's groups
    net_grads = {k: v for k, v in grads.items() if not k.startswith("idloss16.")}
    id_grads = {k[len("idloss16."):]: v for k, v in grads.items() if k.startswith("idloss16.")}
    our_grads, _, unmapped = map_official_state(net_grads, id_grads)
    assert unmapped == []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = our_grads.get(n)
    build_optimizer(model, cfg.optim).step()

    net_after = {k: p.detach() for k, p in official.items() if not k.startswith("idloss16.")}
    id_after = {k[len("idloss16."):]: p.detach() for k, p in official.items() if k.startswith("idloss16.")}
    expected, _, _ = map_official_state(net_after, id_after)
    expected_before, _, _ = map_official_state({k: v for k, v in values.items() if not k.startswith("idloss16.")},
                                               {k[len("idloss16."):]: v for k, v in values.items() if k.startswith("idloss16.")})
    compared = set()
    for n, p in model.named_parameters():
        if n not in our_grads:
            assert torch.equal(p.detach(), before[n]), f"{n} moved without a gradient"
            continue
        step_size = (expected[n] - expected_before[n]).abs().max().item()  # a first Adam step moves entries by ~lr
        assert step_size > 0, n
        # 1e-3 of the step, plus one float32 rounding of each result (fused vs for-each kernels)
        tol = 1e-3 * step_size + 2 * torch.finfo(torch.float32).eps * expected[n].abs()
        assert ((p.detach() - expected[n]).abs() <= tol).all(), n
        compared.add(n)
    # at least one tensor of each official group was compared
    for prefix in ("image.", "text.lstm.", "proj.", "classifiers.", "dga.", "decoder."):
        assert any(n.startswith(prefix) for n in compared), prefix


def load_heads():
    from safetensors.torch import load_file
    return load_file(str(FIXTURES / "heads.safetensors"))


def load_idloss():
    from safetensors.torch import load_file
    return load_file(str(FIXTURES / "idloss16.safetensors"))
