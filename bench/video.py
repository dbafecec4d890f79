"""Benchmark: video indexing throughput per detector (not a test).

    .venv/bin/python bench/video.py [--video vtest.avi] [--frames 40] [--fps 2] [--threads 2]
                                    [--detectors ssd-mobilenet hog onnx:PATH] [--recipe lgur_small_synth]

What `lgur index --video` does per sampled frame, timed stage by stage on --threads CPU threads:
  decode   OpenCV reads the footage and samples it at --fps (the skipped frames are grabbed, not converted)
  detect   the detector on batches of video.frame_batch frames
  crop     pad + crop + JPEG-write the crops and the context frame (what ingest writes to OUT.media)
  encode   the recipe's image encoder on the crops (random weights: same cost as trained ones), batches of 64
Prints frames/s of the whole pipeline per detector, crops per frame, and the minutes of processing that one
hour of footage takes at --fps (3600 x fps sampled frames). Footage: vtest.avi (768x576, OpenCV's sample;
tools/ensure_vtest.sh fetches it) if found, else the rendered walkers video at 768x576. The machine may be
shared: the load average is printed next to the numbers; compare rows of one run.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import lgur  # noqa: F401  (sets the OpenMP policy before torch/cv2 start their thread pools)


def find_footage(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    cached = Path(os.environ.get("LGUR_CACHE", Path.home() / ".cache" / "lgur")) / "vtest.avi"
    if cached.is_file():
        return cached
    script = Path(__file__).resolve().parents[1] / "tools" / "ensure_vtest.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600).stdout.strip()
    last = out.splitlines()[-1] if out else ""
    return Path(last) if last.endswith(".avi") and Path(last).is_file() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video")
    ap.add_argument("--frames", type=int, default=40, help="sampled frames timed per detector")
    ap.add_argument("--fps", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--detectors", nargs="+", default=["ssd-mobilenet", "hog"])
    ap.add_argument("--recipe", default="lgur_small_synth", help="model whose image encoder encodes the crops")
    args = ap.parse_args()

    import cv2
    import numpy as np
    import torch

    from lgur.config import defaults, load_config
    from lgur.data import build_test_transform
    from lgur.models import build_model
    from lgur.video.detectors import build_detector
    from lgur.video.ingest import pad_box
    from lgur.video.reader import find_sources, probe, sample_frames

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    vcfg = defaults().video
    footage = find_footage(args.video)
    tmp = Path(tempfile.mkdtemp(prefix="lgur-bench-video-"))
    if footage is None:
        from lgur.data.synth import sample_identities
        from lgur.video.synthetic import render_walkers

        footage = tmp / "walkers.avi"
        render_walkers(footage, sample_identities(6, 0), seconds=args.frames / args.fps + 1, fps=10,
                       size=(768, 576))
        print("vtest.avi not available: timing the rendered walkers video (768x576)")
    _, [src] = find_sources(footage)
    info = probe(src, vcfg.frames_fps)
    print(f"footage: {footage} ({info.width}x{info.height}, {info.fps:g} fps, {info.frames} frames); "
          f"sampling {args.fps:g} fps; {args.threads} threads")

    cfg = load_config(args.recipe)
    model = build_model(cfg, 0, pretrained=False).eval()
    transform = build_test_transform(cfg.data.image_size, model.image_mean, model.image_std, cfg.data.interpolation)
    from PIL import Image

    rows = []
    for name in args.detectors:
        det = build_detector(name)
        t_dec = t_det = t_crop = t_enc = 0.0
        n_frames = n_crops = 0
        crops: list = []
        it = sample_frames(src, info, args.fps)
        quality = [int(cv2.IMWRITE_JPEG_QUALITY), int(vcfg.jpeg_quality)]
        while n_frames < args.frames:
            t = time.perf_counter()
            batch = []
            for _ in range(int(vcfg.frame_batch)):
                try:
                    batch.append(next(it))
                except StopIteration:
                    break
            t_dec += time.perf_counter() - t
            if not batch:
                break
            t = time.perf_counter()
            found = det([b[2] for b in batch])
            t_det += time.perf_counter() - t
            t = time.perf_counter()
            for (i, _, frame), d in zip(batch, found):
                h, w = frame.shape[:2]
                keep = (d[:, 3] - d[:, 1] >= vcfg.min_height) & (d[:, 2] - d[:, 0] >= vcfg.min_width)
                if keep.any():
                    s = vcfg.frame_width / w
                    cv2.imwrite(str(tmp / "frame.jpg"), cv2.resize(frame, (round(w * s), round(h * s)),
                                                                    interpolation=cv2.INTER_AREA), quality)
                for k, box in enumerate(d[keep]):
                    x1, y1, x2, y2 = pad_box(box, vcfg.pad, w, h)
                    crop = frame[y1:y2, x1:x2]
                    cv2.imwrite(str(tmp / f"crop{k}.jpg"), crop, quality)
                    crops.append(transform(Image.fromarray(crop[:, :, ::-1])))
            t_crop += time.perf_counter() - t
            n_frames += len(batch)
            t = time.perf_counter()
            while len(crops) >= 64 or (crops and n_frames >= args.frames):
                part, crops = crops[:64], crops[64:]
                with torch.no_grad():
                    model.encode_images(torch.stack(part))
                n_crops += len(part)
            t_enc += time.perf_counter() - t
        total = t_dec + t_det + t_crop + t_enc
        fps = n_frames / total
        rows.append((name, n_frames, n_crops, t_dec, t_det, t_crop, t_enc, fps, 3600 * args.fps / fps / 60))
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 = both cores busy with other work)")
    print(f"{'detector':<16}{'frames':>7}{'crops/fr':>9}{'decode':>9}{'detect':>9}{'crop':>9}{'encode':>9}"
          f"{'frames/s':>10}{'min per h':>11}")
    for name, nf, nc, td, tt, tc, te, fps, mins in rows:
        print(f"{name:<16}{nf:>7}{nc / max(nf, 1):>9.1f}" + "".join(f"{1e3 * x / max(nf, 1):>7.0f}ms" for x in (td, tt, tc, te))
              + f"{fps:>10.2f}{mins:>11.1f}")
    print(f"(per sampled frame; 'min per h' = minutes to index one hour of this footage at {args.fps:g} fps = "
          f"{int(3600 * args.fps)} frames; encode = {args.recipe}'s image encoder, random weights)")


if __name__ == "__main__":
    main()
