"""`lgur data-check` and `lgur synth`. Heavy imports happen inside the commands (keeps `lgur -h` fast)."""
from __future__ import annotations

import argparse
import time
from collections import Counter


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data-check", help="read a dataset, print counts per split and every problem found",
                       description="Reads CUHK-PEDES / ICFG-PEDES / RSTPReid (layout auto-detected), opens every "
                                   "image, and prints counts, grouped problems, duplicate images and images shared "
                                   "between splits. Exit 2 when `lgur train` would refuse the data.")
    p.add_argument("root", help="dataset folder (or its annotation json)")
    p.add_argument("--config", help="recipe whose data section to use (default: defaults.yaml)")
    p.add_argument("--skip-train-ids", type=int, nargs="*", help="raw train ids to drop (default: data.skip_train_ids)")
    p.add_argument("--max-bad-fraction", type=float, help="default: data.max_bad_fraction")
    p.add_argument("--max-caption-tokens", type=int, help="default: data.max_caption_tokens")
    p.add_argument("--tokenizer", help="tokenizer folder for the caption-length check (default: model.tokenizer)")
    p.add_argument("--no-verify", action="store_true", help="only check that image files exist (faster)")
    p.add_argument("--examples", type=int, default=5, help="messages shown per kind of problem")
    p.add_argument("--all", action="store_true", help="show every message (no --examples limit)")
    p.set_defaults(func=data_check)

    s = sub.add_parser("synth", help="write the synthetic pedestrian dataset (CUHK-PEDES layout)",
                       description="Renders person crops whose look is set by attributes the captions mention; "
                                   "writes reid_raw.json, imgs/, attributes.json and preview.png.")
    s.add_argument("out", help="output folder")
    s.add_argument("--ids", type=int, default=500, help="number of identities (split 80/10/10 %% by id)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--images-per-id", type=int, default=4)
    s.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    s.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    s.set_defaults(func=synth)


def data_check(args: argparse.Namespace) -> int:
    from lgur.config import load_config
    from lgur.data.annotations import SPLITS, caption_token_lengths, load_annotations

    start = time.perf_counter()
    cfg = load_config(args.config)
    dc = cfg.data
    skip = dc.skip_train_ids if args.skip_train_ids is None else args.skip_train_ids
    max_bad = dc.max_bad_fraction if args.max_bad_fraction is None else args.max_bad_fraction
    max_tokens = dc.max_caption_tokens if args.max_caption_tokens is None else args.max_caption_tokens
    ann = load_annotations(args.root, skip, max_bad_fraction=None, verify_images=not args.no_verify, progress=True)
    counts = ann.counts()
    print(f"layout       {ann.layout}")
    print(f"annotations  {ann.annotation_file} ({ann.total_records} records)")
    print(f"images       {ann.image_root} ({'opened and verified' if not args.no_verify else 'existence only'})")
    print(f"splits       {ann.split_rule}")
    print(f"train ids    {ann.num_train_ids} (remapped to 0..{ann.num_train_ids - 1})")
    if ann.dropped_train_ids:
        print(f"skipped      {ann.dropped_train_ids} train records of data.skip_train_ids {list(skip)}")
    print(f"\n{'split':<7}{'images':>9}{'captions':>10}{'ids':>7}")
    for s in SPLITS:
        c = counts[s]
        note = "  (none in this dataset)" if s == "val" and not c["images"] else ""
        print(f"{s:<7}{c['images']:>9}{c['captions']:>10}{c['ids']:>7}{note}")

    from lgur.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer or cfg.model.tokenizer)
    long = {s: sum(n > max_tokens for n in caption_token_lengths([c for r in ann.split(s) for c in r.captions],
                                                                   tokenizer)) for s in SPLITS}
    print(f"\ncaptions over {max_tokens} tokens (truncated when loaded): "
          + ", ".join(f"{s} {n}" for s, n in long.items()))
    print(f"\nproblems ({len(ann.problems)}; {ann.problems.skipped_records()} records skipped = "
          f"{ann.bad_fraction():.2%} of {ann.total_records}, limit data.max_bad_fraction {max_bad:.2%}):")
    print(ann.problems.format(None if args.all else args.examples))
    print(f"\nin and used   {ann.summary()}")
    dups = ann.duplicates()
    if dups:
        print(f"duplicates    {len(dups)} records reuse an image ("
              + ", ".join(f"{k} {n}" for k, n in Counter(p.kind for p in dups).items()) + "): `lgur train` refuses "
              + ("them unless data.allow_duplicate_images=true" if not dc.allow_duplicate_images else
                 "nothing: data.allow_duplicate_images is true"))
    print(f"\nchecked in {time.perf_counter() - start:.1f} s")
    ann.raise_if_unusable(max_bad)
    ann.raise_if_duplicates(bool(dc.allow_duplicate_images))
    return 0


def synth(args: argparse.Namespace) -> int:
    from lgur.data.synth import generate

    start = time.perf_counter()
    path = generate(args.out, args.ids, args.seed, args.images_per_id, args.workers, args.overwrite)
    print(f"wrote {path} ({args.ids} ids x {args.images_per_id} images) in {time.perf_counter() - start:.1f} s; "
          f"look at {path.parent / 'preview.png'}")
    return 0
