"""``exact_mip``: an independent optimal planner, a staircase-stem MIP solved by HiGHS.

It cross-checks ``exact`` (:mod:`.exact_dp`) in the tests; ``exact`` is faster and more
predictable (HiGHS's LP relaxation is weak at small budgets, where fractional options
share a stem fractionally), so it is the one the experiments use.

The original enumerated stems (lists of (chokepoint, fps) with chokepoints increasing
and fps decreasing) and ran a Pareto-frontier DP over apps per stem: minutes at 3 apps,
hours at 6-9. Here the stem is a set of variables instead of an enumeration:

* x[i, o] in {0, 1}: app i takes option o = (chokepoint a, fps r); one per app.
* y[t, r] in [0, 1]: segment t of the base network (layers [c_{t-1}, c_t)) runs at rate
  >= fps[r]. The stem's cost is sum_t lambda_t sum_r (fps[r] - fps[r-1]) y[t, r] -- a
  staircase, so "max over apps" becomes linear.
* Linking, per app (the disaggregated form, tighter than one row per (t, r)):
  y[t, r] >= sum of x[i, o] over options o of app i with chokepoint >= c_t and fps >= fps[r].
* Budget: branches + stem <= B; memory (optional): branch bytes + sum_t bytes_t y[t, 0]
  <= M (segment t is resident iff any app still shares it).
* Objective: max sum_i w_i b_i(o) x[i, o]; for max-min F1: max z with z <= b_i for all i.

Options that are dominated whatever the other apps do (another option of the same app
with no more stem, no more branch cost or bytes, and at least the benefit) are dropped
first. The ``mainstream`` heuristic's schedule is the incumbent: the answer is the better
of it and the MIP's, so it never returns less than ``mainstream``. The MIP is
solved with a zero relative gap; its answer is re-checked with this package's own cost
model and re-solved under a slightly tighter budget if HiGHS's feasibility tolerance let
it overshoot.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sparse
from scipy import optimize

from mainstream_jax import profiles, schedule
from mainstream_jax.planners import common, frontier, stem_search


def solve_mip(
    table: common.OptionTable,
    *,
    budget: float,
    time_limit_s: float | None = None,
    lower_bound: float | None = None,
):
    """Solves the MIP under ``budget``; returns ((a, r) or None, stats).

    ``lower_bound`` optionally cuts off every plan scoring below it.
    """
    n, num_k, num_r = table.benefit.shape
    keep = frontier.undominated_options(table)
    app_idx, opt_a, opt_r = np.nonzero(keep)
    num_x = app_idx.size
    kidx = table.k_index[opt_a]
    num_t = int(table.k_index.max())
    num_y = num_t * num_r
    maxmin = table.maxmin
    num_vars = num_x + num_y + (1 if maxmin else 0)
    benefit = table.benefit[app_idx, opt_a, opt_r]

    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []
    lo: list[np.ndarray] = []
    hi: list[np.ndarray] = []
    row = 0
    # One option per app.
    rows.append(app_idx.astype(np.int64))
    cols.append(np.arange(num_x))
    vals.append(np.ones(num_x))
    lo.append(np.ones(n))
    hi.append(np.ones(n))
    row += n
    # Linking: y[t, r] - sum_{o of i: kidx >= t, r_o >= r} x[i, o] >= 0 for each i, t, r.
    if num_t > 0:
        t_grid, r_grid = np.meshgrid(np.arange(1, num_t + 1), np.arange(num_r), indexing="ij")
        t_grid, r_grid = t_grid.reshape(-1), r_grid.reshape(-1)  # [num_y]
        # [num_x, num_y]: option covers (t, r).
        covers = (kidx[:, None] >= t_grid[None, :]) & (opt_r[:, None] >= r_grid[None, :])
        for i in range(n):
            mine = np.flatnonzero(app_idx == i)
            cov = covers[mine]  # [Oi, num_y]
            used = np.flatnonzero(cov.any(axis=0))
            if used.size == 0:
                continue
            opt_pos, y_pos = np.nonzero(cov[:, used].T)  # y-major
            row_ids = row + opt_pos
            rows += [row_ids, row + np.arange(used.size)]
            cols += [mine[y_pos], num_x + used]
            vals += [-np.ones(row_ids.size), np.ones(used.size)]
            lo.append(np.zeros(used.size))
            hi.append(np.full(used.size, np.inf))
            row += used.size
    # Budget (scaled to O(1)).
    step = np.diff(np.concatenate([[0.0], table.fps]))
    y_cost = (table.costs.segment_cost[:num_t, None] * step[None, :]).reshape(-1)
    x_cost = table.branch_cost[opt_a, opt_r]
    rows.append(np.full(num_x + num_y, row))
    cols.append(np.arange(num_x + num_y))
    vals.append(np.concatenate([x_cost, y_cost]) / budget)
    lo.append(np.array([-np.inf]))
    hi.append(np.array([1.0]))
    row += 1
    if np.isfinite(table.memory_budget):
        y_bytes = np.zeros((num_t, num_r))
        y_bytes[:, 0] = table.costs.segment_bytes[:num_t]
        rows.append(np.full(num_x + num_y, row))
        cols.append(np.arange(num_x + num_y))
        vals.append(
            np.concatenate([table.branch_bytes[opt_a], y_bytes.reshape(-1)]) / table.memory_budget
        )
        lo.append(np.array([-np.inf]))
        hi.append(np.array([1.0]))
        row += 1
    objective = np.zeros(num_vars)
    if maxmin:
        # z - sum_o b_io x_io <= 0 for each app; maximise z.
        rows += [app_idx + row, np.arange(n) + row]
        cols += [np.arange(num_x), np.full(n, num_vars - 1)]
        vals += [-benefit, np.ones(n)]
        lo.append(np.full(n, -np.inf))
        hi.append(np.zeros(n))
        row += n
        objective[-1] = -1.0
    else:
        objective[:num_x] = -table.weights[app_idx] * benefit
    if lower_bound is not None:
        # Cut off everything worse than the incumbent (helps pruning).
        score_row = objective.copy()
        rows.append(np.full(num_vars, row))
        cols.append(np.arange(num_vars))
        vals.append(-score_row)
        lo.append(np.array([lower_bound - 1e-9]))
        hi.append(np.array([np.inf]))
        row += 1
    matrix = sparse.csr_array(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(row, num_vars),
    )
    integrality = np.zeros(num_vars)
    integrality[:num_x] = 1
    upper = np.ones(num_vars)
    if maxmin:
        upper[-1] = 1.0
    opts = {"mip_rel_gap": 0.0}
    if time_limit_s is not None:
        opts["time_limit"] = float(time_limit_s)
    res = optimize.milp(
        objective,
        integrality=integrality,
        bounds=optimize.Bounds(np.zeros(num_vars), upper),
        constraints=optimize.LinearConstraint(matrix, np.concatenate(lo), np.concatenate(hi)),
        options=opts,
    )
    stats = {
        "mip_objective": None if res.x is None else -float(res.fun),
        "mip_status": int(res.status),
        "mip_message": str(res.message),
        "num_options": int(num_x),
        "num_rows": int(row),
    }
    if res.x is None:
        return None, stats
    x = res.x[:num_x]
    a = np.zeros(n, np.int64)
    r = np.zeros(n, np.int64)
    for i in range(n):
        mine = np.flatnonzero(app_idx == i)
        best = mine[np.argmax(x[mine])]
        a[i], r[i] = opt_a[best], opt_r[best]
    stats["optimal"] = res.status == 0
    return (a, r), stats


def exact_search(
    table: common.OptionTable,
    incumbent: tuple[np.ndarray, np.ndarray] | None = None,
    time_limit_s: float | None = None,
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """The optimal plan for an option table (grid indices) and solver statistics."""
    start = time.perf_counter()
    budget = table.budget
    stats: dict = {}
    best = incumbent
    for attempt in range(4):
        remaining = None
        if time_limit_s is not None:
            remaining = max(0.01, time_limit_s - (time.perf_counter() - start))
        # No incumbent cutoff: in trials it made HiGHS slower as often as faster.
        plan, stats = solve_mip(table, budget=budget, time_limit_s=remaining)
        stats["attempts"] = attempt + 1
        if plan is None:  # out of time before a first solution
            stats["optimal"] = False
            break
        if not verify or bool(table.feasible(*plan)):
            if best is None or table.score(*plan) >= table.score(*best):
                best = plan
            break
        # HiGHS's feasibility tolerance let the cost overshoot: tighten and solve again.
        overshoot = float(table.cost(*plan)) - table.budget
        budget = budget - max(overshoot, 1e-9 * table.budget) * 2.0
    if best is None:
        raise common.InfeasibleError("exact: the solver found no feasible schedule")
    stats["solve_s"] = time.perf_counter() - start
    return best[0], best[1], stats


def exact_mip(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """The optimal schedule by the MIP (an independent check on ``exact``)."""
    table = common.build_table(problem, fps=common.sharing_fps(problem, options))
    common.check_feasible(table, "exact_mip")
    incumbent = stem_search.mainstream_search(table, options)
    a, r, stats = exact_search(
        table, incumbent=incumbent, time_limit_s=options.time_limit_s,
    )
    return schedule.build_schedule(
        problem, table.k_index[a], table.fps[r], planner="exact_mip", stats=stats
    )
