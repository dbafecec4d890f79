"""`lgur index`: build or update a gallery index, in one process or data-parallel under torchrun.

    lgur index --checkpoint m.safetensors --images crops/ --out g.lgidx                # one process
    lgur index --nproc 4 --checkpoint ... --images crops/ --out g.lgidx                # 4 processes, this machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m lgur index --checkpoint ... --images /shared/crops --out /shared/g.lgidx    # many machines

Every rank lists the folder, rank 0 decides what to encode (new or changed files only; unchanged rows are
reused from the current index) and broadcasts the plan; each rank encodes a contiguous share of those files
(on its own GPU with `--device cuda`, else CPU) and writes it as its own shard `part-RANK.npy` (+ the
positions that decoded) inside the new version's data folder; rank 0 then merges the reused rows and the
parts in path order into the index's shards, so the result equals the single-process index row for row.
Multi-machine runs need `--images` and `--out` on a file system every machine sees at the same path.

If any rank dies, torchrun stops the others and nothing is committed: the previous index stays current
(see lgur.search.index: the manifest is the single commit point) and the next run removes the leftovers.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lgur.checkpoint import load_model
from lgur.config import defaults
from lgur.data.datasets import ImageFolderSet
from lgur.data.images import verify_image
from lgur.data.transforms import build_test_transform
from lgur.engine.distributed import init_distributed, teardown
from lgur.search import index as index_mod
from lgur.search.ann import attach_reduction
from lgur.search.index import (BASE_COLUMNS, SHARD_ROWS, STORE_DTYPES, BuildReport, GalleryIndex, IndexWriter, Rows,
                               MetadataSource, SearchError, _kind_of, _metadata_columns, _previous, _stat,
                               column_array)
from lgur.search.paths import split_gallery
from lgur.search.topk import Shards

MERGE_BLOCK = 65536  # rows gathered per write while merging


def _broadcast(obj, env):
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_ok(ok: bool, env) -> bool:
    """True when every rank says ok (a rank that failed in Python still reaches this and says so)."""
    if not env.distributed:
        return ok
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    return int(flag) == 0


def build(checkpoint, images, out, dtype="fp16", batch_size=64, num_workers=2, device=None, ann=None, pca=None,
          search_cfg=None, progress=True, metadata=None,
          follow_symlinks=False, explain_maps=True) -> tuple[GalleryIndex | None, BuildReport]:
    """See build_index below. Under torchrun every rank calls this; rank 0 returns the index,
    the others (None, their report)."""
    env = init_distributed(device or "auto")
    try:
        result = _build(env, checkpoint, images, out, dtype, batch_size, num_workers, ann, pca, search_cfg,
                        progress, metadata, follow_symlinks, explain_maps)
    except BaseException:
        if env.distributed:  # a peer may be gone: no barrier, just leave the group
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        raise
    teardown(env)
    return result


def _build(env, checkpoint, images, out, dtype, batch_size, num_workers, ann, pca, search_cfg, progress, metadata,
           follow_symlinks=False, explain_maps=True):
    t0 = time.perf_counter()
    if dtype not in STORE_DTYPES:
        raise SearchError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    scfg = search_cfg or defaults().search
    checkpoint, root, out = Path(checkpoint).resolve(), Path(images).expanduser().resolve(), Path(out)
    report = BuildReport(processes=env.world)
    model, cfg, meta = load_model(checkpoint, device=env.device)
    fingerprint = meta["fingerprint"]  # computed from the loaded tensors and config
    transform = build_test_transform(cfg.data.image_size, model.image_mean, model.image_std, cfg.data.interpolation)
    dataset = ImageFolderSet(root, transform)
    dataset.paths, report.outside = split_gallery(dataset.paths, root, follow_symlinks)
    rel = [p.relative_to(root).as_posix() for p in dataset.paths]

    writer = old = None
    plan, failure, reuse = None, None, {}
    if env.main:
        try:
            old, reuse, todo = _plan(out, fingerprint, root, dtype, dataset, rel, report)
            writer = IndexWriter(out).__enter__()
            plan = {"rel": rel, "todo": todo, "data": str(writer.data)}
        except Exception as e:  # tell the other ranks, which wait for the plan
            failure, plan = e, {"error": f"{type(e).__name__}: {e}"}
    plan = _broadcast(plan, env)
    if "error" in plan:
        if failure is not None:
            raise failure
        raise SearchError(f"rank 0 could not plan the run: {plan['error']}")
    try:
        if plan["rel"] != rel:  # every rank must encode the same files rank 0 planned
            dataset.paths = [root / r for r in plan["rel"]]
            rel = plan["rel"]
        todo, data = plan["todo"], Path(plan["data"])
        share = todo[env.rank * len(todo) // env.world:(env.rank + 1) * len(todo) // env.world]
        ok, err = True, ""
        try:
            maps_out = {} if explain_maps else None
            emb, done = index_mod.encode_files(model, dataset, share, batch_size, num_workers, env.device,
                                               progress and env.main, maps_out=maps_out)
            _save_part_maps(data, env.rank, maps_out)
            part = data / f"part-{env.rank:05d}.npy"
            with open(part, "wb") as f:
                np.save(f, emb.to(STORE_DTYPES[dtype]).numpy(), allow_pickle=False)
            (data / f"part-{env.rank:05d}.json").write_text(json.dumps(done))
        except Exception as e:  # every rank reports to the vote below, then the failure is raised
            ok, err = False, f"{type(e).__name__}: {e}"
            if not env.distributed:
                raise
        del model
        if not _all_ok(ok, env):
            raise SearchError(f"indexing failed on rank {env.rank}: {err}" if err else
                              "indexing failed on another rank (see its error); the previous index is unchanged")
        if not env.main:
            return None, report
        index = _merge(writer, old, rel, reuse, dataset, data, env.world, dtype, fingerprint, checkpoint, root, cfg,
                       report, ann, pca, scfg, metadata, verify_image, explain_maps)
        report.seconds = time.perf_counter() - t0
        return index, report
    finally:
        if writer is not None:
            writer.__exit__(None, None, None)


def _plan(out, fingerprint, root, dtype, dataset, rel, report):
    """Rank 0: the reusable current index, {dataset position: its row} for unchanged files, and the
    positions to encode (new or changed files)."""
    old, report.reencode_reason = _previous(out, fingerprint, root, dtype)
    stats = [_stat(p) for p in dataset.paths]
    old_rows = {p: i for i, p in enumerate(old.files.paths())} if old is not None else {}
    reuse: dict[int, int] = {}
    todo: list[int] = []
    sizes = old.files.columns["size"] if old is not None else None
    mtimes = old.files.columns["mtime_ns"] if old is not None else None
    for pos, (r, (size, mtime)) in enumerate(zip(rel, stats)):
        row = old_rows.get(r)
        if row is not None and int(sizes[row]) == size and int(mtimes[row]) == mtime:
            reuse[pos] = row
        else:
            report.changed += row is not None
            todo.append(pos)
    present = set(rel)
    report.removed = sum(p not in present for p in old_rows)
    report.kept = len(reuse)
    return old, reuse, todo


def _merge(writer, old, rel, reuse, dataset, data, world, dtype, fingerprint, checkpoint, root, cfg, report, ann,
           pca, scfg, metadata, verify_image, explain_maps=True):
    """Rank 0: reused rows + every rank's part, in path order, into the new version's shards; commit."""
    part_rows: dict[int, tuple[int, int]] = {}  # dataset position -> (part, row in part)
    parts = []
    for r in range(world):
        done = json.loads((data / f"part-{r:05d}.json").read_text())
        parts.append(torch.from_numpy(np.load(data / f"part-{r:05d}.npy", mmap_mode="c", allow_pickle=False)))
        part_rows.update({pos: (r, i) for i, pos in enumerate(done)})
    todo_failed = sorted(set(range(len(rel))) - set(reuse) - set(part_rows))
    report.added = len(part_rows)
    report.skipped = [{"path": rel[p], "reason": verify_image(dataset.paths[p]) or "could not be decoded"}
                      for p in todo_failed]
    order = sorted(list(reuse) + list(part_rows))
    if not order:
        raise SearchError(f"{root}: none of the {len(rel)} images could be decoded; nothing to index")
    dim = parts[0].shape[1] if part_rows else old.dim
    # source of each output row: -1 = the old index, r >= 0 = part r; and its row there
    src = np.array([part_rows[p][0] if p in part_rows else -1 for p in order], dtype=np.int64)
    row = np.array([part_rows[p][1] if p in part_rows else reuse[p] for p in order], dtype=np.int64)
    sources = {-1: old.store if old is not None else None, **{r: Shards([t]) for r, t in enumerate(parts)}}

    def blocks():
        for b0 in range(0, len(order), MERGE_BLOCK):
            s, rr = src[b0:b0 + MERGE_BLOCK], row[b0:b0 + MERGE_BLOCK]
            block = torch.empty(len(s), dim, dtype=STORE_DTYPES[dtype])
            for k in np.unique(s):
                m = s == k
                block[torch.from_numpy(m)] = sources[int(k)].take(torch.from_numpy(rr[m])).to(block.dtype)
            yield block

    writer.write_embeddings(blocks(), dtype, SHARD_ROWS, total=len(order))
    del parts, sources
    maps_layout = _merge_maps(writer, old, src, row, data, world) if explain_maps else None
    for p in list(data.glob("part-*")):
        p.unlink()
    stats = [_stat(dataset.paths[p]) for p in order]
    old_rows = {p: i for i, p in enumerate(old.files.paths())} if old is not None else {}
    rel_order = [rel[p] for p in order]
    meta = _metadata_columns(rel_order, metadata, old, old_rows, report)
    cols = {"path": column_array(rel_order, "str"), "size": column_array([s[0] for s in stats], "int"),
            "mtime_ns": column_array([s[1] for s in stats], "int")}
    kinds = dict(BASE_COLUMNS)
    old_kinds = old.files.metadata_columns if old is not None else {}
    for name, values in meta.items():
        kinds[name] = _kind_of(values) if name not in old_kinds or _kind_of(values) == "str" else old_kinds[name]
        if kinds[name] == "int" and old_kinds.get(name) == "float":
            kinds[name] = "float"
        cols[name] = column_array(values, kinds[name])
    writer.write_rows(Rows(cols, kinds))

    prev = old.manifest if old is not None else {}
    ann_kind = prev.get("ann", {}).get("kind") if ann is None and prev.get("ann") else ann
    pca_dim = prev.get("pca", {}).get("dim") if pca is None and prev.get("pca") else pca
    manifest = {"fingerprint": fingerprint, "checkpoint": str(checkpoint), "images_root": str(root), "dtype": dtype,
                "dim": int(dim), "model": {"name": cfg.model.name, "image_backbone": cfg.model.image_backbone,
                                           "text_backbone": cfg.model.text_backbone},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": report.outside + report.skipped,
                "pca": None, "ann": None, "processes": world, "explain_maps": maps_layout}
    store = _written_store(writer, dim, dtype)
    report.notes += attach_reduction(store, manifest, writer, pca_dim or None,
                                     None if ann_kind in (None, "none") else ann_kind, scfg)
    writer.commit(manifest)
    return GalleryIndex.load(writer.path)


def _save_part_maps(data: Path, rank: int, maps_out: dict | None) -> None:
    """This rank's explanation maps beside its embeddings (rows aligned with part-RANK.npy)."""
    if maps_out and "maps" in maps_out:
        with open(data / f"part-{rank:05d}-maps.npy", "wb") as f:
            np.save(f, maps_out["maps"].numpy(), allow_pickle=False)
        (data / f"part-{rank:05d}-maps.json").write_text(json.dumps(maps_out["layout"]))


def _merge_maps(writer: IndexWriter, old, src: np.ndarray, row: np.ndarray, data: Path, world: int) -> dict | None:
    """Rank 0: maps.npy for the output rows (`src`/`row` as in _merge: the old index or a rank's part). Reused
    rows keep their stored maps; rows reused from an index without maps get NaN rows (explained by a forward at
    query time). Returns the manifest entry, None when no row has maps (a model without PGU and FCR)."""
    parts, layout = {}, None
    for r in range(world):
        if (data / f"part-{r:05d}-maps.npy").is_file():
            parts[r] = np.load(data / f"part-{r:05d}-maps.npy", mmap_mode="r", allow_pickle=False)
            layout = json.loads((data / f"part-{r:05d}-maps.json").read_text())
    old_layout = old.manifest.get("explain_maps") if old is not None else None
    if layout is None and not parts and not (src >= 0).any():  # nothing encoded: the old maps as they were
        layout = old_layout
    if layout is None:
        return None
    old_maps = old.maps if old is not None and old_layout == layout else None
    (h, w), k = layout["grid"], layout["parts"]
    out = writer.open_array("maps.npy", (len(src), k + 1, h * w), np.float16)
    for b0 in range(0, len(src), MERGE_BLOCK):
        s, rr = src[b0:b0 + MERGE_BLOCK], row[b0:b0 + MERGE_BLOCK]
        block = np.full((len(s), k + 1, h * w), np.nan, dtype=np.float16)
        for p in np.unique(s):
            m = s == p
            source = old_maps if p == -1 else parts.get(int(p))
            if source is not None:
                block[m] = source[rr[m]]
        out[b0:b0 + len(s)] = block
    out.flush()
    del out, parts
    return layout


def _written_store(writer: IndexWriter, dim: int, dtype: str) -> Shards:
    return Shards.of_mapped([np.load(writer.data / s["file"], mmap_mode="c", allow_pickle=False) for s in writer.shards])


def build_index(checkpoint: str | Path, images: str | Path, out: str | Path, dtype: str = "fp16",
                batch_size: int = 64, num_workers: int = 2, device: str | None = None, ann: str | None = None,
                pca: int | None = None, search_cfg=None, progress: bool = True,
                metadata: MetadataSource | list = None,
                follow_symlinks: bool = False, explain_maps: bool = True) -> tuple[GalleryIndex, BuildReport]:
    """Create or update the index at `out` for every image under `images`, encoded by `checkpoint`.

    Files whose real location is outside `images` (symlinks) are skipped and reported (BuildReport.outside,
    the manifest's `skipped`), unless follow_symlinks.

    ann/pca: build an ANN index (ivfpq | hnsw) and/or a PCA reduction; None keeps what the previous index
    had (an update rebuilds them on the new rows), "none"/0 removes them.

    metadata: per-row metadata columns (filterable by `lgur search --where/--after/--before`): a callable
    `f(relative_path) -> {column: value}`, a dict {relative_path: {column: value}}, or a list of those
    (later ones override). Values: int, float, str or None (missing). A column named `time` holds Unix
    seconds (what --after/--before compare). `PathPattern` and `read_sidecar` make the usual sources.

    How a producer of crops (e.g. video ingestion) attaches its columns: write each crop as a file under
    the images folder and pass a dict keyed by the crop's relative path, e.g.
        {"cam3/vid01/f000120_t2.jpg": {"video": "cam3/vid01.mp4", "frame": 120, "t": 4.0, "time": 1764338400.0,
                                        "x1": 10, "y1": 20, "x2": 74, "y2": 212, "track": 2, "camera": "cam3"}}
    Rows whose file is unchanged and that the producer does not mention keep their stored values, so an
    incremental run only needs the new crops' metadata. Read them back with `index.files[i]` (a dict) or
    `index.files.columns[name]` (an array).

    explain_maps: also store each row's explanation maps (prototype attention + foreground gate, recorded by
    the same forward; see lgur.models.explain) so that explaining a hit needs no image forward at query time.

    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same arguments: the files to encode
    are split across ranks, each writes its own shard, rank 0 merges them (see `build` above).
    """
    return build(checkpoint, images, out, dtype=dtype, batch_size=batch_size, num_workers=num_workers, device=device,
                 ann=ann, pca=pca, search_cfg=search_cfg, progress=progress, metadata=metadata,
                 follow_symlinks=follow_symlinks, explain_maps=explain_maps)
