"""Gallery index: image embeddings of a folder, built and updated incrementally by `lgur index`.

An index is a directory (conventionally `NAME.lgidx`), no pickle anywhere:

    manifest.json           format, model fingerprint + checkpoint path, images root, dtype, dim, the
                            files (relative path, size, mtime_ns; row i = embedding row i), the files
                            skipped as unreadable, and the PCA / ANN settings with their measured recall
    embeddings.safetensors  `embeddings` (N, D), fp16 (default) or fp32, L2-normalised
    pca.safetensors         optional: `components` (D, r) fp32 and `reduced` (N, r) fp16
    ann.faiss               optional: a faiss index (faiss's own binary format), over reduced or full vectors

It is written to a temporary sibling directory and swapped in, so an interrupted run leaves the old index.
Re-running on the same folder reuses every row whose file has the same relative path, size and mtime
(and the same model), encodes new or changed files and drops deleted ones.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lgur.errors import LgurError

log = logging.getLogger(__name__)

FORMAT = "lgur-index-1"
STORE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


class SearchError(LgurError):
    """A missing/corrupt index, an index built by another model, or a search request that cannot run."""


@dataclass
class GalleryIndex:
    """An index in memory. `files[i]` describes embedding row i."""

    manifest: dict
    files: list[dict]
    embeddings: torch.Tensor
    components: torch.Tensor | None = None  # PCA projection (D, r)
    reduced: torch.Tensor | None = None     # PCA-reduced rows (N, r)
    ann: object | None = None               # faiss index (loaded only when faiss is importable)
    path: Path | None = None

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    @property
    def checkpoint(self) -> str:
        return self.manifest["checkpoint"]

    def __len__(self) -> int:
        return len(self.files)

    def file(self, i: int) -> Path:
        """Absolute path of gallery image i."""
        return self.images_root / self.files[i]["path"]

    @classmethod
    def load(cls, path: str | Path, with_ann: bool = True) -> "GalleryIndex":
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise SearchError(f"{path}: not an lgur index (no manifest.json); build one with `lgur index`")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SearchError(f"{mpath}: unreadable manifest ({e})") from None
        if manifest.get("format") != FORMAT:
            raise SearchError(f"{path}: index format {manifest.get('format')!r}, this lgur reads {FORMAT!r}")
        try:
            emb = load_file(str(path / "embeddings.safetensors"))["embeddings"]
            pca = load_file(str(path / "pca.safetensors")) if manifest.get("pca") else {}
        except (OSError, KeyError, SafetensorError) as e:
            raise SearchError(f"{path}: corrupt or missing embeddings ({type(e).__name__}: {e})") from None
        files = manifest.pop("files")
        if emb.shape[0] != len(files):
            raise SearchError(f"{path}: {emb.shape[0]} embeddings for {len(files)} files (corrupt index)")
        ann = None
        if with_ann and manifest.get("ann"):
            from lgur.search.ann import faiss_or_none

            faiss = faiss_or_none()
            if faiss is not None:
                ann = faiss.read_index(str(path / "ann.faiss"))
            else:
                log.warning("%s has an ANN index but faiss is not installed: exact search is used", path)
        return cls(manifest, files, emb, pca.get("components"), pca.get("reduced"), ann, path)

    def save(self, path: str | Path) -> Path:
        """Write to a temporary sibling directory, then swap it in place of `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            save_file({"embeddings": self.embeddings.contiguous()}, str(tmp / "embeddings.safetensors"))
            if self.components is not None:
                save_file({"components": self.components.contiguous(), "reduced": self.reduced.contiguous()},
                          str(tmp / "pca.safetensors"))
            if self.ann is not None:
                from lgur.search.ann import require_faiss

                require_faiss().write_index(self.ann, str(tmp / "ann.faiss"))
            (tmp / "manifest.json").write_text(json.dumps({**self.manifest, "files": self.files}))
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            if path.exists():
                if not (path / "manifest.json").is_file():
                    raise SearchError(f"{path} exists and is not an lgur index; refusing to replace it")
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.path = path
        return path


@dataclass
class BuildReport:
    """What `build_index` did; `summary()` is what `lgur index` prints."""

    kept: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    reencode_reason: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, examples: int = 10) -> str:
        lines = []
        if self.reencode_reason:
            lines.append(f"re-encoding everything: {self.reencode_reason}")
        lines.append(f"kept {self.kept}, added {self.added} ({self.changed} changed), removed {self.removed}, "
                     f"skipped {len(self.skipped)} unreadable ({self.seconds:.1f} s)")
        for s in self.skipped[:examples]:
            lines.append(f"  skipped {s['path']}: {s['reason']}")
        if len(self.skipped) > examples:
            lines.append(f"  ... and {len(self.skipped) - examples} more (all listed in the manifest)")
        return "\n".join(lines + self.notes)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _previous(out: Path, fingerprint: str, root: Path, dtype: str) -> tuple[GalleryIndex | None, str]:
    """The index at `out` if its rows can be reused, else (None, why not)."""
    if not out.exists():
        return None, ""
    old = GalleryIndex.load(out, with_ann=False)
    if old.fingerprint != fingerprint:
        return None, f"the checkpoint differs from the index's ({old.fingerprint} -> {fingerprint})"
    if old.images_root != root:
        return None, f"the images root changed ({old.images_root} -> {root})"
    if old.manifest["dtype"] != dtype:  # fp16 rows widened to fp32 would not be fp32 encodings
        return None, f"the stored dtype changed ({old.manifest['dtype']} -> {dtype})"
    return old, ""


def encode_files(model, dataset, positions: list[int], batch_size: int, num_workers: int, device,
                 progress: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Encode dataset items `positions` -> (embeddings fp32 on CPU, the positions that decoded, in order)."""
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from lgur.data import Collate

    loader = DataLoader(Subset(dataset, positions), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Collate(pad_id=0), pin_memory=device.type == "cuda")
    embs, done = [], []
    # bf16 autocast on CUDA (fast, and the rows are stored in fp16 anyway); plain fp32 on CPU
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    bar = tqdm(total=len(positions), desc="encoding images", unit="img", disable=not progress)
    with torch.no_grad(), amp, bar:
        for batch in loader:
            if batch["indices"].numel():
                embs.append(model.encode_images(batch["images"].to(device, non_blocking=True)).float().cpu())
                done.extend(batch["indices"].tolist())
            bar.update(len(batch["indices"]))
    dim = model.embedding_dim
    return (torch.cat(embs) if embs else torch.empty(0, dim)), done


def build_index(checkpoint: str | Path, images: str | Path, out: str | Path, dtype: str = "fp16",
                batch_size: int = 64, num_workers: int = 2, device: str | None = None, ann: str | None = None,
                pca: int | None = None, search_cfg=None, progress: bool = True) -> tuple[GalleryIndex, BuildReport]:
    """Create or update the index at `out` for every image under `images`, encoded by `checkpoint`.

    ann/pca: build an ANN index (ivfpq | hnsw) and/or a PCA reduction; None keeps what the previous index
    had (an update rebuilds them on the new rows), "none"/0 removes them.
    """
    from lgur.checkpoint import load_model, read_metadata
    from lgur.config import defaults
    from lgur.data import ImageFolderSet, build_test_transform
    from lgur.data.images import verify_image

    t0 = time.perf_counter()
    if dtype not in STORE_DTYPES:
        raise SearchError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got {dtype!r}")
    scfg = search_cfg or defaults().search
    checkpoint, root, out = Path(checkpoint).resolve(), Path(images).expanduser().resolve(), Path(out)
    fingerprint = read_metadata(checkpoint)["fingerprint"]
    report = BuildReport()
    old, report.reencode_reason = _previous(out, fingerprint, root, dtype)

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, _ = load_model(checkpoint, device=dev)
    transform = build_test_transform(cfg.data.image_size, model.image_mean, model.image_std, cfg.data.interpolation)
    dataset = ImageFolderSet(root, transform)
    rel = [p.relative_to(root).as_posix() for p in dataset.paths]
    stats = [_stat(p) for p in dataset.paths]

    old_rows = {f["path"]: i for i, f in enumerate(old.files)} if old is not None else {}
    reuse: dict[int, int] = {}  # dataset position -> old row
    todo: list[int] = []
    for pos, (r, (size, mtime)) in enumerate(zip(rel, stats)):
        row = old_rows.get(r)
        if row is not None and old.files[row]["size"] == size and old.files[row]["mtime_ns"] == mtime:
            reuse[pos] = row
        else:
            report.changed += row is not None
            todo.append(pos)
    present = set(rel)
    report.removed = sum(p not in present for p in old_rows)
    report.kept = len(reuse)

    new_emb, done = encode_files(model, dataset, todo, batch_size, num_workers, dev, progress)
    report.added = len(done)
    failed = sorted(set(todo) - set(done))
    report.skipped = [{"path": rel[p], "reason": verify_image(dataset.paths[p]) or "could not be decoded"}
                      for p in failed]

    # rows in path order: reused rows come from the old store, new ones from this run
    order = sorted(list(reuse) + done)
    if not order:
        raise SearchError(f"{root}: none of the {len(rel)} images could be decoded; nothing to index")
    emb = torch.empty(len(order), model.embedding_dim, dtype=STORE_DTYPES[dtype])
    new_row = {pos: i for i, pos in enumerate(done)}
    for source, rows in ((old.embeddings if old is not None else None, reuse), (new_emb, new_row)):
        pairs = [(i, rows[p]) for i, p in enumerate(order) if p in rows]
        if pairs:
            dst, src = zip(*pairs)
            emb[list(dst)] = source[list(src)].to(emb.dtype)
    files = [{"path": rel[p], "size": stats[p][0], "mtime_ns": stats[p][1]} for p in order]

    prev = old.manifest if old is not None else {}
    ann_kind = prev.get("ann", {}).get("kind") if ann is None and prev.get("ann") else ann
    pca_dim = prev.get("pca", {}).get("dim") if pca is None and prev.get("pca") else pca
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "checkpoint": str(checkpoint),
                "images_root": str(root), "dtype": dtype, "dim": model.embedding_dim,
                "model": {"name": cfg.model.name, "image_backbone": cfg.model.image_backbone,
                          "text_backbone": cfg.model.text_backbone},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "skipped": report.skipped, "pca": None, "ann": None}
    index = GalleryIndex(manifest, files, emb)
    from lgur.search.ann import attach_reduction

    report.notes += attach_reduction(index, pca_dim or None, None if ann_kind in (None, "none") else ann_kind, scfg)
    report.seconds = time.perf_counter() - t0
    index.save(out)
    return index, report
