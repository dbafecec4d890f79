"""Mixed precision (`train.amp`): which autocast dtype a run uses, and the fp16 loss scaler.

    auto  CUDA: bf16 where the GPU supports it, else fp16 + GradScaler. CPU: bf16 only where the CPU
          has native bf16 matrix instructions (AVX512-BF16 or AMX), else off: there a bf16 step is
          faster than fp32, without them bf16 is emulated and slower (bench/train_step.py prints the
          ratio; the README lists measured figures).
    bf16  autocast to bfloat16 (no scaler needed)
    fp16  autocast to float16 + torch.amp.GradScaler (CUDA only)
    off   float32
"""
from __future__ import annotations

import torch

from lgur.errors import ConfigError
from lgur.runtime import autocast, cpu_has_fast_bf16  # noqa: F401  (autocast: re-exported for the engine)

AMP_MODES = ("auto", "bf16", "fp16", "off")


def resolve_amp(mode: str | bool | None, device: torch.device) -> torch.dtype | None:
    """train.amp -> the autocast dtype, or None for float32. YAML reads a bare `off` as False."""
    mode = "off" if mode in (False, None) else mode
    if mode not in AMP_MODES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_MODES)}, got {mode!r}")
    cuda = device.type == "cuda"
    if mode == "auto":
        if not cuda:
            return torch.bfloat16 if cpu_has_fast_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and not cuda:
        raise ConfigError("train.amp=fp16 needs a CUDA device (use bf16 or off on a CPU)")
    if mode == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.amp=bf16: this GPU has no bfloat16 support (use fp16 or auto)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[mode]


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 (a disabled scaler passes step/backward through)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
