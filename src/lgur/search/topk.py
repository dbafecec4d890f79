"""Exact top-k inner-product search over stored embeddings: chunked matmul + top-k, in torch.

Why this design (bench/search.py measures it; the README lists the figures):
- The gallery is stored in fp16 (half the bytes of fp32). Converting fp16 rows to fp32 per chunk is slow on
  CPU (it costs far more than the scan itself), so the scan runs on a *working copy* in the compute dtype
  made once at load.
- bf16 matmul is the fast path on CPUs with AVX512-BF16 (oneDNN) and fp16 on CUDA; both round the scores
  (bf16 keeps 8 mantissa bits), which alone reorders near-ties. So the low-precision scan returns
  k + `margin` candidates per query and those are re-scored in fp32 from the stored rows (`rescore`):
  top-k agreement with an fp32 brute force is then ~1.0 at negligible cost (Q x (k+margin) x D).
- Queries and gallery rows are processed in chunks so the score buffer stays bounded
  (query_chunk x chunk_rows floats) whatever the gallery size.
"""
from __future__ import annotations

import mmap
import os
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from lgur.errors import SearchError
from lgur.runtime import cpu_has_fast_bf16

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_SCORES = 1 << 26  # elements of one score buffer (256 MB in fp32)
# ExactSearch.subset_threads applies from this many subset rows (128-d fp16, one query, 2 cores: 30k rows 1.4 ->
# 1.1 ms, 60k 3.9 -> 2.2 ms; below, switching torch's thread count weighs against a gain of < 0.1 ms)
SUBSET_THREAD_ROWS = 32768


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch on `n` intra-op threads (n <= 0: unchanged), then restore.

    Used for single queries (search.single_query_threads): encoding one caption is many small ops and the
    scan is one memory-bound matrix-vector product per chunk, which one thread already runs near memory
    bandwidth; waking a second thread for each op cost more than it gave on a small shared CPU
    (bench/search.py prints the one- and two-thread latencies). The setting is process-wide, so callers
    serialise searches (Searcher holds a lock).
    """
    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def batch_compute_dtype(device: torch.device) -> torch.dtype:
    """Dtype of the matmul for query batches: fp16 on CUDA, bf16 on CPUs whose oneDNN has native bf16
    matmul (AVX512-BF16/AMX), else fp32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


class Shards:
    """An (N, D) matrix stored as consecutive row blocks (the index's memory-mapped shard files, or one
    in-memory tensor). Gathers (`take`) and chunked scans (`blocks`) touch only the rows they need, so a
    memory-mapped gallery is never read whole; `contiguous()` is the whole matrix (small galleries, tests).
    `mapped`: the parts are memory-mapped files (scans convert chunk by chunk instead of keeping a
    working copy in the compute dtype)."""

    def __init__(self, parts: Sequence[torch.Tensor], mapped: bool = False,
                 gather_views: Sequence | None = None):
        keep = [i for i, p in enumerate(parts) if p.shape[0]] or [0]  # empty parts hold no rows
        if not parts:
            raise ValueError("Shards needs at least one part")
        self.parts = [parts[i] for i in keep]
        self.mapped = bool(mapped)
        self.offsets = np.cumsum([0] + [p.shape[0] for p in self.parts])
        d = {p.shape[1] for p in self.parts}
        if len(d) != 1 or len({p.dtype for p in self.parts}) != 1:
            raise ValueError("Shards: parts differ in width or dtype")
        self.shape = torch.Size((int(self.offsets[-1]), d.pop()))
        self.dtype, self.device = self.parts[0].dtype, self.parts[0].device
        # numpy views for gathers: numpy's fancy indexing of a memory-mapped array was 15-40 times faster
        # than torch indexing of the same mapped tensor (figures in the README)
        self._np = ([p.numpy() for p in self.parts] if self.device.type == "cpu" and self.dtype != torch.bfloat16
                    else None)
        if gather_views is not None and self._np is not None:
            self._np = [gather_views[i] for i in keep]

    @classmethod
    def of_mapped(cls, arrays: Sequence[np.ndarray]) -> "Shards":
        """Shards over memory-mapped arrays (np.load(..., mmap_mode=...)): scans read them through their
        mapping (the kernel's readahead serves sequential reads), gathers with pread (RowReader: no readahead,
        no page cache mapped into this process)."""
        parts = [torch.from_numpy(a) for a in arrays]
        return cls(parts, mapped=True, gather_views=[row_reader(a) for a in arrays])

    @classmethod
    def of(cls, x: "torch.Tensor | Shards") -> "Shards":
        return x if isinstance(x, Shards) else cls([x])

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, rows: int) -> Iterator[torch.Tensor]:
        for start, block in self.enumerate_blocks(rows):
            yield block

    def enumerate_blocks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row id, block of <= rows rows) over the whole matrix, never crossing a part."""
        for off, p in zip(self.offsets, self.parts):
            for r0 in range(0, p.shape[0], rows):
                yield int(off) + r0, p[r0:r0 + rows]

    def take(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape of non-negative ids) -> ids.shape + (D,), reading only those rows."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self._np is None:
            if len(self.parts) == 1:
                return self.parts[0][ids.to(self.device)]
            return self.contiguous()[ids.to(self.device)]
        flat = ids.reshape(-1).cpu().numpy()
        if len(self.parts) == 1:
            return torch.from_numpy(self._np[0][flat]).reshape(*ids.shape, self.shape[1])
        which = np.searchsorted(self.offsets[1:], flat, side="right")
        out = np.empty((len(flat), self.shape[1]), dtype=self._np[0].dtype)
        for k in np.unique(which):
            m = which == k
            out[m] = self._np[k][flat[m] - self.offsets[k]]
        return torch.from_numpy(out).reshape(*ids.shape, self.shape[1])

    def contiguous(self) -> torch.Tensor:
        return self.parts[0] if len(self.parts) == 1 else torch.cat(self.parts)

    def to(self, device: torch.device) -> "Shards":
        device = torch.device(device)
        if device == self.device:
            return self
        return Shards([self.contiguous().to(device)])


class RowReader:
    """Rows of a memory-mapped array's file read with pread into a fresh buffer, the file opened with the
    kernel's readahead off (POSIX_FADV_RANDOM): `reader[ids]` is `array[ids]` (ids: 1-d, in range).

    For gathers (re-ranking's candidate rows): through a mapping, every fault on a gallery larger than the
    page cache read ~128 KiB around its page (the 10 M benchmark's tuning read 700 MB/s for minutes), and
    every page cache folio a fault touched was mapped into the process, so its RSS grew by ~35 MB per query
    (5.6 GB after 200) with nothing of its own behind it. pread copies just the row."""

    def __init__(self, a: np.memmap):
        self.path, self.offset = str(a.filename), int(a.offset)
        self.shape, self.dtype = tuple(a.shape), a.dtype
        self.row_bytes = int(a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64)))
        # opened now, beside the mapping: both then read the same file even after a newer index's commit
        # removes this data folder (clean_stale) while a server still searches the version it loaded
        self._fd = os.open(self.path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)

    def __getitem__(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: row ids must be in 0..{self.shape[0] - 1}")
        out = np.empty((ids.size, *self.shape[1:]), self.dtype)
        if not ids.size:
            return out
        rb, buf = self.row_bytes, memoryview(out.reshape(-1).view(np.uint8))
        for j, i in enumerate(ids.tolist()):
            got = os.preadv(self._fd, [buf[j * rb:(j + 1) * rb]], self.offset + i * rb)
            if got != rb:
                raise SearchError(f"{self.path}: row {i} reads {got} of {rb} bytes: the file was truncated "
                                  f"after the index was loaded (rebuild it with `lgur index`)")
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def row_reader(a: np.ndarray):
    """A RowReader for a memory-mapped array as np.load / np.memmap return it, `a` itself for anything else
    (in-memory arrays, a slice of a mapping, whose `offset` numpy leaves at the file's; no preadv)."""
    if (isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename is not None and a.ndim >= 1
            and hasattr(os, "preadv")):
        return RowReader(a)
    return a


def take_rows(store, ids: torch.Tensor) -> torch.Tensor:
    return store.take(ids) if isinstance(store, Shards) else store[ids]


def merge_topk(best: tuple[torch.Tensor, torch.Tensor] | None, scores: torch.Tensor, ids: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a chunk's (Q, k') candidates into the running best (Q, <=k)."""
    if best is not None:
        scores, ids = torch.cat([best[0], scores], 1), torch.cat([best[1], ids], 1)
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    return top, ids.gather(1, pos)


def rescore(queries: torch.Tensor, store: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 scores of candidate rows `ids` (Q, C) of `store`; returns the best k per query, best first.
    Negative ids (an ANN index's 'no result') score -inf and keep their id."""
    ids = ids.to(store.device)
    rows = take_rows(store, ids.clamp(min=0)).to(queries.device, torch.float32)
    scores = torch.einsum("qd,qcd->qc", queries.float(), rows).masked_fill(ids.to(queries.device) < 0, float("-inf"))
    top, pos = scores.topk(min(k, scores.shape[1]), dim=1)
    return top, ids.to(queries.device).gather(1, pos)


class ExactSearch:
    """Brute-force inner-product top-k over `embeddings` (N, D), exact up to fp32 rounding.

    `compute_dtype="auto"` picks, per call, what measured fastest on the 2-core CPU box: a single query
    is a matrix-vector product bound by memory bandwidth, fastest straight on the fp16 store; a batch
    of queries is compute-bound, fastest in bf16 (a working copy made on first use) or fp16 on CUDA.
    A fixed dtype (fp32 | bf16 | fp16) forces one working copy for every call.
    """

    def __init__(self, embeddings: "torch.Tensor | Shards", compute_dtype: str = "auto", chunk_rows: int = 65536,
                 device: str | torch.device = "cpu", margin: int = 16, subset_cache_bytes: int = 0,
                 subset_threads: int = 0):
        if compute_dtype != "auto" and compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be auto or one of {', '.join(DTYPES)}, got {compute_dtype!r}")
        self.device = torch.device(device)
        self.shards = Shards.of(embeddings).to(self.device)
        # one in-memory matrix: the plain tensor (and working copies, see _scan_blocks); memory-mapped
        # shards: scanned block by block, converted per block, never copied whole
        self.store = self.shards.parts[0] if len(self.shards.parts) == 1 and not self.shards.mapped else self.shards
        self.compute_dtype = compute_dtype
        self.chunk_rows = max(1, int(chunk_rows))
        self.margin = int(margin)
        # a filter's rows gathered for its scan, kept for the next query with the same subset array (the
        # Searcher reuses one array per filter): up to `subset_cache_bytes` in all, oldest dropped first
        self.subset_cache_bytes = int(subset_cache_bytes)
        self._subset_cache: OrderedDict = OrderedDict()
        # a filtered subset of at least SUBSET_THREAD_ROWS rows is scanned on this many torch threads where
        # the caller runs fewer (a single query: search.single_query_threads): one query's scan is
        # memory-bound, and one core alone does not saturate memory (100k PCA-128 fp16 rows, the 1 % filter
        # of the 10 M benchmark: 5.1-6.9 ms on 1 thread, 3.7-4.0 on 2)
        self.subset_threads = int(subset_threads)
        self._copies: dict[torch.dtype, torch.Tensor] = {self.store.dtype: self.store}

    def __len__(self) -> int:
        return self.store.shape[0]

    def scan_dtype(self, num_queries: int) -> torch.dtype:
        if self.compute_dtype != "auto":
            return DTYPES[self.compute_dtype]
        if num_queries == 1 and self.store.dtype in (torch.float16, torch.float32):
            return self.store.dtype
        return batch_compute_dtype(self.device)

    def _scan_blocks(self, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
        if isinstance(self.store, Shards):
            for r0, block in self.store.enumerate_blocks(self.chunk_rows):
                yield r0, block.to(dtype)
            return
        if dtype not in self._copies:
            self._copies[dtype] = self.store.to(dtype)
        work = self._copies[dtype]
        for r0 in range(0, work.shape[0], self.chunk_rows):
            yield r0, work[r0:r0 + self.chunk_rows]

    def _subset_blocks(self, subset: np.ndarray, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        key = (id(subset), dtype)
        hit = self._subset_cache.get(key)
        if hit is not None and hit[0] is subset:  # the same array object (kept alive by the cache)
            self._subset_cache.move_to_end(key)
            return hit[1]
        store = Shards.of(self.store)
        blocks = []
        for i in range(0, len(subset), self.chunk_rows):
            ids = torch.from_numpy(subset[i:i + self.chunk_rows])
            blocks.append((ids, store.take(ids).to(dtype)))
        size = sum(b.numel() * b.element_size() + ids.numel() * 8 for ids, b in blocks)
        if size <= self.subset_cache_bytes:
            self._subset_cache[key] = (subset, blocks, size)
            while sum(v[2] for v in self._subset_cache.values()) > self.subset_cache_bytes:
                self._subset_cache.popitem(last=False)
        return blocks

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int, subset: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> scores (Q, k) fp32 and gallery ids (Q, k) long, best first (k capped at N).
        subset: sorted row ids (np.int64) to search among (a metadata filter); only those rows are read.
        Fewer than k rows in the subset: the missing ids are -1 with score -inf."""
        if subset is not None:
            return self._search_subset(queries, k, subset)
        n = len(self)
        k = min(int(k), n)
        queries = queries.to(self.device, torch.float32)
        dtype = self.scan_dtype(queries.shape[0])
        exact = dtype == torch.float32 and self.store.dtype == torch.float32
        wanted = k if exact else min(n, k + self.margin)
        qchunk = max(1, _MAX_SCORES // min(self.chunk_rows, n))
        out_s, out_i = [], []
        for q0 in range(0, queries.shape[0], qchunk):
            q = queries[q0:q0 + qchunk]
            qw = q.to(dtype)
            best = None
            for r0, block in self._scan_blocks(dtype):
                scores = qw @ block.T
                top, pos = scores.topk(min(wanted, scores.shape[1]), dim=1)
                best = merge_topk(best, top.float(), pos + r0, wanted)
            top, ids = best if exact else rescore(q, self.store, best[1], k)
            out_s.append(top)
            out_i.append(ids)
        return torch.cat(out_s), torch.cat(out_i)

    def _search_subset(self, queries: torch.Tensor, k: int, subset: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        queries = queries.to(self.device, torch.float32)
        q = queries.shape[0]
        if len(subset) == 0:
            return torch.full((q, k), float("-inf")), torch.full((q, k), -1, dtype=torch.long)
        dtype = self.scan_dtype(q)
        exact = dtype == torch.float32 and self.store.dtype == torch.float32
        wanted = min(len(subset), k if exact else k + self.margin)
        best = None
        qw = queries.to(dtype)
        more = self.subset_threads > torch.get_num_threads() and len(subset) >= SUBSET_THREAD_ROWS
        with torch_threads(self.subset_threads if more else 0):  # 0: unchanged
            for ids, block in self._subset_blocks(subset, dtype):
                scores = qw @ block.T
                top, pos = scores.topk(min(wanted, scores.shape[1]), dim=1)
                best = merge_topk(best, top.float(), ids.to(pos.device)[pos], wanted)
        top, ids = best if exact else rescore(queries, self.store, best[1], min(k, len(subset)))
        if ids.shape[1] < k:  # pad to k
            pad = k - ids.shape[1]
            top = torch.cat([top, torch.full((q, pad), float("-inf"))], 1)
            ids = torch.cat([ids, torch.full((q, pad), -1, dtype=torch.long)], 1)
        return top, ids
