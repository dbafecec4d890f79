"""Reading pretrained weight files safely and loading them with a loud, readable report.

The official LGUR code wraps every copy in a bare `except`, so a wrong file silently leaves random
weights (docs/reference.md §9.8). Here every file goes through `load_checked`: it logs what was
loaded, ignored and missing, and raises WeightsError on a missing key the model uses or on a shape
mismatch, naming the file.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lgur.errors import WeightsError
from lgur.files import read_any

log = logging.getLogger(__name__)

_WRAPPERS = ("model", "state_dict")  # {'model': sd} (DeiT/Facebook), {'state_dict': sd} (many trainers)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weight file: safetensors, or a torch state dict (bare or under 'model'/'state_dict')
    read with torch.load(weights_only=True), through lgur.files (TorchScript archives are refused: their
    code would run at load). A DDP 'module.' prefix is stripped."""
    path = Path(path).expanduser()
    obj = read_any(path, "a pretrained weights file")
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: holds no state dict (got {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise WeightsError(f"{path}: the state dict holds no tensors")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def summarize_keys(keys: Iterable[str], n: int = 12) -> str:
    """Keys grouped by module for a log line: 'blocks.11.* (12), dist_token, head.* (2)'."""
    groups: dict[str, int] = {}
    for k in sorted(keys):
        parts = k.split(".")
        depth = 2 if len(parts) > 2 and parts[1].isdigit() else 1
        g = ".".join(parts[:depth]) + ".*" if len(parts) > depth else k
        groups[g] = groups.get(g, 0) + 1
    items = [f"{g} ({c})" if c > 1 else g for g, c in groups.items()]
    more = f" ... (+{len(items) - n} more groups)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_checked(module: nn.Module, sd: dict[str, torch.Tensor], source: str | Path,
                 ignored: Iterable[str] = ()) -> dict[str, list[str]]:
    """Copy `sd` into `module`; return the report {'loaded', 'ignored', 'unexpected', 'missing'}.

    `ignored` names checkpoint keys the caller drops on purpose (heads, distillation token, unused
    blocks). Keys neither used nor ignored are logged as unexpected; a missing key or a shape mismatch
    means the file does not fit this model and raises WeightsError.
    """
    own = module.state_dict()
    ignored = sorted(set(ignored))
    unexpected = sorted(k for k in sd if k not in own)
    missing = sorted(k for k in own if k not in sd)
    bad_shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or bad_shape:
        problems = []
        if bad_shape:
            problems.append(f"{len(bad_shape)} shape mismatch(es): {'; '.join(bad_shape[:4])}")
        if missing:
            problems.append(f"{len(missing)} missing key(s): {summarize_keys(missing)}")
        raise WeightsError(f"{source}: does not fit the {type(module).__name__} being built "
                           f"({' and '.join(problems)})")
    module.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=True)
    loaded = sorted(k for k in sd if k in own)
    log.info("loaded %d tensors from %s", len(loaded), source)
    if ignored:
        log.info("ignored (not used by this model): %s", summarize_keys(ignored))
    if unexpected:
        log.warning("%s: %d unexpected key(s) not used: %s", source, len(unexpected), summarize_keys(unexpected))
    return {"loaded": loaded, "ignored": ignored, "unexpected": unexpected, "missing": missing}


def warn_random_init_on_use(module: nn.Module, message: str) -> None:
    """Warn (warnings + log) that `module` runs from random init, at its first forward call, unless a
    load_state_dict that fills all its tensors comes first: `build_model(cfg, n)` followed by loading a
    checkpoint warns nothing, training from scratch warns once. Both hooks go away after either event."""
    own = list(module.state_dict())
    handles = []

    def remove_hooks() -> None:
        for h in handles:
            h.remove()

    def loaded(mod, state_dict, prefix, *args) -> None:
        if all(prefix + k in state_dict for k in own):
            remove_hooks()

    @torch.compiler.disable  # runs eagerly under torch.compile (train.compile): a side effect, no graph
    def first_use(mod, args) -> None:
        remove_hooks()
        warnings.warn(message, stacklevel=2)
        log.warning(message)

    handles += [module.register_load_state_dict_pre_hook(loaded), module.register_forward_pre_hook(first_use)]
