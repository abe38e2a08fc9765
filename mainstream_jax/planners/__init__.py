"""Planners: pure functions ``(problem, options) -> Schedule``, in a registry.

A new planner is one function with that signature plus one entry in :data:`PLANNERS`.
"""

from __future__ import annotations

from collections.abc import Callable

from mainstream_jax import profiles, schedule
from mainstream_jax.planners.common import (
    InfeasibleError,
    OptionTable,
    PlannerOptions,
    build_table,
)
from mainstream_jax.planners.exact_dp import exact
from mainstream_jax.planners.mip import exact_mip
from mainstream_jax.planners.paper_greedy import greedy, max_sharing, no_sharing
from mainstream_jax.planners.stem_search import mainstream

Planner = Callable[[profiles.Problem, PlannerOptions], schedule.Schedule]

PLANNERS: dict[str, Planner] = {
    "greedy": greedy,
    "max_sharing": max_sharing,
    "no_sharing": no_sharing,
    "exact": exact,
    "exact_mip": exact_mip,
    "mainstream": mainstream,
}


def plan(
    problem: profiles.Problem,
    planner: str = "mainstream",
    options: PlannerOptions | None = None,
) -> schedule.Schedule:
    """Runs a registered planner by name."""
    if planner not in PLANNERS:
        raise ValueError(f"unknown planner {planner!r}; choose one of {sorted(PLANNERS)}")
    return PLANNERS[planner](problem, options or PlannerOptions())


__all__ = [
    "InfeasibleError",
    "OptionTable",
    "PLANNERS",
    "Planner",
    "PlannerOptions",
    "build_table",
    "exact",
    "exact_mip",
    "greedy",
    "mainstream",
    "max_sharing",
    "no_sharing",
    "plan",
]
