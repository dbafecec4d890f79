"""Benchmark: what verifying a model's identity costs when it is loaded (not a test).

    .venv/bin/python bench/fingerprint.py [--config lgur_cuhk] [--repeats 3]

`load_model` recomputes the fingerprint (lgur.checkpoint.model_fingerprint: sha256 over the identity
config and every tensor's bytes) once: it verifies the stored value and is the identity it returns.
This writes the paper model (random init; BERT-base + DeiT-S + heads) to a temporary file, then times,
in one run: the whole `load_model`, the file read alone, and one fingerprint. Prints the best of
--repeats for each (wall and process CPU time) and the fingerprint's share of the load.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lgur.checkpoint import load_model, model_fingerprint, save_model
from lgur.config import load_config
from lgur.files import read_safetensors
from lgur.models import build_model


def best(fn, repeats: int) -> tuple[float, float]:
    """(best wall seconds, best process CPU seconds): on a shared machine CPU time is inflated less."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="lgur_cuhk")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(args.config)
    model = build_model(cfg, 0, pretrained=False)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        save_model(model, cfg, path, 0)
        state, meta = read_safetensors(path)
        raw_cfg = json.loads(meta["config"])
        n = sum(t.numel() for t in state.values())
        size = sum(t.numel() * t.element_size() for t in state.values())
        t_fp = best(lambda: model_fingerprint(state, raw_cfg), args.repeats)
        t_read = best(lambda: read_safetensors(path), args.repeats)
        t_load = best(lambda: load_model(path), args.repeats)
    print(f"{args.config}: {len(state)} tensors, {n / 1e6:.1f} M values, {size / 2**20:.0f} MiB, "
          f"torch threads {torch.get_num_threads()}")
    print(f"fingerprint (sha256)  wall {t_fp[0]:7.3f} s  cpu {t_fp[1]:7.3f} s  ({size / 2**30 / t_fp[0]:.2f} GiB/s wall)")
    print(f"read file             wall {t_read[0]:7.3f} s  cpu {t_read[1]:7.3f} s")
    print(f"load_model            wall {t_load[0]:7.3f} s  cpu {t_load[1]:7.3f} s  -> the fingerprint is "
          f"{t_fp[0] / t_load[0]:.0%} of a load's wall time, {t_fp[1] / t_load[1]:.0%} of its CPU time")


if __name__ == "__main__":
    main()
