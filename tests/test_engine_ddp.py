"""Two CPU processes (gloo, torchrun) against one process on the same global batch.

Equivalence asserted: with train.gather_embeddings every rank computes the loss of the GLOBAL batch
(embeddings and labels all-gathered with gradients), so one DDP step must equal the single-process
step on the concatenated batch — with the real LGUR loss, random semi-hard negatives included: the
loss's generator has the same seed and draws the same (2, terms, B, B) uniforms on every rank and in
the single process, so every process picks the same negatives. Dropout is switched off
(model.text_dropout_in_train=false; lgur_tiny has no drop path) because per-rank dropout masks cannot
equal a single process's.

What is invariant, and so what is asserted (the test must pass on any x86-64 CPU, whatever its vector
width): per-rank backward + all-reduce sums in another order than one backward, so the GRADIENTS agree
only up to float32 rounding, and Adam turns that rounding into large PARAMETER differences: its first
update is lr * g / (|g| + eps), whose slope at g ~ 0 is lr / eps = 1e5, so a 1e-10 rounding difference
in a near-zero gradient moves a weight by 1e-5 (seen on an AVX2-only EPYC: 1.3e-5..4.2e-5 after two
steps). Comparing parameters after real Adam steps therefore tests the CPU's summation order, not DDP.
Instead, at every step (1) the single process's gradient is compared with rank 0's (all-reduced) one,
and (2) the single process's optimizer is then fed rank 0's gradient, so both runs follow the same
trajectory and the parameters after the steps must agree to float32 rounding of one elementwise
update: this checks that DDP applied exactly one Adam step to the averaged gradient on each rank.

Run as a script under torchrun, this file is the worker: it trains STEPS steps on its slice and writes
its parameters and every step's gradients to OUT/rank<R>.safetensors.

Run as a script under torchrun, this file is the worker: it trains STEPS steps on its slice and writes
its parameters to OUT/rank<R>.safetensors.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GLOBAL_BATCH, STEPS = 8, 2
OVERRIDES = ["model.text_dropout_in_train=false", f"optim.batch_size={GLOBAL_BATCH}", "train.gather_embeddings=true"]


def _setup():
    """The tiny model, loss and optimiser, seeded; the fixed global batches of every step."""
    from lgur.config import load_config
    from lgur.engine.optim import build_optimizer
    from lgur.losses import build_criterion
    from lgur.models import build_model

    cfg = load_config("lgur_tiny", OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4, pretrained=False)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        lengths = torch.randint(6, 20, (GLOBAL_BATCH,), generator=g)  # ragged captions: per-rank trimming differs
        ids = torch.randint(1000, 5000, (GLOBAL_BATCH, 20), generator=g)
        mask = (torch.arange(20) < lengths[:, None]).long()
        batches.append((torch.randn(GLOBAL_BATCH, 3, *cfg.data.image_size, generator=g), ids * mask, mask,
                        torch.arange(GLOBAL_BATCH) % 4))
    return cfg, model, build_criterion(cfg), build_optimizer(model, cfg.optim), batches


def _worker(out: Path) -> None:
    from safetensors.torch import save_file

    from lgur.engine.distributed import init_distributed, teardown
    from lgur.engine.trainer import TrainStep

    env = init_distributed("cpu")
    cfg, model, criterion, optimizer, batches = _setup()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    step = TrainStep(ddp, model, criterion, optimizer, env.device, gather_world=env.world)
    per_rank = GLOBAL_BATCH // env.world
    rows = slice(env.rank * per_rank, (env.rank + 1) * per_rank)
    losses, state = [], {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for s, batch in enumerate(batches):
        losses.append(float(step(*(t[rows] for t in batch))["loss"]))
        state |= {f"grad{s}/{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    state |= {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{env.rank}.safetensors"))
    (out / f"rank{env.rank}.json").write_text(json.dumps(losses))
    del ddp, step, model, optimizer, criterion
    teardown(env)


# Gradient tolerance. Only the summation order differs, and rounding error scales with the size of the
# terms summed, not with their sum: a tensor whose gradient nearly cancels (dga.gate.proj here: norm 1e-5
# against ~0.05 for its neighbours) shows a large RELATIVE error (1e-3 measured) for an ABSOLUTE one of
# 1e-8. So each tensor's gradient must agree within GRAD_RTOL of its own norm plus GRAD_ATOL of the whole
# model's gradient norm. float32 rounds at 6e-8 per operation; measured on an AVX2-only EPYC, both with
# its AVX2 kernels and with ATEN_CPU_CAPABILITY=default, the worst tensor used 0.4% and 0.6% of this
# bound (relative errors of non-cancelling tensors <= 3e-6). A wrong gradient (a rank that does not see
# the global batch, a missing all-reduce or a double average) is off by ~50-100% on most tensors: the
# negative control at the end measured it at a median 1,100x and a worst 5,900x the bound.
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5
# Parameter tolerance once both runs take their Adam step from the same (rank 0's) gradient: the update is
# elementwise, with no reduction, so at most rounding inside it can differ (e.g. FMA contraction in vector
# vs scalar code): a few float32 ulps. Measured: bit-identical.
PARAM_RTOL, PARAM_ATOL = 1e-6, 1e-9


def _grad_excess(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor: |got - want| / (GRAD_RTOL |want| + GRAD_ATOL |all of want|); <= 1 is within tolerance."""
    total = float(torch.stack([g.norm() for g in want.values()]).norm())
    return {k: float((got[k] - g).norm() / (GRAD_RTOL * g.norm() + GRAD_ATOL * total)) for k, g in want.items()}


@pytest.mark.slow  # torchrun, 2 processes
def test_two_process_step_equals_single_process_step(tmp_path):
    from safetensors.torch import load_file

    from lgur.engine.trainer import TrainStep
    from lgur.losses import build_criterion

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.run(["timeout", "180", sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", __file__, str(tmp_path)], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP keeps the replicas identical
    losses = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert losses[0] == losses[1]  # both ranks computed the global-batch loss

    cfg, model, criterion, optimizer, batches = _setup()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    names = {p: k for k, p in model.named_parameters()}
    single_grads: list[dict[str, torch.Tensor]] = []

    def use_rank0_gradient(opt, args, kwargs):  # before each Adam step: keep ours, step with rank 0's
        s = len(single_grads)
        single_grads.append({names[p]: p.grad.clone() for g in opt.param_groups for p in g["params"]
                             if p.grad is not None})
        for k in single_grads[-1]:
            model.get_parameter(k).grad.copy_(rank0[f"grad{s}/{k}"])

    optimizer.register_step_pre_hook(use_rank0_gradient)
    step = TrainStep(model, model, criterion, optimizer, torch.device("cpu"))
    single_losses = [float(step(*batch)["loss"]) for batch in batches]
    assert losses[0] == pytest.approx(single_losses, rel=1e-5)
    assert len(single_grads) == len(batches)
    for s, grads in enumerate(single_grads):
        ddp = {k[len(f"grad{s}/"):]: v for k, v in rank0.items() if k.startswith(f"grad{s}/")}
        assert ddp.keys() == grads.keys()
        excess = _grad_excess(ddp, grads)
        worst = max(excess, key=excess.get)
        assert excess[worst] <= 1, f"step {s}: gradient of {worst} off by {excess[worst]:.1f}x the tolerance"
    moved = 0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rank0[k], v, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=k)
        moved += not torch.equal(v, initial[k])
    assert moved > 10  # the steps really changed the trainable parameters

    # negative control: DDP without the embedding gather (each rank's loss on its own half, gradients
    # averaged) is a wrong gradient for this loss; the tolerance must be far from accepting it
    model.load_state_dict(initial)
    halves = []
    for r in (0, 1):
        model.zero_grad(set_to_none=True)
        rows = slice(r * GLOBAL_BATCH // 2, (r + 1) * GLOBAL_BATCH // 2)
        fresh = build_criterion(cfg)  # what each rank would hold at its first step
        loss, _ = fresh({k: v.float() for k, v in model(*(t[rows] for t in batches[0][:3])).items()},
                        batches[0][3][rows], model)
        loss.backward()
        halves.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    wrong = _grad_excess({k: (halves[0][k] + halves[1][k]) / 2 for k in halves[0]}, single_grads[0])
    assert max(wrong.values()) > 100, max(wrong.values())


@pytest.mark.slow  # lgur train --nproc 2
def test_cli_nproc_2_trains_and_tears_down(synth_root, tmp_path):
    """`lgur train --nproc 2`: one run folder written by rank 0, with results, and a clean exit."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = ["timeout", "240", sys.executable, "-m", "lgur", "train", "--nproc", "2", "--config", "lgur_tiny",
           "--data-root", str(synth_root), "--out-dir", str(tmp_path), "optim.epochs=1",
           "train.max_steps_per_epoch=2", "train.gather_embeddings=true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = tmp_path.iterdir()
    results = json.loads((run / "results.json").read_text())
    assert results["best_epoch"] == 1
    log = (run / "train.log").read_text()
    assert "2 process(es) x batch 4" in log and log.count("run folder") == 1


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
