"""Event model: recall, precision and F1 of every (app, k, fps) at once (NumPy).

Reference: docs/SPEC.md section 3. An app samples ``phi`` of the stream's ``F`` frames/s
(stride s = F / phi). An event lasts L ms, i.e. d frames:

* ``faithful`` form (default; the published numbers): d = L/1000 * phi;
* ``corrected`` form: d = L/1000 * F (frames of the original stream).
* ``stream`` form: d as ``corrected``, and c is the correlation of consecutive *stream
  frames* (the object persists from one frame to the next with probability c), so
  samples s frames apart repeat with probability c^s: the chain below runs with
  c_s = c ** s per fps option. This describes a stream generated frame by frame (the
  end-to-end streams of ``mainstream_jax.e2e.streams``); ``faithful`` and ``corrected``
  apply c between consecutive samples whatever the rate, as the paper does.

The app sees n = d / s sampled frames of an event on average: floor(n) of them with
probability 1 - frac(n) and floor(n) + 1 with probability frac(n). This is the SPEC's
``miss(p)``: for d < s it is 1 - (d/s) p, otherwise with r1 = floor(d/s), r2 = ceil(d/s)
and m = d mod s, miss = (1 - p) [(s-m)/s cp^(r1-1) + m/s cp^(r2-1)], where
cp = (1 - p) + c p is the probability of a miss right after a miss.

That cp is the two-state Markov chain "with probability c repeat the previous outcome,
else draw a fresh one with hit probability p", so hit-after-hit has probability
c + (1 - c) p. x-voting (fire only after ``x`` consecutive positive samples) is computed
exactly on that chain; x = 1 is the paper's model. (The original estimated x-voting by
Monte Carlo on a slightly different chain; this is the analytic counterpart.)

Recall R = 1 - miss(accuracy(k)); the false-alarm rate A = 1 - miss(fpr(k)) uses the
same window; precision P = f R / (f R + (1 - f) A), 1 when the denominator is 0;
F1 = 2 R P / (R + P), 0 when R or P is about 0 (|x| <= 1e-8, as the original's
``np.isclose``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mainstream_jax import profiles

ZERO_ATOL = 1e-8  # np.isclose(x, 0) in the original F1.


class EventMetrics(NamedTuple):
    """Per (app, chokepoint, fps) metrics, each float64 [N, K, R]."""

    recall: np.ndarray
    false_alarm: np.ndarray
    precision: np.ndarray
    f1: np.ndarray


def samples_per_event(
    event_length_ms: np.ndarray, fps: np.ndarray, stream_fps: float, form: str = "faithful"
) -> np.ndarray:
    """n = d / s, the mean number of sampled frames inside one event; float64 [N, R].

    Values within 1e-9 of an integer are snapped to it, so that floor() does not depend
    on rounding (the original computed d mod s in floating point).
    """
    length_s = np.asarray(event_length_ms, np.float64)[:, None] / 1000.0
    fps = np.asarray(fps, np.float64)[None, :]
    if form == "faithful":
        d = length_s * fps
    elif form in ("corrected", "stream"):
        d = length_s * float(stream_fps)
    else:
        raise ValueError(f"unknown event model {form!r}; choose one of {profiles.EVENT_MODELS}")
    stride = float(stream_fps) / fps
    n = d / stride
    nearest = np.round(n)
    return np.where(np.abs(n - nearest) < 1e-9, nearest, n)


def no_fire_probability(
    p: np.ndarray, correlation: np.ndarray, x_vote: np.ndarray, max_samples: int
) -> np.ndarray:
    """q[t] = P(no x-run of hits among t samples), t = 0..max_samples; [T+1, *p.shape].

    ``p`` [N, K] per-frame hit probabilities; ``correlation`` and ``x_vote`` [N].
    """
    p = np.asarray(p, np.float64)
    c = np.asarray(correlation, np.float64)[:, None]
    x = np.asarray(x_vote, np.int64)[:, None]
    q = np.empty((max_samples + 1,) + p.shape)
    q[0] = 1.0
    if max_samples == 0:
        return q
    if np.all(x == 1):
        miss_after_miss = (1.0 - p) + c * p
        t = np.arange(1, max_samples + 1, dtype=np.float64)[:, None, None]
        q[1:] = (1.0 - p)[None] * miss_after_miss[None] ** (t - 1.0)
        return q
    hit_after_miss = (1.0 - c) * p
    hit_after_hit = c + (1.0 - c) * p
    x_max = int(x.max())
    # run[r]: P(not fired yet and the current run of hits has length r); r = 0 also
    # stands for "no sample yet" before the first step.
    run = np.zeros((x_max,) + p.shape)
    run[0] = 1.0
    for t in range(1, max_samples + 1):
        new = np.zeros_like(run)
        first_hit = p if t == 1 else hit_after_miss
        new[0] = run[0] * (1.0 - first_hit) + run[1:].sum(axis=0) * (1.0 - hit_after_hit)
        if x_max > 1:
            new[1] = np.where(x > 1, run[0] * first_hit, 0.0)
            for r in range(1, x_max - 1):
                new[r + 1] = np.where(x > r + 1, run[r] * hit_after_hit, 0.0)
        run = new
        q[t] = run.sum(axis=0)
    return q


def miss_probability(
    p: np.ndarray,
    n: np.ndarray,
    correlation: np.ndarray,
    x_vote: np.ndarray,
) -> np.ndarray:
    """P(an event is missed); ``p`` [N, K], ``n`` [N, R] samples per event -> [N, K, R]."""
    n = np.asarray(n, np.float64)
    n_lo = np.floor(n)
    frac = n - n_lo
    n_lo = n_lo.astype(np.int64)
    q = no_fire_probability(p, correlation, x_vote, int(n_lo.max()) + 1)  # [T, N, K]
    q = np.moveaxis(q, 0, -1)  # [N, K, T]
    lo = np.take_along_axis(q, np.broadcast_to(n_lo[:, None, :], q.shape[:2] + n_lo.shape[1:]),
                            axis=-1)
    hi = np.take_along_axis(
        q, np.broadcast_to(n_lo[:, None, :] + 1, q.shape[:2] + n_lo.shape[1:]), axis=-1
    )
    w = frac[:, None, :]
    return (1.0 - w) * lo + w * hi


def precision_f1(recall: np.ndarray, false_alarm: np.ndarray, event_frequency: np.ndarray):
    """Precision and F1 from recall and the false-alarm rate; broadcasting arrays."""
    f = np.asarray(event_frequency, np.float64)
    tp = f * recall
    fp = (1.0 - f) * false_alarm
    denom = tp + fp
    precision = np.where(denom == 0.0, 1.0, tp / np.where(denom == 0.0, 1.0, denom))
    zero = (np.abs(recall) <= ZERO_ATOL) | (np.abs(precision) <= ZERO_ATOL)
    safe = np.where(zero, 1.0, recall + precision)
    f1 = np.where(zero, 0.0, 2.0 * recall * precision / safe)
    return precision, f1


def event_metrics(
    accuracy: np.ndarray,
    false_positive_rate: np.ndarray,
    event_length_ms: np.ndarray,
    event_frequency: np.ndarray,
    correlation: np.ndarray,
    fps: np.ndarray,
    stream_fps: float,
    *,
    x_vote: np.ndarray | None = None,
    form: str = "faithful",
) -> EventMetrics:
    """Recall, false-alarm rate, precision and F1 for every (app, k, fps).

    Args:
      accuracy, false_positive_rate: float [N, K] per-frame probabilities.
      event_length_ms, event_frequency, correlation: float [N].
      fps: float [R] sampling rates (each in (0, stream_fps]).
      stream_fps: F.
      x_vote: int [N] consecutive positives to fire (default all 1, the paper).
      form: ``"faithful"`` (default, published numbers), ``"corrected"`` or ``"stream"``
        (see the module docstring).

    Returns:
      :class:`EventMetrics`, each float64 [N, K, R].
    """
    accuracy = np.atleast_2d(np.asarray(accuracy, np.float64))
    false_positive_rate = np.atleast_2d(np.asarray(false_positive_rate, np.float64))
    num_apps = accuracy.shape[0]
    fps = np.atleast_1d(np.asarray(fps, np.float64))
    if np.any(fps <= 0) or np.any(fps > stream_fps + 1e-12):
        raise ValueError(f"fps options must lie in (0, stream_fps={stream_fps}], got {fps}")
    if x_vote is None:
        x_vote = np.ones(num_apps, np.int64)
    n = samples_per_event(np.broadcast_to(event_length_ms, (num_apps,)), fps, stream_fps, form)
    corr = np.broadcast_to(np.asarray(correlation, np.float64), (num_apps,))
    xv = np.broadcast_to(np.asarray(x_vote, np.int64), (num_apps,))
    if form == "stream":
        # Per fps option r, the sample-to-sample correlation c ** s_r; one column at a time.
        strides = float(stream_fps) / fps
        recall = np.concatenate([1.0 - miss_probability(accuracy, n[:, r:r + 1],
                                                        corr ** s, xv)
                                 for r, s in enumerate(strides)], axis=-1)
        false_alarm = np.concatenate([1.0 - miss_probability(false_positive_rate,
                                                             n[:, r:r + 1], corr ** s, xv)
                                      for r, s in enumerate(strides)], axis=-1)
    else:
        recall = 1.0 - miss_probability(accuracy, n, corr, xv)
        false_alarm = 1.0 - miss_probability(false_positive_rate, n, corr, xv)
    freq = np.broadcast_to(np.asarray(event_frequency, np.float64), (num_apps,))
    precision, f1 = precision_f1(recall, false_alarm, freq[:, None, None])
    return EventMetrics(recall=recall, false_alarm=false_alarm, precision=precision, f1=f1)


def problem_metrics(problem: profiles.Problem, fps: np.ndarray) -> EventMetrics:
    """:func:`event_metrics` for all apps of a problem over the given fps options."""
    apps = problem.apps
    return event_metrics(
        np.stack([a.accuracy for a in apps]),
        np.stack([a.false_positive_rate for a in apps]),
        np.array([a.event_length_ms for a in apps]),
        np.array([a.event_frequency for a in apps]),
        np.array([a.correlation for a in apps]),
        fps,
        problem.stream_fps,
        x_vote=np.array([a.x_vote for a in apps]),
        form=problem.event_model,
    )


def benefit(metrics: EventMetrics, objective: str) -> np.ndarray:
    """Per-app benefit the planners maximise, [N, K, R], for an objective.

    ``f1`` and ``maxmin_f1``: F1. ``fnr``: recall (mean FNR = 1 - mean recall). ``fdr``:
    precision (mean 1 - precision = 1 - mean precision).
    """
    if objective in ("f1", "maxmin_f1"):
        return metrics.f1
    if objective == "fnr":
        return metrics.recall
    if objective == "fdr":
        return metrics.precision
    raise ValueError(f"unknown objective {objective!r}; choose one of {profiles.OBJECTIVES}")


def aggregate(benefits: np.ndarray, weights: np.ndarray, objective: str) -> float:
    """The value planners maximise for per-app benefits [N] (weighted mean, or min)."""
    benefits = np.asarray(benefits, np.float64)
    if objective == "maxmin_f1":
        return float(benefits.min())
    w = np.asarray(weights, np.float64)
    return float((w * benefits).sum() / w.sum())


def objective_value(score: float, objective: str) -> float:
    """The objective in its natural units: mean F1 / min F1 (maximised) or mean FNR /
    mean 1 - precision (minimised)."""
    if objective in ("fnr", "fdr"):
        return 1.0 - score
    return score
