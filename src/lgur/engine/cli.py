"""`lgur train` and `lgur eval`. Heavy imports happen inside the commands (keeps `lgur -h` fast)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train a model (new run folder, or --resume one)",
                       description="Train LGUR per a recipe. Every run gets a folder OUTPUT_DIR/NAME-TIME with "
                                   "config.yaml, train.log, metrics.csv, tb/, curves.png, results.json and the "
                                   "last/best checkpoints. Multi-GPU: --nproc N, or torchrun --nproc_per_node=N "
                                   "-m lgur train ...")
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.epochs=10")
    t.add_argument("--config", help="recipe file, or a recipe shipped in lgur/configs/ by name (e.g. lgur_cuhk); "
                                    "default: defaults.yaml")
    t.add_argument("--data-root", help="dataset folder (sets data.root)")
    t.add_argument("--out-dir", help="where run folders are created (sets output_dir)")
    t.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR|latest",
                   help="continue a run from its `last` checkpoint (default: the latest run under the output dir); "
                        "its config.yaml is used, overrides still apply (and are saved to it once the checkpoint has "
                        "loaded; a refused resume leaves the run folder as it was)")
    t.add_argument("--nproc", type=int, help="train on N processes (one per GPU) by re-launching under torchrun")
    t.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="evaluate a model file on a dataset split (also another dataset: cross-domain)",
                       description="Encode all captions (queries) and images (gallery) of a split and print R@1/5/10, "
                                   "mAP, mINP and the official code's trapezoid mAP. Classifier ids play no role, "
                                   "so any dataset works (cross-domain evaluation).")
    e.add_argument("--checkpoint", required=True, help="model file (.safetensors) or run folder (uses best, else last)")
    e.add_argument("--data-root", required=True, help="dataset folder")
    e.add_argument("--split", choices=("test", "val"), default="test")
    e.add_argument("--protocol", choices=("t2i", "t2i_wm"), default="t2i",
                   help="t2i: standard; t2i_wm: each caption's own image removed from the gallery")
    e.add_argument("--i2t", action="store_true", help="also image -> text retrieval")
    e.add_argument("--batch-size", type=int, help="encoding batch size (default: the model's eval.batch_size)")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    e.add_argument("--amp", default="off",
                   help="off | auto | bf16 | fp16 (default off: fp32, so a checkpoint gives the same numbers on "
                        "every machine; bf16/fp16 are faster, their numbers depend on the hardware)")
    e.add_argument("--workers", type=int, default=2, help="image loader workers")
    e.add_argument("--out", help="also write the metrics to this JSON file")
    e.set_defaults(func=run_eval)


def _resolve_train_config(args: argparse.Namespace):
    from lgur.config import load_config
    from lgur.engine.state import find_run

    resume_dir = None
    if args.resume:
        out_dir = args.out_dir or load_config(args.config).output_dir
        resume_dir = find_run(args.resume, out_dir)
        cfg = load_config(resume_dir / "config.yaml", args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    if args.data_root:
        cfg.data.root = str(Path(args.data_root).expanduser())
    if args.out_dir:
        cfg.output_dir = str(Path(args.out_dir).expanduser())
    return cfg, resume_dir


def run_train(args: argparse.Namespace) -> int:
    if args.nproc and "LOCAL_RANK" not in os.environ:
        from lgur.engine.distributed import relaunch, strip_nproc

        return relaunch(args.nproc, strip_nproc(sys.argv[1:]))
    from lgur.engine.trainer import train

    cfg, resume_dir = _resolve_train_config(args)
    results = train(cfg, resume_dir)
    if results is not None:
        print(f"run folder: {results['run_dir']}\nbest epoch {results['best_epoch']} (selected on "
              f"{results['selected_on']}), model: {results['checkpoint']}\ndata: {results['data']['summary']}"
              + (" (every record named in train.log and results.json)" if results["data"]["problems"] else ""))
    return 0


def _checkpoint_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        from lgur.errors import WeightsError

        raise WeightsError(f"{p}: no best.safetensors or last.safetensors in this folder")
    return p


def run_eval(args: argparse.Namespace) -> int:
    import json
    import logging

    from lgur.checkpoint import load_model
    from lgur.data.annotations import load_annotations
    from lgur.runtime import resolve_device
    from lgur.data.datasets import build_eval_split
    from lgur.engine.evaluation import evaluate
    from lgur.engine.precision import resolve_amp
    from lgur.eval.table import by_direction, format_table

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = resolve_device(args.device)
    ckpt = _checkpoint_file(args.checkpoint)
    model, cfg, meta = load_model(ckpt, device)
    ann = load_annotations(args.data_root, max_bad_fraction=None)  # eval needs only the evaluated split
    ann.raise_if_unusable(cfg.data.max_bad_fraction, splits=(args.split,))
    records = ann.split(args.split)
    split = build_eval_split(args.split, records, model.tokenizer, cfg, model.image_mean, model.image_std,
                             batch_size=args.batch_size or cfg.eval.batch_size, num_workers=args.workers)
    directions = (args.protocol, "i2t") if args.i2t else (args.protocol,)
    dtype = resolve_amp(args.amp, device)
    metrics = evaluate(model, split, device, dtype, lambda x, train: x, directions,
                       cfg.eval.chunk_size)
    print(f"model {ckpt} (fingerprint {meta['fingerprint']}) on {args.data_root} [{ann.layout}], "
          f"{args.split} split: {len(split.captions)} captions x {len(split.images)} images")
    print(format_table(by_direction({args.split: metrics})))
    data = ann.report(split.problems(ann.annotation_file.name), splits=(args.split,))
    print(f"data: {data['summary']}" + (f"\n{data['text']}" if data["problems"] else ""))
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(ckpt), "fingerprint": meta["fingerprint"],
                                              "data_root": str(args.data_root), "split": args.split,
                                              "metrics": metrics, "data": data}, indent=2))
    return 0
