"""`lgur index`, `lgur search`, `lgur serve`, `lgur export`. Heavy imports happen inside the commands.

Like `lgur train`, each takes `--config NAME|PATH` (a recipe: defaults.yaml when not given) and `key=value`
overrides, but only of the keys it reads: search.* and device (index --video: also video.*; export:
export.*). The model itself is always used with the config saved in its checkpoint, so model.* and data.*
overrides are refused (lgur.config.load_command_config). Explicit flags (--batch-size, --device, ...) win
over the config. `lgur search` tells overrides from query text by their key: `search.rerank=20` or
`device=cpu` is an override, any other word is part of a query.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

CONFIG_HELP = ("recipe file, or a recipe shipped in lgur/configs/ by name; only its search: section and device are "
               "read (default: defaults.yaml)")
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=\S*$")


def _add_config(p: argparse.ArgumentParser, help_text: str = CONFIG_HELP, overrides: bool = True) -> None:
    p.add_argument("--config", help=help_text)
    if overrides:
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides of the keys this command reads, e.g. search.rerank=20 device=cpu")


def command_config(args: argparse.Namespace, command: str, sections: tuple[str, ...] = ("search",),
                   keys: tuple[str, ...] = ("device",)):
    """The resolved config of a search-side command (args.config + args.overrides), checked against the
    keys it may set."""
    from lgur.config import load_command_config

    return load_command_config(args.config, args.overrides, command, sections, keys)


def split_query_overrides(words: list[str]) -> tuple[list[str], list[str]]:
    """`lgur search` positionals -> (query texts, overrides). An override is one `key.sub=value` token whose
    first part is a top-level config key (search, device, model, ...); everything else is query text."""
    from lgur.config import defaults

    top = set(defaults())
    overrides = [w for w in words if _OVERRIDE.match(w) and w.split("=", 1)[0].split(".")[0] in top]
    return [w for w in words if w not in overrides], overrides


def apply_faiss_threads(scfg) -> None:
    """search.faiss_threads as configured. lgur.search.ann applies the default (defaults.yaml) when it first
    imports faiss; another value is applied here through faiss's own API (0: faiss's own thread count).
    Nothing is imported when the default stands."""
    from lgur.config import defaults

    if scfg.faiss_threads == defaults().search.faiss_threads:
        return
    try:
        import faiss
    except ImportError:
        return
    own = faiss.omp_get_max_threads()  # before lgur.search.ann sets the default
    from lgur.search.ann import faiss_or_none

    faiss_or_none()
    faiss.omp_set_num_threads(int(scfg.faiss_threads) or own)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="encode a folder of images, or the people in video footage, into a gallery "
                                     "index (incremental)",
                       description="--images: encodes all jpg/jpeg/png/bmp/webp files under IMAGES (recursively) "
                                   "with the checkpoint's image encoder. --video (lgur.video.cli): samples frames "
                                   "at --fps from a video file, a folder of videos or a folder of frames, detects "
                                   "people, tracks them and indexes the crops (written to OUT.media/) with video, "
                                   "time, box and track. Re-running on the same OUT processes only new or changed "
                                   "files and drops deleted ones; unreadable files are skipped and listed.")
    p.add_argument("--checkpoint", required=True, help="lgur model file (.safetensors)")
    p.add_argument("--images", help="folder of gallery images (or --video)")
    p.add_argument("--out", required=True, help="index directory to create or update (e.g. gallery.lgidx)")
    p.add_argument("--dtype", choices=["fp16", "fp32"], help="stored embedding dtype (default: search.dtype)")
    p.add_argument("--batch-size", type=int, help="images per batch (default: search.batch_size)")
    p.add_argument("--workers", type=int, help="decoding processes (default: search.num_workers)")
    p.add_argument("--ann", choices=["ivfpq", "hnsw", "none"],
                   help="also build a faiss ANN index (used for galleries >= search.ann_threshold); "
                        "default: keep what the index had")
    p.add_argument("--pca", type=int, help="reduce embeddings to this many dims for stage-1 search (e.g. 512, 256; "
                                           "0 removes it); default: keep what the index had")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available; under torchrun: this rank's GPU)")
    p.add_argument("--meta-pattern", help="per-row metadata from each relative path by a regex with named groups, "
                                          "e.g. 'cam(?P<camera>\\d+)/' or '(?P<time>\\d{8}T\\d{6})' (time: a timestamp)")
    p.add_argument("--meta", help="per-row metadata from a sidecar CSV (a 'path' column + fields) or JSON "
                                  "({path: {field: value}}); overrides --meta-pattern; 'time' is a timestamp")
    p.add_argument("--nproc", type=int, help="encode with N processes on this machine (torchrun, gloo/nccl); for "
                                             "many machines run `torchrun --nnodes ... -m lgur index ...`")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="also index files whose real location is outside IMAGES (default: skipped and listed)")
    p.add_argument("--no-explain-maps", action="store_true",
                   help="do not store each image's part attention and foreground maps (recorded by the same "
                        "forward; (K+1) x patches x 2 bytes per image); `lgur search --explain` then runs the "
                        "image encoder on the hits instead")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config(p, "recipe file, or a recipe shipped in lgur/configs/ by name; only its search: (and, with "
                   "--video, video:) section and device are read (default: defaults.yaml)")
    p.set_defaults(func=index_cmd)

    s = sub.add_parser("search", help="rank an index's images for free-text descriptions",
                       description="Prints rank, score and path of the top-k images for each query; optionally "
                                   "writes an HTML or PNG results sheet.")
    s.add_argument("query", nargs="*", help="description(s) of the person; KEY=VALUE words whose key is a config "
                                            "key (search.rerank=20, device=cpu) are config overrides")
    s.add_argument("--index", required=True, help="index directory built by `lgur index`")
    s.add_argument("--queries", help="file with one query per line (blank lines ignored)")
    s.add_argument("-k", type=int, default=10, help="results per query (default 10)")
    s.add_argument("--checkpoint", help="model file (default: the one recorded in the index; must be the same model)")
    s.add_argument("--html", help="write a self-contained HTML results sheet here")
    s.add_argument("--png", help="write a PNG results sheet here")
    s.add_argument("--mode", choices=["auto", "exact", "ann"], default="auto",
                   help="auto: ANN for galleries >= search.ann_threshold, PCA scan if built, else exact")
    s.add_argument("--per-track", action="store_true",
                   help="video indexes: one hit per track (its best-matching crop and its time span)")
    s.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    s.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="search only rows whose metadata matches (repeatable, ANDed): camera=3, camera=1,2, "
                        "video!=a.mp4, score>=0.5")
    s.add_argument("--after", help="only rows with time >= this (Unix seconds or ISO 8601, UTC unless a zone is given)")
    s.add_argument("--before", help="only rows with time < this")
    s.add_argument("--explain", action="store_true",
                   help="per hit: the prototype parts ranked by their share of the score, with the query words "
                        "each part attends to; --html/--png sheets then draw each hit's foreground map and its "
                        "strongest part's attention over the crop and colour the query's words by part")
    _add_config(s, overrides=False)
    s.set_defaults(func=search_cmd)

    v = sub.add_parser("serve", help="web page + JSON API for person search over an index",
                       description="FastAPI app: GET / (search page), POST /api/search, GET /img/{id}.")
    v.add_argument("--index", required=True)
    v.add_argument("--checkpoint", help="default: the one recorded in the index")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--mode", choices=["auto", "exact", "ann"], default="auto")
    v.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    v.add_argument("--images", help="gallery folder (default: the images root recorded in the index); "
                                    "no file outside it is ever served")
    v.add_argument("--batch-workers", type=int, help="micro-batches searched at once on the CPU, each on cores/workers "
                                               "threads; 0 = one per core, at most 4 (default: search.serve_workers)")
    v.add_argument("--max-body-bytes", type=int, help="largest request body (default: search.max_body_bytes)")
    v.add_argument("--batch-max", type=int, help="concurrent queries encoded together at most; 1 disables "
                                                 "micro-batching (default: search.serve_batch_max)")
    v.add_argument("--batch-window-ms", type=float, help="wait for more queries to batch (default: "
                                                         "search.serve_batch_window_ms)")
    v.add_argument("--follow-symlinks", action="store_true",
                   help="serve gallery symlinks that lead outside the images folder (for an index built with "
                        "`lgur index --follow-symlinks`); default: refused (403)")
    _add_config(v)
    v.set_defaults(func=serve_cmd)

    e = sub.add_parser("export", help="export the image and text encoders (ONNX)",
                       description="Writes image_encoder.onnx (images -> normalised embedding) and "
                                   "text_encoder.onnx (input_ids, attention_mask -> normalised embedding), "
                                   "dynamic batch and sequence length, and checks them with onnxruntime.")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--format", choices=["onnx"], default="onnx")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--opset", type=int, help="ONNX opset (default: export.opset = 17)")
    _add_config(e, "recipe file, or a recipe shipped in lgur/configs/ by name; only its export: section is read "
                   "(default: defaults.yaml)")
    e.set_defaults(func=export_cmd)


def index_cmd(args: argparse.Namespace) -> int:
    import os
    import sys

    if args.images is None:
        from lgur.errors import LgurError

        raise LgurError("give --images FOLDER (or --video PATH)")
    if args.nproc is not None and args.nproc > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from lgur.errors import LgurError

            raise LgurError("--nproc is for a plain `lgur index`; under torchrun leave it out")
        from lgur.engine.distributed import relaunch, strip_nproc

        return relaunch(args.nproc, strip_nproc(sys.argv[1:]))
    from lgur.search.build import build_index
    from lgur.search.index import PathPattern, read_sidecar

    cfg = command_config(args, "index")
    scfg = cfg.search
    apply_faiss_threads(scfg)
    metadata = [PathPattern(args.meta_pattern)] if args.meta_pattern else []
    if args.meta:
        metadata.append(read_sidecar(args.meta))
    index, report = build_index(args.checkpoint, args.images, args.out, dtype=args.dtype or scfg.dtype,
                                batch_size=args.batch_size or scfg.batch_size,
                                num_workers=scfg.num_workers if args.workers is None else args.workers,
                                device=args.device or cfg.device, ann=args.ann, pca=args.pca, search_cfg=scfg,
                                progress=not args.quiet, metadata=metadata or None,
                                follow_symlinks=args.follow_symlinks, explain_maps=not args.no_explain_maps)
    if index is not None:  # rank 0 (or the only process) reports
        print(report.summary())
        cols = index.files.metadata_columns
        if cols:
            print("metadata columns: " + ", ".join(f"{k} ({v})" for k, v in cols.items()))
        print(f"index written to {args.out}")
    return 0


def read_queries(args: argparse.Namespace) -> list[str]:
    from lgur.errors import LgurError

    queries = [q for q in split_query_overrides(args.query)[0] if q.strip()]
    if args.queries:
        path = Path(args.queries)
        if not path.is_file():
            raise LgurError(f"--queries: file not found: {path}")
        queries += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not queries:
        raise LgurError("no query given (pass text or --queries FILE)")
    return queries


def search_cmd(args: argparse.Namespace) -> int:
    from lgur.search.searcher import Searcher

    from lgur.search.filters import Filter

    args.overrides = split_query_overrides(args.query)[1]
    cfg = command_config(args, "search")
    apply_faiss_threads(cfg.search)
    queries = read_queries(args)
    flt = Filter.parse(args.where, args.after, args.before)
    searcher = Searcher(args.index, args.checkpoint, device=args.device or cfg.device, mode=args.mode,
                        search_cfg=cfg.search)
    if flt:
        subset = searcher.select(flt)
        print(f"filter: {flt.describe()}: {len(subset)} of {len(searcher)} images")
    results = searcher.search(queries, k=args.k, where=flt, per_track=args.per_track)
    explanations = explain_results(searcher, results) if args.explain else None
    for j, r in enumerate(results):
        print(f"query: {r.query}")
        if explanations is not None:
            print_explained_words(explanations[j])
        for i, h in enumerate(r.hits):
            if h.video:  # video crops: where and when, readably (all columns are in the JSON API)
                meta = "  " + h.where()
            else:
                meta = "  " + " ".join(f"{k}={v}" for k, v in h.meta.items() if v not in (None, "")) if h.meta else ""
            print(f"{h.rank:>4}  {h.score:.4f}  {h.path}{meta}")
            if explanations is not None:
                print_explained_hit(explanations[j].hits[i])
    if explanations is not None and (args.html or args.png):
        from lgur.search.sheet import write_explained_html, write_explained_png

        if args.html:
            print(f"wrote {write_explained_html(results, explanations, args.html)}")
        if args.png:
            print(f"wrote {write_explained_png(results, explanations, args.png)}")
    elif args.html or args.png:
        from lgur.search.sheet import write_html, write_png

        if args.html:
            print(f"wrote {write_html(results, args.html)}")
        if args.png:
            print(f"wrote {write_png(results, args.png)}")
    return 0


def explain_results(searcher, results) -> list:
    from lgur.search.explain import explain_result

    return [explain_result(searcher, r) for r in results]


def print_explained_words(ex) -> None:
    """The query's words grouped by the part that attends to each most, and what the model cannot explain."""
    for note in ex.limitations:
        print(f"      note: {note}")
    if ex.word_attention is not None:
        by_part: dict[int, list[str]] = {}
        for w, k in zip(ex.words, ex.word_part):
            by_part.setdefault(k, []).append(w)
        print("      words by part: " + "; ".join(f"part {k}: {' '.join(ws)}" for k, ws in sorted(by_part.items())))


def print_explained_hit(hit, limit: int = 3) -> None:
    """Under a hit: its parts ranked by contribution (they add up to the score), each with its top words, and
    where its strongest part looks on the crop."""
    for p in hit.parts[:limit]:
        words = ", ".join(f"{w} {a:.2f}" for w, a in p.top_words)
        print(f"        part {p.part}  {p.contribution:+.4f}  {words}")
    rest = hit.parts[limit:]
    if rest:
        print(f"        {len(rest)} more parts  {sum(p.contribution for p in rest):+.4f}")
    if hit.part_attention is not None and hit.strongest is not None:
        import numpy as np

        thirds = [float(band.sum()) for band in np.array_split(hit.part_attention[hit.strongest], 3, axis=0)]
        print(f"        part {hit.strongest}'s attention over the crop's top / middle / bottom third: "
              + " / ".join(f"{t:.0%}" for t in thirds))


def serve_cmd(args: argparse.Namespace) -> int:
    from lgur.search.searcher import Searcher
    from lgur.search.server import serve

    from lgur.errors import LgurError

    for name in ("max_body_bytes", "batch_max"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise LgurError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_workers is not None and not 0 <= args.batch_workers <= 64:
        raise LgurError(f"--batch-workers must be within 0..64, got {args.batch_workers}")
    if args.batch_window_ms is not None and not 0 <= args.batch_window_ms <= 1000:
        raise LgurError(f"--batch-window-ms must be within 0..1000, got {args.batch_window_ms}")
    cfg = command_config(args, "serve")
    apply_faiss_threads(cfg.search)
    searcher = Searcher(args.index, args.checkpoint, device=args.device or cfg.device, mode=args.mode,
                        search_cfg=cfg.search, images_root=args.images)
    print(f"serving {len(searcher)} images on http://{args.host}:{args.port}/")
    serve(searcher, args.host, args.port, max_body_bytes=args.max_body_bytes, batch_max=args.batch_max,
          batch_window_ms=args.batch_window_ms, follow_symlinks=args.follow_symlinks, workers=args.batch_workers)
    return 0


def export_cmd(args: argparse.Namespace) -> int:
    from lgur.export.onnx import export_onnx

    cfg = command_config(args, "export", sections=("export",), keys=())
    report = export_onnx(args.checkpoint, args.out, opset=args.opset or cfg.export.opset)
    print(report)
    return 0
