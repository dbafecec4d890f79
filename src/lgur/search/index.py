"""Gallery index: image embeddings of a folder, built and updated incrementally by `lgur index`.

An index is a directory (conventionally `NAME.lgidx`), no pickle anywhere (every array is a raw `.npy`,
read with allow_pickle=False):

    manifest.json           the commit point: format, model fingerprint + checkpoint path, images root, dtype,
                            dim, row count, the data folder and its shards, the row columns and their kinds,
                            the files skipped as unreadable, and the PCA / ANN settings with their recall
    data-<token>/           one version of the data, named by the manifest:
        emb-00000.npy ...   embedding shards (rows, D), fp16 (default) or fp32, L2-normalised; row order =
                            shard order; each shard is memory-mapped at load, never read whole
        col-<name>.npy      one array per row column (N,): `path` (UTF-8 bytes, relative to the images
                            root), `size`, `mtime_ns`, and any metadata columns (see Rows)
        pca.npy, reduced.npy   optional: PCA projection (D, r) fp32 and the reduced rows (N, r) fp16
        maps.npy            optional: per row the explanation maps (N, K + 1, h * w) fp16, recorded by the
                            forward that computed the embedding: the K prototype parts' attention over the
                            backbone's h x w patch grid, then the foreground gate; manifest "explain_maps"
                            {grid: [h, w], parts: K, part_attention: bool, foreground: bool} (see
                            lgur.models.explain.pack_maps; a row NaN throughout has none)
        ann.faiss           optional: a faiss index (faiss's own binary format), over reduced or full vectors

Saving is atomic as a whole: a new version is written into a fresh `data-<token>/` beside the current one
and becomes current with one `os.replace` of manifest.json; a kill at any instant leaves the old or the new
manifest, each naming complete data. Folders and temp files no manifest names (a killed run's leftovers,
superseded versions) are removed by the next writer, which holds `.lock` (flock) while it writes.

Re-running on the same folder reuses every row whose file has the same relative path, size and mtime
(and the same model), encodes new or changed files and drops deleted ones. Rows are in path order.

Bytes per crop: D x 2 (fp16 embedding; 3072 -> 6 KiB, lgur-small 1536 -> 3 KiB) + the path + 16 (size,
mtime) + 8 per numeric metadata column, on disk, + (K + 1) x h x w x 2 for the explanation maps (DeiT 24x8,
K = 6: 2.6 KiB; `lgur index --no-explain-maps` leaves them out); add r x 2 with a PCA-r reduction and the ANN's codes
(IVF-PQ 4-bit, r/2 dims per code: r/4 bytes + 8 for the id). In RAM while searching only the ANN index
is resident; embeddings and columns are memory-mapped (the page cache holds what queries touch).
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from lgur.data.datasets import Collate
from lgur.errors import SearchError  # also re-exported from here (it lived here)
from lgur.models.explain import image_evidence, maps_layout, pack_maps
from lgur.runtime import autocast
from lgur.search import ann as ann_mod  # called as ann_mod.faiss_or_none(): tests replace it to act faiss-less
from lgur.search.paths import manifest_paths_problems
from lgur.search.topk import Shards

log = logging.getLogger(__name__)

FORMAT = "lgur-index-2"
OLD_FORMATS = ("lgur-index-1",)
STORE_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
NP_DTYPES = {"fp16": np.float16, "fp32": np.float32}
SHARD_ROWS = 1 << 20  # rows per embedding shard file (3 GiB at 1536-d fp16)
BASE_COLUMNS = {"path": "str", "size": "int", "mtime_ns": "int"}
COLUMN_KINDS = ("int", "float", "str")
MISSING_INT = int(np.iinfo(np.int64).min)  # an int column's "no value"; float columns use NaN, str ""
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}\Z")
_DATA = re.compile(r"data-[0-9a-f]{1,40}\Z")
_SHARD = re.compile(r"emb-\d{5}\.npy\Z")
_OLD_FILES = ("embeddings.safetensors", "pca.safetensors", "ann.faiss")  # lgur-index-1's data files


# ---------------------------------------------------------------------------------------------------
# rows: path, size, mtime and metadata columns


def _kind_of(values: Iterable) -> str:
    kind = "int"
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        if isinstance(v, (bool, np.bool_, int, np.integer)):
            continue
        if isinstance(v, (float, np.floating)):
            kind = "float"
        else:
            return "str"
    return kind


def column_array(values: Sequence, kind: str) -> np.ndarray:
    """Python values -> the stored array of a column of `kind` (None -> the kind's missing value)."""
    if kind == "int":
        return np.array([MISSING_INT if v is None else int(v) for v in values], dtype=np.int64)
    if kind == "float":
        return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    if kind == "str":
        enc = [b"" if v is None else str(v).encode("utf-8") for v in values]
        return np.array(enc, dtype=f"S{max([1, *map(len, enc)])}")
    raise SearchError(f"column kind must be one of {', '.join(COLUMN_KINDS)}, got {kind!r}")


def _value(kind: str, v):
    if kind == "str":
        return bytes(v).decode("utf-8", "replace")
    if kind == "int":
        return None if int(v) == MISSING_INT else int(v)
    return None if math.isnan(float(v)) else float(v)


class Rows(Sequence):
    """The index's rows as named columns (numpy arrays; memory-mapped when loaded). Row i describes
    embedding row i; `rows[i]` is a dict {column: value} ("path" relative to the images root, "size",
    "mtime_ns", then the metadata columns; a missing value is None).

    Column kinds: "int" (int64), "float" (float64, e.g. `time` as Unix seconds), "str" (UTF-8). Column
    names are identifiers (letters, digits, _; at most 64)."""

    def __init__(self, columns: Mapping[str, np.ndarray], kinds: Mapping[str, str]):
        self.columns, self.kinds = dict(columns), dict(kinds)
        lengths = {len(a) for a in self.columns.values()}
        if len(lengths) > 1:
            raise SearchError(f"index columns have different lengths {sorted(lengths)} (corrupt index)")
        self._n = lengths.pop() if lengths else 0

    @classmethod
    def from_dicts(cls, rows: Sequence[Mapping], kinds: Mapping[str, str] | None = None) -> "Rows":
        """Rows from dicts (every dict needs path, size, mtime_ns; other keys become metadata columns)."""
        names = list(BASE_COLUMNS) + sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
        kinds = {**BASE_COLUMNS, **(kinds or {})}
        out_kinds, cols = {}, {}
        for name in names:
            check_column_name(name)
            values = [r.get(name) for r in rows]
            out_kinds[name] = kinds.get(name) or _kind_of(values)
            cols[name] = column_array(values, out_kinds[name])
        return cls(cols, out_kinds)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        return {name: _value(self.kinds[name], a[i]) for name, a in self.columns.items()}

    def path(self, i: int) -> str:
        return bytes(self.columns["path"][i]).decode("utf-8", "replace")

    def paths(self) -> list[str]:
        return [bytes(p).decode("utf-8", "replace") for p in self.columns["path"]]

    @property
    def metadata_columns(self) -> dict[str, str]:
        return {k: v for k, v in self.kinds.items() if k not in BASE_COLUMNS}


def check_column_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise SearchError(f"metadata column name {name!r}: use letters, digits and _ (at most 64, not starting "
                          f"with a digit)")
    return name


# ---------------------------------------------------------------------------------------------------
# metadata producers


class PathPattern:
    """Metadata from each file's relative path by a regular expression with named groups, e.g.
    `cam(?P<camera>\\d+)/(?P<video>[^/]+)/` or `(?P<time>\\d{8}T\\d{6})`. A group named `time` is parsed as a
    timestamp (Unix seconds, ISO 8601, or YYYYmmddTHHMMSS; UTC unless it names a zone) into a float column;
    digit-only groups become int columns. Paths that do not match get no values (and are counted)."""

    def __init__(self, pattern: str):
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise SearchError(f"--meta-pattern {pattern!r}: {e}") from None
        if not self.regex.groupindex:
            raise SearchError(f"--meta-pattern {pattern!r} has no named group such as (?P<camera>\\d+)")
        for name in self.regex.groupindex:
            check_column_name(name)
        self.unmatched = 0

    def __call__(self, rel_path: str) -> dict:
        m = self.regex.search(rel_path)
        if m is None:
            self.unmatched += 1
            return {}
        out = {}
        for k, v in m.groupdict().items():
            if v is None:
                continue
            out[k] = parse_time(v) if k == "time" else (int(v) if v.isdigit() and len(v) < 19 else v)
        return out


def parse_time(value) -> float:
    """A timestamp -> Unix seconds (float): a number, ISO 8601 ('2026-11-28T14:00', '2026-11-28 14:00:05+01:00'),
    or compact 'YYYYmmddTHHMMSS' / 'YYYYmmddHHMMSS'. Naive times are UTC."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    s = str(value).strip()
    try:
        return float(s)
    except ValueError:
        pass
    for fmt in ("%Y%m%dT%H%M%S", "%Y%m%d%H%M%S"):
        try:
            return datetime.strptime(s, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise SearchError(f"not a time: {s[:60]!r} (use Unix seconds or ISO 8601 such as 2026-11-28T14:00:00)") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


MAX_SIDECAR_BYTES = 1 << 30


def read_sidecar(path: str | Path) -> dict[str, dict]:
    """Metadata per relative path from a CSV (header row; a `path` column, any others) or a JSON file
    ({"rel/path.jpg": {"camera": 3, ...}, ...} or [{"path": ..., ...}, ...]). A `time` field is parsed as a
    timestamp (see parse_time); numeric CSV cells become numbers."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"--meta: file not found: {path}")
    if path.stat().st_size > MAX_SIDECAR_BYTES:
        raise SearchError(f"--meta: {path} is larger than {MAX_SIDECAR_BYTES >> 20} MiB")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            items = list(data.items()) if isinstance(data, dict) else [(r.get("path"), r) for r in data]
        else:
            with path.open(newline="", encoding="utf-8") as f:
                items = [(r.get("path"), r) for r in csv.DictReader(f)]
    except (ValueError, UnicodeDecodeError, csv.Error, AttributeError) as e:
        raise SearchError(f"--meta: {path} is not a readable CSV/JSON metadata file ({e})") from None
    out = {}
    for where, (rel, rec) in enumerate(items):
        if not isinstance(rel, str) or not isinstance(rec, dict):
            raise SearchError(f"--meta: {path}, record {where}: needs a 'path' and fields")
        fields = {}
        for k, v in rec.items():
            if k == "path":
                continue
            check_column_name(k)
            if isinstance(v, str) and k != "time":
                with contextlib.suppress(ValueError):
                    if re.fullmatch(r"-?\d{1,18}", v):
                        v = int(v)
                    elif re.fullmatch(r"-?[\d.]+(e-?\d+)?", v):
                        v = float(v)
            if isinstance(v, (dict, list)):
                raise SearchError(f"--meta: {path}, {rel}: field {k!r} must be a number or a string")
            fields[k] = parse_time(v) if k == "time" and v not in (None, "") else (None if v == "" else v)
        out[rel] = fields
    return out


# ---------------------------------------------------------------------------------------------------
# the index on disk


def _checked_manifest(manifest, where: Path) -> dict:
    """Refuse a manifest with missing fields or wrong types, with a message naming the field."""
    def need(cond: bool, what: str):
        if not cond:
            raise SearchError(f"{where}: malformed manifest: {what}; rebuild the index with `lgur index`")

    need(isinstance(manifest, dict), "not a JSON object")
    fmt = manifest.get("format")
    if fmt in OLD_FORMATS:
        raise SearchError(f"{where.parent}: index format {fmt!r} is from an older lgur; rebuild it with `lgur index` "
                          f"(the same --out re-encodes everything and replaces it)")
    need(fmt == FORMAT, f"format {str(fmt)[:40]!r} is not {FORMAT!r}")
    for key in ("fingerprint", "checkpoint", "images_root", "data"):
        need(isinstance(manifest.get(key), str), f"'{key}' must be a string")
    need(manifest.get("dtype") in STORE_DTYPES, f"'dtype' must be one of {', '.join(STORE_DTYPES)}")
    for key in ("dim", "count"):
        need(type(manifest.get(key)) is int and 0 <= manifest[key] < 1 << 40, f"'{key}' must be a count")
    need(manifest["dim"] > 0, "'dim' must be positive")
    need(bool(_DATA.match(manifest["data"])), "'data' must name a data-<hex> folder")
    shards = manifest.get("shards")
    need(isinstance(shards, list) and all(isinstance(s, dict) and isinstance(s.get("file"), str)
                                          and _SHARD.match(s["file"]) and type(s.get("rows")) is int
                                          and s["rows"] >= 0 for s in shards),
         "'shards' must be a list of {file: emb-NNNNN.npy, rows: int}")
    need(sum(s["rows"] for s in shards) == manifest["count"], "the shards' rows do not add up to 'count'")
    cols = manifest.get("columns")
    need(isinstance(cols, dict) and all(isinstance(k, str) and _NAME.match(k) and v in COLUMN_KINDS
                                        for k, v in cols.items()), "'columns' must map names to int|float|str")
    need(all(cols.get(k) == v for k, v in BASE_COLUMNS.items()), "'columns' lacks path/size/mtime_ns")
    need(isinstance(manifest.get("skipped", []), list), "'skipped' must be a list")
    pca, ann = manifest.get("pca"), manifest.get("ann")
    need(pca is None or (isinstance(pca, dict) and type(pca.get("dim")) is int and 0 < pca["dim"] < manifest["dim"]
                         and type(pca.get("rerank")) is int), "'pca' must be null or {dim, rerank, ...}")
    need(ann is None or (isinstance(ann, dict) and ann.get("kind") in ("ivfpq", "hnsw")
                         and ann.get("param") in ("nprobe", "efSearch") and type(ann.get("value")) is int
                         and type(ann.get("rerank")) is int and type(ann.get("refine", 0)) is int
                         and 0 <= ann.get("refine", 0) <= 1000),
         "'ann' must be null or {kind, param, value, rerank, refine (0..1000)}")
    maps = manifest.get("explain_maps")
    need(maps is None or (isinstance(maps, dict) and isinstance(maps.get("grid"), list) and len(maps["grid"]) == 2
                          and all(type(g) is int and 0 < g <= 4096 for g in maps["grid"])
                          and type(maps.get("parts")) is int and 0 < maps["parts"] <= 64),
         "'explain_maps' must be null or {grid: [h, w], parts: K, ...}")
    return manifest


def check_manifest_paths(where: Path, root: str, paths: list[str]) -> None:
    """Refuse an index whose images root is not an absolute folder or whose file paths escape it (an edited
    manifest must not make `lgur serve` read /etc/passwd): see lgur.search.paths."""
    if not Path(root).is_absolute() or Path(root) == Path(Path(root).anchor):
        raise SearchError(f"{where}: manifest images_root {root[:200]!r} is not an absolute path below the "
                          f"filesystem root")
    bad, examples = manifest_paths_problems(paths)
    if bad:
        raise SearchError(f"{where}: refusing an index that names {bad} image path(s) outside its images root "
                          f"{root}: " + "; ".join(examples))


def _open_array(path: Path, shape: tuple, dtype, what: str) -> np.ndarray:
    """A stored array, memory-mapped copy-on-write (writable view, file never modified), checked."""
    try:
        a = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SearchError(f"{path}: missing or corrupt {what} ({type(e).__name__}: {e})") from None
    if a.dtype != np.dtype(dtype) if not isinstance(dtype, str) else a.dtype.kind != dtype:
        raise SearchError(f"{path}: {what} stored as {a.dtype}, the manifest says {dtype} (corrupt index)")
    if tuple(a.shape) != tuple(shape):
        detail = (f"embedding width {a.shape[1]}, the manifest says {shape[1]}" if len(shape) == 2 and a.ndim == 2
                  and a.shape[0] == shape[0] else f"shape {tuple(a.shape)}, expected {tuple(shape)}")
        raise SearchError(f"{path}: {what}: {detail} (corrupt or edited index; rebuild it with `lgur index`)")
    return a


@dataclass
class GalleryIndex:
    """An index: `files[i]` (a Rows) describes embedding row i of `store` (Shards over memory-mapped files).

    `embeddings` is the whole (N, D) tensor (zero-copy for one shard, else concatenated: for small
    galleries and tests; search code uses `store`)."""

    manifest: dict
    files: Rows
    store: Shards
    components: torch.Tensor | None = None  # PCA projection (D, r)
    reduced: torch.Tensor | None = None     # PCA-reduced rows (N, r), memory-mapped
    ann: object | None = None               # faiss index (loaded only when faiss is importable)
    path: Path | None = None
    maps: np.ndarray | None = None          # explanation maps (N, K + 1, h * w) fp16, memory-mapped; or None

    @property
    def embeddings(self) -> torch.Tensor:
        return self.store.contiguous()

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def images_root(self) -> Path:
        return Path(self.manifest["images_root"])

    @property
    def checkpoint(self) -> str:
        return self.manifest["checkpoint"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.files)

    def file(self, i: int) -> Path:
        """Absolute path of gallery image i."""
        return self.images_root / self.files.path(i)

    @classmethod
    def load(cls, path: str | Path, with_ann: bool = True) -> "GalleryIndex":
        path = Path(path)
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise SearchError(f"{path}: not an lgur index (no manifest.json); build one with `lgur index`")
        try:
            if mpath.stat().st_size > 64 << 20:
                raise SearchError(f"{mpath}: manifest larger than 64 MiB (not an lgur manifest)")
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SearchError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
        manifest = _checked_manifest(manifest, mpath)
        data = path / manifest["data"]
        n, d = manifest["count"], manifest["dim"]
        np_dtype = NP_DTYPES[manifest["dtype"]]
        parts = [_open_array(data / s["file"], (s["rows"], d), np_dtype, "embeddings") for s in manifest["shards"]]
        cols = {name: _open_array(data / f"col-{name}.npy", (n,), {"int": np.int64, "float": np.float64}.get(kind, "S"),
                                  f"column {name!r}") for name, kind in manifest["columns"].items()}
        components = reduced = None
        if manifest.get("pca"):
            r = manifest["pca"]["dim"]
            components = torch.from_numpy(_open_array(data / "pca.npy", (d, r), np.float32, "PCA projection"))
            reduced = torch.from_numpy(_open_array(data / "reduced.npy", (n, r), np.float16, "PCA-reduced rows"))
        ann = None
        if with_ann and manifest.get("ann"):
            faiss = ann_mod.faiss_or_none()
            if faiss is not None:
                try:
                    ann = faiss.read_index(str(data / "ann.faiss"))
                except RuntimeError as e:
                    raise SearchError(f"{data / 'ann.faiss'}: unreadable ANN index ({str(e).splitlines()[0]})") from None
                want = manifest["ann"].get("dim", manifest["pca"]["dim"] if manifest.get("pca") else d)
                if ann.ntotal != n or ann.d != want:
                    raise SearchError(f"{data / 'ann.faiss'}: {ann.ntotal} vectors of {ann.d} dims, the manifest "
                                      f"says {n} of {want} (corrupt index)")
            else:
                log.warning("%s has an ANN index but faiss is not installed: exact search is used", path)
        maps = None
        if manifest.get("explain_maps"):
            lay = manifest["explain_maps"]
            maps = _open_array(data / "maps.npy", (n, lay["parts"] + 1, lay["grid"][0] * lay["grid"][1]),
                               np.float16, "explanation maps")
        rows = Rows(cols, manifest["columns"])
        check_manifest_paths(path, manifest["images_root"], rows.paths())
        return cls(manifest, rows, Shards.of_mapped(parts), components, reduced, ann, path, maps)

    def save(self, path: str | Path) -> Path:
        """Write this (in-memory) index to `path` atomically (see the module docstring)."""
        with IndexWriter(path) as w:
            w.write_embeddings(self.store.blocks(SHARD_ROWS), self.manifest["dtype"], total=len(self.store))
            w.write_rows(self.files)
            if self.components is not None:
                w.write_array("pca.npy", self.components.float().numpy())
                w.write_array("reduced.npy", self.reduced.half().numpy())
            if self.ann is not None:
                w.write_faiss(self.ann)
            if self.maps is not None:
                w.write_array("maps.npy", np.asarray(self.maps, dtype=np.float16))
            w.commit(self.manifest)
        self.path = Path(path)
        return self.path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current_data(path: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        data = json.loads((path / "manifest.json").read_text(encoding="utf-8")).get("data")
        return data if isinstance(data, str) else None
    return None


def clean_stale(path: Path) -> list[str]:
    """Remove what the current manifest does not name: data folders of killed or superseded writes,
    temp files, lgur-index-1 data files. Call with the index's lock held. Returns the removed names."""
    keep = _current_data(path)
    removed = []
    for p in path.iterdir():
        name = p.name
        stale = ((name.startswith("data-") and name != keep) or name.startswith(".manifest.json.tmp")
                 or (name in _OLD_FILES and keep is not None))
        if stale:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(name)
    # lgur-index-1 wrote whole temp/old sibling folders
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    for p in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    return removed


def _as_store_array(b, dtype: str) -> np.ndarray:
    if isinstance(b, torch.Tensor):
        return b.detach().cpu().to(STORE_DTYPES[dtype]).numpy()
    return np.asarray(b, NP_DTYPES[dtype])


class IndexWriter:
    """Writes one new version of the index at `path` and makes it current with `commit(manifest)`.

        with IndexWriter(out) as w:
            w.write_embeddings(blocks, "fp16")      # (n, D) tensors/arrays in row order, any block sizes
            w.write_rows(rows)                      # a Rows (path, size, mtime_ns, metadata columns)
            w.commit(manifest)                      # fills format/data/shards/count/columns, swaps it in

    Until commit the old index stays current; leaving the block without commit (an error, a kill) leaves
    a data folder the next writer removes. Holds an exclusive lock on `path/.lock` meanwhile."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.data_name = f"data-{time.time_ns():x}{os.getpid():x}"
        self.shards: list[dict] = []
        self.columns: dict[str, str] | None = None
        self.count = 0
        self._lock = None
        self.committed = False

    def __enter__(self) -> "IndexWriter":
        import fcntl  # POSIX only: imported where the lock is taken, so reading an index works everywhere

        path = self.path
        if path.exists() and not path.is_dir():
            raise SearchError(f"{path} exists and is not an lgur index; refusing to replace it")
        if path.is_dir() and not (path / "manifest.json").is_file():
            foreign = [p.name for p in path.iterdir()
                       if not (p.name == ".lock" or p.name.startswith(("data-", ".manifest.json.tmp")))]
            if foreign:
                raise SearchError(f"{path} exists and is not an lgur index (it holds {foreign[0]!r}, ...); "
                                  f"refusing to replace it")
        path.mkdir(parents=True, exist_ok=True)
        self._lock = open(path / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock.close()
            raise SearchError(f"{path} is being written by another `lgur index` (lock {path / '.lock'})") from None
        clean_stale(path)
        self.data = path / self.data_name
        self.data.mkdir()
        return self

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.data, ignore_errors=True)
        if self._lock is not None:
            self._lock.close()

    def write_array(self, name: str, array: np.ndarray) -> Path:
        out = self.data / name
        with open(out, "wb") as f:
            np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return out

    def open_array(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """A new array file to fill in place (np.lib.format.open_memmap); flushed by commit."""
        return np.lib.format.open_memmap(self.data / name, mode="w+", dtype=dtype, shape=tuple(shape))

    def write_embeddings(self, blocks: Iterable, dtype: str, shard_rows: int = SHARD_ROWS,
                         total: int | None = None) -> None:
        """Embedding rows in order, from blocks of any size, into shards of `shard_rows` rows. With `total`
        (the row count, when known) every block goes straight into its memory-mapped shard file, so no more
        than one block is in memory; without it a shard's rows are held until the shard is full."""
        self.dtype = dtype
        if total is not None:
            return self._stream_embeddings(blocks, dtype, shard_rows, int(total))
        pending, held = [], 0

        def flush(final: bool):
            nonlocal pending, held
            while held >= shard_rows or (final and held):
                take = min(held, shard_rows)
                out, got = [], 0
                while got < take:
                    b = pending[0]
                    need = take - got
                    out.append(b[:need])
                    got += min(need, len(b))
                    pending[0] = b[need:]
                    if not len(pending[0]):
                        pending.pop(0)
                held -= take
                name = f"emb-{len(self.shards):05d}.npy"
                self.write_array(name, np.concatenate(out) if len(out) > 1 else out[0])
                self.shards.append({"file": name, "rows": int(take)})

        for b in blocks:
            b = _as_store_array(b, dtype)
            if len(b):
                pending.append(b)
                held += len(b)
                flush(False)
        flush(True)
        self.count = sum(s["rows"] for s in self.shards)

    def _stream_embeddings(self, blocks: Iterable, dtype: str, shard_rows: int, total: int) -> None:
        sizes = [min(shard_rows, total - i) for i in range(0, total, shard_rows)]
        shard, filled, dim = -1, 0, None
        current = None
        written = 0
        for b in blocks:
            b = _as_store_array(b, dtype)
            while len(b):
                if current is None or filled == sizes[shard]:
                    if current is not None:
                        current.flush()
                    shard += 1
                    if shard >= len(sizes):
                        raise SearchError(f"IndexWriter: more embedding rows than the {total} announced")
                    dim = b.shape[1]
                    name = f"emb-{shard:05d}.npy"
                    current = self.open_array(name, (sizes[shard], dim), NP_DTYPES[dtype])
                    self.shards.append({"file": name, "rows": sizes[shard]})
                    filled = 0
                take = min(len(b), sizes[shard] - filled)
                current[filled:filled + take] = b[:take]
                filled += take
                written += take
                b = b[take:]
        if current is not None:
            current.flush()
        if written != total:
            raise SearchError(f"IndexWriter: {written} embedding rows written, {total} announced")
        self.count = total

    def write_rows(self, rows: Rows) -> None:
        for name, kind in rows.kinds.items():
            check_column_name(name)
            self.write_array(f"col-{name}.npy", np.asarray(rows.columns[name]))
        self.columns = dict(rows.kinds)

    def write_faiss(self, index) -> None:
        ann_mod.require_faiss().write_index(index, str(self.data / "ann.faiss"))

    def commit(self, manifest: dict) -> dict:
        """Make this version current: one atomic replace of manifest.json. Returns the manifest written."""
        if self.columns is None:
            raise SearchError("IndexWriter.commit: write_rows was not called")
        manifest = {**manifest, "format": FORMAT, "data": self.data_name, "count": self.count,
                    "shards": self.shards, "columns": self.columns}
        manifest.pop("files", None)
        for p in self.data.iterdir():  # memmaps filled in place, faiss files: make them durable first
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        _fsync_dir(self.data)
        tmp = self.path / f".manifest.json.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / "manifest.json")
        self.committed = True
        _fsync_dir(self.path)
        with contextlib.suppress(OSError):
            clean_stale(self.path)
        return manifest


# ---------------------------------------------------------------------------------------------------
# building


@dataclass
class BuildReport:
    """What `build_index` did; `summary()` is what `lgur index` prints."""

    kept: int = 0
    added: int = 0
    changed: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)  # {"path", "reason"}
    outside: list[dict] = field(default_factory=list)  # symlinks leading outside the images root (not indexed)
    reencode_reason: str = ""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    processes: int = 1

    def summary(self, examples: int = 10) -> str:
        lines = []
        if self.reencode_reason:
            lines.append(f"re-encoding everything: {self.reencode_reason}")
        lines.append(f"kept {self.kept}, added {self.added} ({self.changed} changed), removed {self.removed}, "
                     f"skipped {len(self.skipped)} unreadable"
                     + (f", {len(self.outside)} outside the gallery" if self.outside else "")
                     + f" ({self.seconds:.1f} s"
                     + (f", {self.processes} processes" if self.processes > 1 else "") + ")")
        listed = self.outside + self.skipped
        for s in listed[:examples]:
            lines.append(f"  skipped {s['path']}: {s['reason']}")
        if len(listed) > examples:
            lines.append(f"  ... and {len(listed) - examples} more (all listed in the manifest)")
        return "\n".join(lines + self.notes)


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _previous(out: Path, fingerprint: str, root: Path, dtype: str) -> tuple[GalleryIndex | None, str]:
    """The index at `out` if its rows can be reused, else (None, why not)."""
    if not (out / "manifest.json").is_file():
        return None, ""
    try:
        old = GalleryIndex.load(out, with_ann=False)
    except SearchError as e:
        return None, f"the existing index cannot be reused ({e})"
    if old.fingerprint != fingerprint:
        return None, f"the checkpoint differs from the index's ({old.fingerprint} -> {fingerprint})"
    if old.images_root != root:
        return None, f"the images root changed ({old.images_root} -> {root})"
    if old.manifest["dtype"] != dtype:  # fp16 rows widened to fp32 would not be fp32 encodings
        return None, f"the stored dtype changed ({old.manifest['dtype']} -> {dtype})"
    return old, ""


ENCODE_HOST_ROWS = 16384  # encode_files: rows kept on the device between copies to the host


def encode_files(model, dataset, positions: list[int], batch_size: int, num_workers: int, device,
                 progress: bool = True, maps_out: dict | None = None) -> tuple[torch.Tensor, list[int]]:
    """Encode dataset items `positions` -> (embeddings fp32 on CPU, the positions that decoded, in order).

    With `maps_out` (a dict), the same forward also records the explanation maps (lgur.models.explain):
    maps_out["maps"] = (n, K + 1, h * w) fp16 rows aligned with the embeddings and maps_out["layout"] = the
    manifest entry; both stay unset for a model without prototype decoder and foreground gate."""
    loader = DataLoader(Subset(dataset, positions), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=Collate(pad_id=0), pin_memory=device.type == "cuda")
    embs, done, maps = [], [], []
    # the device's results stay queued there (no host sync per batch) and come back in one copy per
    # ENCODE_HOST_ROWS rows (bounds the device memory they hold); on CPU the copies are no-ops
    queued, queued_maps, held = [], [], 0

    def to_host():
        nonlocal queued, queued_maps, held
        if queued:
            embs.append(torch.cat(queued).float().cpu())
        if queued_maps:
            maps.append(torch.cat(queued_maps).cpu())
        queued, queued_maps, held = [], [], 0

    # bf16 autocast on CUDA (fast, and the rows are stored in fp16 anyway); plain fp32 on CPU
    amp = autocast(device, torch.bfloat16 if device.type == "cuda" else None)
    bar = tqdm(total=len(positions), desc="encoding images", unit="img", disable=not progress)
    with torch.no_grad(), amp, bar:
        for batch in loader:
            if batch["indices"].numel():  # collated on the host: no device sync
                images = batch["images"].to(device, non_blocking=True)
                if maps_out is None:
                    queued.append(model.encode_images(images).float())
                else:
                    ev = image_evidence(model, images)
                    queued.append(ev.embeddings.float())
                    packed = pack_maps(ev, model.num_parts)
                    if packed is not None:
                        queued_maps.append(packed.half())
                        maps_out["layout"] = maps_layout(ev, model.num_parts)
                done.extend(batch["indices"].tolist())
                held += len(images)
                if held >= ENCODE_HOST_ROWS:
                    to_host()
            bar.update(len(batch["indices"]))
    to_host()
    dim = model.embedding_dim
    if maps:
        maps_out["maps"] = torch.cat(maps)
    return (torch.cat(embs) if embs else torch.empty(0, dim)), done


MetadataSource = Callable[[str], Mapping] | Mapping[str, Mapping] | None


def _metadata_columns(rel: list[str], metadata: MetadataSource | list, old: GalleryIndex | None,
                      old_rows: dict[str, int], report: BuildReport) -> dict[str, list]:
    """Metadata values per row (aligned with `rel`), from one or more sources (callables rel -> dict, or
    dicts rel -> dict), later sources overriding earlier ones; rows no source covers keep the old index's
    values for their columns."""
    sources = metadata if isinstance(metadata, list) else ([metadata] if metadata is not None else [])
    per_row: list[dict] = [{} for _ in rel]
    for src in sources:
        get = src if callable(src) else (lambda r, s=src: s.get(r, {}))
        for i, r in enumerate(rel):
            values = get(r) or {}
            if not isinstance(values, Mapping):
                raise SearchError(f"metadata for {r}: expected a mapping of fields, got {type(values).__name__}")
            per_row[i].update(values)
    if isinstance(sources and sources[0], PathPattern) and sources[0].unmatched:
        report.notes.append(f"metadata: {sources[0].unmatched} paths did not match --meta-pattern (no values)")
    names = sorted({k for d in per_row for k in d} - set(BASE_COLUMNS))
    old_meta = old.files.metadata_columns if old is not None else {}
    for name in old_meta:
        if name not in names:
            names.append(name)
    cols = {}
    for name in names:
        check_column_name(name)
        values = [d.get(name) for d in per_row]
        if name in old_meta:
            for i, r in enumerate(rel):
                if values[i] is None and name not in per_row[i] and r in old_rows:
                    values[i] = old.files[old_rows[r]][name]
        cols[name] = values
    return cols



def __getattr__(name: str):
    """`build_index` lives in lgur.search.build (building imports this module); kept importable from here."""
    if name == "build_index":
        from lgur.search.build import build_index

        return build_index
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
