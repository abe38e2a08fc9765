"""The paper's greedy heuristic (docs/SPEC.md section 3), vectorised.

Start every app at the largest allowed k and the smallest fps. Each iteration looks at
every app and every option (k', phi') of it, keeps those that lower that app's metric
(1 - benefit) and keep the whole schedule within budget, and applies the one with the
highest (1 - benefit') / (lambda[k':] * phi') -- the original's ratio: the metric *after*
the move over the new branch's cost, so cheap small steps go first. Ties go to the first
candidate in the original's scan order (apps in order, fps ascending, then k
ascending). It stops when no move is left.

All moves are scored at once per iteration: the cost of replacing one app's option is
the others' stem (a top-2 per segment gives each app's "stem without me") maxed with the
new option's prefix, plus branches; O(N * K * R * T) numbers per iteration.
"""

from __future__ import annotations

import numpy as np

from mainstream_jax import profiles, schedule
from mainstream_jax.planners import common


def _without_each(values: np.ndarray) -> np.ndarray:
    """For values [N, T]: the column max over all rows but row i, as [N, T] (0 if N == 1)."""
    n = values.shape[0]
    if n == 1:
        return np.zeros_like(values)
    top2 = np.partition(values, n - 2, axis=0)[n - 2 :]  # [2, T]: second, first largest
    first = top2[1]
    arg = values.argmax(axis=0)
    out = np.broadcast_to(first, values.shape).copy()
    out[arg, np.arange(values.shape[1])] = top2[0]
    return out


def move_costs(table: common.OptionTable, a: np.ndarray, r: np.ndarray):
    """Cost and memory of the schedule after moving app i to option (a', r').

    Returns (cost [N, Ka, R], memory [N, Ka] or None): every app, every option, with the
    other apps fixed at (a, r).
    """
    kidx = table.k_index[a]  # chokepoint index per app
    phi = table.fps[r]
    seg = table.costs.segment_cost  # [T]
    num_segments = seg.shape[0]
    t = np.arange(1, num_segments + 1)
    rates = np.where(kidx[:, None] >= t[None, :], phi[:, None], 0.0)  # [N, T]
    others = _without_each(rates)  # [N, T]
    # Stem cost with a new option (c, phi'): segments 1..c at max(others, phi'), the rest
    # at others.
    raised = np.maximum(others[:, None, :], table.fps[None, :, None]) * seg  # [N, R, T]
    head = np.concatenate([np.zeros(raised.shape[:2] + (1,)), np.cumsum(raised, -1)], -1)
    rest = others * seg  # [N, T]
    tail = np.concatenate([np.cumsum(rest[:, ::-1], -1)[:, ::-1], np.zeros((rest.shape[0], 1))],
                          -1)  # [N, T+1]: sum over t > j
    c = table.k_index  # [Ka]
    stem = head[:, :, c].transpose(0, 2, 1) + tail[:, c][:, :, None]  # [N, Ka, R]
    branch_now = table.branch_cost[a, r]  # [N]
    cost = stem + branch_now.sum() - branch_now[:, None, None] + table.branch_cost[None]
    memory = None
    if np.isfinite(table.memory_budget):
        deepest_others = _without_each(kidx[:, None].astype(np.float64))[:, 0].astype(np.int64)
        deepest = np.maximum(deepest_others[:, None], c[None, :])  # [N, Ka]
        bytes_now = table.branch_bytes[a]
        memory = (
            table.costs.prefix_bytes[deepest]
            + bytes_now.sum()
            - bytes_now[:, None]
            + table.branch_bytes[None, :]
        )
    return cost, memory


def _others_and_deepest(table: common.OptionTable, a: np.ndarray, r: np.ndarray):
    """Per app: the stem rates of all *other* apps [N, T] and their deepest chokepoint."""
    kidx = table.k_index[a]
    t = np.arange(1, table.num_segments + 1)
    rates = np.where(kidx[:, None] >= t[None, :], table.fps[r][:, None], 0.0)
    deepest = _without_each(kidx[:, None].astype(np.float64))[:, 0].astype(np.int64)
    return _without_each(rates), deepest


def candidate_costs(table, others, deepest, a, r, app, new_a, new_r):
    """Cost and memory after moving each listed app to one option: the others fixed.

    ``app``, ``new_a``, ``new_r`` are [M] arrays; returns (cost [M], memory [M] or None).
    """
    seg = table.costs.segment_cost
    t = np.arange(1, seg.shape[0] + 1)
    kidx_new = table.k_index[new_a]
    phi_new = table.fps[new_r]
    rates = np.where(t[None, :] <= kidx_new[:, None],
                     np.maximum(others[app], phi_new[:, None]), others[app])
    branch_now = table.branch_cost[a, r]
    cost = rates @ seg + branch_now.sum() - branch_now[app] + table.branch_cost[new_a, new_r]
    memory = None
    if np.isfinite(table.memory_budget):
        bytes_now = table.branch_bytes[a]
        memory = (
            table.costs.prefix_bytes[np.maximum(deepest[app], kidx_new)]
            + bytes_now.sum()
            - bytes_now[app]
            + table.branch_bytes[new_a]
        )
    return cost, memory


def greedy_search(
    table: common.OptionTable, a: np.ndarray | None = None, r: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Runs the greedy from (a, r) (default: the cheapest plan); returns (a, r, moves).

    The ratio of a move does not depend on the rest of the schedule, so candidates are
    sorted by it once (ties in the original's scan order) and each iteration checks
    feasibility only down that list until the first improving move that fits: the same
    move the full scan picks.
    """
    if a is None or r is None:
        a, r = common.cheapest_plan(table)
    a, r = a.copy(), r.copy()
    n, num_k, num_r = table.benefit.shape
    rows = np.arange(n)
    metric = (1.0 - table.benefit) * table.weights[:, None, None]  # [N, Ka, R]
    bc = np.broadcast_to(table.branch_cost[None], metric.shape)
    ratio = np.where(bc > 0, metric / np.where(bc > 0, bc, 1.0), np.where(metric > 0, np.inf, 0))
    # Scan order of the original: app, then fps, then k. Only ratios > 0 ever win (the
    # original's running max starts at 0).
    ratio_scan = ratio.transpose(0, 2, 1).reshape(-1)
    keep = np.flatnonzero(ratio_scan > 0)
    order = keep[np.lexsort((keep, -ratio_scan[keep]))]
    cand_app, rem = np.divmod(order, num_r * num_k)
    cand_r, cand_a = np.divmod(rem, num_k)
    cand_benefit = table.benefit[cand_app, cand_a, cand_r]
    moves = 0
    while True:
        improving = np.flatnonzero(cand_benefit > table.benefit[rows, a, r][cand_app])
        if improving.size == 0:
            return a, r, moves
        others, deepest = _others_and_deepest(table, a, r)
        chosen = -1
        lo, size = 0, 32
        while lo < improving.size:
            pos = improving[lo : lo + size]
            cost, memory = candidate_costs(
                table, others, deepest, a, r, cand_app[pos], cand_a[pos], cand_r[pos]
            )
            ok = common.fits(cost, table.budget)
            if memory is not None:
                ok &= common.fits(memory, table.memory_budget)
            hit = np.flatnonzero(ok)
            if hit.size:
                chosen = int(pos[hit[0]])
                break
            lo += size
            size *= 4
        if chosen < 0:
            return a, r, moves
        i = cand_app[chosen]
        a[i], r[i] = cand_a[chosen], cand_r[chosen]
        moves += 1


def _plan(problem: profiles.Problem, table: common.OptionTable, name: str) -> schedule.Schedule:
    common.check_feasible(table, name)
    a, r, moves = greedy_search(table)
    return schedule.build_schedule(
        problem, table.k_index[a], table.fps[r], planner=name, stats={"moves": moves}
    )


def greedy(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """The paper's greedy over every chokepoint and fps 1..F."""
    table = common.build_table(problem, fps=common.sharing_fps(problem, options))
    return _plan(problem, table, "greedy")


def max_sharing(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """k fixed to the largest chokepoint (only the layers after it are app-specific);
    fps chosen by the same greedy search, as in the original."""
    k_last = problem.network.chokepoints.size - 1
    table = common.build_table(
        problem, k_index=np.array([k_last]), fps=common.sharing_fps(problem, options)
    )
    return _plan(problem, table, "max_sharing")


def no_sharing(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """k fixed to 0 (every app runs the whole network); fps from 0.1..0.9 and 1..F by the
    same greedy search, as in the original."""
    table = common.build_table(
        problem, k_index=np.array([0]), fps=common.no_sharing_fps(problem, options)
    )
    return _plan(problem, table, "no_sharing")
