"""``exact``: provably optimal planning by a Pareto-frontier DP over apps with the stem as
state, pruned by an LP upper bound against a near-optimal incumbent.

The original enumerated every stem and ran a DP over apps per stem: minutes at 3 apps,
hours at 6-9. Here the stem is built *by* the DP:

* A state after deciding apps 1..i is (stem, value, cost): the stem is the rate each base
  segment [c_{t-1}, c_t) runs at (the envelope of the chosen options), the value is the
  objective so far and the cost is the stem's cost plus the chosen branches'. Adding an
  option raises the stem on segments 1..k to its fps; the cost grows by the branch plus
  the stem's increase, so costs stay exact.
* States with the same stem are pruned to their Pareto frontier (lower cost and higher
  value dominate): every completion of the dominated one is open to the dominating one
  at the same extra cost.
* Branch and bound: a state is dropped when its value plus an upper bound on what the
  remaining apps can add cannot beat the incumbent (the ``mainstream`` schedule). The
  bound is the LP relaxation of the remaining apps' knapsack over branch costs alone
  (they may need more stem; never less), precomputed per suffix of apps as a concave
  piecewise-linear function of the budget left. Once states number in the hundreds, a
  per-state Lagrangian bound also charges each remaining option its share of the stem
  it would add (:func:`_state_bound`).
* Options dominated whatever the others do (another option of the same app needs no more
  stem, costs no more and gives at least as much) are dropped up front.
* Apps are taken in decreasing order of their utility range, which tightens the bound
  early (orders of magnitude fewer states than the given order on hard cases).

Exactness: all three prunings only drop states that cannot lead to a strictly better
schedule than one that is kept or than the incumbent. The result is the incumbent when
nothing beats it. With a memory budget the state also carries the branch bytes (states
are grouped by stem and bytes), and the stem's resident bytes follow from its depth.

It stops scaling where the frontier explodes: see benchmarks/results/mainstream/README.md.
A ``time_limit_s`` or ``max_states`` guard returns the incumbent with
``stats['optimal'] = False``.
"""

from __future__ import annotations

import time

import numpy as np

from mainstream_jax import profiles, schedule
from mainstream_jax.planners import common, frontier, stem_search

DEFAULT_MAX_STATES = 4_000_000
_STATE_BOUND_MIN = 500  # states below which the per-state bound is not worth its cost


def _state_bound(bound, i, n, keep, util, opt_cost, inc, value, cost, budget):
    """Lagrangian bound per state that also charges the stem the remaining apps need.

    Any completion by apps i..n-1 raises the stem by at least the largest single
    increase inc(o_j), hence by at least their mean: each option is charged its branch
    cost plus inc / (n - i). With the price mu of a unit of budget (any mu >= 0 gives an
    upper bound; the suffix LP's slope is a good one): value + mu * spare +
    sum_j max_o (u_jo - mu * (c_o + inc_o / (n - i))).
    """
    spare = budget - cost
    mu = bound.slope(i, spare)
    price = mu[:, None] * (opt_cost[None, :] + inc / (n - i))
    total = value + mu * spare
    for j in range(i, n):
        total = total + np.max(np.where(keep[j][None, :], util[j][None, :] - price, -np.inf),
                               axis=1)
    return total


def exact_search(
    table: common.OptionTable,
    incumbent: tuple[np.ndarray, np.ndarray],
    *,
    time_limit_s: float | None = None,
    max_states: int = DEFAULT_MAX_STATES,
    state_bound: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Optimal plan (grid indices a, r) for a table, given a feasible incumbent plan.

    ``state_bound`` also prunes states by :func:`_state_bound` once there are more than a
    few hundred (it costs O(states x options x remaining apps), and pays off on the hard
    cases: 3-4x fewer seconds at 15-25 apps).
    """
    start_time = time.perf_counter()
    n, num_k, num_r = table.benefit.shape
    num_t = table.num_segments
    seg = table.costs.segment_cost
    levels = np.concatenate([[0.0], table.fps])  # stem level 0 = segment not run
    keep = frontier.undominated_options(table).reshape(n, -1)
    util = table.benefit if table.maxmin else table.benefit * table.weights[:, None, None]
    util = util.reshape(n, -1)
    spread = np.where(keep, util, np.nan)
    order = np.argsort(-(np.nanmax(spread, 1) - np.nanmin(spread, 1)), kind="stable")
    util, keep = util[order], keep[order]
    opt_cost = table.branch_cost.reshape(-1)
    opt_k = np.repeat(table.k_index, num_r)  # chokepoint index of each option
    opt_level = np.tile(np.arange(1, num_r + 1), num_k)  # stem level it needs
    opt_bytes = np.repeat(table.branch_bytes, num_r)
    use_mem = np.isfinite(table.memory_budget)
    bound = frontier.SuffixBound(np.where(keep, util, -np.inf), opt_cost, table.maxmin)
    min_bytes_left = np.r_[
        np.cumsum([opt_bytes[keep[i]].min() for i in range(n)][::-1])[::-1], 0.0
    ]
    incumbent_score = float(table.score(*incumbent))
    cut = incumbent_score - 1e-12
    # Bounds see the budget as ``common.fits`` does (with its round-off slack), so they
    # never drop a completion that the feasibility test would accept.
    slack_budget = table.budget + 1e-9 * max(1.0, table.budget)
    seg_index = np.arange(1, num_t + 1)
    level_bits = int(num_r).bit_length()

    stem = np.zeros((1, num_t), np.int8)
    value = np.array([np.inf if table.maxmin else 0.0])
    cost = np.zeros(1)
    nbytes = np.zeros(1)
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    peak = 1
    stats = {"optimal": True}
    for i in range(n):
        opts = np.flatnonzero(keep[i])
        lev = stem.astype(np.int64)  # [M, T]
        # Stem cost increase if every segment up to t is raised to level l: [M, L, T+1].
        raise_to = np.arange(1, num_r + 1)
        extra = seg * (levels[np.maximum(lev[:, None, :], raise_to[None, :, None])]
                       - levels[lev[:, None, :]])
        extra = np.concatenate([np.zeros(extra.shape[:2] + (1,)), np.cumsum(extra, -1)], -1)
        if state_bound and not table.maxmin and i > 0 and value.size > _STATE_BOUND_MIN:
            alive = _state_bound(bound, i, n, keep, util, opt_cost,
                                 extra[:, opt_level - 1, opt_k], value, cost,
                                 slack_budget) > cut
            if not alive.all():
                stem, value, cost, nbytes = stem[alive], value[alive], cost[alive], (
                    nbytes[alive] if use_mem else nbytes)
                parents[-1], choices[-1] = parents[-1][alive], choices[-1][alive]
                lev, extra = lev[alive], extra[alive]
        new_cost = cost[:, None] + extra[:, opt_level[opts] - 1, opt_k[opts]] + opt_cost[opts]
        if table.maxmin:
            new_value = np.minimum(value[:, None], util[i, opts][None, :])
        else:
            new_value = value[:, None] + util[i, opts][None, :]
        ok = common.fits(new_cost, table.budget)
        ok &= bound(i + 1, new_value, slack_budget - new_cost) > cut
        new_bytes = None
        if use_mem:
            depth = np.maximum(
                np.where(lev > 0, seg_index, 0).max(axis=1)[:, None], opt_k[opts][None, :]
            )
            new_bytes = nbytes[:, None] + opt_bytes[opts][None, :]
            ok &= common.fits(
                new_bytes + table.costs.prefix_bytes[depth] + min_bytes_left[i + 1],
                table.memory_budget,
            )
        state, col = np.nonzero(ok)
        if state.size == 0:
            stats.update(states_peak=peak, reason="nothing beats the incumbent")
            return incumbent[0], incumbent[1], stats
        picked = opts[col]
        raised = np.where(seg_index[None, :] <= opt_k[picked][:, None],
                          np.maximum(lev[state], opt_level[picked][:, None]), lev[state])
        cand_cost = new_cost[state, col]
        cand_value = new_value[state, col]
        keys = frontier.pack(raised, level_bits)
        if use_mem:
            cand_bytes = new_bytes[state, col]
            keys.append(cand_bytes)
        kept = frontier.pareto(keys, cand_cost, cand_value)
        stem = raised[kept].astype(np.int8)
        value, cost = cand_value[kept], cand_cost[kept]
        if use_mem:
            nbytes = cand_bytes[kept]
        parents.append(state[kept])
        choices.append(picked[kept])
        peak = max(peak, int(kept.size))
        too_slow = time_limit_s is not None and time.perf_counter() - start_time > time_limit_s
        if kept.size > max_states or too_slow:
            stats.update(optimal=False, states_peak=peak,
                         reason="time limit" if too_slow else "state limit")
            return incumbent[0], incumbent[1], stats
    best = int(np.lexsort((cost, -value))[0])
    stats["states_peak"] = peak
    if value[best] <= incumbent_score:
        stats["reason"] = "the incumbent is optimal"
        return incumbent[0], incumbent[1], stats
    picked = np.zeros(n, np.int64)
    s = best
    for i in range(n - 1, -1, -1):
        picked[i] = choices[i][s]
        s = parents[i][s]
    a = np.zeros(n, np.int64)
    r = np.zeros(n, np.int64)
    a[order], r[order] = np.divmod(picked, num_r)
    stats["reason"] = "improved on the incumbent"
    return a, r, stats


def exact(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """The optimal schedule over every chokepoint and fps 1..F (see module docstring)."""
    table = common.build_table(problem, fps=common.sharing_fps(problem, options))
    common.check_feasible(table, "exact")
    start = time.perf_counter()
    incumbent = stem_search.mainstream_search(table, options)
    a, r, stats = exact_search(
        table, incumbent, time_limit_s=options.time_limit_s,
        max_states=options.exact_max_states,
    )
    stats["solve_s"] = time.perf_counter() - start
    return schedule.build_schedule(
        problem, table.k_index[a], table.fps[r], planner="exact", stats=stats
    )
