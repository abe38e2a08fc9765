r"""The Mainstream paper's experiment: mean event F1 per planner, number of apps, budget.

  python -m experiments.mainstream_sweep --planners=greedy,max_sharing,no_sharing,mainstream,exact \
      --num_apps=2,3,4,5,6,7,8,9,10,15,20,25 --budgets=50,100,150,200,250,300 --setups=100 \
      --seed=0 --exact_max_apps=10 --out=benchmarks/results/mainstream/sweep

Writes setups.csv, summary.csv, summary.json and the plots to --out (see
mainstream_jax/sweep.py). An interrupted sweep resumes from setups.csv when rerun with the
same flags.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags, logging

from mainstream_jax import sweep

_PLANNERS = flags.DEFINE_list(
    "planners", ["greedy", "max_sharing", "no_sharing", "mainstream"], "Planners to run."
)
_NUM_APPS = flags.DEFINE_list("num_apps", ["2", "3", "4", "5", "6", "7", "8", "9", "10", "15",
                                           "20", "25"], "Numbers of apps.")
_BUDGETS = flags.DEFINE_list("budgets", ["50", "100", "150", "200", "250", "300"], "Budgets.")
_SETUPS = flags.DEFINE_integer("setups", 100, "Random setups per number of apps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random setups.")
_EXACT_MAX_APPS = flags.DEFINE_integer(
    "exact_max_apps", 10, "Run the exact planners only up to this many apps."
)
_EVENT_MODEL = flags.DEFINE_enum("event_model", "faithful", ["faithful", "corrected"],
                                 "Event-model form.")
_OBJECTIVE = flags.DEFINE_enum("objective", "f1", ["f1", "fnr", "fdr", "maxmin_f1"],
                               "Objective.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", None, "Per-problem limit for exact planners.")
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)


def main(argv):
    del argv
    try:
        config = sweep.SweepConfig(
            planners=tuple(_PLANNERS.value),
            num_apps=tuple(int(n) for n in _NUM_APPS.value),
            budgets=tuple(float(b) for b in _BUDGETS.value),
            setups=_SETUPS.value,
            seed=_SEED.value,
            exact_max_apps=_EXACT_MAX_APPS.value,
            event_model=_EVENT_MODEL.value,
            objective=_OBJECTIVE.value,
            time_limit_s=_TIME_LIMIT.value,
        )
        config.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    start = time.perf_counter()

    def progress(done, total, row):
        if done % 200 == 0 or done == total:
            logging.info("%d/%d runs (%.0f s): last %s N=%d B=%g setup %d F1=%.4f", done, total,
                         time.perf_counter() - start, row["planner"], row["num_apps"],
                         row["budget"], row["setup"], row["mean_f1"])

    try:
        rows = sweep.run_sweep(config, _OUT.value, progress=progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = sweep.write_outputs(rows, config, _OUT.value)
    headline = {k: v["max"] for k, v in summary["ratios"].items()}
    print(json.dumps({"wall_s": time.perf_counter() - start, "headline": headline,
                      "gap_to_exact": {k: {kk: vv for kk, vv in v.items() if kk != "cells"}
                                       for k, v in summary["gap_to_exact"].items()},
                      "plots": summary["plots"]}, indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
