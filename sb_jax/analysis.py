"""Turning runs' metrics into the paper's comparisons: time to a target error, speedups.

Pure functions over lists of metric records (the dicts of metrics.jsonl), and over a
trained model's per-example losses (where the mislabeled examples sit).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Record = Mapping[str, Any]

TARGET_OFFSETS = (0.25, 0.5, 1.0)  # points of test error above traditional's final error


def first_reaching(records: Sequence[Record], target_error: float, key: str) -> float | None:
    """``key`` (e.g. wall_s, examples_backward) at the first evaluation with
    test_error <= target_error, or None if the run never gets there."""
    for record in records:
        if record["test_error"] <= target_error:
            return float(record[key])
    return None


def targets_from_baseline(baseline_runs: Sequence[Sequence[Record]],
                          offsets: Sequence[float] = TARGET_OFFSETS) -> dict[str, float]:
    """Targets = the baseline's final test error (mean over its seeds) + each offset."""
    finals = [runs[-1]["test_error"] for runs in baseline_runs if runs]
    if not finals:
        raise ValueError("the baseline has no evaluated runs to define targets from")
    base = sum(finals) / len(finals)
    return {f"+{offset:g}": base + offset for offset in offsets}


def _mean(values: Sequence[float | None]) -> float | None:
    """Mean over seeds; None if any seed missed (a missed target has no time)."""
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def summarize_policy(runs: Sequence[Sequence[Record]], targets: Mapping[str, float]
                     ) -> dict[str, Any]:
    """Per-target mean time/backprops to reach it, and final/best error, over seeds."""
    out: dict[str, Any] = {
        "seeds": len(runs),
        "final_test_error": _mean([r[-1]["test_error"] for r in runs]),
        "best_test_error": _mean([min(x["test_error"] for x in r) for r in runs]),
        "wall_s": _mean([r[-1]["wall_s"] for r in runs]),
        "examples_backward": _mean([r[-1]["examples_backward"] for r in runs]),
        "examples_scored": _mean([r[-1].get("examples_scored", 0) for r in runs]),
        "to_target": {},
    }
    for name, target in targets.items():
        out["to_target"][name] = {
            "target_error": target,
            "wall_s": _mean([first_reaching(r, target, "wall_s") for r in runs]),
            "examples_backward": _mean(
                [first_reaching(r, target, "examples_backward") for r in runs]
            ),
        }
    return out


def add_speedups(summaries: dict[str, dict[str, Any]], baseline: str) -> None:
    """Adds baseline/policy ratios of time and backprops to each target, in place."""
    base = summaries[baseline]["to_target"]
    for summary in summaries.values():
        for name, entry in summary["to_target"].items():
            for key in ("wall_s", "examples_backward"):
                ref, value = base[name][key], entry[key]
                entry[f"speedup_{key}"] = (
                    ref / value if ref is not None and value not in (None, 0) else None
                )


def format_table(summaries: Mapping[str, Mapping[str, Any]], targets: Mapping[str, float]
                 ) -> str:
    """A fixed-width text table: final error and wall-clock speedup to each target."""
    names = list(targets)
    header = f"{'policy':<14}{'final err %':>12}{'wall s':>9}" + "".join(
        f"{'speedup ' + n:>15}" for n in names
    ) + "".join(f"{'bwd x ' + n:>13}" for n in names)
    lines = [header, "-" * len(header)]

    def fmt(value, width, spec):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return f"{'missed':>{width}}"
        return f"{value:>{width}{spec}}"

    for policy, s in summaries.items():
        row = f"{policy:<14}" + fmt(s["final_test_error"], 12, ".2f") + fmt(s["wall_s"], 9, ".0f")
        row += "".join(fmt(s["to_target"][n].get("speedup_wall_s"), 15, ".2f") for n in names)
        row += "".join(
            fmt(s["to_target"][n].get("speedup_examples_backward"), 13, ".2f") for n in names
        )
        lines.append(row)
    lines.append("targets (test error %): " + ", ".join(f"{n}: {t:.2f}"
                                                      for n, t in targets.items()))
    return "\n".join(lines)


def noise_by_loss_percentile(
    losses: Any, label_rank: Any, noisy: Any, edges: Sequence[float]
) -> list[dict[str, Any]]:
    """Where the mislabeled examples sit in a model's loss distribution.

    ``losses`` float [N]: per-example loss against the training labels; ``label_rank``
    int [N]: how many classes the model ranks above the training label (0 = predicted);
    ``noisy`` bool [N]: the corrupted labels. For each percentile range
    ``[edges[j], edges[j+1])`` of the loss (the last one closed): its size, its share of
    mislabeled examples, the AUC with which the loss itself ranks mislabeled above clean
    inside the range (0.5 = no information; None if the range holds only one kind), and
    the mislabeled share per label rank. Ties in the loss share their rank.
    """
    losses = np.asarray(losses, np.float64)
    label_rank = np.asarray(label_rank)
    noisy = np.asarray(noisy, bool)
    n = losses.shape[0]
    if not (label_rank.shape == noisy.shape == (n,)):
        raise ValueError(f"losses, label_rank and noisy must all be [N]; got "
                         f"{losses.shape}, {label_rank.shape}, {noisy.shape}")
    edges = [float(e) for e in edges]
    if len(edges) < 2 or edges != sorted(edges) or edges[0] < 0 or edges[-1] > 1:
        raise ValueError(f"edges must be >= 2 increasing numbers in [0, 1], got {edges}")
    pct = np.searchsorted(np.sort(losses), losses, side="left") / n  # share strictly below
    rows = []
    for j, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        last = j == len(edges) - 2
        inside = (pct >= lo) & ((pct <= hi) if last else (pct < hi))
        lab, score = noisy[inside], losses[inside]
        pos, neg = int(lab.sum()), int((~lab).sum())
        auc = None
        if pos and neg:
            # Mann-Whitney U with average ranks for ties.
            order = np.argsort(score, kind="stable")
            ranks = np.empty(len(score))
            sorted_scores = score[order]
            start = 0
            for end in range(1, len(score) + 1):
                if end == len(score) or sorted_scores[end] != sorted_scores[start]:
                    ranks[order[start:end]] = 0.5 * (start + end - 1)
                    start = end
            auc = float((ranks[lab].sum() - pos * (pos - 1) / 2) / (pos * neg))
        by_rank = {int(r): {"count": int(np.sum(inside & (label_rank == r))),
                            "mislabeled_share": float(noisy[inside & (label_rank == r)].mean())}
                   for r in np.unique(label_rank[inside])}
        rows.append({"percentiles": [lo, hi], "count": int(inside.sum()),
                     "mislabeled_share": float(lab.mean()) if inside.any() else None,
                     "loss_auc": auc, "by_label_rank": by_rank})
    return rows
