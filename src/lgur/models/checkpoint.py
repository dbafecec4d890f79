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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from lgur.config import Config, config_from_dict
from lgur.errors import WeightsError
from lgur.files import CONVERT_OFFICIAL, read_safetensors, read_safetensors_metadata
from lgur.models.build import build_model

FORMAT = "lgur-model-2"     # fingerprint over the config's model identity + every tensor (model_fingerprint)
LEGACY_FORMATS = ("lgur-model-1",)  # fingerprint over the tensors only (tensors_fingerprint)

# config keys that change no computation of a loaded model: where its initial weights came from and
# training-only behaviour. Everything else under `model`, and IDENTITY_DATA_KEYS, is part of its identity.
NON_IDENTITY_MODEL_KEYS = ("image_weights", "text_weights", "drop_path", "freeze_text", "text_dropout_in_train")
IDENTITY_DATA_KEYS = ("image_size", "max_caption_tokens", "interpolation")


def _umask() -> int:
    """The process umask (read from /proc where possible: os.umask() has to set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temp file in the same folder, then rename it over `path`.

    The file gets the permissions any newly created file gets (0666 minus the umask): mkstemp creates
    its temp file 0600, which would make model files unreadable to other users and services."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path




def _tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def tensors_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """lgur-model-1 fingerprint: sha256 over names, shapes and bytes of every tensor, in sorted order
    (16 hex digits). Kept to verify files written before the config became part of the identity."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # 0-dim: BN counters; the uint8 view hashes the raw bytes without a copy
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def identity_config(cfg: Config | dict) -> dict:
    """The part of a config that decides what a model with given tensors computes (see
    NON_IDENTITY_MODEL_KEYS): the head counts, switches, backbones, tokenizer, image size, ..."""
    d = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    model = {k: v for k, v in (d.get("model") or {}).items() if k not in NON_IDENTITY_MODEL_KEYS}
    data = {k: d["data"][k] for k in IDENTITY_DATA_KEYS if k in (d.get("data") or {})}
    return {"model": model, "data": data}


def model_fingerprint(state: dict[str, torch.Tensor], cfg: Config | dict) -> str:
    """The identity of a model: sha256 over its identity config (canonical JSON) and, per tensor in name
    order, its name and the sha256 of its shape, dtype and bytes (32 hex digits). Computed from the file's contents whenever a model
    is loaded, so metadata alone can neither fake nor hide it: the same tensors under other head
    settings are another model, and so is any changed byte."""
    names = sorted(state)
    # one sha256 per tensor, on torch's threads (hashlib releases the GIL), then one over the digests
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        digests = list(pool.map(_tensor_digest, (state[k] for k in names)))
    h = hashlib.sha256(b"lgur-model-fingerprint-2\0")
    h.update(json.dumps(identity_config(cfg), sort_keys=True, separators=(",", ":")).encode())
    for name, digest in zip(names, digests):
        h.update(b"\0" + name.encode() + b"\0" + digest)
    return h.hexdigest()[:32]


def save_model(model: torch.nn.Module, cfg: Config | dict, path: str | Path, num_classes: int,
               extra: dict | None = None) -> str:
    """Write model weights + config atomically. Returns the model's fingerprint (model_fingerprint)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config_json = json.dumps(cfg.to_dict() if isinstance(cfg, Config) else dict(cfg))
    fp = model_fingerprint(state, json.loads(config_json))  # exactly what load_model will hash
    meta = {"format": FORMAT, "config": config_json, "num_classes": str(num_classes),
            "fingerprint": fp, "extra": json.dumps(extra or {})}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return fp


def _parse_metadata(path: Path, meta: dict[str, str]) -> dict:
    if meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        raise WeightsError(f"{path}: not an lgur model file (format={meta.get('format')!r}); "
                           f"{CONVERT_OFFICIAL.format(path=path)}")
    try:
        raw = json.loads(meta["config"])
        return {"config": config_from_dict(raw), "num_classes": int(meta["num_classes"]),
                "fingerprint": str(meta["fingerprint"]), "extra": json.loads(meta.get("extra", "{}")),
                "format": meta["format"], "stored_config": raw}
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
        raise WeightsError(f"{path}: corrupt lgur model metadata ({type(e).__name__}: {e})") from None


def _existing(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    return path


def read_metadata(path: str | Path) -> dict:
    """The metadata of a model file as stored, read from its header alone. Nothing is verified: identity
    checks need the fingerprint load_model / read_model_file compute."""
    path = _existing(path)
    meta = _parse_metadata(path, read_safetensors_metadata(path, "an lgur model file"))
    del meta["stored_config"]
    return meta


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a model file, verified: the fingerprint is recomputed from the tensors and
    the stored config, and a file whose stored fingerprint differs is refused as corrupt. The returned
    metadata's `fingerprint` is the computed one."""
    path = _existing(path)
    state, raw = read_safetensors(path, "an lgur model file")
    meta = _parse_metadata(path, raw)
    computed = model_fingerprint(state, meta.pop("stored_config"))
    if meta["format"] in LEGACY_FORMATS:
        stored_ok = tensors_fingerprint(state) == meta["fingerprint"]
    else:
        stored_ok = computed == meta["fingerprint"]
    if not stored_ok:
        raise WeightsError(f"{path}: corrupt model file: its tensors and config do not match the fingerprint "
                           f"stored with them ({meta['fingerprint']}); the file was damaged or edited. Use "
                           "another copy or re-save the model")
    meta["stored_fingerprint"] = meta["fingerprint"]
    meta["fingerprint"] = computed
    return state, meta


def load_model(path: str | Path, device: str | torch.device = "cpu", with_classifiers: bool = False):
    """Rebuild the model stored in `path`. Returns (model in eval mode, config, metadata).

    Pretrained-weight paths in the stored config are ignored: every weight comes from the file. The
    metadata's `fingerprint` is computed from the file's tensors and config (read_model_file).
    """
    state, meta = read_model_file(path)
    cfg = meta["config"]
    model_cfg = Config(cfg.to_dict())
    model_cfg.model.image_weights = None
    model_cfg.model.text_weights = None
    model = build_model(model_cfg, num_classes=meta["num_classes"] if with_classifiers else 0, pretrained=False)
    if not with_classifiers:
        state = {k: v for k, v in state.items() if not k.startswith("classifiers.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: weights do not match the model built from its config "
                           f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device).eval(), cfg, meta
