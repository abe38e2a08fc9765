"""Stem-sharing runtime: per-app rates, nesting of frames, numerics vs the full networks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mainstream_jax import cost_model
from mainstream_jax.e2e import basenet, runtime, training

TINY = dict(widths=(4, 8), strides=(1, 2), stem_width=4, stem_strides=2, hidden=8)
SHAPE = (8, 8, 1)
F = 10


@pytest.mark.parametrize("ks, fps", [
    ((0, 0, 0), (10, 3, 7)),
    ((7, 7, 7), (10, 2, 5)),
    ((2, 5, 5, 0), (3, 7, 4, 9)),
    ((3, 1, 6, 6), (1, 10, 2, 9)),
])
def test_plan_rates_and_nesting(ks, fps):
    plan = runtime.make_plan(ks, fps, F, num_layers=8)
    # Every app runs on exactly phi frames per window, a subset of its stem's frames.
    for i, (k, phi) in enumerate(zip(ks, fps, strict=True)):
        pos = plan.app_positions[i]
        assert len(pos) == phi == len(set(pos))
        src = plan.app_source[i]
        parent = range(F) if src < 0 else plan.segments[src].positions
        assert set(pos) <= set(parent)
        if k > 0:
            assert plan.segments[src].end == k
    # Segment [a, e) runs at the max rate of the apps with k >= e (the SPEC's cost model).
    ends = sorted({k for k in ks if k > 0})
    assert [s.end for s in plan.segments] == ends
    prev = set(range(F))
    for s in plan.segments:
        assert s.rate == max(p for k, p in zip(ks, fps, strict=True) if k >= s.end)
        assert len(s.positions) == s.rate and set(s.positions) <= prev
        prev = set(s.positions)
    # Frames computed per window, per layer, equal the cost model's rates.
    lam = np.random.default_rng(0).uniform(0.1, 1, 8)
    runtime_cost = sum(lam[s.start:s.end].sum() * s.rate for s in plan.segments) + sum(
        lam[k:].sum() * p for k, p in zip(ks, fps, strict=True))
    np.testing.assert_allclose(runtime_cost, cost_model.schedule_cost(ks, fps, lam))


def test_even_subset_spreads_frames():
    np.testing.assert_array_equal(runtime.even_subset(np.arange(10), 5), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(runtime.even_subset(np.arange(10), 3), [0, 3, 6])
    with pytest.raises(ValueError):
        runtime.even_subset(np.arange(3), 4)


@pytest.mark.parametrize("ks, fps, match", [
    ((0, 1), (10,), "one k and one fps"),
    ((8,), (10,), "outside"),
    ((1,), (2.5,), "whole number"),
    ((1,), (11,), "whole number"),
])
def test_bad_plans(ks, fps, match):
    with pytest.raises(ValueError, match=match):
        runtime.make_plan(ks, fps, F, num_layers=8)


@pytest.fixture(scope="module")
def apps():
    spec = basenet.mobilenet_spec(**TINY)
    model = basenet.ChokepointNet(spec, 1)
    base = basenet.init_variables(model, SHAPE, 0)
    ks = (0, 3, 3, 6, 6)
    out = []
    for a, k in enumerate(ks):
        own = basenet.init_variables(model, SHAPE, 10 + a)  # a different branch per app
        out.append(training.assemble_app(
            base, basenet.select_layers(own, spec, k, spec.num_layers), spec, k))
    return model, base, ks, out


@pytest.mark.parametrize("batch_apps, fused", [(True, True), (False, False)])
def test_runtime_equals_each_apps_full_network(apps, batch_apps, fused):
    model, base, ks, app_vars = apps
    ks, app_vars = ks[:4], app_vars[:4]
    fps = (10, 4, 4, 7)
    frames = np.random.default_rng(1).integers(0, 256, (3 * 2 * F, *SHAPE), dtype=np.uint8)
    rt = runtime.StemRuntime(model, base, app_vars, ks, fps, stream_fps=F, windows_per_call=2,
                             mean=0.3, std=0.4, batch_apps=batch_apps, fused=fused)
    assert sorted(map(len, rt.groups)) == ([1, 1, 2] if batch_apps else [1, 1, 1, 1])
    res = rt.run(frames)
    x = (frames.astype(np.float32) / 255.0 - 0.3) / 0.4
    for i, v in enumerate(app_vars):
        assert res.frames[i].size == 3 * 2 * fps[i]  # phi frames per second of stream
        np.testing.assert_array_equal(res.frames[i] % F,
                                      np.tile(rt.plan.app_positions[i], 6))
        ref = np.asarray(model.apply(v, jnp.asarray(x[res.frames[i]]), 0, None, False))[:, 0]
        np.testing.assert_allclose(res.logits[i], ref, rtol=1e-4, atol=1e-5)
    assert res.frames_per_s > 0


def test_unfrozen_app_cannot_share(apps):
    model, base, ks, app_vars = apps
    bad = jax.tree.map(lambda x: x, app_vars[1])
    name = model.spec.layer_names[1]
    bad["params"][name]["dw"]["kernel"] = bad["params"][name]["dw"]["kernel"] + 1.0
    with pytest.raises(ValueError, match="not frozen"):
        runtime.StemRuntime(model, base, [bad], [3], [5], stream_fps=F, windows_per_call=1,
                            mean=0.0, std=1.0)


def test_run_rejects_partial_calls(apps):
    model, base, ks, app_vars = apps
    rt = runtime.StemRuntime(model, base, app_vars[:1], ks[:1], [5], stream_fps=F,
                             windows_per_call=2, mean=0.0, std=1.0)
    with pytest.raises(ValueError, match="multiple of 20"):
        rt.run(np.zeros((25, *SHAPE), np.uint8))


def test_fractional_rates_with_ten_second_windows():
    plan = runtime.make_plan([0, 4, 4], [0.3, 2.5, 10], F, num_layers=8, window_s=10)
    assert plan.fps == (3, 25, 100)  # frames per 10 s window
    assert [len(p) for p in plan.app_positions] == [3, 25, 100]
    assert plan.segments[0].rate == 100
    with pytest.raises(ValueError, match="whole number of frames"):
        runtime.make_plan([0], [0.25], F, num_layers=8, window_s=10)


@pytest.mark.parametrize("batch_apps, fused", [(True, False), (False, False), (True, True)])
def test_predicted_call_cost_is_the_cost_model_plus_one_overhead_per_jitted_call(
        apps, batch_apps, fused):
    model, base, ks, app_vars = apps
    fps = (10, 4, 4, 7, 7)
    rt = runtime.StemRuntime(model, base, app_vars, ks, fps, stream_fps=F,
                             windows_per_call=3, mean=0.0, std=1.0, batch_apps=batch_apps,
                             fused=fused)
    # Segments [0, 3) and [3, 6); groups: k=0, (3, 4) x 2, (6, 7) x 2 batched or not.
    pieces = 2 + (3 if batch_apps else 5)
    assert rt.num_pieces == pieces
    assert rt.num_calls == (1 if fused else pieces)
    lam = np.random.default_rng(2).uniform(0.01, 0.1, model.spec.num_layers)
    per_window = cost_model.schedule_cost(ks, fps, lam)  # ms per second of stream
    np.testing.assert_allclose(rt.predicted_call_ms(lam), 3 * per_window)
    np.testing.assert_allclose(rt.predicted_call_ms(lam, 0.25),
                               3 * per_window + 0.25 * rt.num_calls)
