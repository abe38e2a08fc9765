"""Profiling of the e2e loop: detection rates, layer costs, and the profile writer
round-tripping into the planner."""

import numpy as np
import pytest

from mainstream_jax import planners, profiles
from mainstream_jax.e2e import basenet, profiling


def test_detection_rates_match_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50))
    pos = rng.random((3, 50)) < 0.3
    acc, fpr = profiling.detection_rates(logits, pos)
    for a in range(3):
        hits = [logits[a, i] > 0 for i in range(50) if pos[a, i]]
        false = [logits[a, i] > 0 for i in range(50) if not pos[a, i]]
        assert acc[a] == pytest.approx(sum(hits) / len(hits))
        assert fpr[a] == pytest.approx(sum(false) / len(false))
    with pytest.raises(ValueError, match="positive and negative"):
        profiling.detection_rates(logits, np.zeros_like(pos))
    with pytest.raises(ValueError, match="apps, frames"):
        profiling.detection_rates(logits[0], pos[0])


def test_weighted_false_positive_rate_is_the_weighted_mean_over_negatives():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 60))
    pos = rng.random((2, 60)) < 0.3
    w = rng.uniform(0, 2, (2, 60))
    acc, fpr = profiling.detection_rates(logits, pos, w)
    np.testing.assert_allclose(acc, profiling.detection_rates(logits, pos)[0])
    for a in range(2):
        neg = ~pos[a]
        want = (w[a, neg] * (logits[a, neg] > 0)).sum() / w[a, neg].sum()
        assert fpr[a] == pytest.approx(want)
    # Weight only on one negative frame: the rate is that frame's outcome.
    one = np.zeros_like(w)
    i = np.flatnonzero(~pos[0])[0]
    one[:, i] = 1.0
    one[1] = ~pos[1]
    assert profiling.detection_rates(logits, pos, one)[1][0] == float(logits[0, i] > 0)
    with pytest.raises(ValueError, match="positive and negative"):
        profiling.detection_rates(logits, pos, np.where(pos, 1.0, 0.0))


def test_layer_costs_from_times_scale_each_layer_to_the_network():
    # Layers' own times less the overhead, scaled so that they add up to the whole
    # network's time less the overhead; a layer faster than the overhead costs 0.
    raw = np.array([2.3, 1.3, 0.2, 3.3])
    full, over, batch = 4.3, 0.3, 10
    row = np.concatenate([raw, [full, over]]) / 1e3
    costs = profiling.costs_from_times(np.stack([row, row * 2, row * 0.5]), batch)
    np.testing.assert_allclose(costs.ms_per_frame, np.array([2.0, 1.0, 0.0, 3.0]) * 4 / 6
                               / batch)
    assert (costs.full_ms, costs.overhead_ms) == pytest.approx((full, over))


def _network_and_apps():
    rng = np.random.default_rng(3)
    net = profiles.make_network(rng.uniform(0.001, 0.05, 8), range(8),
                                layer_bytes=rng.integers(0, 5000, 8) * 4.0,
                                layer_names=[f"layer_{i}" for i in range(8)], name="tiny")
    apps = [profiles.make_app(
        f"app{a}", net, num_frozen=range(8), accuracy=rng.uniform(0.3, 1, 8),
        false_positive_rate=rng.uniform(0, 0.3, 8), event_length_ms=500 * (a + 1),
        event_frequency=0.1 * (a + 1), correlation=0.3, clean=False) for a in range(3)]
    return net, apps


def test_profile_writer_round_trips_into_the_planner(tmp_path):
    net, apps = _network_and_apps()
    profiling.write_profile_dir(str(tmp_path), net, apps, metadata={"device": "test"})
    raw = profiles.load_profile_dir(str(tmp_path), clean=False)
    np.testing.assert_array_equal(raw.network.layer_costs, net.layer_costs)
    np.testing.assert_array_equal(raw.network.layer_bytes, net.layer_bytes)
    np.testing.assert_array_equal(raw.network.chokepoints, net.chokepoints)
    assert raw.network.layer_names == net.layer_names
    for a in apps:
        got = raw.app_types[a.name]
        np.testing.assert_array_equal(got.accuracy, a.accuracy)
        np.testing.assert_array_equal(got.false_positive_rate, a.false_positive_rate)
        assert (got.event_length_ms, got.event_frequency, got.correlation) == (
            a.event_length_ms, a.event_frequency, a.correlation)
    cleaned = profiles.load_profile_dir(str(tmp_path))
    for a in apps:
        acc, fpr = profiles.monotone_accuracy(a.accuracy, a.false_positive_rate)
        np.testing.assert_array_equal(cleaned.app_types[a.name].accuracy, acc)
    # The planner accepts what was written, and plans the same schedule as from memory.
    budget = 0.3 * 3 * 10 * net.total_cost
    from_disk = planners.plan(profiles.make_problem(list(raw.app_types.values()), raw.network,
                                                    budget), "mainstream")
    in_memory = planners.plan(profiles.make_problem(apps, net, budget), "mainstream")
    np.testing.assert_array_equal(from_disk.num_frozen, in_memory.num_frozen)
    np.testing.assert_array_equal(from_disk.fps, in_memory.fps)
    assert from_disk.mean_f1 == in_memory.mean_f1


def test_layer_costs_shape_and_sign():
    spec = basenet.mobilenet_spec(widths=(4,), strides=(2,), stem_width=4, hidden=8)
    model = basenet.ChokepointNet(spec, 1)
    variables = basenet.init_variables(model, (8, 8, 1), 0)
    # 256 frames: the whole network must take clearly longer than a trivial call even on
    # a loaded machine (on 4 frames, 2 rounds, it did not always).
    costs = profiling.measure_layer_costs(model, variables, (8, 8, 1), batch=256, repeats=3,
                                          warmup=1)
    assert costs.ms_per_frame.shape == (spec.num_layers,)
    assert np.all(costs.ms_per_frame >= 0) and costs.ms_per_frame.sum() > 0
    # Layers add up to the fused network's time less the dispatch overhead, in
    # proportion to their own times.
    np.testing.assert_allclose(costs.ms_per_frame.sum() * 256,
                               max(costs.full_ms - costs.overhead_ms, 0.0))
    alone = np.maximum(costs.raw_ms - costs.overhead_ms, 0.0)
    np.testing.assert_allclose(costs.ms_per_frame * alone.sum(),
                               alone * costs.ms_per_frame.sum(), atol=1e-12)
    with pytest.raises(ValueError, match="repeats"):
        profiling.measure_layer_costs(model, variables, (8, 8, 1), batch=4, repeats=0)
