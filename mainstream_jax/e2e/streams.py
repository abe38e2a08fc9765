"""Synthetic video streams built from real images, and event-level scoring.

One stream serves every app (they watch the same camera). A frame shows one object.
App ``a``'s events are runs of ``d_a = L_a / 1000 * F`` frames showing its target class;
events of different apps never overlap, so their frequencies must sum to less than 1;
the frames between events show background classes (none of them any app's target).
Between two events there is at least one background frame, so events never merge.

Correlation ``c``: within a run (an event, or a background gap), each frame after the
first shows, with probability ``c``, the previous frame's object again, shifted by a
fresh random jitter of up to ``jitter`` pixels; otherwise a new image drawn from the
run's classes. The planner's event model takes ``c`` as the correlation between
consecutive *samples*; an app sampling every ``s``-th frame sees less of it (about
``c ** s``), which is one of the gaps between predicted and observed F1 (reported).

Scoring (:func:`score_app`) follows the event model's counting: an event is detected
when any frame the app sampled inside it is flagged; the time outside the app's events is
cut into windows of ``d_a`` frames, and a window with a flagged sample is a false alarm;
precision = detected / (detected + false alarms).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np


class Stream(NamedTuple):
    frames: np.ndarray  # uint8 [T, H, W, C]
    event_app: np.ndarray  # int32 [T]: app whose event the frame belongs to, -1 if none
    source: np.ndarray  # int64 [T]: index of the frame's image in the pool
    repeated: np.ndarray  # bool [T]: same object as the previous frame (jittered)
    run_start: np.ndarray  # bool [T]: first frame of an event or background run
    events: np.ndarray  # int64 [E, 3]: (app, first frame, end frame (exclusive))
    event_frames: tuple[int, ...]  # d per app
    stream_fps: int


def event_frames(event_length_ms: float, stream_fps: int) -> int:
    """d = L / 1000 * F, which must be a whole number of frames >= 1."""
    d = event_length_ms / 1000.0 * stream_fps
    if abs(d - round(d)) > 1e-9 or round(d) < 1:
        raise ValueError(
            f"event length {event_length_ms} ms at {stream_fps} frames/s is {d} frames; "
            "choose a length that is a whole number (>= 1) of frames"
        )
    return int(round(d))


def jitter_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Shifts each image by (dy, dx) pixels, filling with 0 (the background)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:3]
    for i, (dy, dx) in enumerate(np.asarray(shifts, np.int64)):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h),
                                                                  slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w),
                                                                  slice(0, w + dx))
        out[i, yd, xd] = images[i, ys, xs]
    return out


def make_stream(
    images: np.ndarray,
    labels: np.ndarray,
    targets: Sequence[int],
    event_length_ms: Sequence[float],
    event_frequency: Sequence[float],
    *,
    background_classes: Sequence[int],
    correlation: float,
    stream_fps: int,
    duration_s: float,
    jitter: int = 1,
    seed: int = 0,
) -> Stream:
    """Builds a stream of ``duration_s * stream_fps`` frames from a pool of images.

    App ``a`` gets ``round(f_a * T / d_a)`` events of ``d_a`` frames showing class
    ``targets[a]``, placed in random order with random background gaps (each >= 1 frame).
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    num_apps = len(targets)
    if not (len(event_length_ms) == len(event_frequency) == num_apps) or num_apps == 0:
        raise ValueError("targets, event_length_ms and event_frequency need one entry per "
                         "app (at least one)")
    if not 0.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must lie in [0, 1], got {correlation}")
    if jitter < 0:
        raise ValueError(f"jitter must be >= 0, got {jitter}")
    if set(targets) & set(background_classes) or len(set(targets)) != num_apps:
        raise ValueError(f"targets {list(targets)} must be distinct and not among the "
                         f"background classes {list(background_classes)}")
    freq = np.asarray(event_frequency, np.float64)
    if np.any(freq <= 0) or freq.sum() >= 1.0:
        raise ValueError(f"event frequencies must be > 0 and sum to < 1 (events of "
                         f"different apps share one stream), got {freq.tolist()}")
    total = int(round(duration_s * stream_fps))
    d = [event_frames(length, stream_fps) for length in event_length_ms]
    counts = [int(round(f * total / di)) for f, di in zip(freq, d, strict=True)]
    if min(counts) < 1:
        raise ValueError(f"duration {duration_s} s is too short: some app gets no event "
                         f"(events per app: {counts})")
    background = total - sum(c * di for c, di in zip(counts, d, strict=True))
    num_events = sum(counts)
    if background < num_events + 1:
        raise ValueError("not enough background frames to separate the events; lower the "
                         "event frequencies")
    pools = {int(c): np.flatnonzero(labels == c) for c in set(targets) | set(background_classes)}
    for c, ids in pools.items():
        if ids.size == 0:
            raise ValueError(f"the image pool has no image of class {c}")
    bg_ids = np.concatenate([pools[int(c)] for c in background_classes])
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(num_apps), counts))
    gaps = 1 + rng.multinomial(background - (num_events + 1), np.full(num_events + 1,
                                                                      1.0 / (num_events + 1)))
    runs: list[tuple[int, int]] = []  # (app or -1, length)
    for e, a in enumerate(order):
        runs.append((-1, int(gaps[e])))
        runs.append((int(a), d[a]))
    runs.append((-1, int(gaps[-1])))
    event_app = np.empty(total, np.int32)
    source = np.empty(total, np.int64)
    repeated = np.zeros(total, bool)
    run_start = np.zeros(total, bool)
    events = []
    t = 0
    for a, length in runs:
        ids = bg_ids if a < 0 else pools[int(targets[a])]
        if a >= 0:
            events.append((a, t, t + length))
        run_start[t] = True
        for j in range(length):
            if j > 0 and rng.random() < correlation:
                source[t + j] = source[t + j - 1]
                repeated[t + j] = True
            else:
                source[t + j] = ids[rng.integers(ids.size)]
        event_app[t:t + length] = a
        t += length
    shifts = rng.integers(-jitter, jitter + 1, size=(total, 2))
    frames = jitter_images(images[source], shifts)
    return Stream(frames, event_app, source, repeated, run_start,
                  np.asarray(events, np.int64).reshape(-1, 3), tuple(d), int(stream_fps))


def negative_class_shares(
    labels: np.ndarray,
    targets: Sequence[int],
    event_frequency: Sequence[float],
    background_classes: Sequence[int],
) -> np.ndarray:
    """Expected share of each class among the frames outside app ``a``'s events, for a
    stream :func:`make_stream` builds from an image pool with these ``labels``; float
    [A, num_classes] (rows sum to 1; classes the stream never shows get 0).

    Background frames (a share 1 - sum f of the stream) draw uniformly from the pool's
    background images, so class ``b`` gets (1 - sum f) n_b / n_background; app ``a``
    also sees app ``j``'s events (j != a), a share f_j.
    """
    labels = np.asarray(labels)
    freq = np.asarray(event_frequency, np.float64)
    num_classes = int(max(labels.max(), *targets, *background_classes)) + 1
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    bg = np.zeros(num_classes)
    bg[list(background_classes)] = counts[list(background_classes)]
    if bg.sum() == 0:
        raise ValueError("the pool has no background image")
    bg *= (1.0 - freq.sum()) / bg.sum()
    out = np.tile(bg, (len(targets), 1))
    for a in range(len(targets)):
        for j, t in enumerate(targets):
            if j != a:
                out[a, t] += freq[j]
    return out / out.sum(axis=1, keepdims=True)


class StreamStats(NamedTuple):
    event_frequency: np.ndarray  # [A] share of frames in each app's events
    mean_event_frames: np.ndarray  # [A]
    num_events: np.ndarray  # [A]
    repeat_fraction: float  # share of non-first frames of a run that repeat the object


def stream_stats(stream: Stream, num_apps: int) -> StreamStats:
    """The statistics the generator is asked to produce, measured on a stream."""
    t = stream.event_app.shape[0]
    freq = np.array([(stream.event_app == a).sum() / t for a in range(num_apps)])
    lengths = [stream.events[stream.events[:, 0] == a] for a in range(num_apps)]
    mean_len = np.array([float((e[:, 2] - e[:, 1]).mean()) if len(e) else 0.0
                         for e in lengths])
    counts = np.array([len(e) for e in lengths])
    inner = ~stream.run_start
    return StreamStats(freq, mean_len, counts, float(stream.repeated[inner].mean()))


class EventScore(NamedTuple):
    recall: float
    precision: float
    f1: float
    num_events: int
    detected: int
    num_windows: int  # non-event windows of d frames
    false_alarms: int


def score_app(stream: Stream, app: int, sampled: np.ndarray, flagged: np.ndarray) -> EventScore:
    """Event-level recall / precision / F1 of one app (see the module docstring).

    ``sampled`` int [n]: the stream frames the app processed; ``flagged`` bool [n].
    """
    sampled = np.asarray(sampled, np.int64)
    flagged = np.asarray(flagged, bool)
    if sampled.shape != flagged.shape:
        raise ValueError(f"sampled {sampled.shape} and flagged {flagged.shape} differ")
    t = stream.event_app.shape[0]
    hit = np.zeros(t, bool)
    hit[sampled[flagged]] = True
    cum = np.concatenate([[0], np.cumsum(hit)])
    ev = stream.events[stream.events[:, 0] == app]
    detected = int(((cum[ev[:, 2]] - cum[ev[:, 1]]) > 0).sum())
    d = stream.event_frames[app]
    outside = stream.event_app != app
    # Maximal runs of frames outside the app's events, each cut into whole windows of d.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], outside.astype(np.int8), [0]])))
    windows = fired = 0
    for start, end in zip(edges[::2], edges[1::2], strict=True):
        n = (end - start) // d
        w_start = start + d * np.arange(n)
        windows += n
        fired += int(((cum[w_start + d] - cum[w_start]) > 0).sum())
    recall = detected / len(ev) if len(ev) else 0.0
    precision = detected / (detected + fired) if detected + fired else 1.0
    f1 = 2 * recall * precision / (recall + precision) if recall > 0 and precision > 0 else 0.0
    return EventScore(recall, precision, f1, int(len(ev)), detected, int(windows), int(fired))
