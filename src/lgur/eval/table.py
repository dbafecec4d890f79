"""The one results table: what `lgur train`, `lgur eval`, `lgur demo` and the benchmarks print.

    format_table({"val t2i": metrics, "chance level": chance, ...})

One row per label, values in percent with two decimals; a metric a row lacks is shown as '-'; the
`queries` column appears when a row carries `num_queries` (as lgur.eval.metrics returns).
"""
from __future__ import annotations

from typing import Mapping

# metric key of lgur.eval.metrics -> column title (mAP is the standard one; the official code's is the trapezoid)
COLUMNS = {"R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "mAP": "mAP", "mINP": "mINP",
           "mAP_lgur_trapezoid": "mAP (LGUR trapezoid)"}


def by_direction(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Mapping[str, float]]:
    """{split: {direction: metrics}} (what the engine's evaluate returns) -> {"split direction": metrics}."""
    return {f"{label} {direction}": m for label, metrics in rows.items() for direction, m in metrics.items()}


def format_table(rows: Mapping[str, Mapping[str, float]], columns: Mapping[str, str] = COLUMNS) -> str:
    """A fixed-width table in percent: one row per label, the `columns` (metric key -> title)."""
    label_width = max([16, *(len(label) + 2 for label in rows)])
    width = [max(len(title), 7) + 2 for title in columns.values()]
    queries = any("num_queries" in m for m in rows.values())
    lines = [f"{'':<{label_width}}" + "".join(f"{t:>{w}}" for t, w in zip(columns.values(), width))
             + ("  queries" if queries else "")]
    for label, m in rows.items():
        cells = "".join(f"{100 * m[k]:>{w}.2f}" if k in m else f"{'-':>{w}}" for k, w in zip(columns, width))
        count = f"  {int(m['num_queries'])}" if "num_queries" in m else ""
        lines.append(f"{label:<{label_width}}{cells}{count}".rstrip())
    return "\n".join(lines)
