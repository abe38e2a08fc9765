r"""Planning time against the number of apps, and the heuristics' gap to ``exact``.

  python -m benchmarks.mainstream_planning_time --out=benchmarks/results/mainstream/planning_time

For each N, ``--setups`` random setups (the paper's generator) at each of ``--budgets``
are planned by every planner; wall time is measured around the planner call (the option
table, i.e. the event model, is built inside it). ``exact`` gets ``--exact_time_limit_s``
per problem and is dropped for larger N once more than half of an N's problems hit the
limit or its state cap: that N is where it stops scaling. Writes ``runs.csv``,
``summary.json`` and ``planning_time.png``.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import time

import numpy as np
from absl import app, flags, logging

from mainstream_jax import planners, profiles, scenarios

_NUM_APPS = flags.DEFINE_list(
    "num_apps",
    ["1", "2", "3", "4", "5", "6", "8", "10", "12", "15", "20", "25", "30", "40", "50", "75",
     "100"],
    "Numbers of apps.",
)
_BUDGETS = flags.DEFINE_list("budgets", ["50", "150", "300"], "Budgets.")
_SETUPS = flags.DEFINE_integer("setups", 3, "Random setups per N.")
_SEED = flags.DEFINE_integer("seed", 123, "Seed of the setups.")
_PLANNERS = flags.DEFINE_list(
    "planners", ["greedy", "max_sharing", "no_sharing", "mainstream", "exact"], "Planners."
)
_MIP_MAX_APPS = flags.DEFINE_integer(
    "mip_max_apps", 8, "Also time the exact_mip cross-check up to this N (0: never)."
)
_EXACT_LIMIT = flags.DEFINE_float("exact_time_limit_s", 30.0, "Per-problem limit for exact.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)

FIELDS = ("planner", "num_apps", "budget", "setup", "seconds", "score", "feasible", "optimal")


def _time(problem, name, options):
    start = time.perf_counter()
    try:
        sched = planners.plan(problem, name, options)
    except planners.InfeasibleError:
        return time.perf_counter() - start, None
    return time.perf_counter() - start, sched


def main(argv):
    del argv
    os.makedirs(_OUT.value, exist_ok=True)
    library = profiles.load_mobilenet()
    options = planners.PlannerOptions(time_limit_s=_EXACT_LIMIT.value)
    names = list(_PLANNERS.value)
    exact_alive = {"exact": True, "exact_mip": True}
    stopped_at = {}
    rows = []
    start_all = time.perf_counter()
    for n in (int(x) for x in _NUM_APPS.value):
        run_names = names + (["exact_mip"] if n <= _MIP_MAX_APPS.value else [])
        gave_up = {k: 0 for k in exact_alive}
        tried = {k: 0 for k in exact_alive}
        for setup in range(_SETUPS.value):
            for budget in (float(b) for b in _BUDGETS.value):
                problem = scenarios.random_problem(library, n, setup, budget, seed=_SEED.value)
                for name in run_names:
                    if name in exact_alive and not exact_alive[name]:
                        continue
                    seconds, sched = _time(problem, name, options)
                    optimal = ""
                    if name in exact_alive and sched is not None:
                        tried[name] += 1
                        optimal = int(bool(sched.stats.get("optimal", False)))
                        gave_up[name] += 1 - optimal
                    rows.append({
                        "planner": name, "num_apps": n, "budget": budget, "setup": setup,
                        "seconds": seconds, "score": "" if sched is None else sched.score,
                        "feasible": int(sched is not None), "optimal": optimal,
                    })
        for name in exact_alive:
            if exact_alive[name] and tried[name] and gave_up[name] * 2 > tried[name]:
                exact_alive[name] = False
                stopped_at[name] = n
        logging.info("N=%d done (%.0f s)", n, time.perf_counter() - start_all)
    with open(os.path.join(_OUT.value, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    summary.update(
        exact_stops_scaling_at=stopped_at,
        exact_time_limit_s=_EXACT_LIMIT.value,
        total_wall_s=time.perf_counter() - start_all,
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
                "(shared with other jobs)",
    )
    with open(os.path.join(_OUT.value, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot(summary, os.path.join(_OUT.value, "planning_time.png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "per_n"}, indent=1))


def summarize(rows):
    per_n = {}
    by_key = {(r["planner"], r["num_apps"], r["budget"], r["setup"]): r for r in rows}
    for n in sorted({r["num_apps"] for r in rows}):
        entry = {}
        for name in sorted({r["planner"] for r in rows if r["num_apps"] == n}):
            secs = np.array([r["seconds"] for r in rows
                             if r["planner"] == name and r["num_apps"] == n])
            entry[name] = {"median_s": float(np.median(secs)), "max_s": float(secs.max()),
                           "runs": int(secs.size)}
        for name in ("mainstream", "greedy"):
            gaps = []
            for (p, nn, b, s), r in by_key.items():
                ex = by_key.get(("exact", nn, b, s))
                if p != name or nn != n or ex is None or not ex["optimal"] or not r["feasible"]:
                    continue
                gaps.append((ex["score"] - r["score"]) / max(ex["score"], 1e-12))
            if gaps:
                entry[name]["gap_to_exact_mean"] = float(np.mean(gaps))
                entry[name]["gap_to_exact_max"] = float(np.max(gaps))
        per_n[n] = entry
    return {"per_n": per_n}


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    per_n = summary["per_n"]
    names = sorted({name for entry in per_n.values() for name in entry})
    for name in names:
        pts = [(n, e[name]["median_s"], e[name]["max_s"]) for n, e in per_n.items()
               if name in e]
        xs, med, mx = zip(*sorted(pts), strict=True)
        line, = ax.plot(xs, med, "o-", label=f"{name} (median)", markersize=3)
        ax.plot(xs, mx, ":", color=line.get_color(), linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.axhline(10.0, color="grey", linewidth=0.5)
    ax.set_xlabel("number of apps")
    ax.set_ylabel("planning time (s); dotted: max")
    ax.set_title("Planning time per problem (MobileNet profiles, 10 fps)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    app.run(main)
