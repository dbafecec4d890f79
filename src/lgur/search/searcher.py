"""Free-text person search over a gallery index: the Python API behind `lgur search`, `lgur serve` and the demo.

    searcher = Searcher("gallery.lgidx")                 # model = the checkpoint recorded in the index
    [result] = searcher.search(["a man in a black jacket with a red backpack"], k=10)
    for hit in result.hits:
        print(hit.rank, hit.score, hit.path)

The model is loaded once; its weights' fingerprint must equal the index's (an index built by another
model would rank with incompatible embeddings, so that is refused, not warned about).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Collection, Sequence

import numpy as np
import torch

from lgur.checkpoint import load_model
from lgur.config import defaults
from lgur.runtime import cpu_cores, resolve_device
from lgur.search.ann import FaissSearch, TwoStageSearch
from lgur.search.filters import Filter
from lgur.search.index import BASE_COLUMNS, GalleryIndex, SearchError
from lgur.search.paths import load_gallery_image
from lgur.search.topk import ExactSearch, torch_threads

SEARCH_MODES = ("auto", "exact", "ann")
# ground truth for marking hits: one collection of correct relative paths per query, or a predicate
Relevant = Sequence[Collection[str]] | Callable[[int, str, str], bool] | None


@dataclass
class Hit:
    rank: int          # 1-based
    score: float       # cosine similarity (embeddings are L2-normalised)
    id: int            # row of the index (what GET /img/{id} serves)
    path: str          # relative to the index's images root
    file: Path         # absolute path
    correct: bool | None = None  # None: ground truth unknown
    meta: dict = field(default_factory=dict)  # the row's metadata columns (camera, time, video, ...), if any
    frame_file: Path | None = None  # video crops: the (downscaled) frame the crop was cut from

    def image(self):
        """The crop as an RGB PIL image, opened inside the gallery (lgur.search.paths): a file swapped for a
        symlink leading outside since indexing raises OutsideGallery instead of being read."""
        root = self.file.parents[len(PurePosixPath(self.path).parts) - 1]  # file = images root / path
        return load_gallery_image(root, self.path)

    @property
    def video(self) -> dict | None:
        """For a crop from `lgur index --video`: {"video", "frame", "t" (s), "box" [x1, y1, x2, y2] in frame
        pixels, "track", "span" [first, last t of the track], "frame_size" [w, h]}; else None."""
        m = self.meta
        if not m or any(m.get(k) is None for k in ("video", "t", "x1", "y1", "x2", "y2")):
            return None
        t = m["t"]
        return {"video": m["video"], "frame": m.get("frame"), "t": t, "box": [m["x1"], m["y1"], m["x2"], m["y2"]],
                "track": m.get("track"), "span": [t if m.get(c) is None else m[c] for c in ("track_start", "track_end")],
                "frame_size": [m.get("frame_w"), m.get("frame_h")]}

    def to_dict(self) -> dict:
        out = {"rank": self.rank, "score": round(self.score, 6), "id": self.id, "path": self.path,
               "correct": self.correct}
        if self.meta:
            out["meta"] = self.meta
        if self.video:
            out.update(self.video)
        return out

    def where(self) -> str:
        """'video @ m:ss.s (track m:ss.s-m:ss.s) box x1,y1,x2,y2' for a video crop, else ''."""
        v = self.video
        if v is None:
            return ""
        return (f"{v['video']} @ {fmt_time(v['t'])} (track {fmt_time(v['span'][0])}-{fmt_time(v['span'][1])}) "
                f"box {','.join(str(round(x)) for x in v['box'])}")


def fmt_time(t: float) -> str:
    """Seconds -> 'm:ss.s' (or 'h:mm:ss.s')."""
    t = max(float(t), 0.0)
    h, rem = divmod(t, 3600)
    m, s = divmod(rem, 60)
    return f"{int(h)}:{int(m):02d}:{s:04.1f}" if h else f"{int(m)}:{s:04.1f}"


@dataclass
class QueryResult:
    query: str
    hits: list[Hit] = field(default_factory=list)


def make_engine(index: GalleryIndex, mode: str, scfg, device: torch.device):
    """The search engine for `mode` (see SEARCH_MODES).

    auto: the ANN index when the gallery has >= search.ann_threshold rows and faiss is importable, else the
    PCA-reduced exact scan when the index has a PCA, else exact full-dim search. exact: always full-dim.
    """

    if mode not in SEARCH_MODES:
        raise SearchError(f"search mode must be one of {', '.join(SEARCH_MODES)}, got {mode!r}")
    ann = index.manifest.get("ann")
    if mode == "ann" and (not ann or index.ann is None):
        raise SearchError(f"{index.path}: " + ("no ANN index (build it with `lgur index --ann ivfpq|hnsw`)" if not ann
                                               else "its ANN index needs faiss (pip install faiss-cpu)"))
    exact = ExactSearch(index.store, scfg.compute_dtype, scfg.chunk_rows, device)
    if mode == "exact":
        return exact
    components = index.components.to(device) if index.components is not None else None
    if index.ann is not None and (mode == "ann" or len(index) >= int(scfg.ann_threshold)):
        first = FaissSearch(index.ann, ann["param"], ann["value"], threads=int(scfg.ann_threads))
        engine = TwoStageSearch(first, exact.store, components, int(ann["rerank"]),  # as tuned at build time
                                index.reduced, int(ann.get("refine", 0)))  # indexes built before refine: 0
        # a small filtered subset: an exact scan of its rows (PCA rows when built, re-ranked) beats probing
        # most of the IVF lists for the few allowed rows among them
        cache = int(scfg.filter_cache_mb) << 20
        threads = first.threads  # the subset scan on the IVF scan's threads (search.ann_threads)
        small = (TwoStageSearch(ExactSearch(index.reduced, scfg.compute_dtype, scfg.chunk_rows, device,
                                            subset_cache_bytes=cache, subset_threads=threads), exact.store,
                                components, int(index.manifest["pca"]["rerank"])) if components is not None
                 else ExactSearch(index.store, scfg.compute_dtype, scfg.chunk_rows, device, subset_cache_bytes=cache,
                                  subset_threads=threads))
        return FilterRouter(engine, small, int(scfg.filter_exact_rows))
    if components is not None:
        first = ExactSearch(index.reduced, scfg.compute_dtype, scfg.chunk_rows, device,
                            subset_cache_bytes=int(scfg.filter_cache_mb) << 20)
        return TwoStageSearch(first, exact.store, components, int(index.manifest["pca"]["rerank"]))
    return exact


def length_buckets(lengths: Sequence[int], max_batch: int, max_padding: float) -> list[list[int]]:
    """Positions grouped for batched encoding: sorted by length, a batch grows while its padding (tokens added
    to reach its longest member) stays within `max_padding` of its real tokens and it has < max_batch members.
    A transformer's cost grows with batch x longest length, so mixing 14- and 40-token captions wastes compute."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    buckets: list[list[int]] = []
    real = 0
    for i in order:
        b = buckets[-1] if buckets else None
        padded = lengths[i] * (len(b) + 1) if b is not None else 0  # lengths[i] is the longest so far
        if b is not None and len(b) < max_batch and padded <= (1 + max_padding) * (real + lengths[i]):
            b.append(i)
            real += lengths[i]
        else:
            buckets.append([i])
            real = lengths[i]
    return buckets


class FilterRouter:
    """`engine` for unfiltered queries and large filtered subsets; `small` (an exact scan of the subset's
    rows) when a filter keeps at most `max_rows` rows."""

    def __init__(self, engine, small, max_rows: int):
        self.engine, self.small, self.max_rows = engine, small, int(max_rows)
        self.first, self.store = engine.first, engine.store  # what callers inspect

    def __len__(self) -> int:
        return len(self.engine)

    def search(self, queries: torch.Tensor, k: int, subset: np.ndarray | None = None):
        if subset is not None and len(subset) <= self.max_rows:
            return self.small.search(queries, k, subset=subset)
        return self.engine.search(queries, k, **({} if subset is None else {"subset": subset}))


class ModelTurns:
    """Who may run the model now. Searches hold one of `n` slots, so up to `n` run at once (the server's
    parallel workers, each on its own threads; an inference forward keeps no state between calls);
    `with turns:` (an explanation: recording attention sets state on shared modules) waits for every slot and
    runs alone."""

    def __init__(self, n: int = 1):
        self.n = max(1, int(n))
        self._slots = threading.Semaphore(self.n)
        self._exclusive = threading.Lock()  # one exclusive taker at a time, so two never hold half the slots each

    @contextmanager
    def shared(self):
        with self._slots:
            yield

    def __enter__(self):
        self._exclusive.acquire()
        for _ in range(self.n):
            self._slots.acquire()
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(self.n):
            self._slots.release()
        self._exclusive.release()


class Searcher:
    """Loads an index and its model once; `search(texts, k)` ranks the gallery for each text."""

    def __init__(self, index_path: str | Path, checkpoint: str | Path | None = None, device: str | None = None,
                 mode: str = "auto", search_cfg=None, images_root: str | Path | None = None):
        self.cfg = search_cfg or defaults().search
        self.index = GalleryIndex.load(index_path)
        if images_root is not None:
            self.index.manifest["images_root"] = str(Path(images_root).expanduser().resolve())
        checkpoint = Path(checkpoint or self.index.checkpoint)
        self.device = resolve_device(device)
        # the fingerprint is computed from the loaded tensors and config, not read from metadata
        self.model, _, meta = load_model(checkpoint, device=self.device)
        fingerprint = meta["fingerprint"]
        if fingerprint != self.index.fingerprint:
            raise SearchError(f"{checkpoint} (model {fingerprint}) is not the model that built {index_path} "
                              f"(model {self.index.fingerprint}); its embeddings are not comparable. "
                              f"Search with that checkpoint or rebuild the index with `lgur index`")
        if self.model.embedding_dim != self.index.dim:
            raise SearchError(f"{index_path}: embeddings of width {self.index.dim}, but {checkpoint} encodes "
                              f"{self.model.embedding_dim}-d queries (corrupt or edited index; rebuild it with "
                              f"`lgur index`)")
        self.checkpoint = checkpoint
        self.engine = make_engine(self.index, mode, self.cfg, self.device)
        self._has_meta = bool(self.index.files.metadata_columns)
        self._subsets: dict = {}
        self._cache_lock = threading.Lock()
        self._lock = ModelTurns(1)  # the server calls from worker threads; see parallel()

    def __len__(self) -> int:
        return len(self.index)

    def parallel(self, workers: int) -> int:
        """Let up to `workers` searches run at once, each on cores // workers torch threads (process-wide; call
        before serving, not while searching). 0 = one per CPU core, at most 4; a GPU runs one at a time.
        Returns the number of workers."""
        cores = cpu_cores()
        workers = int(workers)
        if self.device.type != "cpu":
            workers = 1
        elif workers <= 0:
            workers = min(cores, 4)
        self._lock = ModelTurns(workers)
        if self.device.type == "cpu" and workers > 1:
            torch.set_num_threads(max(1, cores // workers))
        return workers

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (Q, D) embeddings, in input order. Encoded in batches of at most search.text_batch_size texts
        of similar token length (`length_buckets`), so that short captions are not padded to the longest one."""
        texts = list(texts)
        if len(texts) == 1:
            return self.model.encode_captions(texts).float()
        lengths = [len(ids) for ids in self.model.tokenizer(texts, truncation=True,
                                                             max_length=self.model.max_caption_tokens)["input_ids"]]
        out = [None] * len(texts)
        for bucket in length_buckets(lengths, int(self.cfg.text_batch_size), float(self.cfg.text_max_padding)):
            for i, e in zip(bucket, self.model.encode_captions([texts[i] for i in bucket]).float()):
                out[i] = e
        return torch.stack(out)

    def frame_file(self, i: int) -> Path | None:
        """The frame image of video crop `i` (index built by `lgur index --video`), only if it lies inside the
        index's media folder's frames/ (the media folder is the crops root's parent); rows are untrusted input."""
        cols = self.index.files.columns
        rel = bytes(cols["frame_image"][i]).decode("utf-8", "replace") if "frame_image" in cols else ""
        if not rel or "\x00" in rel:
            return None
        media = self.index.images_root.parent.resolve()
        path = (media / rel).resolve()
        if not path.is_relative_to(media / "frames"):
            return None
        return path

    def select(self, where=None, after=None, before=None) -> np.ndarray | None:
        """Row ids passing a metadata filter (see lgur.search.filters), cached for the last few filters;
        None = every row."""
        flt = where if isinstance(where, Filter) else Filter.parse(where, after, before)
        if not flt:
            return None
        with self._cache_lock:
            ids = self._subsets.get(flt)
        if ids is None:
            ids = flt.select(self.index.files)
            with self._cache_lock:
                self._subsets[flt] = ids
                while len(self._subsets) > 8:
                    self._subsets.pop(next(iter(self._subsets)))
        return ids

    def search(self, texts: Sequence[str] | str, k: int | Sequence[int] = 10, relevant: Relevant = None,
               where=None, after=None, before=None, per_track: bool = False) -> list[QueryResult]:
        """Top-k gallery images per text, best first. `k` is one number or one per text (the texts are encoded
        together either way; `lgur serve` batches concurrent requests this way). `relevant` (optional ground
        truth) marks each hit's `correct`: either one collection of correct relative paths per query, or a
        predicate relevant(query_index, query_text, relative_path) -> bool.
        where/after/before: a metadata filter for every text (["camera=3"], times as Unix seconds or ISO 8601;
        or a lgur.search.filters.Filter as `where`): only matching rows are searched, inside the engine, so a
        result may have fewer than k hits. per_track: one hit per track (video indexes: the track's best crop;
        `Hit.video["span"]` is the track's time span); rows without a track count as their own track."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise SearchError("every query must be a non-empty string")
        ks = [k] * len(texts) if isinstance(k, int) else list(k)
        if len(ks) != len(texts):
            raise SearchError(f"k: {len(ks)} values for {len(texts)} queries")
        if min(ks) < 1:
            raise SearchError(f"k must be at least 1, got {min(ks)}")
        if relevant is not None and not callable(relevant) and len(relevant) != len(texts):
            raise SearchError(f"relevant: {len(relevant)} ground-truth sets for {len(texts)} queries")
        # one query = small ops (a short caption, a memory-bound scan): run them on search.single_query_threads
        subset = self.select(where, after, before)
        kw = {} if subset is None else {"subset": subset}
        rows: list = [None] * len(texts)
        n = len(self.index) if subset is None else len(subset)
        one = len(texts) == 1 and self._lock.n == 1  # (parallel workers already run on few threads each)
        with self._lock.shared(), torch_threads(int(self.cfg.single_query_threads) if one else 0):
            emb = self.encode(texts)
            for kk in sorted(set(ks)):  # one scan per distinct k, so each query ranks exactly as if alone
                group = [i for i, x in enumerate(ks) if x == kk]
                # per track: fetch more rows than k, and all of them if k tracks are still not covered
                fetch = min(n, kk * 20) if per_track else kk
                q = emb if len(group) == len(texts) else emb[group]
                scores, ids = self.engine.search(q, fetch, **kw)
                if per_track and fetch < n and any(len(self._tracks(r)) < kk for r in ids.tolist()):
                    scores, ids = self.engine.search(q, n, **kw)
                for i, s_row, i_row in zip(group, scores.tolist(), ids.tolist()):
                    rows[i] = (s_row, i_row)
        results = []
        for qi, (text, (s_row, i_row)) in enumerate(zip(texts, rows)):
            hits, seen = [], set()
            for score, i in zip(s_row, i_row):
                if i < 0:  # an ANN index found fewer than k
                    continue
                if per_track:
                    track = self._track(i)
                    if track in seen:
                        continue
                    seen.add(track)
                if len(hits) == ks[qi]:
                    break
                path = self.index.files.path(i)
                correct = None
                if relevant is not None:
                    correct = bool(relevant(qi, text, path)) if callable(relevant) else path in relevant[qi]
                meta = {c: v for c, v in self.index.files[i].items() if c not in BASE_COLUMNS} if self._has_meta else {}
                hits.append(Hit(len(hits) + 1, float(score), i, path, self.index.file(i), correct, meta,
                                self.frame_file(i)))
            results.append(QueryResult(text, hits))
        return results

    def _track(self, i: int):
        cols = self.index.files.columns
        t = bytes(cols["track"][i]).decode("utf-8", "replace") if "track" in cols else ""
        return ("track", t) if t else ("row", i)

    def _tracks(self, ids: list[int]) -> set:
        return {self._track(i) for i in ids if i >= 0}
