"""Where and in which precision lgur computes: one device resolver, one bf16-capability check, one
autocast helper. Training, evaluation, indexing and search all ask here (lgur.engine.precision turns
`train.amp` into a dtype with these; lgur.engine.distributed gives each torchrun rank its device).
"""
from __future__ import annotations

import contextlib
import os

import torch

from lgur.errors import ConfigError


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(name: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """A device name (auto | cpu | cuda | cuda:N; None = auto) -> a device. `auto` is CUDA when present,
    else the CPU; `cuda` under torchrun means this rank's GPU (LOCAL_RANK)."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available (use device=cpu or device=auto)")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not cpu, cuda, cuda:N or auto") from None


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles). Without them oneDNN
    emulates bf16 and it is slower than fp32. torch exposes the checks privately (torch.cpu._is_*);
    a check absent from this torch means no."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def fast_bf16(device: torch.device) -> bool:
    """bfloat16 compute is native on `device` (a bf16-capable GPU, or a CPU per cpu_has_fast_bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_fast_bf16()


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast to `dtype` on the device's type, or a no-op context for float32 (dtype None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
