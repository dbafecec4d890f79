"""`lgur info`: parameter counts of the model a config describes, per paper module (the modules of the
model's parts description, lgur.models.parts).

The model is built on the meta device with pretrained=False: no weights file is read, no memory is
allocated and BERT-base takes no time to initialise; counts depend only on shapes. Total and trainable
exclude the ID classifiers (the official code keeps them outside the network too), which are reported
separately. Reference (docs/reference.md §9): the official network has 145,657,985 parameters used at
inference, BERT counted with its pooler (590,592); we never build the pooler (nor DeiT's 12th block,
final norm and head, nor the unused pos_embed_image), so the paper recipe comes to 145,067,393
(-0.41 %), 36,175,745 of them trainable (the official 38,385,129 minus the 2,209,384 it never uses).
"""
from __future__ import annotations

import json

import torch
from torch import nn

from lgur.config import load_config
from lgur.models.build import build_model
from lgur.models.parts import CATALOGUE, CLASSIFIERS, ModelParts

LABELS = {m.key: m.label for m in CATALOGUE}  # row labels, from the parts catalogue


def module_key(name: str, parts: ModelParts) -> str:
    """Which paper module a parameter belongs to (the model's parts description); an unclaimed one is
    counted under its top-level name."""
    module = parts.module_of(name)
    return module.key if module is not None else name.split(".")[0]


def parameter_counts(model: nn.Module) -> dict:
    """{'total', 'trainable', 'classifiers', 'modules': {key: n}, 'trainable_modules': {key: n}}, per module
    of `model.parts`. total/trainable exclude the ID classifiers; the modules add up to total."""
    parts: ModelParts = model.parts
    modules: dict[str, int] = {}
    trainable_modules: dict[str, int] = {}
    classifiers = 0
    for name, p in model.named_parameters():
        key = module_key(name, parts)
        if key == CLASSIFIERS.key:
            classifiers += p.numel()
            continue
        modules[key] = modules.get(key, 0) + p.numel()
        trainable_modules[key] = trainable_modules.get(key, 0) + (p.numel() if p.requires_grad else 0)
    order = {m.key: i for i, m in enumerate(CATALOGUE)}  # paper order, unclaimed ones last
    keys = sorted(modules, key=lambda k: order.get(k, len(order)))
    return {"total": sum(modules.values()), "trainable": sum(trainable_modules.values()),
            "classifiers": classifiers, "modules": {k: modules[k] for k in keys},
            "trainable_modules": {k: trainable_modules[k] for k in keys}}


def count_config(cfg, num_classes: int) -> dict:
    """Build the model of `cfg` on the meta device (no weights, no memory) and count it."""
    with torch.device("meta"):
        model = build_model(cfg, num_classes, pretrained=False)
    return parameter_counts(model)


def format_counts(counts: dict, cfg, num_classes: int) -> str:
    m = cfg.model
    lines = [f"{m.name}: image {m.image_backbone}, text {m.text_backbone}, dim {m.dim}, "
             f"image {cfg.data.image_size[0]}x{cfg.data.image_size[1]}",
             f"{'module':<32}{'parameters':>14}{'trainable':>14}"]
    for key, n in counts["modules"].items():
        lines.append(f"{LABELS.get(key, key):<32}{n:>14,}{counts['trainable_modules'][key]:>14,}")
    lines.append(f"{'total (without ID classifiers)':<32}{counts['total']:>14,}{counts['trainable']:>14,}")
    what = f"ID classifiers ({num_classes} ids)" if num_classes else "ID classifiers (--num-classes)"
    lines.append(f"{what:<32}{counts['classifiers']:>14,}{counts['classifiers']:>14,}")
    return "\n".join(lines)


def run_info(args) -> int:
    cfg = load_config(args.config, args.overrides)
    counts = count_config(cfg, args.num_classes)
    print(json.dumps(counts, indent=1) if args.json else format_counts(counts, cfg, args.num_classes))
    return 0
