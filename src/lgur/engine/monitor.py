"""What a person sees of a run: the log file, TensorBoard scalars, one CSV row per epoch, the curves PNG.

Only rank 0 creates a Monitor; other ranks get a silent one (every method is a no-op), so the training
loop never branches on the rank.
"""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("lgur.engine")


def setup_logging(log_file: Path | None) -> None:
    """Log lines to stderr and (rank 0) to the run's train.log; readable, one event per line."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_lgur", False):
            root.removeHandler(h)
            h.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        h._lgur = True
        root.addHandler(h)


class Monitor:
    """Writes train.log (via logging), tb/ (TensorBoard), metrics.csv and curves.png of a run folder."""

    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self.writer = None
        if run_dir is not None:
            self.writer = SummaryWriter(str(run_dir / "tb"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def epoch_row(self, row: dict[str, float | int | str]) -> None:
        """Append one row to metrics.csv; a column added later (e.g. test after val) rewrites the header."""
        if self.run_dir is None:
            return
        path = self.run_dir / "metrics.csv"
        rows = list(csv.DictReader(path.open())) if path.is_file() else []
        rows = [r for r in rows if int(r["epoch"]) < int(row["epoch"])]  # a resumed run replaces later rows
        rows.append({k: str(v) for k, v in row.items()})
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="")
            w.writeheader()
            w.writerows(rows)
        if self.writer is not None:
            self.writer.flush()

    def plot(self) -> Path | None:
        """curves.png: training losses, learning rate and the evaluation metrics per epoch."""
        if self.run_dir is None or not (self.run_dir / "metrics.csv").is_file():
            return None
        import matplotlib  # here, not at the top: choosing the Agg backend must not happen on import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = list(csv.DictReader((self.run_dir / "metrics.csv").open()))
        epochs = [int(r["epoch"]) for r in rows]

        def series(col):
            return [float(r[col]) if r.get(col) not in (None, "") else float("nan") for r in rows]

        cols = list(rows[0]) if rows else []
        for r in rows:
            cols += [c for c in r if c not in cols]
        panels = [("training loss", [c for c in cols if c.startswith("train/")]),
                  ("learning rate", [c for c in cols if c.startswith("lr/")]),
                  ("retrieval (%)", [c for c in cols if c.startswith(("val/", "test/"))
                                     and c.rsplit("/", 1)[-1] in ("R@1", "R@5", "R@10", "mAP", "mINP")])]
        panels = [(t, c) for t, c in panels if c]
        fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
        for ax, (title, columns) in zip(axes[0], panels):
            for c in columns:
                ys = series(c)
                ax.plot(epochs, [100 * y for y in ys] if title.startswith("retrieval") else ys, marker="o",
                        ms=3, label=c.split("/", 1)[1])
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if title == "learning rate":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        out = self.run_dir / "curves.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
