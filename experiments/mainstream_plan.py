r"""Plans one Mainstream problem file and prints the schedule.

  python -m experiments.mainstream_plan \
      --problem=experiments/configs/mainstream_example_problem.json \
      [--planner=mainstream] [--budget=150] [--format=json|table]

The problem-file format is documented in mainstream_jax.profiles.PROBLEM_FILE_DOC (and in
WORKSPACE.md). Bad input exits with status 1 and a one-line error.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from mainstream_jax import planners, profiles

_PROBLEM = flags.DEFINE_string("problem", None, "JSON problem file.", required=True)
_PLANNER = flags.DEFINE_enum("planner", "mainstream", sorted(planners.PLANNERS), "Planner.")
_BUDGET = flags.DEFINE_float("budget", None, "Compute budget; overrides the file's.")
_MEMORY = flags.DEFINE_float(
    "memory_budget_mib", None, "Memory budget in MiB; overrides the file's."
)
_OBJECTIVE = flags.DEFINE_string("objective", None, "Overrides the file's objective.")
_EVENT_MODEL = flags.DEFINE_string("event_model", None, "faithful | corrected (override).")
_FORMAT = flags.DEFINE_enum("format", "json", ["json", "table"], "Output format.")
_TIME_LIMIT = flags.DEFINE_float("time_limit_s", None, "Time limit for the exact planners.")


def main(argv):
    del argv
    try:
        with open(_PROBLEM.value) as f:
            spec = json.load(f)
    except FileNotFoundError:
        print(f"error: {_PROBLEM.value}: no such problem file", file=sys.stderr)
        return 1
    except json.JSONDecodeError as e:
        print(f"error: {_PROBLEM.value}: not valid JSON ({e})", file=sys.stderr)
        return 1
    if isinstance(spec, dict):
        if _MEMORY.value is not None:
            spec["memory_budget_mib"] = _MEMORY.value
        if _OBJECTIVE.value is not None:
            spec["objective"] = _OBJECTIVE.value
        if _EVENT_MODEL.value is not None:
            spec["event_model"] = _EVENT_MODEL.value
    try:
        problem = profiles.problem_from_dict(spec, budget=_BUDGET.value)
        start = time.perf_counter()
        schedule = planners.plan(
            problem, _PLANNER.value, planners.PlannerOptions(time_limit_s=_TIME_LIMIT.value)
        )
        elapsed = time.perf_counter() - start
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if _FORMAT.value == "table":
        print(schedule.format_table())
        print(f"\nplanned in {elapsed:.3f} s")
    else:
        out = schedule.to_dict()
        out["planning_s"] = elapsed
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
