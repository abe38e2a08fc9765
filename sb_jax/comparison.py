"""Runs several selectors on one config and compares them the way the paper does.

Each (variant, seed) trains in its own sub-directory through :func:`train_and_evaluate`,
so an interrupted comparison resumes where it stopped and finished runs cost nothing on
a re-run. The result is a JSON-able dict: per variant, the final/best error, time and
backpropagated examples to the targets (the baseline's final error + 0.25/0.5/1 points)
and the speedups over the baseline.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import logging

from sb_jax import analysis, metrics_io, train


def run_variants(
    base: ml_collections.ConfigDict,
    variants: Mapping[str, Mapping[str, Any]],
    seeds: Sequence[int],
    workdir: str,
    before_each: Callable[[str, int], None] | None = None,
) -> dict[str, list[list[dict]]]:
    """Trains every variant (config overrides) for every seed; returns their records.

    Seeds are the outer loop, so each seed's variants run back to back: on a shared,
    noisy machine their wall-clock times are then measured under similar conditions.
    `before_each(name, seed)`, if given, is called just before each run starts (e.g. to
    measure the machine's step costs next to the run they will be compared with).
    """
    runs: dict[str, list[list[dict]]] = {name: [] for name in variants}
    for seed in seeds:
        for name, overrides in variants.items():
            config = copy.deepcopy(base)
            for key, value in overrides.items():
                config[key] = value
            config.seed = seed
            run_dir = os.path.join(workdir, f"{name}_seed{seed}")
            logging.info("=== %s, seed %d -> %s", name, seed, run_dir)
            if before_each is not None:
                before_each(name, seed)
            train.train_and_evaluate(config, run_dir)
            runs[name].append(metrics_io.read_metrics(run_dir))
    return runs


def compare(runs: Mapping[str, Sequence[Sequence[dict]]], baseline: str = "traditional"
            ) -> dict[str, Any]:
    """Targets from the baseline, per-variant summaries and speedups."""
    if baseline not in runs:
        raise ValueError(f"the baseline {baseline!r} is not among the runs {sorted(runs)}")
    targets = analysis.targets_from_baseline(runs[baseline])
    summaries = {name: analysis.summarize_policy(r, targets) for name, r in runs.items()}
    analysis.add_speedups(summaries, baseline)
    return {"baseline": baseline, "targets": targets, "policies": summaries}


def plot_runs(runs: Mapping[str, Sequence[Sequence[dict]]], out_dir: str, title: str) -> list[str]:
    """Plots test error against wall-clock time and against backpropagated examples:
    one colour per variant, one line style per seed. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    paths = []
    for key, label, fname in (
        ("wall_s", "training wall-clock time (s)", "error_vs_time.png"),
        ("examples_backward", "backpropagated examples", "error_vs_backprops.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
        for v, (name, seeds) in enumerate(runs.items()):
            for i, records in enumerate(seeds):
                ax.plot([r[key] for r in records], [r["test_error"] for r in records],
                        color=colours(v % 10), linestyle=styles[i % len(styles)], marker="o",
                        markersize=2.5, label=name if i == 0 else None)
        ax.set_xlabel(label)
        ax.set_ylabel("test error (%)")
        ax.set_title(f"{title} (line style = seed)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
