"""Metric outputs of a run: metrics.jsonl, TensorBoard events, plots, progress lines.

Only this module (and the experiment entry points) touch the file system for metrics;
the training code hands it plain dicts.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def read_metrics(workdir: str) -> list[dict]:
    """All records of ``workdir``/metrics.jsonl (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Appends evaluation records to metrics.jsonl and TensorBoard.

    On resume, records past the restored epoch (written after the last checkpoint by a
    run that was then killed) are dropped, so the file ends exactly as an uninterrupted
    run's would.
    """

    def __init__(self, workdir: str, *, resume_epoch: int = 0, tensorboard: bool = True):
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = [r for r in read_metrics(workdir) if r.get("epoch", 0) <= resume_epoch]
        with open(self.path, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # imported lazily: optional at import

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, record: Mapping[str, Any]) -> None:
        record = _jsonable(dict(record))
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Writes ``payload`` atomically (rename), so a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(_jsonable(dict(payload)), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def plot_error_curves(
    curves: Mapping[str, Iterable[tuple[float, float]]],
    path: str,
    *,
    xlabel: str = "training wall-clock time (s)",
    ylabel: str = "test error (%)",
    title: str | None = None,
) -> None:
    """Line plot of several named (x, y) curves, saved to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, points in curves.items():
        points = list(points)
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_priorities(
    records: Iterable[Mapping[str, Any]],
    path: str,
    *,
    title: str | None = None,
    reference: Iterable[float] | None = None,
    class_names: Iterable[str] | None = None,
) -> None:
    """Priority of each class of examples per evaluated epoch (AdaptSB), saved as PNG.

    ``records`` are metrics.jsonl records (:func:`read_metrics`); those without a
    ``priorities`` list are skipped. ``reference`` (e.g. SB's binned curve,
    ``selection.adapt_sb.sb_bin_priorities``) is drawn dashed, one level per class.
    ``class_names`` label the lines (default "class k").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["epoch"], r["priorities"]) for r in records if "priorities" in r]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    if points:
        epochs = [e for e, _ in points]
        levels = list(zip(*(p for _, p in points), strict=True))
        colors = plt.cm.viridis([i / max(len(levels) - 1, 1) for i in range(len(levels))])
        names = list(class_names) if class_names is not None else [
            f"class {k}" for k in range(len(levels))
        ]
        for ys, color, name in zip(levels, colors, names, strict=True):
            ax.plot(epochs, ys, marker="o", markersize=3, color=color, label=name)
        if reference is not None:
            for level, color in zip(reference, colors, strict=True):
                ax.axhline(level, color=color, linestyle="--", linewidth=0.8, alpha=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("selection probability")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if points:  # Outside the axes: priorities span the whole [0, 1] range.
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class Progress:
    """Terminal progress: epoch, steps/s, examples/s and ETA from recent throughput."""

    def __init__(self, total_units: int, log_fn=print):
        self.total_units = total_units
        self.log_fn = log_fn
        self._t0 = time.perf_counter()
        self._done0 = None

    def update(self, units_done: int, *, epoch: int, steps_per_s: float, extra: str = "") -> None:
        now = time.perf_counter()
        if self._done0 is None:
            self._done0, self._t0 = units_done, now
            rate = float("nan")
        else:
            rate = (units_done - self._done0) / max(now - self._t0, 1e-9)
        remaining = self.total_units - units_done
        eta = remaining / rate if rate and rate > 0 and math.isfinite(rate) else float("nan")
        eta_txt = "?" if not math.isfinite(eta) else time.strftime("%H:%M:%S", time.gmtime(eta))
        pct = 100.0 * units_done / max(self.total_units, 1)
        self.log_fn(
            f"epoch {epoch} | {pct:5.1f}% | {steps_per_s:6.2f} steps/s | ETA {eta_txt} {extra}"
        )
