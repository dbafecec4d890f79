"""Model files: safetensors weights + the resolved config in the metadata, written atomically.

A model file is self-contained: `load_model(path)` rebuilds the architecture from the config stored
inside it (no network, no pickle). Training state (optimizer, scheduler, RNG, epoch) lives beside it
in the engine's own file; see lgur.engine.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lgur.config import Config, config_from_dict
from lgur.errors import WeightsError

FORMAT = "lgur-model-1"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes of every tensor, in sorted order (16 hex digits)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return h.hexdigest()[:16]


def save_model(model: torch.nn.Module, cfg: Config | dict, path: str | Path, num_classes: int,
               extra: dict | None = None) -> str:
    """Write model weights + config atomically. Returns the weights' fingerprint."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    fp = tensors_fingerprint(state)
    cfg_dict = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    meta = {"format": FORMAT, "config": json.dumps(cfg_dict), "num_classes": str(num_classes),
            "fingerprint": fp, "extra": json.dumps(extra or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return fp


def read_metadata(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # truncated or not a safetensors file
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise WeightsError(f"{path}: not an lgur model file (format={meta.get('format')!r}); "
                           "official LGUR checkpoints need `lgur convert-official` first")
    return {"config": config_from_dict(json.loads(meta["config"])), "num_classes": int(meta["num_classes"]),
            "fingerprint": meta["fingerprint"], "extra": json.loads(meta.get("extra", "{}"))}


def load_model(path: str | Path, device: str | torch.device = "cpu", with_classifiers: bool = False):
    """Rebuild the model stored in `path`. Returns (model in eval mode, config, metadata).

    Pretrained-weight paths in the stored config are ignored: every weight comes from the file.
    """
    from lgur.models import build_model  # late import: models imports timm/transformers

    from safetensors.torch import load_file

    meta = read_metadata(path)
    cfg = meta["config"]
    model_cfg = Config(cfg.to_dict())
    model_cfg.model.image_weights = None
    model_cfg.model.text_weights = None
    model = build_model(model_cfg, num_classes=meta["num_classes"] if with_classifiers else 0, pretrained=False)
    state = load_file(str(path))
    if not with_classifiers:
        state = {k: v for k, v in state.items() if not k.startswith("classifiers.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the model built from its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), cfg, meta
