"""Benchmark: PyTorch vs onnxruntime latency of the exported encoders (not a test).

    .venv/bin/python bench/export.py [--configs lgur_tiny lgur_small_synth] [--threads 1 2]

For each recipe a model is built with random heads (weights do not change the timing), saved as a model
file and exported with `lgur.search.export.export_onnx` (which also checks parity). Then the image encoder
(batch 1 and --batch) and the text encoder (1 and --batch captions of mixed length) are timed in PyTorch
(eval, no_grad) and onnxruntime (CPUExecutionProvider), both on the same number of threads (each value of
--threads): median of --repeats runs after a warm-up. Ratios are PyTorch time / onnxruntime time, measured
in this run. On a busy machine torch's 2-thread numbers for batch 1 can be far worse than 1 thread (every
small op waits for the second thread), hence both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["lgur_tiny", "lgur_small_synth"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import onnxruntime as ort

    from lgur.checkpoint import load_model, save_model
    from lgur.config import load_config
    from lgur.models import build_model
    from lgur.search.export import example_inputs, export_onnx

    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, load average {os.getloadavg()[0]:.1f}")
    print("| recipe | encoder | threads | batch | PyTorch ms | onnxruntime ms | ratio | parity (max abs diff) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            cfg = load_config(name)
            ck = Path(tmp) / f"{name}.safetensors"
            torch.manual_seed(0)
            save_model(build_model(cfg, 0, pretrained=False), cfg, ck, 0)
            out = Path(tmp) / name
            export_onnx(ck, out)
            parity = json.loads((out / "export.json").read_text())["parity_max_abs_diff"]
            model, cfg, _ = load_model(ck)
            for threads, batch in [(t, b) for t in args.threads for b in (1, args.batch)]:
                torch.set_num_threads(threads)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = threads
                opts.log_severity_level = 3
                img = ort.InferenceSession(str(out / "image_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
                txt = ort.InferenceSession(str(out / "text_encoder.onnx"), opts, providers=["CPUExecutionProvider"])
                images, ids, mask = example_inputs(model, cfg.data.image_size, batch=batch, seed=batch)
                feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
                with torch.no_grad():
                    cases = [("image", lambda: model.encode_images(images),
                              lambda: img.run(None, {"images": images.numpy()})),
                             ("text", lambda: model.encode_texts(ids, mask), lambda: txt.run(None, feeds))]
                    for enc, pt_fn, ort_fn in cases:
                        pt, onnx = median_ms(pt_fn, args.repeats), median_ms(ort_fn, args.repeats)
                        print(f"| {name} | {enc} | {threads} | {batch} | {pt:.2f} | {onnx:.2f} | {pt / onnx:.2f} | "
                              f"{parity[enc]:.1e} |", flush=True)


if __name__ == "__main__":
    main()
