"""The vectorised cost and memory models against brute-force references (docs/SPEC.md)."""

from __future__ import annotations

import numpy as np
import pytest

from mainstream_jax import cost_model, profiles


def ref_cost(ks, phis, lam) -> float:
    """SPEC's segment formula, literally: branch points = sorted distinct k plus L."""
    num_layers = len(lam)
    points = sorted(set(int(k) for k in ks)) + [num_layers]
    start, cost = 0, 0.0
    for end in points:
        seg = float(sum(lam[start:end]))
        branched = [p for k, p in zip(ks, phis, strict=True) if k < end]
        attached = [p for k, p in zip(ks, phis, strict=True) if k >= end]
        cost += seg * (sum(branched) + (max(attached) if attached else 0.0))
        start = end
    return cost


def ref_memory(ks, nbytes) -> float:
    """Every base layer some app still shares, once; every app's own branch."""
    total = 0.0
    for layer, b in enumerate(nbytes):
        shared = any(k > layer for k in ks)
        own = sum(1 for k in ks if k <= layer)
        total += b * (int(shared) + own)
    return total


def test_schedule_cost_and_memory_match_references():
    rng = np.random.default_rng(0)
    lam = rng.uniform(0, 2, 12)
    nbytes = rng.integers(0, 1000, 12).astype(float)
    ks = rng.integers(0, 12, (200, 4))
    phis = rng.choice([0.1, 1, 2, 3, 7, 10], (200, 4))
    cost = cost_model.schedule_cost(ks, phis, lam)
    mem = cost_model.schedule_memory(ks, nbytes)
    for b in range(200):
        assert cost[b] == pytest.approx(ref_cost(ks[b], phis[b], lam), rel=1e-12)
        assert mem[b] == pytest.approx(ref_memory(ks[b], nbytes), rel=1e-12)


def test_single_app_pays_the_whole_network_and_sharing_saves():
    lam = np.array([1.0, 2.0, 3.0, 4.0])
    assert cost_model.schedule_cost([0], [2.0], lam) == pytest.approx(20.0)
    # Two apps sharing 3 layers at the faster app's rate, branching for the last one.
    got = cost_model.schedule_cost([3, 3], [2.0, 1.0], lam)
    assert got == pytest.approx((1 + 2 + 3) * 2 + 4 * (2 + 1))
    assert got < cost_model.schedule_cost([0, 0], [2.0, 1.0], lam)


def test_chokepoint_versions_match_the_layer_versions():
    lib = profiles.load_mobilenet()
    net = lib.network
    costs = cost_model.chokepoint_costs(net.layer_costs, net.chokepoints, net.layer_bytes)
    rng = np.random.default_rng(1)
    j = rng.integers(0, net.chokepoints.size, (300, 5))
    phi = rng.integers(1, 11, (300, 5)).astype(float)
    np.testing.assert_allclose(
        cost_model.chokepoint_schedule_cost(j, phi, costs),
        cost_model.schedule_cost(net.chokepoints[j], phi, net.layer_costs), rtol=1e-12)
    np.testing.assert_allclose(
        cost_model.chokepoint_schedule_memory(j, costs),
        cost_model.schedule_memory(net.chokepoints[j], net.layer_bytes), rtol=1e-12)
    assert costs.branch_cost[0] == pytest.approx(net.total_cost)
    assert costs.segment_cost.sum() + costs.branch_cost[-1] == pytest.approx(net.total_cost)


def test_stem_rates_are_the_envelope():
    # Apps at chokepoint indices 1 and 3 with rates 5 and 2: segments 1 at 5, 2-3 at 2.
    rates = cost_model.stem_rates(np.array([1, 3]), np.array([5.0, 2.0]), 4)
    np.testing.assert_array_equal(rates, [5.0, 2.0, 2.0, 0.0])
