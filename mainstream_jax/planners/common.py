"""What every planner shares: options, the per-problem option table, feasibility."""

from __future__ import annotations

import dataclasses

import numpy as np

from mainstream_jax import cost_model, event_model, profiles

NO_SHARING_FRACTIONAL_FPS = tuple(round(0.1 * i, 1) for i in range(1, 10))


class InfeasibleError(ValueError):
    """The budget (or memory budget) is below the cheapest schedule a planner can make."""


def fits(value, limit) -> np.ndarray:
    """value <= limit up to float round-off (relative 1e-9); ``limit`` may be inf."""
    limit = np.asarray(limit, np.float64)
    return np.asarray(value) <= limit + 1e-9 * np.maximum(1.0, np.abs(limit))


@dataclasses.dataclass(frozen=True)
class PlannerOptions:
    """Options shared by the planners (each reads the ones it needs).

    Attributes:
      fps_options: sampling rates the sharing planners may choose; default 1..F.
      no_sharing_fractional_fps: also allow 0.1..0.9 frames/s for ``no_sharing`` (the
        original's baseline does).
      time_limit_s: wall-clock limit for the exact planners (None: none). When it is hit
        the best schedule known is returned with ``stats['optimal'] = False``.
      exact_max_states: ``exact`` gives up (returning ``mainstream``'s schedule, flagged
        not optimal) when its frontier grows past this many states.
    """

    fps_options: tuple[float, ...] | None = None
    no_sharing_fractional_fps: bool = True
    time_limit_s: float | None = None
    exact_max_states: int = 4_000_000


DEFAULT_OPTIONS = PlannerOptions()


@dataclasses.dataclass(frozen=True, eq=False)
class OptionTable:
    """Every (app, chokepoint, fps) option of a problem, evaluated once.

    Options form the grid ``k_index`` x ``fps`` (the same for all apps). ``k_index``
    indexes the network's chokepoints; costs refer to the whole chokepoint list.
    """

    problem: profiles.Problem
    k_index: np.ndarray  # int64 [Ka], increasing
    fps: np.ndarray  # float64 [R], increasing
    metrics: event_model.EventMetrics  # each [N, Ka, R]
    benefit: np.ndarray  # float64 [N, Ka, R]: what the objective aggregates
    weights: np.ndarray  # float64 [N], summing to 1 (mean objectives)
    maxmin: bool
    costs: cost_model.ChokepointCosts
    branch_cost: np.ndarray  # float64 [Ka, R]: lambda[c_k:] * fps
    branch_bytes: np.ndarray  # float64 [Ka]
    budget: float
    memory_budget: float  # inf when none

    @property
    def num_apps(self) -> int:
        return self.benefit.shape[0]

    @property
    def num_segments(self) -> int:
        return self.costs.segment_cost.shape[0]

    def score(self, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        """Objective score of plans given as grid indices (a: into k_index, r: into fps);
        batched over leading axes ([..., N] -> [...])."""
        b = self.benefit[np.arange(self.num_apps), a, r]
        if self.maxmin:
            return b.min(axis=-1)
        return (b * self.weights).sum(axis=-1)

    def cost(self, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        return cost_model.chokepoint_schedule_cost(self.k_index[a], self.fps[r], self.costs)

    def memory(self, a: np.ndarray) -> np.ndarray:
        return cost_model.chokepoint_schedule_memory(self.k_index[a], self.costs)

    def feasible(self, a: np.ndarray, r: np.ndarray) -> np.ndarray:
        ok = fits(self.cost(a, r), self.budget)
        if np.isfinite(self.memory_budget):
            ok = ok & fits(self.memory(a), self.memory_budget)
        return ok


def build_table(
    problem: profiles.Problem,
    *,
    k_index: np.ndarray | None = None,
    fps: tuple[float, ...] | np.ndarray | None = None,
) -> OptionTable:
    """Evaluates the event and cost models once for a planner's option grid."""
    net = problem.network
    k_index = (
        np.arange(net.chokepoints.size) if k_index is None else np.asarray(k_index, np.int64)
    )
    if fps is None:
        fps = np.arange(1, problem.stream_fps + 1, dtype=np.float64)
    fps = np.unique(np.asarray(fps, np.float64))
    if fps.size == 0 or fps[0] <= 0 or fps[-1] > problem.stream_fps:
        raise ValueError(
            f"fps options must lie in (0, stream_fps={problem.stream_fps}], got {fps.tolist()}"
        )
    metrics_all = event_model.problem_metrics(problem, fps)
    metrics = event_model.EventMetrics(*(m[:, k_index, :] for m in metrics_all))
    benefit = event_model.benefit(metrics, problem.objective)
    weights = np.array([a.weight for a in problem.apps], np.float64)
    costs = cost_model.chokepoint_costs(net.layer_costs, net.chokepoints, net.layer_bytes)
    return OptionTable(
        problem=problem,
        k_index=k_index,
        fps=fps,
        metrics=metrics,
        benefit=benefit,
        weights=weights / weights.sum(),
        maxmin=problem.objective == "maxmin_f1",
        costs=costs,
        branch_cost=costs.branch_cost[k_index][:, None] * fps[None, :],
        branch_bytes=costs.branch_bytes[k_index],
        budget=problem.budget,
        memory_budget=(
            np.inf if problem.memory_budget_bytes is None else problem.memory_budget_bytes
        ),
    )


def cheapest_plan(table: OptionTable) -> tuple[np.ndarray, np.ndarray]:
    """Every app at the largest allowed k and the lowest fps: the minimum of both cost and
    memory over the option grid (a product set), in grid indices."""
    n = table.num_apps
    return np.full(n, table.k_index.size - 1), np.zeros(n, np.int64)


def check_feasible(table: OptionTable, planner: str) -> None:
    """Raises :class:`InfeasibleError` when not even the cheapest plan fits."""
    a, r = cheapest_plan(table)
    k = int(table.problem.network.chokepoints[table.k_index[-1]])
    phi = float(table.fps[0])
    cost = float(table.cost(a, r))
    if not fits(cost, table.budget):
        raise InfeasibleError(
            f"budget {table.budget:g} is too small for planner {planner!r}: its cheapest "
            f"schedule (all {table.num_apps} apps at k={k}, fps={phi:g}) costs {cost:.4f}; "
            f"raise the budget to at least {cost:.4f}"
        )
    if np.isfinite(table.memory_budget):
        mem = float(table.memory(a))
        if not fits(mem, table.memory_budget):
            raise InfeasibleError(
                f"memory budget {table.memory_budget / profiles.MIB:.3f} MiB is too small for "
                f"planner {planner!r}: its smallest schedule (all apps at k={k}) needs "
                f"{mem / profiles.MIB:.3f} MiB ({mem:.0f} bytes); raise it to at least that"
            )


def sharing_fps(problem: profiles.Problem, options: PlannerOptions) -> np.ndarray:
    if options.fps_options is not None:
        return np.asarray(options.fps_options, np.float64)
    return np.arange(1, problem.stream_fps + 1, dtype=np.float64)


def no_sharing_fps(problem: profiles.Problem, options: PlannerOptions) -> np.ndarray:
    fps = sharing_fps(problem, options)
    if options.no_sharing_fractional_fps:
        fps = np.concatenate([np.asarray(NO_SHARING_FRACTIONAL_FPS), fps])
    return fps
