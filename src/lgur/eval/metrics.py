"""Memory-bounded retrieval metrics: R@k (CMC), mAP, mINP and LGUR's trapezoidal mAP.

Why not the usual recipe: IRRA-style code argsorts the whole Q x G similarity matrix (ICFG-PEDES:
19,848^2 scores = 1.5 GiB, plus 3 GiB of int64 indices) and LGUR's official code loops over queries in
numpy (85 s, 4.2 GB at ICFG size, docs/reference.md §9). Every metric here only needs the 0-based rank of each *relevant*
gallery item, and a relevant item's rank is just "how many gallery items come before it". So, per chunk
of queries:

1. compute the similarity block (chunk x G) in float32 (never the full Q x G matrix);
2. sort the *values* of each row (no argsort; numpy's SIMD sort on CPU, torch.sort on CUDA);
3. look each relevant item's score up in its sorted row (`searchsorted`): the number of scores strictly
   above it is its rank, up to ties;
4. add the tie rule below for the few relevant items whose score occurs more than once in the row.

Tie rule (identical in the tests' plain reference): the ranking is the one of a **stable descending
sort over gallery index order**, i.e. `torch.argsort(s, descending=True, stable=True)` or
`np.argsort(-s, kind="stable")`: equal scores are ranked by ascending gallery index. The rank of a
relevant item j is therefore  #{g : s_g > s_j} + #{g < j : s_g == s_j}.  (LGUR's official code uses
`np.argsort(s)[::-1]`, whose tie order is unspecified; with real-valued scores ties practically never
occur, so the two agree on real features.)

Metrics, for a query with n relevant items at sorted 0-based ranks r_0 < ... < r_{n-1}:
    R@k                   1 if r_0 < k (mean over queries = CMC[k-1])
    mAP                   (1/n) sum_i (i+1)/(r_i+1)                 precision at each hit (IRRA, RDE)
    mINP                  n / (r_{n-1}+1)                           IRRA's inverse negative penalty
    mAP_lgur_trapezoid    (1/n) sum_i 1/2 [ i/r_i + (i+1)/(r_i+1) ]   LGUR's coded AP (docs/reference.md
                          §3, §9.2): i is the 0-based hit index, and the "old precision" i/r_i is 1
                          when r_i = 0.
All values are fractions in [0, 1]. Queries without any relevant gallery item are left out of every
mean and counted in `num_dropped` (the official "t2i_wm" protocol drops them; the official "t2i" code
would crash on them).

The "t2i_wm" protocol ("without matching image"): `exclude[q]` is a gallery index removed from query
q's gallery (the image caption q was written for); -1 removes nothing. Ranking it last and not counting
it as relevant is exactly the official `np.delete` of that column.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from lgur.errors import LgurError

RANK_METRICS = ("mAP", "mINP", "mAP_lgur_trapezoid")


def _check_ids(query_ids: torch.Tensor, gallery_ids: torch.Tensor, num_queries: int, num_gallery: int,
               exclude: torch.Tensor | None) -> None:
    """Refuse shapes that would silently mis-assign relevance."""
    if query_ids.shape != (num_queries,) or gallery_ids.shape != (num_gallery,):
        raise ValueError(f"ids must be 1-D with one id per row: got query ids {tuple(query_ids.shape)} for "
                         f"{num_queries} queries, gallery ids {tuple(gallery_ids.shape)} for {num_gallery} items")
    if num_gallery == 0:
        raise LgurError("the gallery is empty: nothing to retrieve")
    if exclude is not None:
        if exclude.shape != (num_queries,):
            raise ValueError(f"exclude must hold one gallery index per query (-1: none), got shape "
                             f"{tuple(exclude.shape)} for {num_queries} queries")
        if num_queries and (int(exclude.min()) < -1 or int(exclude.max()) >= num_gallery):
            raise ValueError(f"exclude holds gallery indices outside [-1, {num_gallery})")


class _Relevance:
    """Relevant gallery indices per query, in CSR form (gallery indices grouped by id, ascending).

    Memory O(G + chunk x max relevant per id), never Q x G.
    """

    def __init__(self, query_ids: torch.Tensor, gallery_ids: torch.Tensor):
        ids, group, counts = torch.unique(gallery_ids, return_inverse=True, return_counts=True)
        self.order = torch.argsort(group, stable=True)
        zero = counts.new_zeros(1)
        # one extra, empty group for query ids that never occur in the gallery
        self.counts = torch.cat([counts, zero])
        self.starts = torch.cat([zero, counts.cumsum(0)])
        where = torch.searchsorted(ids, query_ids).clamp(max=len(ids) - 1)
        self.query_group = torch.where(ids[where] == query_ids, where, len(ids))

    def chunk(self, rows: slice, exclude: torch.Tensor | None) -> torch.Tensor:
        """(chunk, P) relevant gallery indices of the queries in `rows`, -1 padded (excluded ones too)."""
        group = self.query_group[rows]
        n = self.counts[group]
        width = max(int(n.max()), 1) if len(group) else 1
        slot = torch.arange(width, device=n.device)
        idx = self.order[(self.starts[group, None] + slot).clamp(max=len(self.order) - 1)]
        idx = torch.where(slot < n[:, None], idx, -1)
        if exclude is not None:
            idx = torch.where(idx == exclude[rows, None], -1, idx)
        return idx


class _RowSorter:
    """Sorts each row's values ascending into one reused buffer.

    On CPU numpy's SIMD sort is much faster than torch.sort (README), and reusing the buffer avoids paging in a
    fresh chunk x G array per chunk (page faults cost as much as a memory pass here).
    """

    def __init__(self, rows: int, num_gallery: int, device: torch.device):
        self.buffer = np.empty((rows, num_gallery), np.float32) if device.type == "cpu" else None

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        if self.buffer is None:
            return torch.sort(block, dim=1).values
        out = self.buffer[:len(block)]
        np.copyto(out, block.numpy())
        out.sort(axis=1)
        return torch.from_numpy(out)


def _relevant_ranks(block: torch.Tensor, relevant: torch.Tensor, sort_rows: _RowSorter,
                    tie_rows: int) -> torch.Tensor:
    """0-based ranks (stable descending order, see module doc) of the relevant items of each row.

    block: (C, G) float32 scores (excluded items already at -inf); relevant: (C, P) gallery indices,
    -1 = padding. Returns (C, P) int64 ranks sorted ascending, padding = G (after every real rank).
    """
    num_gallery = block.shape[1]
    valid = relevant >= 0
    score = block.gather(1, relevant.clamp(min=0))
    rows = sort_rows(block)
    below_or_equal = torch.searchsorted(rows, score, right=True)
    rank = num_gallery - below_or_equal
    # The item itself sits at below_or_equal - 1 in its sorted row; it ties with another item iff the
    # value just before it is equal too.
    previous = rows.gather(1, (below_or_equal - 2).clamp(min=0))
    tied = valid & (below_or_equal >= 2) & (previous == score)
    # Ties: add the equal-scored items with a smaller gallery index. Only rows/items that tie pay for it,
    # in blocks of at most `tie_rows` rows of G to keep memory bounded.
    tied_row, tied_col = torch.nonzero(tied, as_tuple=True)
    gallery_index = torch.arange(num_gallery, device=block.device)
    for start in range(0, len(tied_row), tie_rows):
        r, c = tied_row[start:start + tie_rows], tied_col[start:start + tie_rows]
        before = (block[r] == score[r, c, None]) & (gallery_index < relevant[r, c, None])
        rank[r, c] += before.sum(1)
    return torch.where(valid, rank, num_gallery).sort(dim=1).values


def _query_metrics(ranks: torch.Tensor, num_gallery: int, ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query values (C, len(ks) + 3) in float64 and the mask of queries with >= 1 relevant item."""
    hit = ranks < num_gallery
    n = hit.sum(1)
    r = ranks.double()
    i = torch.arange(ranks.shape[1], device=ranks.device, dtype=torch.float64)
    precision = torch.where(hit, (i + 1) / (r + 1), 0.0)
    old_precision = torch.where(r > 0, i / r.clamp(min=1), 1.0)
    nd = n.clamp(min=1).double()
    ap = precision.sum(1) / nd
    last = r.gather(1, (n - 1).clamp(min=0)[:, None]).squeeze(1)
    inp = n.double() / (last + 1)
    trapezoid = torch.where(hit, 0.5 * (old_precision + precision), 0.0).sum(1) / nd
    first = ranks[:, :1]
    cmc = (first < torch.tensor(list(ks), device=ranks.device)).double()
    return torch.cat([cmc, ap[:, None], inp[:, None], trapezoid[:, None]], dim=1), n > 0


def _accumulate(blocks: Callable[[slice, torch.Tensor], None], shape: tuple[int, int], device: torch.device,
                query_ids: torch.Tensor, gallery_ids: torch.Tensor, ks: Sequence[int], chunk_size: int,
                exclude: torch.Tensor | None, progress: bool) -> dict[str, float]:
    """Sum per-query metrics over chunks; `blocks(rows, out)` writes the float32 (rows, G) scores to `out`."""
    num_queries, num_gallery = shape
    query_ids, gallery_ids = query_ids.to(device, torch.int64), gallery_ids.to(device, torch.int64)
    exclude = exclude.to(device, torch.int64) if exclude is not None else None
    _check_ids(query_ids, gallery_ids, num_queries, num_gallery, exclude)
    relevance = _Relevance(query_ids, gallery_ids)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive ranks, got {ks}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    totals = None
    rows_per_chunk = min(chunk_size, num_queries)
    buffer = torch.empty(rows_per_chunk, num_gallery, device=device)   # reused: no page-in per chunk
    sort_rows = _RowSorter(rows_per_chunk, num_gallery, device)
    starts = range(0, num_queries, chunk_size)
    for start in tqdm(starts, desc="retrieval metrics", unit="chunk", disable=not progress, leave=False):
        rows = slice(start, min(start + chunk_size, num_queries))
        block = buffer[:rows.stop - rows.start]
        blocks(rows, block)
        # a finite sum proves every score finite and costs ~1/50 of torch.isfinite over the block on
        # CPU; only a non-finite sum (NaN/inf, or overflow of huge scores) needs the exact check
        if not bool(torch.isfinite(block.sum())) and not bool(torch.isfinite(block).all()):
            raise LgurError(f"non-finite similarity scores for queries {rows.start}..{rows.stop - 1}: "
                            "the embeddings contain NaN/inf (diverged model or corrupt features)")
        if exclude is not None:
            drop = exclude[rows]
            has = drop >= 0
            block[torch.nonzero(has).squeeze(1), drop[has]] = float("-inf")
        ranks = _relevant_ranks(block, relevance.chunk(rows, exclude), sort_rows, chunk_size)
        values, keep = _query_metrics(ranks, num_gallery, ks)
        chunk_total = torch.cat([values[keep].sum(0), keep.sum().double()[None]])
        totals = chunk_total if totals is None else totals + chunk_total
    sums = totals.tolist() if totals is not None else [0.0] * (len(ks) + 4)
    kept = int(sums[-1])
    if kept == 0:
        raise LgurError(f"none of the {num_queries} queries has a relevant gallery item (same id): "
                        "check that query and gallery ids come from the same split and id mapping")
    names = [f"R@{k}" for k in ks] + list(RANK_METRICS)
    out: dict[str, float] = {name: total / kept for name, total in zip(names, sums)}
    out["num_queries"] = kept
    out["num_dropped"] = num_queries - kept
    return out


@torch.no_grad()
def retrieval_metrics(query_feats: torch.Tensor, gallery_feats: torch.Tensor, query_ids: torch.Tensor,
                      gallery_ids: torch.Tensor, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024,
                      exclude: torch.Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """R@k, mAP, mINP, mAP_lgur_trapezoid (+ num_queries, num_dropped) of query -> gallery retrieval.

    Scores are dot products of the features as given (pass L2-normalised features for cosine), computed
    in float32 one chunk of `chunk_size` queries at a time, on the features' device (CPU or CUDA).
    Peak extra memory ~ 2 x chunk_size x G x 4 bytes (+ a float32 copy of the gallery if it is not
    float32). `exclude`: (Q,) gallery index to remove per query, -1 for none ("t2i_wm"). See the module
    docstring for the exact definitions and the tie rule.
    """
    if query_feats.ndim != 2 or gallery_feats.ndim != 2 or query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(query_feats.shape)} and "
                         f"{tuple(gallery_feats.shape)}")
    num_queries, num_gallery = len(query_feats), len(gallery_feats)
    device = gallery_feats.device
    gallery_t = gallery_feats.to(torch.float32).T

    def blocks(rows: slice, out: torch.Tensor) -> None:
        torch.matmul(query_feats[rows].to(device=device, dtype=torch.float32), gallery_t, out=out)

    return _accumulate(blocks, (num_queries, num_gallery), device, query_ids, gallery_ids, ks, chunk_size,
                       exclude, progress)


@torch.no_grad()
def similarity_metrics(similarity: torch.Tensor, query_ids: torch.Tensor, gallery_ids: torch.Tensor,
                       ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024,
                       exclude: torch.Tensor | None = None, progress: bool = False) -> dict[str, float]:
    """Same metrics from a precomputed (Q, G) similarity matrix (higher = more similar).

    The matrix is only read, one chunk of rows at a time (each chunk copied into a float32 buffer).
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (Q, G), got {tuple(similarity.shape)}")
    num_queries, num_gallery = similarity.shape
    device = similarity.device

    def blocks(rows: slice, out: torch.Tensor) -> None:
        out.copy_(similarity[rows])

    return _accumulate(blocks, (num_queries, num_gallery), device, query_ids, gallery_ids, ks, chunk_size,
                       exclude, progress)


def text_image_metrics(text_feats: torch.Tensor, image_feats: torch.Tensor, text_ids: torch.Tensor,
                       image_ids: torch.Tensor, directions: Sequence[str] = ("t2i",),
                       caption_image_index: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10),
                       chunk_size: int = 1024, progress: bool = False) -> dict[str, dict[str, float]]:
    """{direction: metrics} for the protocols of docs/reference.md §3 and the i2t direction.

    t2i: captions query all images. t2i_wm: same, without each caption's own image
    (`caption_image_index[q]`), dropping captions whose id has no other image. i2t: images query
    all captions (the roles swapped).
    """
    out = {}
    for direction in directions:
        if direction == "t2i":
            out[direction] = retrieval_metrics(text_feats, image_feats, text_ids, image_ids, ks, chunk_size,
                                               progress=progress)
        elif direction == "t2i_wm":
            if caption_image_index is None:
                raise ValueError("the t2i_wm protocol needs caption_image_index (each caption's own image)")
            out[direction] = retrieval_metrics(text_feats, image_feats, text_ids, image_ids, ks, chunk_size,
                                               exclude=caption_image_index, progress=progress)
        elif direction == "i2t":
            out[direction] = retrieval_metrics(image_feats, text_feats, image_ids, text_ids, ks, chunk_size,
                                               progress=progress)
        else:
            raise ValueError(f"unknown direction {direction!r}: expected t2i, t2i_wm or i2t")
    return out
