"""lgur.runtime: the one device resolver, bf16 check and autocast helper everyone uses."""
import contextlib

import pytest
import torch

from lgur.errors import ConfigError
from lgur.runtime import autocast, cpu_has_fast_bf16, fast_bf16, resolve_device


def test_resolve_device():
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == want
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="is not cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_one_bf16_check_and_autocast():
    from lgur.engine import distributed, precision
    from lgur.search.topk import batch_compute_dtype

    assert distributed.resolve_device is resolve_device and precision.autocast is autocast
    cpu = torch.device("cpu")
    assert fast_bf16(cpu) == cpu_has_fast_bf16()
    assert precision.resolve_amp("auto", cpu) == (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert batch_compute_dtype(cpu) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert isinstance(autocast(cpu, None), contextlib.nullcontext)
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
