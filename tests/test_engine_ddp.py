"""Two CPU processes (gloo, torchrun) against one process on the same global batch.

Equivalence asserted: with train.gather_embeddings every rank computes the loss of the GLOBAL batch
(embeddings and labels all-gathered with gradients), so one DDP step must equal the single-process
step on the concatenated batch — with the real LGUR loss, random semi-hard negatives included: the
loss's generator has the same seed and draws the same (2, terms, B, B) uniforms on every rank and in
the single process, so every process picks the same negatives. What differs is only float summation
order (per-rank backward + all-reduce vs one backward), hence a 1e-6 tolerance on the parameters after
the Adam step. Dropout is switched off (model.text_dropout_in_train=false; lgur_tiny has no drop path)
because per-rank dropout masks cannot equal a single process's.

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
    losses = [float(step(*(t[rows] for t in batch))["loss"]) for batch in batches]
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state |= {f"grad/{k}": p.grad.contiguous() for k, p in model.named_parameters() if p.grad is not None}
    save_file(state, str(out / f"rank{env.rank}.safetensors"))
    (out / f"rank{env.rank}.json").write_text(json.dumps(losses))
    del ddp, step, model, optimizer, criterion
    teardown(env)


def test_two_process_step_equals_single_process_step(tmp_path):
    from safetensors.torch import load_file

    from lgur.engine.trainer import TrainStep

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
    step = TrainStep(model, model, criterion, optimizer, torch.device("cpu"))
    single_losses = [float(step(*batch)["loss"]) for batch in batches]
    assert losses[0] == pytest.approx(single_losses, rel=1e-5)
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert {f"grad/{k}" for k in grads} == {k for k in rank0 if k.startswith("grad/")}
    for k, g in grads.items():  # last step: same gradients up to float noise (a wrong one is off by ~100%)
        assert (rank0[f"grad/{k}"] - g).norm() <= 1e-2 * g.norm() + 1e-9, k
    moved = 0
    for k, v in model.state_dict().items():
        # Adam's first steps move every weight by ~lr=1e-3 whatever its gradient's size, so float noise in
        # near-zero gradients shows up as ~1e-6 differences; a wrong gradient moves weights by ~1e-3
        torch.testing.assert_close(rank0[k], v, rtol=0, atol=2e-5, msg=k)
        moved += not torch.equal(v, initial[k])
    assert moved > 10  # the step really changed the trainable parameters


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
