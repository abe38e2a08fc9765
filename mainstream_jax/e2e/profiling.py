"""Profiles for the planner: per-(app, k) accuracy / false-positive rate, per-layer cost
measured on the current device, and a writer for the shipped profile-directory format
(read back by :func:`mainstream_jax.profiles.load_profile_dir`).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mainstream_jax import profiles
from mainstream_jax.e2e import basenet, runtime

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


def time_burst(fn, args: tuple, calls: int) -> float:
    """Seconds per call of ``calls`` calls dispatched back to back (as a runtime call
    dispatches its pieces), with one ``block_until_ready`` at the end."""
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(calls)])
    return (time.perf_counter() - start) / calls


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
    probes.append(overhead_probe())
    return probes


def costs_from_times(times: np.ndarray, batch: int) -> LayerCosts:
    """:class:`LayerCosts` from seconds [repeats, L + 2] of the :func:`cost_probes`."""
    med = np.median(np.asarray(times), axis=0) * 1e3
    raw, full, over = med[:-2], float(med[-2]), float(med[-1])
    alone = np.maximum(raw - over, 0.0)
    scale = max(full - over, 0.0) / alone.sum() if alone.sum() > 0 else 0.0
    return LayerCosts(alone * scale / batch, raw, full, over, batch, int(times.shape[0]))


def all_pieces(num_layers: int) -> list[tuple[int, int]]:
    """Every piece a :class:`runtime.StemRuntime` can run on a chain of ``num_layers``
    layers whose every boundary is a chokepoint: stem segments ``[a, b)`` with
    ``0 <= a < b < L`` and branches ``(k, L)`` with ``0 <= k < L`` (L (L + 1) / 2)."""
    return [(a, b) for a in range(num_layers) for b in range(a + 1, num_layers + 1)]


def piece_probes(
    model: basenet.ChokepointNet, variables: dict, image_shape: Sequence[int], *,
    batch: int, mean: float, std: float, pieces: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
) -> list[tuple[tuple[int, int], Any, tuple]]:
    """The runtime's own jitted functions for each piece, as ((start, end), fn, args).

    Stem segment ``(a, b)`` (``b < L``) is ``runtime._segment_fn`` with the layers
    ``[a, b)`` of ``variables``; branch ``(k, L)`` is ``runtime._group_fn`` with the
    layers ``[k, L)`` stacked for one app (what the unbatched runtime dispatches). Both
    are the runtime's cached functions with the same static arguments (``mean``,
    ``std`` must be the runtime's) and argument structure, so a probe and the runtime
    share the compilation when the frame counts match. Inputs: ``batch`` random uint8
    frames for pieces from layer 0 (they normalise them), else ``batch`` random
    activations of layer ``a``'s input shape; the row selection is the identity.
    """
    spec = model.spec
    L = spec.num_layers
    pieces = all_pieces(L) if pieces is None else [tuple(map(int, p)) for p in pieces]
    for a, b in pieces:
        if not 0 <= a < b <= L:
            raise ValueError(f"piece ({a}, {b}) needs 0 <= start < end <= {L}")
    shapes = basenet.activation_shapes(model, image_shape)
    rng = np.random.default_rng(seed)
    idx = jnp.asarray(np.arange(batch))
    inputs: dict[int, jax.Array] = {}
    probes = []
    for a, b in pieces:
        if a not in inputs:
            inputs[a] = (jnp.asarray(rng.integers(0, 256, (batch, *image_shape), np.uint8))
                         if a == 0 else
                         jnp.asarray(rng.normal(size=(batch, *shapes[a])), jnp.float32))
        if b < L:
            fn = runtime._segment_fn(model, a, b, mean, std, a == 0, True)
            v = basenet.select_layers(variables, spec, a, b)
        else:
            fn = runtime._group_fn(model, a, mean, std, a == 0, True)
            v = jax.tree.map(lambda t: jnp.stack([t]),
                             basenet.select_layers(variables, spec, a, L))
        probes.append(((a, b), fn, (v, inputs[a], idx)))
    return probes


def overhead_probe() -> tuple[Any, tuple]:
    """The dispatch-overhead probe of :func:`cost_probes`: a trivial jitted op on one
    number."""
    return jax.jit(lambda h: h + 1.0), (jnp.zeros((1,), jnp.float32),)


def measure_piece_costs(
    model: basenet.ChokepointNet,
    variables: dict,
    image_shape: Sequence[int],
    *,
    batches: Sequence[int],
    mean: float,
    std: float,
    pieces: Sequence[tuple[int, int]] | None = None,
    burst: int = 4,
    repeats: int = 10,
    warmup: int = 1,
    first_calls: bool = False,
    seed: int = 0,
) -> profiles.PieceCosts:
    """Measured cost of each piece (default: :func:`all_pieces`) at each frame count in
    ``batches``, with the runtime's own jitted functions (:func:`piece_probes`).

    A runtime call dispatches its pieces back to back and waits once, so a piece is
    timed the same way: ``burst`` calls issued back to back, one ``block_until_ready``,
    time per call (:func:`time_burst`). The trivial op of :func:`cost_probes` is timed
    in bursts too (``overhead_ms``) and alone (``sync_ms`` = alone less burst: the one
    wait per runtime call). With ``first_calls`` every piece is also called alone,
    after the other pieces' calls (:func:`time_call`), and the table separates a
    piece's first call in a runtime call from a repeated one
    (:func:`piece_costs_from_times`). Warm-up (the first round compiles), then
    ``repeats`` rounds that time every probe once, each round in a new random order of
    the bursts and then of the single calls (all batches interleaved, so a burst of
    load from other processes hits all alike, and no probe always follows the same
    one), median per probe. Nothing is derived from other pieces: segment ``[a, c)`` is
    timed, not summed from ``[a, b)`` and ``[b, c)``.

    Why bursts: on one CPU core, a piece waited for alone cost 0.1-0.7 ms more than in
    a burst (branch ``[7, 14)``: 1.62 against 1.31 ms per 100 frames; ``[11, 14)``: 0.42
    against 0.12), and N apps' branches in the runtime cost the burst figure each; the
    blocked figures got 14-16 of 32 throughput points within 15 %, bursts 29-30.
    ``first_calls`` (off by default) separates a program's first call in a runtime
    call from its repeats. In eight throughput runs (inline dispatch) it moved the
    one-app points' mean error from -5.7 % (bursts) to -1.2 %, but not the count within
    15 % (first calls 32, 31, 32, 32, 32, 31, 32, 32 of 32; bursts 32, 32, 32, 32, 32,
    30, 32, 32), so
    the default table stays the bursts (``benchmarks/results/README.md``). Cost: one
    more call per probe and round.
    """
    if repeats < 1 or warmup < 0 or burst < 1 or not batches:
        raise ValueError(f"need repeats >= 1, warmup >= 0, burst >= 1 and a batch; got "
                         f"{repeats}, {warmup}, {burst}, {batches}")
    if first_calls and burst < 2:
        raise ValueError("first_calls needs burst >= 2 (a repeated call is the marginal "
                         "time of one more call in a burst)")
    batches = sorted(int(b) for b in batches)
    probes = [p for b in batches for p in piece_probes(
        model, variables, image_shape, batch=b, mean=mean, std=std, pieces=pieces,
        seed=seed)]
    over_fn, over_args = overhead_probe()
    rng = np.random.default_rng(seed)

    def one_round():
        t_burst = np.empty(len(probes))
        t_alone = np.empty(len(probes))
        for j in rng.permutation(len(probes)):
            _, fn, args = probes[j]
            t_burst[j] = time_burst(fn, args, burst)
        # The trivial op between the bursts and the single calls, so that the first
        # single call does not follow a burst of itself.
        trivial = [time_burst(over_fn, over_args, burst), time_call(over_fn, *over_args)]
        if first_calls:
            for j in rng.permutation(len(probes)):
                _, fn, args = probes[j]
                t_alone[j] = time_call(fn, *args)
        return np.concatenate([t_burst, trivial]), t_alone

    for _ in range(warmup + 1):
        one_round()
    rounds = [one_round() for _ in range(repeats)]
    times = np.array([r[0] for r in rounds])
    alone = np.array([r[1] for r in rounds]) if first_calls else None
    n = len(probes) // len(batches)
    return piece_costs_from_times(times, [p[0] for p in probes[:n]], batches,
                                  model.spec.num_layers, alone_times=alone, burst=burst)


def measure_pieces_interleaved(
    probes: Sequence[tuple[tuple[int, int], Any, tuple]],
    batches: Sequence[int],
    num_layers: int,
    targets: Sequence[Callable[[], float]],
    *,
    bursts: Sequence[int] = (4,),
    repeats: int = 9,
    warmup: int = 1,
    seed: int = 0,
) -> tuple[list[profiles.PieceCosts], np.ndarray]:
    """Times pieces and other work in the same rounds, so that both see the same load.

    ``probes``: :func:`piece_probes` entries ((start, end), fn, args) for the same
    pieces at each frame count of ``batches`` (increasing), batch-major (as
    :func:`measure_piece_costs` orders them). ``targets``: callables that run some work
    and return its seconds (e.g. one pass of a runtime over a stream,
    ``StemRuntime.time_pass``). Each round runs every piece in a burst of each length in
    ``bursts`` (back-to-back calls, one wait: :func:`time_burst`, as
    :func:`measure_piece_costs` does) and every target once, all in a new random order,
    then the trivial op in a burst of each length and alone; ``warmup`` rounds first,
    discarded. Returns one table per burst length, from the medians
    (:func:`piece_costs_from_times`: nothing in them comes from the targets' times),
    and the targets' seconds [repeats, len(targets)].

    Why: on this shared machine the speed drifts over minutes, so a piece table timed
    minutes before a schedule runs can be off against it; rounds that alternate the two
    give both the same drift, and medians drop single bursts of load.
    """
    batches = [int(b) for b in batches]  # increasing (the table's check)
    bursts = [int(b) for b in bursts]
    if repeats < 1 or warmup < 0 or not bursts or min(bursts) < 1 or not batches:
        raise ValueError(f"need repeats >= 1, warmup >= 0, bursts >= 1 and a batch; got "
                         f"{repeats}, {warmup}, {bursts}, {batches}")
    if not probes or len(probes) % len(batches):
        raise ValueError(f"{len(probes)} probes for {len(batches)} batches: give the same "
                         "pieces at every batch")
    n = len(probes) // len(batches)
    pieces = [tuple(p[0]) for p in probes[:n]]
    for s in range(1, len(batches)):
        if [tuple(p[0]) for p in probes[s * n:(s + 1) * n]] != pieces:
            raise ValueError("probes must list the same pieces, in the same order, per batch")
    over_fn, over_args = overhead_probe()
    rng = np.random.default_rng(seed)
    items = [(k, j) for k in range(len(bursts)) for j in range(len(probes))]
    num = len(items) + len(targets)

    def one_round():
        t = np.empty((len(bursts), len(probes) + 2))
        out = np.empty(len(targets))
        for i in rng.permutation(num):
            if i < len(items):
                k, j = items[i]
                _, fn, args = probes[j]
                t[k, j] = time_burst(fn, args, bursts[k])
            else:
                out[i - len(items)] = targets[i - len(items)]()
        for k, b in enumerate(bursts):
            t[k, -2] = time_burst(over_fn, over_args, b)
        t[:, -1] = time_call(over_fn, *over_args)
        return t, out

    for _ in range(warmup):
        one_round()
    rounds = [one_round() for _ in range(repeats)]
    times = np.array([r[0] for r in rounds])  # [repeats, bursts, probes + 2]
    target_times = np.array([r[1] for r in rounds]).reshape(repeats, len(targets))
    return ([piece_costs_from_times(times[:, k], pieces, batches, num_layers)
             for k in range(len(bursts))], target_times)


def piece_costs_from_times(times: np.ndarray, pieces: Sequence[tuple[int, int]],
                           batches: Sequence[int], num_layers: int, *,
                           alone_times: np.ndarray | None = None,
                           burst: int | None = None) -> profiles.PieceCosts:
    """:class:`profiles.PieceCosts` from seconds per call [repeats, len(batches) *
    len(pieces) + 2]: the probes of :func:`measure_piece_costs` batch-major, then the
    trivial op in a burst and alone. Median per probe; ``sync_ms`` = trivial alone less
    trivial in a burst (>= 0).

    Without ``alone_times``: a piece's entry is its time per call in a burst over the
    batch's frames. With ``alone_times`` (seconds [repeats, len(batches) *
    len(pieces)], each probe called alone after other probes) and ``burst`` (calls per
    burst, >= 2): with B the median time per call in a burst and A the median alone,

    * ``ms_per_frame`` (a repeated call) = the marginal time of one more call in a
      burst, ``(burst * B - A) / (burst - 1)`` (the burst's first call taken as A),
      at least the trivial op's time in a burst (``overhead_ms``);
    * ``first_ms_per_frame`` (a first call) = ``A - sync_ms`` (its own wait is the
      runtime call's one wait), at least the repeated call's time.
    """
    times = np.asarray(times)
    if times.ndim != 2 or times.shape[1] != len(batches) * len(pieces) + 2:
        raise ValueError(f"times {times.shape}: expected [repeats, {len(batches)} batches x "
                         f"{len(pieces)} pieces + 2]")
    med = np.median(times, axis=0) * 1e3
    overhead, sync = float(med[-2]), max(float(med[-1] - med[-2]), 0.0)
    call = med[:-2]
    first_call = None
    if alone_times is not None:
        alone_times = np.asarray(alone_times)
        if alone_times.ndim != 2 or alone_times.shape[1] != call.size:
            raise ValueError(f"alone_times {alone_times.shape}: expected [repeats, "
                             f"{call.size}]")
        if burst is None or burst < 2:
            raise ValueError(f"alone_times needs the burst length (>= 2), got {burst}")
        alone = np.median(alone_times, axis=0) * 1e3
        call = np.maximum((burst * call - alone) / (burst - 1), overhead)
        first_call = np.maximum(alone - sync, call)
    ms = np.full((len(batches), num_layers + 1, num_layers + 1), np.nan)
    first = None if first_call is None else ms.copy()
    for s, b in enumerate(batches):
        for j, (a, e) in enumerate(pieces):
            ms[s, a, e] = call[s * len(pieces) + j] / b
            if first is not None:
                first[s, a, e] = first_call[s * len(pieces) + j] / b
    return profiles.make_piece_costs(num_layers, batches, ms, overhead, sync,
                                     first_ms_per_frame=first)


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
    bytes), ``piece_costs.csv`` (when it has piece costs: one row per measured piece and
    batch; the overhead in ``profile.json``) and ``accuracy/<app>.csv``. The curves are
    written as given (uncleaned).
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
    pieces_meta = None
    pc = network.piece_costs
    if pc is not None:
        with open(os.path.join(directory, "piece_costs.csv"), "w", newline="") as f:
            w = csv.writer(f)
            first = pc.first_ms_per_frame
            w.writerow(list(profiles.PIECE_COLUMNS)
                       + ([profiles.PIECE_FIRST_COLUMN] if first is not None else []))
            for s, b in enumerate(pc.batches):
                for a, e in pc.pieces:
                    w.writerow([a, e, int(b), repr(float(pc.ms_per_frame[s, a, e]))]
                               + ([repr(float(first[s, a, e]))] if first is not None else []))
        pieces_meta = {"file": "piece_costs.csv", "overhead_ms": float(pc.overhead_ms),
                       "sync_ms": float(pc.sync_ms)}
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
        "piece_costs": pieces_meta,
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
