"""``mainstream``: this project's planner. Near-exact at any number of apps, and never
below the paper's greedy on the same problem.

Three stages, all vectorised over apps and options:

1. **Greedy seed.** The paper's greedy (:mod:`.paper_greedy`); its plan is a candidate,
   so the result can never score below it.
2. **Stem search.** Fixing the shared stem (the rate each base segment runs at) makes
   the apps independent except for the budget: a multiple-choice knapsack. For a stem,
   every app may take any option the stem already feeds (k <= depth at a rate <= the
   segment rate); a Lagrangian relaxation (bisection on the price of a unit of budget,
   each app then picks its best option alone) plus a greedy fill of the leftover budget
   solves that knapsack to within about one app's step. Every one-step stem (a depth and
   a rate: 150 for MobileNet at 10 fps) is scored this way, then the best ones are
   grown into multi-step stems by coordinate ascent (raise a prefix or lower a suffix of
   the stem to one fps level). On the best two stems the knapsack is then solved exactly
   (a Pareto DP over apps pruned by the LP bound; skipped if its frontier gets large).
3. **Polish.** Best-improvement local search on the true cost model: repeatedly apply
   the single-app change that raises the objective most and still fits (the stem may
   grow or shrink), until none is left.

The best candidate after polishing wins. With a memory budget, the knapsack also prices
branch bytes (a second multiplier) and every step checks the memory model.
"""

from __future__ import annotations

import numpy as np

from mainstream_jax import profiles, schedule
from mainstream_jax.planners import common, frontier
from mainstream_jax.planners import paper_greedy as greedy_lib

_BISECT_STEPS = 40


def _allowed(table: common.OptionTable, rates: np.ndarray) -> np.ndarray:
    """bool [Ka, R]: options a stem (rates per segment, non-increasing) already feeds."""
    kidx = table.k_index
    seg_rate = np.where(kidx > 0, rates[np.maximum(kidx - 1, 0)], np.inf)  # [Ka]
    return seg_rate[:, None] >= table.fps[None, :] - 1e-12


def _stem_cost_bytes(table: common.OptionTable, rates: np.ndarray) -> tuple[float, float]:
    cost = float(rates @ table.costs.segment_cost)
    used = np.flatnonzero(rates > 0)
    depth = 0 if used.size == 0 else int(used[-1]) + 1
    return cost, float(table.costs.prefix_bytes[depth])


class StemKnapsack:
    """Solves the per-stem knapsack of a table, many stems in a row.

    Options dominated for an app whatever the stem (see ``frontier.undominated_options``)
    are masked out once. The Lagrange multiplier of the previous stem seeds the next
    bisection, since neighbouring stems have similar prices.
    """

    def __init__(self, table: common.OptionTable):
        self.table = table
        n, num_k, num_r = table.benefit.shape
        self.cost = table.branch_cost.reshape(-1)  # [O]
        self.nbytes = np.repeat(table.branch_bytes, num_r)  # [O]
        keep = frontier.undominated_options(table).reshape(n, -1)
        if table.maxmin:
            util = table.benefit.reshape(n, -1)
        else:
            util = table.benefit.reshape(n, -1) * table.weights[:, None]
        self.util = np.where(keep, util, -np.inf)
        finite = self.util[np.isfinite(self.util)]
        spread = float(np.ptp(finite)) + 1e-12
        self.mu_scale = spread / max(float(self.cost.min()), 1e-12)
        positive = self.nbytes[self.nbytes > 0]
        self.nu_scale = spread / (float(positive.min()) if positive.size else 1.0)
        self.mu_hint = self.mu_scale

    def _choose(self, util, mu: float, nu: float) -> np.ndarray:
        return np.argmax(util - (mu * self.cost + nu * self.nbytes), axis=1)

    def _smallest_mu(self, util, budget: float, nu: float) -> np.ndarray:
        """The Lagrangian choice at (about) the smallest price that fits the budget."""
        cost = self.cost
        choice = self._choose(util, 0.0, nu)
        if common.fits(cost[choice].sum(), budget):
            return choice
        lo, hi = self.mu_hint / 8.0, self.mu_hint * 8.0
        while True:  # bracket: lo does not fit, hi fits
            choice = self._choose(util, lo, nu)
            if not common.fits(cost[choice].sum(), budget) or lo < 1e-12 * self.mu_scale:
                break
            lo /= 8.0
        while True:
            best = self._choose(util, hi, nu)
            if common.fits(cost[best].sum(), budget) or hi > 1e12 * self.mu_scale:
                break
            lo, hi = hi, hi * 8.0
        for _ in range(_BISECT_STEPS):
            if hi <= lo * (1.0 + 1e-3):
                break
            mid = np.sqrt(lo * hi) if lo > 0 else 0.5 * hi
            choice = self._choose(util, mid, nu)
            if common.fits(cost[choice].sum(), budget):
                hi, best = mid, choice
            else:
                lo = mid
        self.mu_hint = hi
        return best

    def solve(self, rates: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Near-optimal plan (a, r) using only options the stem feeds; None if none fits."""
        table = self.table
        n, num_k, num_r = table.benefit.shape
        allowed = _allowed(table, rates).reshape(-1)
        stem_cost, stem_bytes = _stem_cost_bytes(table, rates)
        budget = table.budget - stem_cost
        mem_budget = table.memory_budget - stem_bytes
        use_mem = np.isfinite(mem_budget)
        cost, nbytes = self.cost, self.nbytes
        util = np.where(allowed[None, :], self.util, -np.inf)
        if not np.isfinite(util).any(axis=1).all():
            return None
        if table.maxmin:
            return _maxmin_for_stem(table, util, cost, nbytes, budget, mem_budget)
        # If the cheapest allowed option of every app does not fit, the stem is out.
        cheapest = np.argmin(np.where(np.isfinite(util), cost + 1e-12 * nbytes, np.inf), axis=1)
        if not common.fits(cost[cheapest].sum(), budget) or (
            use_mem and not common.fits(nbytes[cheapest].sum(), mem_budget)
        ):
            return None
        choice = self._smallest_mu(util, budget, 0.0)
        if use_mem and not common.fits(nbytes[choice].sum(), mem_budget):
            lo, hi = 0.0, self.nu_scale
            while True:
                best = self._smallest_mu(util, budget, hi)
                if common.fits(nbytes[best].sum(), mem_budget) or hi > 1e12 * self.nu_scale:
                    break
                lo, hi = hi, hi * 4.0
            for _ in range(_BISECT_STEPS // 2):
                mid = 0.5 * (lo + hi)
                choice = self._smallest_mu(util, budget, mid)
                if common.fits(nbytes[choice].sum(), mem_budget):
                    hi, best = mid, choice
                else:
                    lo = mid
            choice = best
        if not common.fits(cost[choice].sum(), budget) or (
            use_mem and not common.fits(nbytes[choice].sum(), mem_budget)
        ):
            choice = cheapest
        choice = self._fill(util, choice, budget, mem_budget)
        return np.divmod(choice, num_r)

    def solve_exact(
        self, rates: np.ndarray, cut: float, max_states: int = 100_000
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The optimal plan under a fixed stem if it scores above ``cut``, else None.

        A Pareto DP over apps (cost, value; grouped by branch bytes under a memory
        budget) pruned by the LP bound of the remaining apps. Gives up (None) past
        ``max_states`` states. Mean objectives only (max-min is exact by bisection).
        """
        table = self.table
        if table.maxmin:
            return None
        num_r = table.fps.size
        allowed = _allowed(table, rates).reshape(-1)
        stem_cost, stem_bytes = _stem_cost_bytes(table, rates)
        budget = table.budget - stem_cost
        mem_budget = table.memory_budget - stem_bytes
        use_mem = np.isfinite(mem_budget)
        util = np.where(allowed[None, :], self.util, -np.inf)
        if not np.isfinite(util).any(axis=1).all():
            return None
        spread = np.where(np.isfinite(util), util, np.nan)
        order = np.argsort(-(np.nanmax(spread, 1) - np.nanmin(spread, 1)), kind="stable")
        util = util[order]
        bound = frontier.SuffixBound(util, self.cost, False)
        value, cost, nbytes = np.zeros(1), np.zeros(1), np.zeros(1)
        parents, choices = [], []
        for i in range(util.shape[0]):
            opts = np.flatnonzero(np.isfinite(util[i]))
            new_cost = cost[:, None] + self.cost[opts][None, :]
            new_value = value[:, None] + util[i, opts][None, :]
            ok = common.fits(new_cost, budget) & (bound(i + 1, new_value, budget - new_cost) > cut)
            if use_mem:
                new_bytes = nbytes[:, None] + self.nbytes[opts][None, :]
                ok &= common.fits(new_bytes, mem_budget)
            state, col = np.nonzero(ok)
            if state.size == 0:
                return None
            keys = [new_bytes[state, col] if use_mem else np.zeros(state.size)]
            kept = frontier.pareto(keys, new_cost[state, col], new_value[state, col])
            if kept.size > max_states:
                return None
            state, col = state[kept], col[kept]
            value, cost = new_value[state, col], new_cost[state, col]
            if use_mem:
                nbytes = new_bytes[state, col]
            parents.append(state)
            choices.append(opts[col])
        best = int(np.lexsort((cost, -value))[0])
        picked = np.zeros(util.shape[0], np.int64)
        for i in range(util.shape[0] - 1, -1, -1):
            picked[i] = choices[i][best]
            best = parents[i][best]
        choice = np.zeros_like(picked)
        choice[order] = picked
        return np.divmod(choice, num_r)

    def _fill(self, util, choice, budget, mem_budget) -> np.ndarray:
        """Spend the leftover budget: repeatedly the single upgrade with the largest gain
        that still fits."""
        cost, nbytes = self.cost, self.nbytes
        n = util.shape[0]
        rows = np.arange(n)
        use_mem = np.isfinite(mem_budget)
        choice = choice.copy()
        for _ in range(4 * n):
            spare = budget - cost[choice].sum()
            gain = util - util[rows, choice][:, None]
            fits = cost[None, :] - cost[choice][:, None] <= spare + 1e-9 * max(1.0, abs(budget))
            if use_mem:
                spare_b = mem_budget - nbytes[choice].sum()
                fits &= nbytes[None, :] - nbytes[choice][:, None] <= spare_b + 1e-9 * mem_budget
            gain = np.where(fits, gain, -np.inf)
            flat = int(np.argmax(gain))
            i, o = divmod(flat, gain.shape[1])
            if not gain[i, o] > 1e-15:
                break
            choice[i] = o
        return choice


def _maxmin_for_stem(table, util, cost, nbytes, budget, mem_budget):
    """Max-min benefit knapsack for a stem: bisection on the floor every app must reach."""
    num_r = table.fps.size
    levels = np.unique(util[np.isfinite(util)])
    use_mem = np.isfinite(mem_budget)
    weight = cost / max(budget, 1e-12) + (nbytes / mem_budget if use_mem else 0.0)

    def plan_for(level: float):
        ok = util >= level
        if not ok.any(axis=1).all():
            return None
        choice = np.argmin(np.where(ok, weight[None, :], np.inf), axis=1)
        if not common.fits(cost[choice].sum(), budget):
            return None
        if use_mem and not common.fits(nbytes[choice].sum(), mem_budget):
            return None
        return choice

    lo, hi = 0, levels.size - 1
    best = plan_for(levels[0])
    if best is None:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        choice = plan_for(levels[mid])
        if choice is None:
            hi = mid - 1
        else:
            lo, best = mid, choice
    return np.divmod(best, num_r)


def polish(table: common.OptionTable, a: np.ndarray, r: np.ndarray, max_moves: int = 10_000):
    """Best-improvement single-app local search on the true cost (and memory) model."""
    a, r = a.copy(), r.copy()
    n = table.num_apps
    rows = np.arange(n)
    for _ in range(max_moves):
        cost, memory = greedy_lib.move_costs(table, a, r)
        ok = common.fits(cost, table.budget)
        if memory is not None:
            ok &= common.fits(memory, table.memory_budget)[:, :, None]
        current = table.benefit[rows, a, r]
        if table.maxmin:
            # The objective after moving app i is min(min over the other apps, new benefit).
            if n == 1:
                others = np.full(1, np.inf)
            else:
                others = -greedy_lib._without_each(-current[:, None])[:, 0]
            gain = np.minimum(others[:, None, None], table.benefit) - current.min()
        else:
            gain = (table.benefit - current[:, None, None]) * table.weights[:, None, None]
        gain = np.where(ok, gain, -np.inf)
        flat = int(np.argmax(gain))
        if not gain.reshape(-1)[flat] > 1e-13:
            break
        i, rem = divmod(flat, gain.shape[1] * gain.shape[2])
        a[i], r[i] = divmod(rem, gain.shape[2])
    return a, r


def _one_step_stems(table: common.OptionTable) -> list[np.ndarray]:
    num_t = table.num_segments
    deepest = int(table.k_index.max())
    stems = [np.zeros(num_t)]
    for t in range(1, deepest + 1):
        for phi in table.fps:
            rates = np.zeros(num_t)
            rates[:t] = phi
            stems.append(rates)
    return stems


def _neighbours(table: common.OptionTable, rates: np.ndarray) -> list[np.ndarray]:
    """Stems one step away: raise a prefix or lower a suffix to one fps level."""
    out = []
    deepest = int(table.k_index.max())
    levels = np.concatenate([[0.0], table.fps])
    for t in range(1, deepest + 1):
        for phi in levels:
            raised = rates.copy()
            raised[:t] = np.maximum(raised[:t], phi)
            lowered = rates.copy()
            lowered[t - 1 :] = np.minimum(lowered[t - 1 :], phi)
            for cand in (raised, lowered):
                if not np.array_equal(cand, rates):
                    out.append(cand)
    uniq = {c.tobytes(): c for c in out}
    return list(uniq.values())


def mainstream_search(
    table: common.OptionTable,
    options: common.PlannerOptions = common.DEFAULT_OPTIONS,
    *,
    beam: int = 2,
    max_rounds: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """The plan (grid indices a, r) of the ``mainstream`` planner for an option table."""
    del options  # Deterministic; nothing to configure yet.
    candidates = []
    ga, gr, _ = greedy_lib.greedy_search(table)
    candidates.append((ga, gr))

    knapsack = StemKnapsack(table)
    scored: list[tuple[float, bytes, np.ndarray, tuple]] = []
    seen: set[bytes] = set()

    def consider(rates: np.ndarray):
        key = rates.tobytes()
        if key in seen:
            return
        seen.add(key)
        plan = knapsack.solve(rates)
        if plan is None:
            return
        scored.append((float(table.score(*plan)), key, rates, plan))

    for rates in _one_step_stems(table):
        consider(rates)
    # Grow the best stems by coordinate ascent.
    frontier = sorted(scored, key=lambda s: -s[0])[:beam]
    for _ in range(max_rounds):
        before = max(s[0] for s in scored) if scored else -np.inf
        for _, _, rates, _ in frontier:
            for cand in _neighbours(table, rates):
                consider(cand)
        frontier = sorted(scored, key=lambda s: -s[0])[:beam]
        if not frontier or frontier[0][0] <= before + 1e-12:
            break
    top = sorted(scored, key=lambda s: -s[0])[:beam]
    cut = max([s[0] for s in top] + [float(table.score(ga, gr))]) - 1e-12
    for _, _, rates, plan in top:
        candidates.append(plan)
        # The Lagrangian knapsack is within about one app's step of the optimum for its
        # stem; close that gap exactly on the best stems when the frontier stays small.
        exact_plan = knapsack.solve_exact(rates, cut)
        if exact_plan is not None:
            candidates.append(exact_plan)

    best, best_score = None, -np.inf
    for a, r in candidates:
        a, r = polish(table, a, r)
        if not bool(table.feasible(a, r)):
            continue
        score = float(table.score(a, r))
        if score > best_score + 1e-15:
            best, best_score = (a, r), score
    assert best is not None  # The greedy plan always fits once check_feasible passed.
    return best


def mainstream(
    problem: profiles.Problem, options: common.PlannerOptions = common.DEFAULT_OPTIONS
) -> schedule.Schedule:
    """This project's planner (see module docstring)."""
    table = common.build_table(problem, fps=common.sharing_fps(problem, options))
    common.check_feasible(table, "mainstream")
    a, r = mainstream_search(table, options)
    return schedule.build_schedule(problem, table.k_index[a], table.fps[r], planner="mainstream")
