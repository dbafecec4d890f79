"""Multi-process training with torch.distributed: set-up from torchrun's environment, the
autograd-aware embedding gather, clean teardown, and `lgur train --nproc N` re-launching itself.

One process per device. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single
process and every helper here is a no-op. Backend: NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from lgur.errors import ConfigError
from lgur.runtime import resolve_device


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str) -> DistEnv:
    """Join the process group torchrun describes (if any) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward all-reduces the gradient of the gathered tensor and keeps this rank's
    rows. Not torch.distributed.nn.functional.all_gather: on gloo, with the four LGUR branches gathered,
    its all_to_all backward gave gradients far from the single-process ones (cosine 0.2 on the part
    projections) while this one matches them (tests/test_engine_ddp.py); an all-reduce works on every
    backend and the embeddings are small."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        ctx.rows = slice(dist.get_rank() * t.shape[0], (dist.get_rank() + 1) * t.shape[0])
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (b, ...) tensor into (world*b, ...), rank order. Gradients flow back:
    each rank's slice receives the SUM over ranks of the gradient of that slice, so with DDP's averaging
    the parameter gradient equals the single-process gradient of the loss on the global batch."""
    return _GatherWithGrad.apply(t)


def gather_labels(labels: torch.Tensor, world: int) -> torch.Tensor:
    out = [torch.empty_like(labels) for _ in range(world)]
    dist.all_gather(out, labels)
    return torch.cat(out)


def teardown(env: DistEnv) -> None:
    """Leave the process group without the gloo teardown races (docs/reference.md §10.1): the caller
    has dropped its model/optimizer/loader references; collect them, then barrier and destroy."""
    gc.collect()
    if env.distributed and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def relaunch(nproc: int, argv: list[str]) -> int:
    """`lgur train --nproc N ...`: run `python -m lgur train ...` under torch.distributed.run."""
    if nproc < 2:
        raise ConfigError(f"--nproc must be at least 2, got {nproc}")
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "--module", "lgur", *argv])
    except ChildFailedError:  # torchrun has printed which rank failed and how
        return 1
    return 0


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line minus `--nproc N` / `--nproc=N` (the re-launched workers must not recurse)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out

