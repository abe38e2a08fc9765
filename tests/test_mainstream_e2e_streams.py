"""Stream generator statistics (f, L, c), jitter and event scoring of the e2e loop."""

import numpy as np
import pytest

from mainstream_jax.e2e import streams


def _pool(n_per_class=40, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    images = rng.integers(0, 256, size=(labels.size, 6, 6, 1), dtype=np.uint8)
    return images, labels


def _stream(correlation=0.4, duration_s=2000, **kw):
    images, labels = _pool()
    args = dict(targets=[3, 4, 5], event_length_ms=[500, 1000, 300],
                event_frequency=[0.1, 0.2, 0.05], background_classes=[0, 1, 2],
                correlation=correlation, stream_fps=10, duration_s=duration_s, seed=1)
    args.update(kw)
    return streams.make_stream(images, labels, **args), images, labels


@pytest.mark.parametrize("correlation", [0.0, 0.4, 0.8])
def test_stream_statistics(correlation):
    s, images, labels = _stream(correlation)
    stats = streams.stream_stats(s, 3)
    np.testing.assert_allclose(stats.event_frequency, [0.1, 0.2, 0.05], atol=2e-3)
    np.testing.assert_array_equal(stats.mean_event_frames, [5, 10, 3])
    # A fresh draw can repeat the object by chance (1 / pool size per class).
    assert abs(stats.repeat_fraction - correlation) < 0.02
    # Events show their target; background shows only background classes.
    src_labels = labels[s.source]
    for a, target in enumerate([3, 4, 5]):
        assert np.all(src_labels[s.event_app == a] == target)
    assert np.all(np.isin(src_labels[s.event_app < 0], [0, 1, 2]))
    # Events are separated by background and never overlap.
    ev = s.events[np.argsort(s.events[:, 1])]
    assert np.all(ev[1:, 1] > ev[:-1, 2])
    assert np.all(s.event_app[ev[:, 1] - 1] == -1)


def test_consecutive_frames_repeat_the_object_jittered():
    s, images, _ = _stream(0.9, duration_s=200, jitter=1)
    rep = np.flatnonzero(s.repeated)
    assert rep.size > 0
    assert np.all(s.source[rep] == s.source[rep - 1])
    # Every frame is its source image shifted by at most one pixel.
    for t in rep[:50]:
        cands = [streams.jitter_images(images[s.source[t]][None], np.array([[dy, dx]]))[0]
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(np.array_equal(s.frames[t], c) for c in cands)


def test_jitter_matches_roll_with_zero_fill():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 255, size=(9, 5, 7, 2), dtype=np.uint8)
    shifts = np.array([(dy, dx) for dy in (-2, 0, 1) for dx in (-1, 0, 3)])
    out = streams.jitter_images(x, shifts)
    for i, (dy, dx) in enumerate(shifts):
        ref = np.zeros_like(x[i])
        for y in range(5):
            for xx in range(7):
                if 0 <= y - dy < 5 and 0 <= xx - dx < 7:
                    ref[y, xx] = x[i, y - dy, xx - dx]
        np.testing.assert_array_equal(out[i], ref)


def _score_reference(s, app, sampled, flagged):
    hit = set(np.asarray(sampled)[np.asarray(flagged)].tolist())
    ev = [e for e in s.events if e[0] == app]
    detected = sum(any(t in hit for t in range(e[1], e[2])) for e in ev)
    d = s.event_frames[app]
    windows = fired = 0
    t, n = 0, len(s.event_app)
    while t < n:
        if s.event_app[t] == app:
            t += 1
            continue
        end = t
        while end < n and s.event_app[end] != app:
            end += 1
        for w in range((end - t) // d):
            windows += 1
            fired += any(u in hit for u in range(t + w * d, t + (w + 1) * d))
        t = end
    return detected, len(ev), windows, fired


def test_score_app_matches_reference():
    s, _, _ = _stream(0.3, duration_s=300)
    rng = np.random.default_rng(5)
    for app in range(3):
        sampled = np.sort(rng.choice(len(s.event_app), 700, replace=False))
        flagged = rng.random(700) < 0.1
        got = streams.score_app(s, app, sampled, flagged)
        detected, events, windows, fired = _score_reference(s, app, sampled, flagged)
        assert (got.detected, got.num_events, got.num_windows, got.false_alarms) == (
            detected, events, windows, fired)
        p = detected / (detected + fired)
        r = detected / events
        assert got.f1 == pytest.approx(2 * p * r / (p + r))


def test_perfect_detector_scores_one():
    s, _, _ = _stream(0.3, duration_s=300)
    t = np.arange(len(s.event_app))
    got = streams.score_app(s, 1, t, s.event_app == 1)
    assert (got.recall, got.precision, got.f1) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("kw, match", [
    (dict(event_frequency=[0.5, 0.4, 0.2]), "sum to < 1"),
    (dict(event_length_ms=[550, 1000, 300]), "whole number"),
    (dict(targets=[0, 4, 5]), "background"),
    (dict(correlation=1.5), "correlation"),
    (dict(duration_s=2), "too short"),
])
def test_bad_stream_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _stream(**kw)


@pytest.mark.parametrize("stride", [1, 2, 5])
def test_samples_s_frames_apart_repeat_with_c_to_the_s(stride):
    # What the planner's "stream" event model assumes: inside an event, two samples s
    # frames apart show the same object with probability c ** s.
    c = 0.7
    s, _, _ = _stream(c, duration_s=4000)
    a = 1  # 10-frame events: several samples per event at these strides
    same = []
    for _, start, end in s.events[s.events[:, 0] == a]:
        src = s.source[start:end:stride]
        same.extend(src[1:] == src[:-1])
    # A fresh draw repeats the object by chance with probability 1/40 (pool of 40).
    want = c ** stride + (1 - c ** stride) / 40
    assert abs(np.mean(same) - want) < 0.03


def test_negative_class_shares_match_a_generated_stream():
    s, _, labels = _stream(0.0, duration_s=4000)
    shares = streams.negative_class_shares(labels, [3, 4, 5], [0.1, 0.2, 0.05], [0, 1, 2])
    assert shares.shape == (3, 6)
    np.testing.assert_allclose(shares.sum(axis=1), 1.0)
    src_labels = labels[s.source]
    for a in range(3):
        outside = src_labels[s.event_app != a]
        empirical = np.bincount(outside, minlength=6) / outside.size
        np.testing.assert_allclose(shares[a], empirical, atol=0.01)
        assert shares[a, 3 + a] == 0.0  # an app's own target is never its negative
