"""Mainstream (Jiang et al., USENIX ATC 2018) as a pure planning library.

Given apps that fine-tune one shared base network, their profiled accuracy curves, the
base network's per-layer costs and a compute budget, choose per app the number of frozen
(shared) layers and the sampling rate that maximise mean event F1. See WORKSPACE.md
("Mainstream planner") and docs/SPEC.md section 3.

    from mainstream_jax import load_problem, plan
    schedule = plan(load_problem("experiments/configs/mainstream_example_problem.json"))
    print(schedule.format_table())
"""

from mainstream_jax import cost_model, event_model, planners, profiles, scenarios, schedule
from mainstream_jax.planners import PLANNERS, InfeasibleError, PlannerOptions, plan
from mainstream_jax.profiles import (
    AppProfile,
    BaseNetwork,
    Problem,
    load_mobilenet,
    load_problem,
    make_app,
    make_network,
    make_problem,
    problem_from_dict,
)
from mainstream_jax.schedule import Schedule

__all__ = [
    "PLANNERS",
    "AppProfile",
    "BaseNetwork",
    "InfeasibleError",
    "PlannerOptions",
    "Problem",
    "Schedule",
    "cost_model",
    "event_model",
    "load_mobilenet",
    "load_problem",
    "make_app",
    "make_network",
    "make_problem",
    "plan",
    "planners",
    "problem_from_dict",
    "profiles",
    "scenarios",
    "schedule",
]
