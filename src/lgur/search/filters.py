"""Metadata filters: which gallery rows a query may return ("camera 3, between 14:00 and 15:00").

    flt = Filter.parse(where=["camera=3", "video!=lobby.mp4"], after="2026-11-28T14:00", before="2026-11-28T15:00")
    ids = flt.select(index.files)        # sorted row ids (np.int64), or None for "every row"
    searcher.search("a man in a red jacket", k=10, where=["camera=3"], after=..., before=...)

Clauses are `COLUMN OP VALUE` with OP one of = != < <= > >=; `COLUMN=a,b,c` means "any of"; clauses are
ANDed. `after`/`before` compare the `time` column (Unix seconds; give Unix seconds or ISO 8601, UTC unless
a zone is named): after <= time < before. Values are typed by the column (see lgur.search.index.Rows).
The row set is computed with numpy over the (memory-mapped) columns and handed to the search engine,
which searches only those rows (faiss ID selector / exact scan of the subset): no over-fetch-and-drop.

`filter_from_request(body)` reads the same fields from a JSON request ({"where": [...] | "...", "after",
"before"}), with bounds, for `lgur serve`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from lgur.search.index import MISSING_INT, Rows, SearchError, parse_time

OPS = ("<=", ">=", "!=", "=", "<", ">")
MAX_CLAUSES = 16
MAX_VALUE_CHARS = 200
TIME_COLUMN = "time"
_CLAUSE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]{0,63})\s*(<=|>=|!=|==|=|<|>)\s*(.*?)\s*\Z", re.S)


@dataclass(frozen=True)
class Clause:
    column: str
    op: str
    values: tuple  # raw strings/numbers; typed against the column in `mask`

    def describe(self) -> str:
        return f"{self.column}{self.op}{','.join(map(str, self.values))}"


@dataclass(frozen=True)
class Filter:
    clauses: tuple[Clause, ...] = ()

    @classmethod
    def parse(cls, where: Sequence[str] | str | None = None, after=None, before=None) -> "Filter":
        where = [where] if isinstance(where, str) else list(where or [])
        clauses = []
        for w in where:
            if not isinstance(w, str) or len(w) > MAX_VALUE_CHARS + 70:
                raise SearchError(f"where: each clause must be a string of at most {MAX_VALUE_CHARS + 70} chars")
            m = _CLAUSE.match(w)
            if m is None or not m[3]:
                raise SearchError(f"where {w[:80]!r}: expected COLUMN=VALUE (or != < <= > >=), e.g. camera=3")
            op = "=" if m[2] == "==" else m[2]
            values = tuple(v.strip() for v in m[3].split(",")) if op == "=" else (m[3],)
            clauses.append(Clause(m[1], op, values))
        if after not in (None, ""):
            clauses.append(Clause(TIME_COLUMN, ">=", (parse_time(after),)))
        if before not in (None, ""):
            clauses.append(Clause(TIME_COLUMN, "<", (parse_time(before),)))
        if len(clauses) > MAX_CLAUSES:
            raise SearchError(f"at most {MAX_CLAUSES} filter clauses, got {len(clauses)}")
        return cls(tuple(clauses))

    def __bool__(self) -> bool:
        return bool(self.clauses)

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.clauses) or "all rows"

    def mask(self, rows: Rows, block: int = 1 << 22) -> np.ndarray:
        """Boolean (N,) over the rows, computed block by block (memory-mapped columns stay mapped)."""
        n = len(rows)
        out = np.ones(n, dtype=bool)
        for c in self.clauses:
            if c.column not in rows.kinds:
                have = ", ".join(k for k in rows.kinds if k not in ("size", "mtime_ns")) or "none"
                raise SearchError(f"filter {c.describe()!r}: the index has no column {c.column!r} (columns: {have})"
                                  + ("; --after/--before need a 'time' column (lgur index --meta/--meta-pattern)"
                                     if c.column == TIME_COLUMN else ""))
            kind = rows.kinds[c.column]
            values = [_typed(kind, v, c) for v in c.values]
            col = rows.columns[c.column]
            for b0 in range(0, n, block):
                a = col[b0:b0 + block]
                if c.op == "=":
                    m = np.isin(a, np.asarray(values)) if len(values) > 1 else a == values[0]
                else:
                    m = {"!=": np.not_equal, "<": np.less, "<=": np.less_equal, ">": np.greater,
                         ">=": np.greater_equal}[c.op](a, values[0])
                if kind == "int" and c.op != "!=":
                    m &= a != MISSING_INT
                out[b0:b0 + block] &= m
        return out

    def select(self, rows: Rows) -> np.ndarray | None:
        """Sorted row ids that pass (np.int64), or None when there is no clause (every row)."""
        if not self.clauses:
            return None
        return np.flatnonzero(self.mask(rows)).astype(np.int64)


def _typed(kind: str, v, clause: Clause):
    try:
        if kind == "int":
            if isinstance(v, str) and not re.fullmatch(r"-?\d{1,18}", v):
                raise ValueError
            return np.int64(int(v))
        if kind == "float":
            return np.float64(parse_time(v) if clause.column == TIME_COLUMN else float(v))
    except (ValueError, TypeError, SearchError):
        raise SearchError(f"filter {clause.describe()[:80]!r}: column {clause.column!r} holds "
                          f"{'integers' if kind == 'int' else 'numbers' if clause.column != TIME_COLUMN else 'times'}")
    if clause.op not in ("=", "!="):
        raise SearchError(f"filter {clause.describe()[:80]!r}: text column {clause.column!r} supports = and != only")
    return str(v).encode("utf-8")


def filter_from_request(body: dict) -> Filter:
    """The filter fields of a JSON search request: "where" (a clause or a list of clauses, strings),
    "after"/"before" (Unix seconds or ISO 8601 strings); absent or null = no filter. Raises SearchError
    with a readable message (answer 422)."""
    where = body.get("where")
    strings = isinstance(where, list) and all(isinstance(w, str) for w in where)
    if where is not None and not (isinstance(where, str) or strings):
        raise SearchError("where: a string or a list of strings such as [\"camera=3\"]")
    if isinstance(where, list) and len(where) > MAX_CLAUSES:
        raise SearchError(f"where: at most {MAX_CLAUSES} clauses")
    for key in ("after", "before"):
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (str, int, float)) or
                              (isinstance(v, str) and len(v) > 64)):
            raise SearchError(f"{key}: Unix seconds or an ISO 8601 time such as 2026-11-28T14:00:00")
    return Filter.parse(where, body.get("after"), body.get("before"))
