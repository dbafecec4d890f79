"""Training throughput (pairs/s) of the paper model, and where the speed comes from.

    python bench/train_step.py                    # CPU, batch 8, 2 threads (the official measurement's setting)
    python bench/train_step.py --device cuda      # GPU, batch 64

The paper model as the recipe builds it (DeiT-S 384x128, frozen BERT-base + BiLSTM, DGA, PGU, 11,000
ID classifiers), random init, one full training step (forward of all branches, the LGUR loss, backward,
Adam). Variants are measured in ONE run, each adding one change to the previous, so the ratios say
what each change gains:

    baseline          the official code's execution: captions padded to 100 tokens and BERT run on
                      all of them, explicit (unfused) attention in DeiT and BERT, for-loop Adam, fp32
    + fused attn      scaled_dot_product_attention in DeiT and BERT (lgur's own heads always use it)
    + token trim      realistic CUHK captions (30-60 tokens), BERT/BiLSTM run only up to the longest
                      caption of the batch (what lgur does)
    + fused Adam      one fused update kernel (lgur's default)
    + bf16 autocast   train.amp=bf16 (on CPU `auto` leaves it off: see the printed ratio)

The official code's own step was measured on the same kind of machine (2 cores, docs/reference.md §9):
4.18 s at batch 8 = 1.9 pairs/s; the last column compares with it (CPU only).
"""
from __future__ import annotations

import argparse
import statistics
import time

import lgur  # noqa: F401  (first: sets lgur's OpenMP policy before torch loads, as `lgur train` runs)
import torch

from lgur.config import load_config
from lgur.engine.optim import build_optimizer
from lgur.engine.precision import autocast
from lgur.losses import build_criterion
from lgur.models import build_model

OFFICIAL_CPU_PAIRS_S = 1.9  # docs/reference.md §9: 4.18 s per step, batch 8, 100-token captions, 2 threads
NUM_IDS = 11000             # CUHK-PEDES training ids after the official skip list


def captions(batch: int, lengths: tuple[int, int], width: int, g: torch.Generator):
    """Random token ids with lengths in [lo, hi] ([CLS] ... [SEP]), right-padded to `width`."""
    n = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=g)
    ids = torch.randint(1000, 29000, (batch, width), generator=g)
    ids[:, 0] = 101
    ids[torch.arange(batch), n - 1] = 102
    mask = (torch.arange(width) < n[:, None]).long()
    return ids * mask, mask


def set_fused_attention(model, on: bool) -> None:
    for m in model.image.modules():  # timm Attention blocks
        if hasattr(m, "fused_attn"):
            m.fused_attn = on
    model.text.backbone.set_attn_implementation("sdpa" if on else "eager")


def measure(model, criterion, optimizer, batch, dtype, device, steps: int) -> float:
    """Median seconds per training step (after one warm-up step)."""
    images, ids, mask, labels = batch
    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast(device, dtype):
            outputs = model(images, ids, mask)
        loss, _ = criterion({k: v.float() for k, v in outputs.items()}, labels, model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, help="default: 8 on CPU, 64 on CUDA")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the official figure used 2)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    args = ap.parse_args()
    device = torch.device(args.device)
    batch_size = args.batch or (64 if device.type == "cuda" else 8)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(None, ["model.drop_path=0.1"])  # the paper model, random init (no weight files)
    model = build_model(cfg, NUM_IDS, pretrained=False).to(device).train()
    criterion = build_criterion(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, *cfg.data.image_size, generator=g)
    labels = torch.randint(0, NUM_IDS // 100, (batch_size,), generator=g) * 100
    padded = captions(batch_size, (100, 100), 100, g)    # the official input: BERT sees 100 positions
    realistic = captions(batch_size, (30, 60), 100, g)   # CUHK-like lengths, padded to 100 by the loader
    to = lambda *ts: tuple(t.to(device) for t in ts)     # noqa: E731

    variants = [  # name, fused attention, captions, fused Adam, autocast dtype
        ("baseline (official execution)", False, padded, False, None),
        ("+ fused attention", True, padded, False, None),
        ("+ token trim (30-60 tokens)", True, realistic, False, None),
        ("+ fused Adam (lgur default)", True, realistic, True, None),
        ("+ bf16 autocast", True, realistic, True, torch.bfloat16),
    ]
    print(f"device {device}, batch {batch_size}, threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"longest realistic caption {int(realistic[1].sum(1).max())} tokens")
    print(f"{'variant':<32}{'s/step':>8}{'pairs/s':>9}{'vs baseline':>13}{'vs previous':>13}"
          + (f"{'vs official':>13}" if device.type == "cpu" else ""))
    first = previous = None
    for name, fused_attn, (ids, mask), fused_adam, dtype in variants:
        set_fused_attention(model, fused_attn)
        optimizer = build_optimizer(model, cfg.optim, fused=fused_adam)
        if not fused_adam:
            optimizer.defaults["foreach"] = False
            for group in optimizer.param_groups:
                group["foreach"] = False  # the official torch-1.x style per-tensor loop
        sec = measure(model, criterion, optimizer, to(images, ids, mask, labels), dtype, device, args.steps)
        pairs = batch_size / sec
        first, prev = first or pairs, previous or pairs
        line = f"{name:<32}{sec:>8.2f}{pairs:>9.2f}{pairs / first:>12.2f}x{pairs / prev:>12.2f}x"
        if device.type == "cpu":
            line += f"{pairs / OFFICIAL_CPU_PAIRS_S:>12.2f}x"
        print(line, flush=True)
        previous = pairs


if __name__ == "__main__":
    main()
