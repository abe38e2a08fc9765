"""Profiles for the planner: per-(app, k) accuracy / false-positive rate, per-layer cost
measured on the current device, and a writer for the shipped profile-directory format
(read back by :func:`mainstream_jax.profiles.load_profile_dir`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mainstream_jax import profiles
from mainstream_jax.e2e import basenet

COST_UNIT = "ms_per_frame"


def detection_rates(
    logits: np.ndarray, positives: np.ndarray, negative_weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame hit rate on positives and false-hit rate on negatives, per app.

    ``logits`` float [A, n] (a frame is flagged when its logit is > 0), ``positives`` bool
    [A, n]. ``negative_weights`` float [A, n] (optional): the false-hit rate is the
    weighted mean over the negatives, so that it can describe the mix of negatives a
    stream shows (see ``streams.negative_class_shares``) rather than the held-out set's.
    Returns (accuracy [A], false_positive_rate [A]).
    """
    logits = np.asarray(logits)
    positives = np.asarray(positives, bool)
    if logits.shape != positives.shape or logits.ndim != 2:
        raise ValueError(f"logits {logits.shape} and positives {positives.shape} must both "
                         "be [apps, frames]")
    flagged = logits > 0
    if negative_weights is None:
        w = (~positives).astype(np.float64)
    else:
        w = np.asarray(negative_weights, np.float64)
        if w.shape != positives.shape or np.any(w < 0):
            raise ValueError(f"negative_weights {w.shape} must be [apps, frames] and >= 0")
        w = np.where(positives, 0.0, w)
    n_pos = positives.sum(axis=1)
    if np.any(n_pos == 0) or np.any(w.sum(axis=1) == 0):
        raise ValueError("every app needs held-out positive and negative frames")
    acc = (flagged & positives).sum(axis=1) / n_pos
    fpr = (flagged * w).sum(axis=1) / w.sum(axis=1)
    return acc, fpr


class LayerCosts(NamedTuple):
    ms_per_frame: np.ndarray  # float64 [L]: the per-layer cost, per frame
    raw_ms: np.ndarray  # float64 [L]: median time of each layer alone on `batch` frames
    full_ms: float  # median time of the whole network, one fused call, on `batch` frames
    overhead_ms: float  # median time of a trivial jitted call (one number): the dispatch cost
    batch: int
    repeats: int


def time_call(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def measure_layer_costs(
    model: basenet.ChokepointNet,
    variables: dict,
    image_shape: Sequence[int],
    *,
    batch: int,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
) -> LayerCosts:
    """Per-layer inference cost on the default device, in ms per frame.

    Every layer is jitted alone and called on ``batch`` frames of its input shape; so are
    the whole network (one fused call, as the runtime runs it) and a trivial op (the
    dispatch overhead, which a runtime pays once per call, not once per layer). Warm-up
    calls, then ``repeats`` rounds that time every call once (interleaved, so a burst of
    load from other processes hits all of them alike), ``block_until_ready`` after each,
    median per call. Layer l's cost is its own time minus the overhead, scaled so that
    the layers add up to the fused network's time minus the overhead.

    Why scaled: alone, the layers added up to ~47 % more than the fused network (e2e
    smoke run: 1.35 predicted against 0.92 ms per stream-second measured). Differences
    of fused prefix times ``[0, l]`` add up right but were dominated by timing noise on
    this shared CPU (layers got 0 or double their cost; 11 of 32 throughput points within
    15 % of the prediction). A non-negative least-squares fit of layer costs to the
    whole network, every prefix ``[0, k)`` and every suffix ``[k, L)`` (the pieces the
    runtime runs) did worse than scaling: 8 of 32 points against 24 of 32 in the same
    run, because it put the suffixes' fixed per-call costs on the last layers.
    """
    if batch < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need batch >= 1, repeats >= 1, warmup >= 0; got {batch}, "
                         f"{repeats}, {warmup}")
    probes = cost_probes(model, variables, image_shape, batch=batch, seed=seed)
    for _ in range(warmup):
        for fn, args in probes:
            time_call(fn, *args)
    times = np.array([[time_call(fn, *args) for fn, args in probes]
                      for _ in range(repeats)])
    return costs_from_times(times, batch)


def cost_probes(
    model: basenet.ChokepointNet, variables: dict, image_shape: Sequence[int], *,
    batch: int, seed: int = 0
) -> list[tuple[Any, tuple]]:
    """The calls :func:`measure_layer_costs` times, as (jitted fn, args): each layer
    alone, the whole network fused, a trivial op. A benchmark can interleave them with
    its own calls (so that both see the same load) and pass the times to
    :func:`costs_from_times`."""
    shapes = basenet.activation_shapes(model, image_shape)
    key = jax.random.key(seed)
    probes = []
    for i in range(model.spec.num_layers):
        x = jax.random.normal(jax.random.fold_in(key, i), (batch, *shapes[i]))
        probes.append((jax.jit(lambda v, h, i=i: model.apply(v, h, i, i + 1, False)),
                       (variables, x)))
    x0 = probes[0][1][1]
    probes.append((jax.jit(lambda v, h: model.apply(v, h, 0, None, False)), (variables, x0)))
    # The dispatch overhead: a trivial op on one number, so that it measures the cost of
    # a jitted call and not of touching `batch` frames (on 600 frames, h + 1 took 7 ms).
    probes.append((jax.jit(lambda h: h + 1.0), (jnp.zeros((1,), jnp.float32),)))
    return probes


def costs_from_times(times: np.ndarray, batch: int) -> LayerCosts:
    """:class:`LayerCosts` from seconds [repeats, L + 2] of the :func:`cost_probes`."""
    med = np.median(np.asarray(times), axis=0) * 1e3
    raw, full, over = med[:-2], float(med[-2]), float(med[-1])
    alone = np.maximum(raw - over, 0.0)
    scale = max(full - over, 0.0) / alone.sum() if alone.sum() > 0 else 0.0
    return LayerCosts(alone * scale / batch, raw, full, over, batch, int(times.shape[0]))


def write_profile_dir(
    directory: str,
    network: profiles.BaseNetwork,
    apps: Sequence[profiles.AppProfile],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``network`` and ``apps`` in the shipped profile format.

    ``profile.json`` (model, chokepoints, per app its accuracy file and event parameters,
    ``metadata`` under "e2e"), ``layer_costs.csv`` (``relative_cost`` = the network's
    layer costs, here ms per frame), ``layer_params.csv`` (when the network has layer
    bytes) and ``accuracy/<app>.csv``. The curves are written as given (uncleaned).
    """
    os.makedirs(os.path.join(directory, "accuracy"), exist_ok=True)
    names = network.layer_names or tuple(f"layer_{i}" for i in range(network.num_layers))
    with open(os.path.join(directory, "layer_costs.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer_index", "layer_name", "relative_cost"])
        for i, (n, c) in enumerate(zip(names, network.layer_costs, strict=True)):
            w.writerow([i, n, repr(float(c))])
    if network.layer_bytes is not None:
        with open(os.path.join(directory, "layer_params.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["layer_index", "layer_name", "param_count", "param_bytes"])
            for i, (n, b) in enumerate(zip(names, network.layer_bytes, strict=True)):
                w.writerow([i, n, int(b) // 4, repr(float(b))])
    app_meta = {}
    for a in apps:
        fname = f"accuracy/{a.name}.csv"
        with open(os.path.join(directory, fname), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["num_frozen", "accuracy", "false_positive_rate"])
            for k, acc, fpr in zip(network.chokepoints, a.accuracy, a.false_positive_rate,
                                   strict=True):
                w.writerow([int(k), repr(float(acc)), repr(float(fpr))])
        app_meta[a.name] = {
            "accuracy_file": fname,
            "event_length_ms": a.event_length_ms,
            "event_frequency": a.event_frequency,
            "correlation_coefficient": a.correlation,
        }
    meta = {
        "model": network.name,
        "chokepoints": [int(k) for k in network.chokepoints],
        "cost_unit": COST_UNIT,
        "apps": app_meta,
        "e2e": dict(metadata or {}),
    }
    with open(os.path.join(directory, "profile.json"), "w") as f:
        json.dump(meta, f, indent=1, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, (np.ndarray, jnp.ndarray)):
        return np.asarray(obj).tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
