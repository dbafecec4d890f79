"""Optimiser and schedule of the official recipe (docs/reference.md §2.2), with explicit parameter groups.

Adam (no weight decay by default) over three learning rates, assigned by MODULE of the model, as its
parts description declares them (`model.parts`, lgur.models.parts):

    optim.lr_backbone (1e-4)  image backbone (and BERT, only when it is not frozen)
    optim.lr_heads    (1e-4)  R, Pdec, dictionary D, prototypes P, foreground gate (the official detr_lr)
    optim.lr          (1e-3)  BiLSTM, the K part projections, the K ID classifiers

A frozen text backbone has requires_grad False and is never handed to the optimiser. A trainable
parameter that no declared module claims is an error (never a silent default group).

Schedule: MultiStepLR stepped once at the END of every epoch, so 0-based epoch e runs at
gamma^(#milestones <= e). `optim.official_early_decay` reproduces the official script, which steps at
the START of each epoch and so decays one epoch early (1-based epochs 20/40/50 already run at the lower
rate): the same scheduler with every milestone moved one epoch earlier. Optional linear warm-up
(`optim.warmup_epochs`, from 0.1x, not in the official recipe) is chained in front.
"""
from __future__ import annotations

import torch
from torch import nn

from lgur.errors import ConfigError
from lgur.models.parts import LR_KEYS, ModelParts


def lr_key_of(name: str, parts: ModelParts) -> str:
    """The optim.* LR key of a parameter name such as 'dga.recon.layers.0.attn.to_q.weight' (ConfigError
    naming it when no module of `parts` claims it)."""
    return parts.lr_key(name)


def param_groups(model: nn.Module, ocfg) -> list[dict]:
    """Adam parameter groups: one per LR key, each with its `lr`, a `name` and the parameter names.
    `model` describes its parts (`model.parts`: every model lgur.models.build_model builds does)."""
    parts = getattr(model, "parts", None)
    if not isinstance(parts, ModelParts):
        raise TypeError(f"{type(model).__name__} carries no parts description (model.parts): the optimiser "
                        "groups parameters by the modules it declares")
    groups = {k: {"name": k, "lr": float(ocfg[k]), "params": [], "param_names": []} for k in LR_KEYS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            group = groups[lr_key_of(name, parts)]
            group["params"].append(p)
            group["param_names"].append(name)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: nn.Module, ocfg, fused: bool | None = None) -> torch.optim.Adam:
    """Adam with the official betas/eps and optim.weight_decay (0: the official --wd is never passed).

    fused (default: whenever every parameter is on a CPU or CUDA device) runs the whole update as one
    kernel instead of a Python loop over ~500 tensors; the same math, measured in bench/train_step.py.
    """
    groups = param_groups(model, ocfg)
    for g in groups:
        del g["param_names"]  # names are for tests/logs; the optimizer state_dict stays plain
    if fused is None:
        fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.Adam(groups, betas=tuple(ocfg.betas), eps=float(ocfg.eps),
                            weight_decay=float(ocfg.weight_decay), fused=fused)


def effective_milestones(ocfg) -> list[int]:
    """0-based epochs at whose start the LR has been multiplied by gamma once more."""
    milestones = sorted(int(m) for m in ocfg.milestones)
    if any(m < 1 for m in milestones):
        raise ConfigError(f"optim.milestones must be epochs >= 1, got {list(ocfg.milestones)}")
    return [m - 1 for m in milestones] if ocfg.official_early_decay else milestones


def build_scheduler(optimizer: torch.optim.Optimizer, ocfg) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-epoch schedule (call .step() after each epoch): optional warm-up, then MultiStepLR."""
    steps = torch.optim.lr_scheduler.MultiStepLR(optimizer, effective_milestones(ocfg), gamma=float(ocfg.gamma))
    warmup = int(ocfg.warmup_epochs)
    if warmup <= 0:
        return steps
    ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.1, total_iters=warmup)
    return torch.optim.lr_scheduler.ChainedScheduler([ramp, steps], optimizer=optimizer)

