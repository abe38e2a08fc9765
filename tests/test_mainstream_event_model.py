"""The vectorised event model against slow scalar references written from docs/SPEC.md."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from mainstream_jax import event_model, profiles

STREAM_FPS = 10


def ref_miss(p: float, d: float, c: float, s: float) -> float:
    """SPEC: miss(p) with stride s, d frames per event, correlation c (x = 1)."""
    cp = (1.0 - p) + c * p
    if d < s:
        return 1.0 - (d / s) * p
    r1, r2 = math.floor(d / s), math.ceil(d / s)
    m = math.fmod(d, s)
    return (1.0 - p) * ((s - m) / s * cp ** (r1 - 1) + m / s * cp ** (r2 - 1))


def ref_metrics(acc, fpr, length_ms, freq, c, phi, form="faithful"):
    s = STREAM_FPS / phi
    d = length_ms / 1000.0 * (phi if form == "faithful" else STREAM_FPS)
    recall = 1.0 - ref_miss(acc, d, c, s)
    alarm = 1.0 - ref_miss(fpr, d, c, s)
    denom = freq * recall + (1 - freq) * alarm
    precision = 1.0 if denom == 0 else freq * recall / denom
    if abs(recall) <= 1e-8 or abs(precision) <= 1e-8:
        f1 = 0.0
    else:
        f1 = 2 * recall * precision / (recall + precision)
    return recall, alarm, precision, f1


def ref_no_fire(p: float, c: float, x: int, n: int) -> float:
    """P(no run of x hits in n samples), by enumerating every hit/miss sequence."""
    hit_after_hit = c + (1 - c) * p
    hit_after_miss = (1 - c) * p
    total = 0.0
    for seq in itertools.product((0, 1), repeat=n):
        prob = 1.0
        run = 0
        fired = False
        for t, hit in enumerate(seq):
            q = p if t == 0 else (hit_after_hit if seq[t - 1] else hit_after_miss)
            prob *= q if hit else 1 - q
            run = run + 1 if hit else 0
            fired |= run >= x
        if not fired:
            total += prob
    return total


def random_apps(rng, n):
    acc = rng.uniform(0.0, 1.0, (n, 4))
    fpr = rng.uniform(0.0, 0.6, (n, 4))
    length = rng.choice([100, 200, 400, 500, 600, 800, 1000, 1700], n).astype(float)
    freq = rng.choice([0.01, 0.1, 0.3, 0.5, 1.0], n)
    corr = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], n)
    return acc, fpr, length, freq, corr


@pytest.mark.parametrize("form", ["faithful", "corrected"])
def test_matches_scalar_reference(form):
    rng = np.random.default_rng(0)
    acc, fpr, length, freq, corr = random_apps(rng, 12)
    fps = np.array([0.1, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], float)
    m = event_model.event_metrics(acc, fpr, length, freq, corr, fps, STREAM_FPS, form=form)
    assert m.f1.shape == (12, 4, fps.size)
    for i, k, r in itertools.product(range(12), range(4), range(fps.size)):
        want = ref_metrics(acc[i, k], fpr[i, k], length[i], freq[i], corr[i], fps[r], form)
        got = (m.recall[i, k, r], m.false_alarm[i, k, r], m.precision[i, k, r], m.f1[i, k, r])
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14,
                                   err_msg=f"app {i} k {k} fps {fps[r]} ({form})")


def test_forms_differ_and_corrected_counts_stream_frames():
    # At fps == F both forms agree (d = L/1000 * F either way); below it they differ.
    args = ([[0.8]], [[0.1]], [500.0], [0.3], [0.2])
    faithful = event_model.event_metrics(*args, [2.0, 10.0], STREAM_FPS, form="faithful")
    corrected = event_model.event_metrics(*args, [2.0, 10.0], STREAM_FPS, form="corrected")
    np.testing.assert_allclose(faithful.f1[..., 1], corrected.f1[..., 1])
    assert corrected.recall[0, 0, 0] > faithful.recall[0, 0, 0]
    n = event_model.samples_per_event(np.array([500.0]), np.array([2.0]), STREAM_FPS,
                                      "corrected")
    assert n[0, 0] == pytest.approx(1.0)  # 5 stream frames, stride 5


def test_unknown_form_is_an_error():
    with pytest.raises(ValueError, match="unknown event model 'fast'"):
        event_model.samples_per_event(np.array([500.0]), np.array([1.0]), 10, "fast")


@pytest.mark.parametrize("x", [1, 2, 3])
def test_x_voting_matches_enumeration(x):
    rng = np.random.default_rng(x)
    p = rng.uniform(0, 1, (3, 2))
    corr = np.array([0.0, 0.4, 0.9])
    q = event_model.no_fire_probability(p, corr, np.full(3, x), 6)
    for i, k, n in itertools.product(range(3), range(2), range(7)):
        assert q[n, i, k] == pytest.approx(ref_no_fire(p[i, k], corr[i], x, n), abs=1e-12)


def test_x_vote_one_is_the_paper_model_and_mixed_votes_work():
    rng = np.random.default_rng(3)
    acc, fpr, length, freq, corr = random_apps(rng, 6)
    fps = np.arange(1, 11, dtype=float)
    base = event_model.event_metrics(acc, fpr, length, freq, corr, fps, STREAM_FPS)
    votes = np.array([1, 2, 1, 3, 1, 2])
    voted = event_model.event_metrics(acc, fpr, length, freq, corr, fps, STREAM_FPS,
                                      x_vote=votes)
    ones = votes == 1
    np.testing.assert_allclose(voted.f1[ones], base.f1[ones], rtol=1e-12)
    # More votes never raise recall or the false-alarm rate.
    assert np.all(voted.recall[~ones] <= base.recall[~ones] + 1e-12)
    assert np.all(voted.false_alarm[~ones] <= base.false_alarm[~ones] + 1e-12)


def test_precision_and_f1_edge_cases():
    # No positive predictions at all: precision 1 by convention, F1 0 (recall 0).
    p, f1 = event_model.precision_f1(np.array([0.0]), np.array([0.0]), np.array([0.5]))
    assert p[0] == 1.0 and f1[0] == 0.0
    # Recall about 0 (below 1e-8) gives F1 0 even though precision is 1.
    p, f1 = event_model.precision_f1(np.array([1e-9]), np.array([0.0]), np.array([0.5]))
    assert f1[0] == 0.0
    p, f1 = event_model.precision_f1(np.array([0.5]), np.array([0.5]), np.array([0.5]))
    assert p[0] == pytest.approx(0.5) and f1[0] == pytest.approx(0.5)


def test_objectives_pick_the_right_metric_and_aggregate():
    m = event_model.EventMetrics(
        recall=np.array([[[0.9]], [[0.5]]]), false_alarm=np.zeros((2, 1, 1)),
        precision=np.array([[[0.6]], [[0.8]]]), f1=np.array([[[0.72]], [[0.615]]]))
    assert event_model.benefit(m, "fnr")[1, 0, 0] == 0.5
    assert event_model.benefit(m, "fdr")[0, 0, 0] == 0.6
    assert event_model.benefit(m, "maxmin_f1")[1, 0, 0] == 0.615
    b = np.array([0.2, 0.6])
    assert event_model.aggregate(b, np.array([1.0, 3.0]), "f1") == pytest.approx(0.5)
    assert event_model.aggregate(b, np.ones(2), "maxmin_f1") == 0.2
    assert event_model.objective_value(0.7, "fnr") == pytest.approx(0.3)
    with pytest.raises(ValueError, match="unknown objective 'auc'"):
        event_model.benefit(m, "auc")


def test_problem_metrics_on_shipped_profiles_are_probabilities():
    lib = profiles.load_mobilenet()
    problem = profiles.make_problem(list(lib.app_types.values()), lib.network, 100)
    m = event_model.problem_metrics(problem, np.arange(1, 11, dtype=float))
    for arr in m:
        assert np.all((arr >= 0) & (arr <= 1))
    # F1 is not monotone in fps for some app (more samples, more false alarms).
    assert np.any(np.diff(m.f1, axis=2) < 0)


def test_fps_outside_the_stream_is_an_error():
    with pytest.raises(ValueError, match="fps options must lie in"):
        event_model.event_metrics([[0.5]], [[0.1]], [500.0], [0.3], [0.1], [11.0], 10)


def test_stream_form_is_corrected_with_per_frame_correlation():
    # "stream": c is the correlation of consecutive stream frames, so samples s = F / phi
    # frames apart repeat with probability c ** s; otherwise the corrected form.
    rng = np.random.default_rng(5)
    acc, fpr, length, freq, corr = random_apps(rng, 6)
    fps = np.array([1.0, 2.0, 2.5, 5.0, 10.0])
    got = event_model.event_metrics(acc, fpr, length, freq, corr, fps, STREAM_FPS,
                                    form="stream")
    for r, phi in enumerate(fps):
        want = event_model.event_metrics(acc, fpr, length, freq,
                                         corr ** (STREAM_FPS / phi), [phi], STREAM_FPS,
                                         form="corrected")
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g[..., r], w[..., 0], rtol=1e-12)
    # Below the stream rate samples are less correlated: a miss is less likely to repeat,
    # so recall is higher than the corrected form's (for 0 < c < 1, accuracy in (0, 1)).
    args = ([[0.6]], [[0.1]], [1000.0], [0.2], [0.5], [2.0], STREAM_FPS)
    assert (event_model.event_metrics(*args, form="stream").recall
            > event_model.event_metrics(*args, form="corrected").recall)
