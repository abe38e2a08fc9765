"""Planners: the greedy against a slow reference, exact against brute force, feasibility,
mainstream >= greedy (property-based), determinism, infeasible budgets."""

from __future__ import annotations

import dataclasses
import itertools

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from mainstream_jax import cost_model, planners, profiles, scenarios
from mainstream_jax.planners import common, exact_dp, frontier, mip, paper_greedy, stem_search

LIB = profiles.load_mobilenet()
TOL = 1e-9


def tiny_problem(seed: int, num_apps: int, budget_factor: float, memory_factor=None,
                 **kwargs) -> profiles.Problem:
    """A random problem on a random 7-layer network with 4 chokepoints.

    The budget is ``budget_factor`` times the cheapest schedule's cost; the memory budget
    (optional) ``memory_factor`` times the smallest resident memory.
    """
    rng = np.random.default_rng(seed)
    layer_bytes = rng.integers(1, 100, 7) * 4.0
    layer_costs = rng.uniform(0.1, 2.0, 7)
    network = profiles.make_network(layer_costs, [0, 2, 4, 6], layer_bytes=layer_bytes,
                                    name="tiny")
    weight_fn = kwargs.pop("weight_fn", lambda i: 1.0)
    apps = []
    for i in range(num_apps):
        acc = np.sort(rng.uniform(0.3, 1.0, 4))[::-1]
        apps.append(profiles.make_app(
            f"app{i}", network, num_frozen=[0, 2, 4, 6], accuracy=acc,
            false_positive_rate=rng.uniform(0.0, 0.5, 4),
            event_length_ms=float(rng.choice([200, 500, 1000])),
            event_frequency=float(rng.choice([0.1, 0.3, 0.8])),
            correlation=float(rng.choice([0.1, 0.5])), weight=weight_fn(i)))
    if memory_factor is not None:
        smallest = layer_bytes[:6].sum() + num_apps * layer_bytes[6]
        kwargs["memory_budget_bytes"] = memory_factor * smallest
    cheapest = layer_costs[:6].sum() + num_apps * layer_costs[6]
    return profiles.make_problem(apps, network, budget_factor * cheapest, stream_fps=5,
                                 **kwargs)


def brute_force(table: common.OptionTable) -> tuple[float, tuple]:
    """Best score over every plan of the table's grid that fits (cost and memory)."""
    n, num_k, num_r = table.benefit.shape
    options = np.arange(num_k * num_r)
    plans = np.array(list(itertools.product(options, repeat=n)))  # [P, N]
    a, r = np.divmod(plans, num_r)
    ok = table.feasible(a, r)
    scores = np.where(ok, table.score(a, r), -np.inf)
    best = int(np.argmax(scores))
    return float(scores[best]), (a[best], r[best])


def ref_layer_cost(problem, ks, phis) -> float:
    lam = problem.network.layer_costs
    return float(cost_model.schedule_cost(np.array(ks), np.array(phis), lam))


def ref_greedy(table: common.OptionTable):
    """The paper's greedy, written as loops from docs/SPEC.md (and the original's order)."""
    problem = table.problem
    n, num_k, num_r = table.benefit.shape
    a = [num_k - 1] * n
    r = [0] * n
    w = table.weights
    chokepoints = problem.network.chokepoints[table.k_index]

    def fits(a_, r_):
        ks = [chokepoints[x] for x in a_]
        phis = [table.fps[x] for x in r_]
        if not ref_layer_cost(problem, ks, phis) <= table.budget * (1 + TOL) + TOL:
            return False
        if np.isfinite(table.memory_budget):
            mem = cost_model.schedule_memory(np.array(ks), problem.network.layer_bytes)
            return mem <= table.memory_budget * (1 + TOL)
        return True

    while True:
        best, best_ratio = None, 0.0
        for i in range(n):
            current = (1 - table.benefit[i, a[i], r[i]]) * w[i]
            for rr in range(num_r):
                for aa in range(num_k):
                    if (aa, rr) == (a[i], r[i]):
                        continue
                    metric = (1 - table.benefit[i, aa, rr]) * w[i]
                    ratio = metric / table.branch_cost[aa, rr]
                    if metric < current and ratio > best_ratio:
                        a2, r2 = list(a), list(r)
                        a2[i], r2[i] = aa, rr
                        if fits(a2, r2):
                            best, best_ratio = (i, aa, rr), ratio
        if best is None:
            return np.array(a), np.array(r)
        i, a[i], r[i] = best


# ------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("seed, num_apps, budget", [(0, 3, 1.6), (1, 4, 2.5), (2, 2, 4.0),
                                                    (3, 4, 6.0)])
def test_greedy_matches_the_slow_reference(seed, num_apps, budget):
    table = common.build_table(tiny_problem(seed, num_apps, budget))
    a, r, moves = paper_greedy.greedy_search(table)
    ra, rr = ref_greedy(table)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(r, rr)
    assert moves > 0


def test_greedy_matches_the_reference_on_mobilenet_with_memory():
    problem = scenarios.random_problem(LIB, 3, 0, 120.0, memory_budget_bytes=40 * 2**20)
    table = common.build_table(problem, fps=np.array([1.0, 2.0, 4.0, 8.0]))
    a, r, _ = paper_greedy.greedy_search(table)
    ra, rr = ref_greedy(table)
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_array_equal(r, rr)


def test_move_costs_match_the_cost_model():
    table = common.build_table(scenarios.random_problem(
        LIB, 4, 1, 100.0, memory_budget_bytes=50 * 2**20))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 16, 4)
    r = rng.integers(0, 10, 4)
    cost, memory = paper_greedy.move_costs(table, a, r)
    for i, aa, rr in [(0, 3, 2), (2, 15, 9), (3, 0, 0), (1, 7, 5)]:
        a2, r2 = a.copy(), r.copy()
        a2[i], r2[i] = aa, rr
        assert cost[i, aa, rr] == pytest.approx(float(table.cost(a2, r2)), rel=1e-12)
        assert memory[i, aa] == pytest.approx(float(table.memory(a2)), rel=1e-12)


# ------------------------------------------------------------------------------- exact


@pytest.mark.parametrize(
    "seed, num_apps, budget, kwargs",
    [
        (0, 3, 1.3, {}),
        (1, 3, 2.0, {}),
        (2, 4, 3.0, {}),
        (3, 3, 2.5, {"objective": "maxmin_f1"}),
        (4, 3, 2.0, {"objective": "fnr"}),
        (5, 3, 2.0, {"objective": "fdr"}),
        (6, 3, 2.2, {"weight_fn": lambda i: 1.0 + 2 * i}),
        (7, 3, 2.5, {"memory_factor": 1.4}),
        (8, 3, 2.2, {"event_model": "corrected"}),
    ],
)
def test_exact_matches_brute_force(seed, num_apps, budget, kwargs):
    problem = tiny_problem(seed, num_apps, budget, **kwargs)
    table = common.build_table(problem)
    want, _ = brute_force(table)
    sched = planners.exact(problem)
    assert sched.score == pytest.approx(want, abs=1e-12)
    assert sched.stats["optimal"]
    # The heuristics never beat the optimum, and the MIP agrees with the DP.
    assert planners.mainstream(problem).score <= want + 1e-12
    assert planners.greedy(problem).score <= want + 1e-12
    assert planners.exact_mip(problem).score == pytest.approx(want, abs=1e-7)


def test_exact_matches_brute_force_on_mobilenet():
    problem = scenarios.random_problem(LIB, 3, 5, 60.0)
    options = planners.PlannerOptions(fps_options=(1.0, 2.0, 3.0, 5.0))
    table = common.build_table(problem, fps=np.array(options.fps_options))
    want, _ = brute_force(table)
    assert planners.exact(problem, options).score == pytest.approx(want, abs=1e-12)


def test_exact_with_a_weak_incumbent_still_finds_the_optimum():
    table = common.build_table(tiny_problem(9, 4, 2.5))
    want, _ = brute_force(table)
    weak = common.cheapest_plan(table)
    a, r, stats = exact_dp.exact_search(table, weak)
    assert float(table.score(a, r)) == pytest.approx(want, abs=1e-12)
    assert stats["reason"] == "improved on the incumbent"


def test_state_bound_prunes_without_losing_the_optimum():
    # A weaker incumbent (the greedy's) leaves thousands of states, so the per-state
    # bound is active; both runs must agree with each other and beat mainstream or tie.
    table = common.build_table(scenarios.random_problem(LIB, 10, 3, 50.0))
    greedy = paper_greedy.greedy_search(table)[:2]
    plain = exact_dp.exact_search(table, greedy, state_bound=False)
    bounded = exact_dp.exact_search(table, greedy, state_bound=True)
    assert bounded[2]["states_peak"] > 500
    assert bounded[2]["states_peak"] <= plain[2]["states_peak"]
    best = float(table.score(*plain[:2]))
    assert float(table.score(*bounded[:2])) == pytest.approx(best, abs=1e-12)
    assert best >= float(table.score(*stem_search.mainstream_search(table))) - 1e-12
    assert best > float(table.score(*greedy))


def test_exact_gives_up_cleanly_at_the_state_limit():
    problem = scenarios.random_problem(LIB, 6, 0, 200.0)
    table = common.build_table(problem)
    weak = common.cheapest_plan(table)
    a, r, stats = exact_dp.exact_search(table, weak, max_states=5)
    assert not stats["optimal"] and stats["reason"] == "state limit"
    np.testing.assert_array_equal(a, weak[0])


def test_dropping_dominated_options_keeps_the_optimum():
    problem = scenarios.random_problem(LIB, 2, 6, 70.0, memory_budget_bytes=30 * 2**20)
    table = common.build_table(problem)
    keep = frontier.undominated_options(table)
    assert keep.any(axis=(1, 2)).all() and not keep.all()
    want, _ = brute_force(table)
    pruned = dataclasses.replace(table, benefit=np.where(keep, table.benefit, -1.0))
    assert brute_force(pruned)[0] == pytest.approx(want, abs=1e-15)


# ---------------------------------------------------------------- every planner, feasible

PLANNER_NAMES = ["greedy", "max_sharing", "no_sharing", "mainstream", "exact"]


@pytest.mark.parametrize("name", PLANNER_NAMES)
@pytest.mark.parametrize("num_apps, budget, memory_mib", [(3, 50.0, None), (6, 150.0, None),
                                                          (5, 120.0, 90.0)])
def test_every_planner_fits_the_budget(name, num_apps, budget, memory_mib):
    memory = None if memory_mib is None else memory_mib * 2**20
    problem = scenarios.random_problem(LIB, num_apps, 2, budget, memory_budget_bytes=memory)
    sched = planners.plan(problem, name)
    ks, phis = sched.num_frozen, sched.fps
    cost = ref_layer_cost(problem, ks, phis)
    assert cost == pytest.approx(sched.total_cost, rel=1e-12)
    assert cost <= budget * (1 + TOL)
    if memory is not None:
        assert sched.memory_bytes <= memory * (1 + TOL)
        assert sched.memory_bytes == pytest.approx(
            float(cost_model.schedule_memory(ks, problem.network.layer_bytes)))
    if name == "max_sharing":
        assert np.all(ks == 84)
    if name == "no_sharing":
        assert np.all(ks == 0) and not sched.stem
    assert len(sched.apps) == num_apps
    assert sched.mean_f1 == pytest.approx(np.mean([a.f1 for a in sched.apps]))


def test_schedule_reports_stems_costs_and_metrics():
    problem = profiles.load_problem(
        "experiments/configs/mainstream_example_problem.json")
    sched = planners.mainstream(problem)
    stem_cost = sum(s.cost for s in sched.stem)
    assert stem_cost + sum(a.branch_cost for a in sched.apps) == pytest.approx(sched.total_cost)
    weights = np.array([a.weight for a in sched.apps])
    f1 = np.array([a.f1 for a in sched.apps])
    assert sched.objective_value == pytest.approx((weights * f1).sum() / weights.sum())
    d = sched.to_dict()
    assert set(d["apps"][0]) >= {"name", "num_frozen", "fps", "recall", "precision", "f1",
                                 "branch_cost"}
    assert "shared stem" in sched.format_table()
    assert sched.to_json().startswith("{")


# --------------------------------------------------------- mainstream >= greedy, property


@hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
@hypothesis.given(
    num_apps=st.integers(1, 7),
    setup=st.integers(0, 10_000),
    budget=st.floats(25.0, 400.0),
    objective=st.sampled_from(["f1", "f1", "fnr", "maxmin_f1"]),
    memory_mib=st.sampled_from([None, None, 30.0, 60.0]),
    form=st.sampled_from(["faithful", "corrected"]),
)
def test_mainstream_never_below_greedy(num_apps, setup, budget, objective, memory_mib, form):
    memory = None if memory_mib is None else memory_mib * 2**20
    problem = scenarios.random_problem(LIB, num_apps, setup, budget, objective=objective,
                                       memory_budget_bytes=memory, event_model=form)
    try:
        greedy = planners.greedy(problem)
    except planners.InfeasibleError:
        with pytest.raises(planners.InfeasibleError):
            planners.mainstream(problem)
        return
    best = planners.mainstream(problem)
    assert best.score >= greedy.score - 1e-12
    assert best.total_cost <= budget * (1 + TOL)
    if memory is not None:
        assert best.memory_bytes <= memory * (1 + TOL)


def test_mainstream_polish_only_improves():
    table = common.build_table(scenarios.random_problem(LIB, 8, 3, 150.0))
    a, r = common.cheapest_plan(table)
    pa, pr = stem_search.polish(table, a, r)
    assert table.score(pa, pr) > table.score(a, r)
    assert table.feasible(pa, pr)


# ------------------------------------------------------------------- determinism, errors


@pytest.mark.parametrize("name", PLANNER_NAMES)
def test_planners_are_deterministic(name):
    a = planners.plan(scenarios.random_problem(LIB, 5, 11, 140.0, seed=3), name)
    b = planners.plan(scenarios.random_problem(LIB, 5, 11, 140.0, seed=3), name)
    assert a.to_dict() | {"stats": None} == b.to_dict() | {"stats": None}


def test_budget_too_small_says_what_the_minimum_is():
    problem = scenarios.random_problem(LIB, 25, 0, 50.0)
    minimum = 25 * LIB.network.total_cost * 0.1
    with pytest.raises(planners.InfeasibleError,
                       match=rf"raise the budget to at least {minimum:.4f}"):
        planners.no_sharing(problem)
    tiny = problem.with_budget(5.0)
    for name in ["greedy", "max_sharing", "mainstream", "exact", "exact_mip"]:
        with pytest.raises(planners.InfeasibleError, match=rf"too small for planner '{name}'"):
            planners.plan(tiny, name)


def test_memory_budget_too_small_says_what_the_minimum_is():
    problem = scenarios.random_problem(LIB, 3, 0, 100.0, memory_budget_bytes=2**20)
    with pytest.raises(planners.InfeasibleError, match=r"memory budget 1.000 MiB is too small"):
        planners.mainstream(problem)


def test_unknown_planner_and_bad_fps_options():
    problem = scenarios.random_problem(LIB, 2, 0, 100.0)
    with pytest.raises(ValueError, match=r"unknown planner 'magic'; choose one of"):
        planners.plan(problem, "magic")
    with pytest.raises(ValueError, match=r"fps options must lie in \(0, stream_fps=10\]"):
        planners.greedy(problem, planners.PlannerOptions(fps_options=(1.0, 12.0)))


def test_weights_steer_the_plan():
    problem = scenarios.random_problem(LIB, 4, 5, 60.0)
    plain = planners.exact(problem)
    heavy = dataclasses.replace(
        problem, apps=(profiles.with_params(problem.apps[0], weight=20.0),) + problem.apps[1:])
    weighted = planners.exact(heavy)
    # The heavy app gains, at the expense of the unweighted mean.
    assert weighted.apps[0].f1 > plain.apps[0].f1
    assert weighted.mean_f1 < plain.mean_f1
    w = np.array([20.0, 1, 1, 1])
    assert weighted.objective_value == pytest.approx(
        (w * [a.f1 for a in weighted.apps]).sum() / w.sum())


def test_mip_uses_the_same_model_as_the_dp():
    problem = scenarios.random_problem(LIB, 4, 8, 100.0)
    table = common.build_table(problem)
    (a, r), stats = mip.solve_mip(table, budget=table.budget)
    assert stats["optimal"]
    assert float(table.score(a, r)) == pytest.approx(planners.exact(problem).score, abs=1e-7)
