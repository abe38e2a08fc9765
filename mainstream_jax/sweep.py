"""The paper's experiment: mean event F1 per (planner, number of apps, budget).

For every number of apps N, ``setups`` random setups are drawn from the shipped scenario
generator (:mod:`mainstream_jax.scenarios`, stream at 10 fps); every setup is planned at
every budget by every planner. Outputs (:func:`write_outputs`):

* ``setups.csv``: one row per (planner, N, budget, setup): mean F1, cost, time, plan;
* ``summary.csv``: one row per (planner, N, budget): mean F1 over setups and more;
* ``summary.json``: the config, the table, the ratios mainstream / no_sharing and
  mainstream / max_sharing per cell with their maxima (the paper's headline numbers;
  the same for ``greedy``, the paper's own planner), and ``mainstream``'s and
  ``greedy``'s gap to ``exact`` where it ran;
* plots: mean F1 against budget at 3 apps, and against N at budgets 150 and 300.

A planner that cannot fit even its cheapest schedule in the budget (``no_sharing`` with
many apps at small budgets) is recorded with ``feasible = 0`` and mean F1 0: no app can
be served.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mainstream_jax import planners, profiles, scenarios

SETUP_FIELDS = (
    "planner", "num_apps", "budget", "setup", "feasible", "mean_f1", "objective_value",
    "total_cost", "planning_s", "optimal", "num_frozen", "fps",
)
SUMMARY_FIELDS = (
    "planner", "num_apps", "budget", "mean_f1", "std_f1", "setups", "infeasible",
    "mean_planning_s", "max_planning_s",
)
EXACT_PLANNERS = ("exact", "exact_mip")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to run. ``exact_max_apps`` bounds N for the exact planners."""

    planners: tuple[str, ...] = ("greedy", "max_sharing", "no_sharing", "mainstream")
    num_apps: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25)
    budgets: tuple[float, ...] = (50, 100, 150, 200, 250, 300)
    setups: int = 100
    seed: int = 0
    exact_max_apps: int = 10
    event_model: str = "faithful"
    objective: str = "f1"
    time_limit_s: float | None = None

    def validate(self) -> None:
        unknown = [p for p in self.planners if p not in planners.PLANNERS]
        if unknown:
            raise ValueError(
                f"unknown planners {unknown}; choose from {sorted(planners.PLANNERS)}"
            )
        if not self.planners:
            raise ValueError("planners: give at least one planner")
        if not self.num_apps or min(self.num_apps) < 1:
            raise ValueError(f"num_apps must be >= 1, got {list(self.num_apps)}")
        if not self.budgets or min(self.budgets) <= 0:
            raise ValueError(f"budgets must be > 0, got {list(self.budgets)}")
        if self.setups < 1:
            raise ValueError(f"setups must be >= 1, got {self.setups}")
        if self.objective not in profiles.OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; "
                             f"choose one of {profiles.OBJECTIVES}")
        if self.event_model not in profiles.EVENT_MODELS:
            raise ValueError(f"unknown event model {self.event_model!r}; "
                             f"choose one of {profiles.EVENT_MODELS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _runs(config: SweepConfig):
    for n in config.num_apps:
        for s in range(config.setups):
            for b in config.budgets:
                for p in config.planners:
                    if p in EXACT_PLANNERS and n > config.exact_max_apps:
                        continue
                    yield p, n, float(b), s


def run_one(
    library: profiles.ProfileLibrary, config: SweepConfig, planner: str, num_apps: int,
    budget: float, setup: int,
) -> dict[str, Any]:
    """Plans one (planner, N, budget, setup) and returns its ``setups.csv`` row."""
    problem = scenarios.random_problem(
        library, num_apps, setup, budget, seed=config.seed,
        objective=config.objective, event_model=config.event_model,
    )
    options = planners.PlannerOptions(time_limit_s=config.time_limit_s)
    row: dict[str, Any] = {"planner": planner, "num_apps": num_apps, "budget": budget,
                           "setup": setup}
    start = time.perf_counter()
    try:
        sched = planners.plan(problem, planner, options)
    except planners.InfeasibleError:
        row.update(feasible=0, mean_f1=0.0, objective_value=float("nan"),
                   total_cost=float("nan"), planning_s=time.perf_counter() - start,
                   optimal="", num_frozen="", fps="")
        return row
    row.update(
        feasible=1,
        mean_f1=sched.mean_f1,
        objective_value=sched.objective_value,
        total_cost=sched.total_cost,
        planning_s=time.perf_counter() - start,
        optimal=int(sched.stats["optimal"]) if "optimal" in sched.stats else "",
        num_frozen=" ".join(str(int(k)) for k in sched.num_frozen),
        fps=" ".join(f"{f:g}" for f in sched.fps),
    )
    return row


def _read_rows(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            r["num_apps"] = int(r["num_apps"])
            r["budget"] = float(r["budget"])
            r["setup"] = int(r["setup"])
            r["feasible"] = int(r["feasible"])
            for k in ("mean_f1", "objective_value", "total_cost", "planning_s"):
                r[k] = float(r[k])
            rows.append(r)
    return rows


def run_sweep(
    config: SweepConfig,
    out_dir: str,
    *,
    library: profiles.ProfileLibrary | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Runs (or resumes) the sweep, appending rows to ``out_dir/setups.csv``.

    Resuming needs the same config (``out_dir/config.json``); finished runs are kept.
    """
    config.validate()
    library = library or profiles.load_mobilenet()
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "config.json")
    rows_path = os.path.join(out_dir, "setups.csv")
    if os.path.exists(config_path) and os.path.exists(rows_path):
        with open(config_path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(config.to_dict())):
            raise ValueError(
                f"{out_dir} holds a sweep with another config ({config_path}); use a new "
                "--out directory or delete it"
            )
        rows = _read_rows(rows_path)
    else:
        with open(config_path, "w") as f:
            json.dump(config.to_dict(), f, indent=1)
        with open(rows_path, "w", newline="") as f:
            csv.DictWriter(f, SETUP_FIELDS).writeheader()
        rows = []
    done = {(r["planner"], r["num_apps"], r["budget"], r["setup"]) for r in rows}
    todo = [run for run in _runs(config) if run not in done]
    with open(rows_path, "a", newline="") as f:
        writer = csv.DictWriter(f, SETUP_FIELDS)
        for count, (p, n, b, s) in enumerate(todo, start=1):
            row = run_one(library, config, p, n, b, s)
            writer.writerow(row)
            f.flush()
            rows.append(row)
            if progress is not None:
                progress(count, len(todo), row)
    return rows


def summarize(rows: Sequence[dict[str, Any]], config: SweepConfig) -> dict[str, Any]:
    """Aggregates per-setup rows into the summary (see module docstring)."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        cells[(r["planner"], r["num_apps"], float(r["budget"]))].append(r)
    table = []
    mean = {}
    for (p, n, b), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        f1 = np.array([r["mean_f1"] for r in rs])
        secs = np.array([r["planning_s"] for r in rs])
        entry = {
            "planner": p, "num_apps": n, "budget": b, "mean_f1": float(f1.mean()),
            "std_f1": float(f1.std()), "setups": len(rs),
            "infeasible": int(sum(1 - int(r["feasible"]) for r in rs)),
            "mean_planning_s": float(secs.mean()), "max_planning_s": float(secs.max()),
        }
        table.append(entry)
        mean[(p, n, b)] = entry["mean_f1"]
    ratios = {}
    # The paper's "Mainstream" is its greedy; report both planners against both baselines.
    for top, base in itertools.product(("mainstream", "greedy"), ("no_sharing", "max_sharing")):
        cells_ratio = []
        for (p, n, b), m in mean.items():
            if p != top or (base, n, b) not in mean:
                continue
            denom = mean[(base, n, b)]
            cells_ratio.append({
                "num_apps": n, "budget": b, top: m, base: denom,
                "ratio": m / denom if denom > 0 else None,  # None: baseline F1 is 0
            })
        finite = [c for c in cells_ratio if c["ratio"] is not None]
        ratios[f"{top}/{base}"] = {
            "cells": cells_ratio,
            "max": max(finite, key=lambda c: c["ratio"]) if finite else None,
            "cells_where_baseline_f1_is_0": [
                (c["num_apps"], c["budget"]) for c in cells_ratio if c["ratio"] is None
            ],
        }
    by_setup = {(r["planner"], r["num_apps"], float(r["budget"]), r["setup"]): r for r in rows}
    gaps = {}
    for p in ("mainstream", "greedy"):
        per_cell = []
        for (q, n, b), _ in mean.items():
            if q != "exact":
                continue
            rel = []
            for s in range(config.setups):
                ex, other = by_setup.get(("exact", n, b, s)), by_setup.get((p, n, b, s))
                if ex is None or other is None or not ex["feasible"]:
                    continue
                e, o = float(ex["objective_value"]), float(other["objective_value"])
                if config.objective in ("fnr", "fdr"):  # minimised: gap = o - e
                    rel.append((o - e) / max(abs(e), 1e-12))
                else:
                    rel.append((e - o) / max(abs(e), 1e-12))
            if rel:
                per_cell.append({"num_apps": n, "budget": b, "mean_rel_gap": float(np.mean(rel)),
                                 "max_rel_gap": float(np.max(rel)), "setups": len(rel)})
        if per_cell:
            gaps[p] = {
                "cells": per_cell,
                "mean_rel_gap": float(np.mean([c["mean_rel_gap"] for c in per_cell])),
                "worst_cell_mean_rel_gap": float(max(c["mean_rel_gap"] for c in per_cell)),
                "max_rel_gap": float(max(c["max_rel_gap"] for c in per_cell)),
            }
    return {"config": config.to_dict(), "table": table, "ratios": ratios,
            "gap_to_exact": gaps}


def plot(summary: dict[str, Any], out_dir: str) -> list[str]:
    """Writes the paper-style plots; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = summary["table"]
    names = sorted({e["planner"] for e in table})
    style = {"mainstream": "o-", "greedy": "s--", "exact": "k+:", "exact_mip": "kx-.",
             "max_sharing": "^-", "no_sharing": "v-"}
    paths = []

    def series(planner, key_fixed, value_fixed, x_key):
        pts = sorted((e[x_key], e["mean_f1"]) for e in table
                     if e["planner"] == planner and e[key_fixed] == value_fixed)
        return [p[0] for p in pts], [p[1] for p in pts]

    num_apps = sorted({e["num_apps"] for e in table})
    budgets = sorted({e["budget"] for e in table})
    jobs = []
    if 3 in num_apps:
        jobs.append(("num_apps", 3, "budget", "budget (layer-cost units x frames/s)",
                     "Mean event F1 at 3 apps", "f1_vs_budget_3apps.png"))
    for b in (150.0, 300.0):
        if b in budgets:
            jobs.append(("budget", b, "num_apps", "number of apps",
                         f"Mean event F1 at budget {b:g}", f"f1_vs_apps_budget{b:g}.png"))
    for key_fixed, value_fixed, x_key, xlabel, title, fname in jobs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in names:
            xs, ys = series(p, key_fixed, value_fixed, x_key)
            if xs:
                ax.plot(xs, ys, style.get(p, "x-"), label=p, markersize=4)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean event F1")
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(rows: Sequence[dict[str, Any]], config: SweepConfig, out_dir: str):
    """Writes summary.csv, summary.json and the plots; returns the summary."""
    summary = summarize(rows, config)
    with open(os.path.join(out_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, SUMMARY_FIELDS)
        writer.writeheader()
        for e in summary["table"]:
            writer.writerow({k: e[k] for k in SUMMARY_FIELDS})
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=_json_default, allow_nan=False)
    summary["plots"] = plot(summary, out_dir)
    return summary


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(type(obj))
