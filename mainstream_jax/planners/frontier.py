"""Shared pieces of the frontier searches: option dominance, LP bounds, Pareto pruning."""

from __future__ import annotations

import numpy as np

from mainstream_jax.planners import common


def undominated_options(table: common.OptionTable) -> np.ndarray:
    """bool [N, Ka, R]: options not dominated by another option of the same app.

    o' dominates o when it needs no more of the stem (k' <= k and fps' <= fps), costs no
    more (branch cost, and branch bytes under a memory budget) and gives at least the
    benefit; exact ties keep the first option.
    """
    n, num_k, num_r = table.benefit.shape
    kk, rr = np.meshgrid(table.k_index, np.arange(num_r), indexing="ij")
    kk, rr = kk.reshape(-1), rr.reshape(-1)
    cost = table.branch_cost.reshape(-1)
    nbytes = np.repeat(table.branch_bytes, num_r)
    use_bytes = np.isfinite(table.memory_budget)
    # [O', O]: option o' (rows) needs no more and costs no more than option o (cols).
    weaker = (kk[:, None] <= kk[None, :]) & (rr[:, None] <= rr[None, :])
    weaker &= cost[:, None] <= cost[None, :]
    if use_bytes:
        weaker &= nbytes[:, None] <= nbytes[None, :]
    np.fill_diagonal(weaker, False)
    strictly = (kk[:, None] < kk[None, :]) | (rr[:, None] < rr[None, :])
    strictly |= cost[:, None] < cost[None, :]
    if use_bytes:
        strictly |= nbytes[:, None] < nbytes[None, :]
    index = np.arange(kk.size)
    earlier = index[:, None] < index[None, :]
    b = table.benefit.reshape(n, -1)
    better = b[:, :, None] > b[:, None, :]  # [N, O', O]
    equal = b[:, :, None] == b[:, None, :]
    dominated = (weaker[None] & (better | (equal & (strictly | earlier)[None]))).any(axis=1)
    return ~dominated.reshape(n, num_k, num_r)


def upper_hull(cost: np.ndarray, util: np.ndarray):
    """Upper concave hull of points (cost, util), from the cheapest point up.

    Returns (base_cost, base_util, steps [S, 2] of (d_cost, d_util), slopes decreasing).
    """
    finite = np.isfinite(util)
    cost, util = cost[finite], util[finite]
    order = np.lexsort((-util, cost))
    pts: list[tuple[float, float]] = []
    for c, u in zip(cost[order], util[order], strict=True):
        if pts and u <= pts[-1][1]:
            continue  # costs more, gives no more
        while len(pts) >= 2:
            (c1, u1), (c2, u2) = pts[-2], pts[-1]
            if (u2 - u1) * (c - c1) <= (u - u1) * (c2 - c1):
                pts.pop()
            else:
                break
        pts.append((float(c), float(u)))
    steps = np.array([(pts[j + 1][0] - pts[j][0], pts[j + 1][1] - pts[j][1])
                      for j in range(len(pts) - 1)]).reshape(-1, 2)
    return pts[0][0], pts[0][1], steps


class SuffixBound:
    """LP bound of the knapsack over apps j..N-1 (branch costs only), for every j."""

    def __init__(self, util: np.ndarray, cost: np.ndarray, maxmin: bool):
        n = util.shape[0]
        self.maxmin = maxmin
        self.base_cost = np.zeros(n + 1)
        self.base_util = np.zeros(n + 1)
        self.xs: list[np.ndarray] = [np.zeros(1)] * (n + 1)
        self.ys: list[np.ndarray] = [np.zeros(1)] * (n + 1)
        # For max-min: the best benefit any remaining app can reach alone.
        self.best_alone = np.full(n + 1, np.inf)
        hulls = [upper_hull(cost, util[i]) for i in range(n)]
        for j in range(n - 1, -1, -1):
            self.best_alone[j] = min(self.best_alone[j + 1], float(np.max(util[j])))
            self.base_cost[j] = self.base_cost[j + 1] + hulls[j][0]
            self.base_util[j] = self.base_util[j + 1] + hulls[j][1]
            steps = np.concatenate([h[2] for h in hulls[j:]], axis=0)
            if steps.shape[0]:
                slope = steps[:, 1] / np.maximum(steps[:, 0], 1e-300)
                steps = steps[np.argsort(-slope, kind="stable")]
                self.xs[j] = np.concatenate([[0.0], np.cumsum(steps[:, 0])])
                self.ys[j] = np.concatenate([[0.0], np.cumsum(steps[:, 1])])

    def slope(self, j: int, budget_left: np.ndarray) -> np.ndarray:
        """d bound / d budget at ``budget_left`` for apps j.. (the LP's budget price)."""
        xs, ys = self.xs[j], self.ys[j]
        if xs.size < 2:
            return np.zeros_like(budget_left)
        slopes = np.diff(ys) / np.maximum(np.diff(xs), 1e-300)
        k = np.searchsorted(xs, budget_left - self.base_cost[j], side="right") - 1
        return np.where(k >= slopes.size, 0.0, slopes[np.clip(k, 0, slopes.size - 1)])

    def __call__(self, j: int, value: np.ndarray, budget_left: np.ndarray) -> np.ndarray:
        """Upper bound on the final objective from states with ``value`` after j apps."""
        spare = budget_left - self.base_cost[j]
        feasible = spare >= -1e-9 * max(1.0, float(np.max(np.abs(budget_left), initial=1.0)))
        if self.maxmin:
            bound = np.minimum(value, self.best_alone[j])
        else:
            bound = value + self.base_util[j] + np.interp(spare, self.xs[j], self.ys[j])
        return np.where(feasible, bound, -np.inf)


def pack(stem: np.ndarray, bits: int) -> list[np.ndarray]:
    """Stem level rows [M, T] as a few int64 sort keys (``bits`` bits per segment)."""
    per_word = max(1, 62 // bits)
    words = []
    for lo in range(0, stem.shape[1], per_word):
        block = stem[:, lo : lo + per_word].astype(np.int64)
        shifts = np.arange(block.shape[1], dtype=np.int64) * bits
        words.append((block << shifts).sum(axis=1))
    return words


def pareto(keys: list[np.ndarray], cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of states not dominated (cost <=, value >=) by another with equal keys."""
    order = np.lexsort((-value, cost, *keys[::-1]))
    start = np.zeros(order.size, bool)
    start[0] = True
    for k in keys:
        sk = k[order]
        start[1:] |= sk[1:] != sk[:-1]
    g = np.cumsum(start) - 1
    v = value[order]
    span = float(v.max() - v.min()) + 1.0
    shifted = v + g * span  # groups ascend: the running max restarts per group
    prev = np.r_[-np.inf, np.maximum.accumulate(shifted)[:-1]]
    keep = start | (shifted > prev + 1e-13)
    return order[keep]
