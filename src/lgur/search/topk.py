"""Exact top-k inner-product search over stored embeddings: chunked matmul + top-k, in torch.

Why this design (numbers: bench/search.py on the 2-core CPU box, see docs in the report):
- The gallery is stored in fp16 (half the bytes of fp32). Converting fp16 rows to fp32 per chunk is slow on
  CPU (~1 s per 100k x 3072), so the scan runs on a *working copy* in the compute dtype made once at load.
- bf16 matmul is the fast path on CPUs with AVX512-BF16 (oneDNN) and fp16 on CUDA; both round the scores
  (bf16 keeps 8 mantissa bits), which alone reorders near-ties. So the low-precision scan returns
  k + `margin` candidates per query and those are re-scored in fp32 from the stored rows (`rescore`):
  top-k agreement with an fp32 brute force is then ~1.0 at negligible cost (Q x (k+margin) x D).
- Queries and gallery rows are processed in chunks so the score buffer stays bounded
  (query_chunk x chunk_rows floats) whatever the gallery size.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_MAX_SCORES = 1 << 26  # elements of one score buffer (256 MB in fp32)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch on `n` intra-op threads (n <= 0: unchanged), then restore.

    Used for single queries (search.single_query_threads): encoding one caption is many small ops and the
    scan is one memory-bound matrix-vector product per chunk, where one thread already reads ~28 GB/s on
    the 2-core box; waking a second thread for each op cost more than it gave on that (shared) machine
    (100k x 3072 fp16 scan: 22 ms on 1 thread, 40 ms on 2). The setting is process-wide, so callers
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
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


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
    rows = store[ids.clamp(min=0)].to(queries.device, torch.float32)
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

    def __init__(self, embeddings: torch.Tensor, compute_dtype: str = "auto", chunk_rows: int = 65536,
                 device: str | torch.device = "cpu", margin: int = 16):
        if compute_dtype != "auto" and compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype must be auto or one of {', '.join(DTYPES)}, got {compute_dtype!r}")
        self.device = torch.device(device)
        self.store = embeddings.to(self.device)
        self.compute_dtype = compute_dtype
        self.chunk_rows = max(1, int(chunk_rows))
        self.margin = int(margin)
        self._copies: dict[torch.dtype, torch.Tensor] = {self.store.dtype: self.store}

    def __len__(self) -> int:
        return self.store.shape[0]

    def scan_dtype(self, num_queries: int) -> torch.dtype:
        if self.compute_dtype != "auto":
            return DTYPES[self.compute_dtype]
        if num_queries == 1 and self.store.dtype in (torch.float16, torch.float32):
            return self.store.dtype
        return batch_compute_dtype(self.device)

    def _scan_matrix(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._copies:
            self._copies[dtype] = self.store.to(dtype)
        return self._copies[dtype]

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) queries -> scores (Q, k) fp32 and gallery ids (Q, k) long, best first (k capped at N)."""
        n = len(self)
        k = min(int(k), n)
        queries = queries.to(self.device, torch.float32)
        dtype = self.scan_dtype(queries.shape[0])
        work = self._scan_matrix(dtype)
        exact = dtype == torch.float32 and self.store.dtype == torch.float32
        wanted = k if exact else min(n, k + self.margin)
        qchunk = max(1, _MAX_SCORES // min(self.chunk_rows, n))
        out_s, out_i = [], []
        for q0 in range(0, queries.shape[0], qchunk):
            q = queries[q0:q0 + qchunk]
            qw = q.to(dtype)
            best = None
            for r0 in range(0, n, self.chunk_rows):
                scores = qw @ work[r0:r0 + self.chunk_rows].T
                top, pos = scores.topk(min(wanted, scores.shape[1]), dim=1)
                best = merge_topk(best, top.float(), pos + r0, wanted)
            top, ids = best if exact else rescore(q, self.store, best[1], k)
            out_s.append(top)
            out_i.append(ids)
        return torch.cat(out_s), torch.cat(out_i)
