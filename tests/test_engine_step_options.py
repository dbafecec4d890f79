"""Two options of the training step: `optim.grad_clip` (gradient-norm clipping before the optimiser step)
and `train.compile` (torch.compile of the model), each checked for what it does, through a real run."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lgur.config import load_config
from lgur.engine.trainer import TrainStep, train
from lgur.losses import build_criterion
from lgur.models import build_model

# no dropout anywhere in lgur_tiny then: two runs of the same step see the same computation
NO_DROPOUT = ["model.text_dropout_in_train=false"]


def _grad_norm(model: torch.nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()
                                                       if p.grad is not None])))


def _one_sgd_step(tiny_cfg, grad_clip):
    """(parameter update, gradient norm left after the step) of one TrainStep with plain SGD (lr 1): the
    update IS the (clipped) gradient, unlike Adam's, which is nearly invariant to the gradient's scale."""
    torch.manual_seed(0)
    model = build_model(load_config("lgur_tiny", NO_DROPOUT), 4, pretrained=False).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    step = TrainStep(model, model, build_criterion(tiny_cfg), optimizer, torch.device("cpu"), grad_clip=grad_clip)
    g = torch.Generator().manual_seed(1)
    mask = (torch.arange(9) < torch.tensor([9, 4, 7, 9])[:, None]).long()
    step(torch.randn(4, 3, *tiny_cfg.data.image_size, generator=g),
         torch.randint(1000, 5000, (4, 9), generator=g) * mask, mask, torch.tensor([0, 1, 2, 1]))
    update = torch.cat([(before[n] - p.detach()).flatten() for n, p in model.named_parameters() if n in before])
    return update, _grad_norm(model)


def test_grad_clip_scales_the_step_to_the_max_norm(tiny_cfg):
    free, norm = _one_sgd_step(tiny_cfg, None)
    assert float(free.norm()) == pytest.approx(norm, rel=1e-3)  # SGD lr 1: the update is the gradient
    max_norm = norm / 4
    clipped, norm_after = _one_sgd_step(tiny_cfg, max_norm)
    assert norm_after <= max_norm * (1 + 1e-5)  # the gradients the optimiser saw
    assert not torch.allclose(clipped, free)
    torch.testing.assert_close(clipped, free * (max_norm / norm), rtol=1e-3, atol=1e-6)  # same direction, 1/4
    # a bound above the norm leaves the step exactly as it was
    loose, norm_loose = _one_sgd_step(tiny_cfg, norm * 2)
    assert torch.equal(loose, free) and norm_loose == norm


def test_optim_grad_clip_reaches_the_training_step(synth_root, tmp_path, monkeypatch):
    """`optim.grad_clip` in a real run: every step clips at that norm, and what the optimiser then sees
    is within it."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None]))
        seen.append((max_norm, float(total), float(after)))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    cfg = load_config("lgur_tiny", ["optim.grad_clip=0.01", "optim.epochs=1", "train.max_steps_per_epoch=2",
                                    "eval.select_on=test"])
    cfg.data.root, cfg.output_dir = str(synth_root), str(tmp_path)
    train(cfg)
    assert [s[0] for s in seen] == [0.01, 0.01]
    assert all(total > 0.01 and after <= 0.01 * (1 + 1e-5) for _, total, after in seen), seen


def _train_losses(synth_root: Path, out: Path, *overrides: str) -> list[float]:
    cfg = load_config("lgur_tiny", [*NO_DROPOUT, "optim.epochs=2", "train.max_steps_per_epoch=2",
                                    "eval.select_on=test", "eval.every=2", *overrides])
    cfg.data.root, cfg.output_dir = str(synth_root), str(out)
    run = Path(train(cfg)["run_dir"])
    return [float(r["train/loss"]) for r in csv.DictReader((run / "metrics.csv").open())]


@pytest.mark.slow  # tracing LGUR's forward and backward with TorchDynamo: tens of seconds on 2 CPU cores
def test_train_compile_gives_the_eager_losses(synth_root, tmp_path, monkeypatch):
    """`train.compile=true`: the run's model goes through torch.compile (TorchDynamo graph capture and
    AOTAutograd for the backward), and a short run has the eager run's losses (epoch means of 2 steps
    each, so the second epoch's reflect the updates from the compiled backward). The code generator is
    swapped for "aot_eager": inductor's C++ compile of this model takes over 10 minutes on 2 shared CPU
    cores (measured), too long for the suite; what it changes is only the kernels' float rounding."""
    real_compile = torch.compile
    compiled_models = []

    def compile_for_test(model, *args, **kwargs):
        compiled_models.append(type(model).__name__)
        return real_compile(model, *args, **{**kwargs, "backend": "aot_eager"})

    eager = _train_losses(synth_root, tmp_path / "eager", "train.compile=false")
    assert compiled_models == []
    monkeypatch.setattr(torch, "compile", compile_for_test)
    compiled = _train_losses(synth_root, tmp_path / "compiled", "train.compile=true")
    assert compiled_models == ["LGUR"]
    assert len(compiled) == len(eager) == 2 and eager[0] != eager[1]
    assert compiled == pytest.approx(eager, rel=1e-4)
