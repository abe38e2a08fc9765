"""Typed, validated planner inputs: app profiles, the shared base network, problems.

Everything a planner needs is a :class:`Problem`: the apps (:class:`AppProfile`, one per
application: its accuracy / false-positive curves over the chokepoints and its event
parameters), the shared base network (:class:`BaseNetwork`: per-layer cost, optional
per-layer parameter bytes, the chokepoints), the compute budget, an optional memory
budget, the objective and the event-model form.

Inputs come from two formats, both validated here so that every bad value fails early
with a ``ValueError`` naming the app and the field:

* the shipped profile directory (``data/mainstream_mobilenet``: ``profile.json``,
  ``accuracy/<app>.csv``, ``layer_costs.csv``, ``layer_params.csv``), loaded by
  :func:`load_profile_dir` / :func:`load_mobilenet`;
* a JSON *problem file* (:func:`load_problem`), documented in :data:`PROBLEM_FILE_DOC`.

The original forces each accuracy curve to be non-increasing in the number of frozen
layers before planning (:func:`monotone_accuracy`); loading applies it by default.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

OBJECTIVES = ("f1", "fnr", "fdr", "maxmin_f1")
"""Objectives: maximise mean event F1 (default); minimise mean false-negative rate
(1 - recall); minimise mean false-discovery rate (1 - precision, called "fpr" in the
original code); maximise the minimum F1 over apps (max-min fairness)."""

EVENT_MODELS = ("faithful", "corrected", "stream")
"""Event-model forms (docs/SPEC.md section 3). ``faithful`` (default) reproduces the
published numbers: event length in frames d = L/1000 * phi. ``corrected`` counts the event
in frames of the original stream: d = L/1000 * F. ``stream`` is ``corrected`` with c the
correlation of consecutive stream frames (c ** s between samples s frames apart), as in
the end-to-end streams (``mainstream_jax.e2e.streams``)."""

MIB = float(2**20)

PROBLEM_FILE_DOC = """\
A problem file is one JSON object:

{
  "description": "...",          # optional, ignored
  "budget": 150,                 # compute budget: layer-cost units x frames/s (required
                                 # unless given on the command line)
  "stream_fps": 10,              # F, frames/s of the stream (default 10)
  "memory_budget_mib": 40,       # optional: MiB of parameters that may be resident
  "objective": "f1",             # f1 | fnr | fdr | maxmin_f1 (default f1)
  "event_model": "faithful",     # faithful | corrected | stream (default faithful)
  "network": "mobilenet",        # the shipped MobileNet-224 profile (default), or
                                 # {"name": .., "layer_costs": [..], "chokepoints": [..],
                                 #  "layer_bytes": [..] (optional), "layer_names": [..]}
  "apps": [                      # one entry per app, at least one
    {"name": "trains_at_crossing",
     "profile": "train",         # a shipped app type: its curves and, unless given
                                 # below, its event parameters
     "event_length_ms": 800, "event_frequency": 0.05, "correlation": 0.3,
     "weight": 2.0,              # optional, default 1: weight in the mean objective
     "x_vote": 1},               # optional, default 1: consecutive hits to fire
    {"name": "my_detector",      # or explicit curves over the network's chokepoints
     "curves": {"num_frozen": [0, 3, ...], "accuracy": [...],
                "false_positive_rate": [...]},
     "event_length_ms": 500, "event_frequency": 0.2, "correlation": 0.1}
  ]
}
"""


# ----------------------------------------------------------------------------- types


@dataclasses.dataclass(frozen=True, eq=False)
class PieceCosts:
    """Measured cost of every piece a stem-sharing runtime runs (optional profile part).

    A runtime that runs each stem segment and each app's branch as its own call (the e2e
    ``StemRuntime``) pays per call what that piece costs as one compiled program, which
    is not the sum of its layers' costs (XLA fuses across layers; a cut changes what it
    fuses). Piece ``(start, end)``: ``end < L`` is the stem segment of layers
    ``[start, end)``; ``end == L`` is the branch from ``start`` to the output (its
    layers and the one-logit head). Pieces from layer 0 read the raw frames.

    Attributes:
      num_layers: L.
      batches: int64 [S], strictly increasing frame counts the pieces were timed on.
      ms_per_frame: float64 [S, L + 1, L + 1]; ``[s, a, b]`` = the time of one call of
        piece ``(a, b)`` on ``batches[s]`` frames (as a runtime dispatches it: among
        calls issued back to back), divided by ``batches[s]``; NaN where not measured
        (every entry with ``a >= b``, and pieces left out). A piece is measured at every
        size or at none. With ``first_ms_per_frame``: a *repeated* call (the marginal
        time of one more call of the piece in a burst of back-to-back calls).
      overhead_ms: the time of a trivial call issued the same way (dispatch), the floor
        of :meth:`call_ms`'s size model.
      sync_ms: the wait for the results, once per runtime call (a trivial call waited
        for alone, less ``overhead_ms``).
      first_ms_per_frame: optional, same layout and measured entries: the piece's call
        as the *first* call of its function after other work (called alone, after the
        other probes, less ``sync_ms``), or None (then every call costs
        ``ms_per_frame``). Why two figures: on one CPU core a piece's first call in a
        runtime call cost more than a repeat of it (branch ``[7, 14)`` at 100 frames:
        1.86 ms alone after other pieces, 1.47 ms per further call), and a runtime
        call's pieces are each the first call of its function, except the branches of
        apps with the same k (one function, run once per app).
    """

    num_layers: int
    batches: np.ndarray
    ms_per_frame: np.ndarray
    overhead_ms: float
    sync_ms: float = 0.0
    first_ms_per_frame: np.ndarray | None = None

    def has(self, start: int, end: int) -> bool:
        return (0 <= start < end <= self.num_layers
                and bool(np.isfinite(self.ms_per_frame[0, start, end])))

    @property
    def pieces(self) -> list[tuple[int, int]]:
        """The measured pieces ``(start, end)``, sorted."""
        a, b = np.nonzero(np.isfinite(self.ms_per_frame[0]))
        return sorted(zip(a.tolist(), b.tolist(), strict=True))

    def call_ms(self, start: int, end: int, frames: float, *, first: bool = False) -> float:
        """Predicted time of one call of piece ``(start, end)`` on ``frames`` frames: the
        first call of its function in a runtime call (``first``; from
        ``first_ms_per_frame`` when the table has it) or a repeated one.

        At a measured size: the measurement. Between two measured sizes: linear in the
        frames between them. Below the smallest size (and above the largest when only
        one was measured): the dispatch overhead plus work proportional to the frames,
        ``overhead + (T_1 - overhead) * frames / B_1``. Above the largest of several
        sizes: the last interval's line, extended.
        """
        if not self.has(start, end):
            raise KeyError(f"piece ({start}, {end}) was not measured")
        if frames <= 0:
            raise ValueError(f"frames must be > 0, got {frames}")
        b = self.batches.astype(np.float64)
        table = (self.first_ms_per_frame if first and self.first_ms_per_frame is not None
                 else self.ms_per_frame)
        t = table[:, start, end] * b
        if frames <= b[0] or b.size == 1:
            return float(self.overhead_ms + (t[0] - self.overhead_ms) * frames / b[0])
        j = min(int(np.searchsorted(b, frames)), b.size - 1)
        return float(t[j - 1] + (t[j] - t[j - 1]) * (frames - b[j - 1]) / (b[j] - b[j - 1]))


@dataclasses.dataclass(frozen=True, eq=False)
class BaseNetwork:
    """The shared base network: per-layer cost and (optionally) parameter bytes.

    Attributes:
      name: a label.
      layer_costs: float64 [L], relative inference cost of each layer per frame.
      chokepoints: int64 [K], strictly increasing allowed numbers of frozen layers, each
        in [0, L). ``chokepoints[0]`` is usually 0 (nothing shared).
      layer_bytes: float64 [L] parameter bytes per layer, or None when unknown (then no
        memory budget can be used).
      layer_names: optional names, for reports.
      piece_costs: optional measured costs of whole pieces (:class:`PieceCosts`, for a
        runtime's cost prediction; the planners use ``layer_costs``).
    """

    name: str
    layer_costs: np.ndarray
    chokepoints: np.ndarray
    layer_bytes: np.ndarray | None = None
    layer_names: tuple[str, ...] | None = None
    piece_costs: PieceCosts | None = None

    @property
    def num_layers(self) -> int:
        return int(self.layer_costs.shape[0])

    @property
    def total_cost(self) -> float:
        """Cost of one frame through the whole network."""
        return float(self.layer_costs.sum())


@dataclasses.dataclass(frozen=True, eq=False)
class AppProfile:
    """One application: its curves over the chokepoints and its event parameters.

    Attributes:
      name: unique within a problem.
      accuracy: float64 [K], per-frame hit probability on event frames at each
        chokepoint of the network (aligned with ``BaseNetwork.chokepoints``).
      false_positive_rate: float64 [K], per-frame false-hit probability on non-event
        frames.
      event_length_ms: L, event length in milliseconds (> 0).
      event_frequency: f, share of time in events, in (0, 1].
      correlation: c, correlation of consecutive misses, in [0, 1].
      weight: weight of this app in the mean objectives (> 0).
      x_vote: consecutive positive samples needed to fire (>= 1; 1 = the paper).
      app_type: the shipped profile this app was built from, if any.
    """

    name: str
    accuracy: np.ndarray
    false_positive_rate: np.ndarray
    event_length_ms: float
    event_frequency: float
    correlation: float
    weight: float = 1.0
    x_vote: int = 1
    app_type: str | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A planning problem. Build with :func:`make_problem` (validates) or load a file."""

    apps: tuple[AppProfile, ...]
    network: BaseNetwork
    budget: float
    stream_fps: int = 10
    memory_budget_bytes: float | None = None
    objective: str = "f1"
    event_model: str = "faithful"

    @property
    def num_apps(self) -> int:
        return len(self.apps)

    def with_budget(self, budget: float) -> Problem:
        """The same problem under another compute budget (validated)."""
        _check_budget(budget)
        return dataclasses.replace(self, budget=float(budget))


@dataclasses.dataclass(frozen=True, eq=False)
class ProfileLibrary:
    """A profile directory: the base network, app types and the scenario generator."""

    network: BaseNetwork
    app_types: Mapping[str, AppProfile]
    scenario_generator: Mapping[str, Any]
    source: str


# ------------------------------------------------------------------------ validation


def _fail(what: str, msg: str) -> ValueError:
    return ValueError(f"{what}: {msg}")


def _as_finite_array(values: Any, what: str, dtype=np.float64) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise _fail(what, f"expected a list of numbers, got {values!r}") from e
    if arr.ndim != 1:
        raise _fail(what, f"expected a flat list of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise _fail(what, f"entry {bad} is {arr[bad]}; every value must be finite")
    return arr


def _check_probabilities(arr: np.ndarray, what: str, labels: Sequence[Any]) -> None:
    bad = np.flatnonzero((arr < 0.0) | (arr > 1.0))
    if bad.size:
        i = int(bad[0])
        raise _fail(what, f"{arr[i]} at num_frozen={labels[i]} is outside [0, 1]")


def _check_scalar(value: Any, what: str, low: float, high: float, *, low_open=False):
    try:
        x = float(value)
    except (TypeError, ValueError) as e:
        raise _fail(what, f"expected a number, got {value!r}") from e
    if not math.isfinite(x):
        raise _fail(what, f"{x} is not finite")
    too_low = x <= low if low_open else x < low
    if too_low or x > high:
        lo = "(" if low_open else "["
        raise _fail(what, f"{x} is outside {lo}{low}, {high}]")
    return x


def _check_budget(budget: Any) -> float:
    return _check_scalar(budget, "budget", 0.0, math.inf, low_open=True)


def make_piece_costs(num_layers: int, batches: Any, ms_per_frame: Any,
                     overhead_ms: float, sync_ms: float = 0.0, *,
                     first_ms_per_frame: Any = None,
                     what: str = "piece_costs") -> PieceCosts:
    """Validates and builds :class:`PieceCosts` (see there for the layout)."""
    num_layers = int(num_layers)
    if num_layers < 1:
        raise _fail(what, f"num_layers must be >= 1, got {num_layers}")
    b = _as_finite_array(batches, f"{what}: batches")
    if b.size == 0 or np.any(b != np.round(b)) or np.any(b < 1):
        raise _fail(f"{what}: batches", f"need whole frame counts >= 1, got {b.tolist()}")
    if np.any(np.diff(b) <= 0):
        raise _fail(f"{what}: batches", f"must strictly increase, got {b.tolist()}")
    try:
        ms = np.array(ms_per_frame, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _fail(f"{what}: ms_per_frame", "expected an array of numbers") from e
    want = (b.size, num_layers + 1, num_layers + 1)
    if ms.shape != want:
        raise _fail(f"{what}: ms_per_frame", f"has shape {ms.shape}, expected {want} "
                    "(batches x (L + 1) x (L + 1))")
    if np.any(np.isinf(ms)):
        raise _fail(f"{what}: ms_per_frame", "has an infinite entry")
    upper = np.triu(np.ones((num_layers + 1, num_layers + 1), bool), 1)
    if np.any(np.isfinite(ms[:, ~upper])):
        s, a, e = np.argwhere(np.isfinite(ms) & ~upper[None])[0]
        raise _fail(f"{what}: ms_per_frame", f"piece ({a}, {e}) at batch {int(b[s])} has "
                    "start >= end; only pieces start < end exist")
    measured = np.isfinite(ms)
    if np.any(measured != measured[:1]):
        s, a, e = np.argwhere(measured != measured[:1])[0]
        raise _fail(f"{what}: ms_per_frame", f"piece ({a}, {e}) is measured at some "
                    "batches but not at all of them")
    if not measured.any():
        raise _fail(f"{what}: ms_per_frame", "no piece is measured")
    if np.any(ms[measured] <= 0):
        s, a, e = np.argwhere(measured & (np.nan_to_num(ms, nan=1.0) <= 0))[0]
        raise _fail(f"{what}: ms_per_frame", f"piece ({a}, {e}) at batch {int(b[s])} has "
                    f"non-positive cost {ms[s, a, e]}")
    over = _check_scalar(overhead_ms, f"{what}: overhead_ms", 0.0, math.inf)
    sync = _check_scalar(sync_ms, f"{what}: sync_ms", 0.0, math.inf)
    first = None
    if first_ms_per_frame is not None:
        try:
            first = np.array(first_ms_per_frame, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise _fail(f"{what}: first_ms_per_frame", "expected an array of numbers") from e
        if first.shape != ms.shape:
            raise _fail(f"{what}: first_ms_per_frame", f"has shape {first.shape}, expected "
                        f"{ms.shape} (as ms_per_frame)")
        if np.any(np.isinf(first)):
            raise _fail(f"{what}: first_ms_per_frame", "has an infinite entry")
        if np.any(np.isfinite(first) != measured):
            s, a, e = np.argwhere(np.isfinite(first) != measured)[0]
            raise _fail(f"{what}: first_ms_per_frame", f"piece ({a}, {e}) at batch "
                        f"{int(b[s])} is measured in one table but not in the other")
        if np.any(first[measured] <= 0):
            s, a, e = np.argwhere(measured & (np.nan_to_num(first, nan=1.0) <= 0))[0]
            raise _fail(f"{what}: first_ms_per_frame", f"piece ({a}, {e}) at batch "
                        f"{int(b[s])} has non-positive cost {first[s, a, e]}")
    return PieceCosts(num_layers, b.astype(np.int64), ms, over, sync, first)


def make_network(
    layer_costs: Any,
    chokepoints: Any,
    *,
    layer_bytes: Any = None,
    layer_names: Sequence[str] | None = None,
    name: str = "network",
    piece_costs: PieceCosts | None = None,
) -> BaseNetwork:
    """Validates and builds a :class:`BaseNetwork`."""
    costs = _as_finite_array(layer_costs, f"network {name!r}: layer_costs")
    if costs.size == 0:
        raise _fail(f"network {name!r}: layer_costs", "needs at least one layer")
    if np.any(costs < 0):
        i = int(np.flatnonzero(costs < 0)[0])
        raise _fail(f"network {name!r}: layer_costs", f"layer {i} has negative cost {costs[i]}")
    cps = _as_finite_array(chokepoints, f"network {name!r}: chokepoints")
    if cps.size == 0 or np.any(cps != np.round(cps)):
        raise _fail(f"network {name!r}: chokepoints", "need a non-empty list of integers")
    cps = cps.astype(np.int64)
    if np.any(np.diff(cps) <= 0):
        raise _fail(f"network {name!r}: chokepoints", f"must strictly increase, got {cps}")
    if cps[0] < 0 or cps[-1] >= costs.size:
        raise _fail(
            f"network {name!r}: chokepoints",
            f"must lie in [0, {costs.size - 1}] (the network has {costs.size} layers)",
        )
    nbytes = None
    if layer_bytes is not None:
        nbytes = _as_finite_array(layer_bytes, f"network {name!r}: layer_bytes")
        if nbytes.shape != costs.shape:
            raise _fail(
                f"network {name!r}: layer_bytes",
                f"has {nbytes.size} entries but the network has {costs.size} layers",
            )
        if np.any(nbytes < 0):
            i = int(np.flatnonzero(nbytes < 0)[0])
            raise _fail(f"network {name!r}: layer_bytes", f"layer {i} is negative")
    names = None
    if layer_names is not None:
        names = tuple(str(n) for n in layer_names)
        if len(names) != costs.size:
            raise _fail(f"network {name!r}: layer_names", "must name every layer")
    if piece_costs is not None:
        if not isinstance(piece_costs, PieceCosts):
            raise _fail(f"network {name!r}: piece_costs", "expected PieceCosts (build with "
                        "make_piece_costs)")
        if piece_costs.num_layers != costs.size:
            raise _fail(f"network {name!r}: piece_costs", f"are for {piece_costs.num_layers} "
                        f"layers but the network has {costs.size}")
    return BaseNetwork(
        name=name, layer_costs=costs, chokepoints=cps, layer_bytes=nbytes, layer_names=names,
        piece_costs=piece_costs,
    )


def monotone_accuracy(accuracy: np.ndarray, false_positive_rate: np.ndarray):
    """The original's clean-up: accuracy made non-increasing in num_frozen.

    Walking from the largest chokepoint down, an accuracy lower than the next larger
    chokepoint's (already cleaned) accuracy is replaced by it, and its false-positive
    rate with it. Returns new (accuracy, false_positive_rate) arrays.
    """
    acc = np.array(accuracy, dtype=np.float64, copy=True)
    fpr = np.array(false_positive_rate, dtype=np.float64, copy=True)
    for i in range(acc.size - 2, -1, -1):
        if acc[i] < acc[i + 1]:
            acc[i] = acc[i + 1]
            fpr[i] = fpr[i + 1]
    return acc, fpr


def make_app(
    name: str,
    network: BaseNetwork,
    *,
    num_frozen: Any,
    accuracy: Any,
    false_positive_rate: Any,
    event_length_ms: Any,
    event_frequency: Any,
    correlation: Any,
    weight: Any = 1.0,
    x_vote: Any = 1,
    app_type: str | None = None,
    clean: bool = True,
) -> AppProfile:
    """Validates one app against the network and builds an :class:`AppProfile`.

    ``num_frozen`` lists the chokepoints the curves are given at; it must cover every
    chokepoint of the network exactly once (order free). With ``clean`` (default) the
    accuracy curve is made non-increasing as in the original.
    """
    what = f"app {name!r}"
    nf = _as_finite_array(num_frozen, f"{what}: num_frozen")
    acc = _as_finite_array(accuracy, f"{what}: accuracy")
    fpr = _as_finite_array(false_positive_rate, f"{what}: false_positive_rate")
    if not (nf.size == acc.size == fpr.size):
        raise _fail(
            what,
            f"num_frozen, accuracy and false_positive_rate have different lengths "
            f"({nf.size}, {acc.size}, {fpr.size})",
        )
    if np.any(nf != np.round(nf)):
        raise _fail(f"{what}: num_frozen", "must be integers")
    nf = nf.astype(np.int64)
    if np.unique(nf).size != nf.size:
        raise _fail(f"{what}: num_frozen", f"has duplicates: {sorted(nf.tolist())}")
    chokepoints = network.chokepoints
    missing = sorted(set(chokepoints.tolist()) - set(nf.tolist()))
    if missing:
        raise _fail(
            what,
            f"missing chokepoints {missing}: give accuracy and false_positive_rate at every "
            f"chokepoint of the network ({chokepoints.tolist()})",
        )
    extra = sorted(set(nf.tolist()) - set(chokepoints.tolist()))
    if extra:
        raise _fail(
            what,
            f"num_frozen {extra} are not chokepoints of the network "
            f"({chokepoints.tolist()}); remove them or add them to the chokepoints",
        )
    order = np.argsort(nf)
    acc, fpr = acc[order], fpr[order]
    _check_probabilities(acc, f"{what}: accuracy", chokepoints.tolist())
    _check_probabilities(fpr, f"{what}: false_positive_rate", chokepoints.tolist())
    if clean:
        acc, fpr = monotone_accuracy(acc, fpr)
    length = _check_scalar(event_length_ms, f"{what}: event_length_ms", 0.0, math.inf,
                           low_open=True)
    freq = _check_scalar(event_frequency, f"{what}: event_frequency", 0.0, 1.0, low_open=True)
    corr = _check_scalar(correlation, f"{what}: correlation", 0.0, 1.0)
    w = _check_scalar(weight, f"{what}: weight", 0.0, math.inf, low_open=True)
    x_vote = _check_x_vote(x_vote, what)
    return AppProfile(
        name=str(name),
        accuracy=acc,
        false_positive_rate=fpr,
        event_length_ms=length,
        event_frequency=freq,
        correlation=corr,
        weight=w,
        x_vote=x_vote,
        app_type=app_type,
    )


def with_params(app: AppProfile, **params: Any) -> AppProfile:
    """A copy of ``app`` with some event parameters replaced (validated)."""
    allowed = {"name", "event_length_ms", "event_frequency", "correlation", "weight",
               "x_vote"}
    unknown = set(params) - allowed
    if unknown:
        raise _fail(f"app {app.name!r}", f"unknown fields {sorted(unknown)}; "
                    f"known: {sorted(allowed)}")
    merged = {
        "event_length_ms": app.event_length_ms,
        "event_frequency": app.event_frequency,
        "correlation": app.correlation,
        "weight": app.weight,
        "x_vote": app.x_vote,
        **params,
    }
    name = merged.pop("name", app.name)
    what = f"app {name!r}"
    return dataclasses.replace(
        app,
        name=str(name),
        event_length_ms=_check_scalar(merged["event_length_ms"], f"{what}: event_length_ms",
                                      0.0, math.inf, low_open=True),
        event_frequency=_check_scalar(merged["event_frequency"], f"{what}: event_frequency",
                                      0.0, 1.0, low_open=True),
        correlation=_check_scalar(merged["correlation"], f"{what}: correlation", 0.0, 1.0),
        weight=_check_scalar(merged["weight"], f"{what}: weight", 0.0, math.inf,
                             low_open=True),
        x_vote=_check_x_vote(merged["x_vote"], what),
    )


def _check_x_vote(x_vote: Any, what: str) -> int:
    if isinstance(x_vote, bool) or not isinstance(x_vote, (int, np.integer, float)) or (
        float(x_vote) != int(x_vote) or int(x_vote) < 1
    ):
        raise _fail(f"{what}: x_vote", f"must be an integer >= 1, got {x_vote!r}")
    return int(x_vote)


def make_problem(
    apps: Sequence[AppProfile],
    network: BaseNetwork,
    budget: Any,
    *,
    stream_fps: Any = 10,
    memory_budget_bytes: Any = None,
    objective: str = "f1",
    event_model: str = "faithful",
) -> Problem:
    """Validates and builds a :class:`Problem`."""
    apps = tuple(apps)
    if not apps:
        raise _fail("apps", "a problem needs at least one app")
    names = [a.name for a in apps]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail("apps", f"app names must be unique; repeated: {dupes}")
    k = network.chokepoints.size
    for a in apps:
        if a.accuracy.shape != (k,) or a.false_positive_rate.shape != (k,):
            raise _fail(f"app {a.name!r}", f"curves must have one value per chokepoint ({k})")
    budget = _check_budget(budget)
    if isinstance(stream_fps, bool) or float(stream_fps) != int(float(stream_fps)) or (
        int(float(stream_fps)) < 1
    ):
        raise _fail("stream_fps", f"must be an integer >= 1, got {stream_fps!r}")
    mem = None
    if memory_budget_bytes is not None:
        mem = _check_scalar(memory_budget_bytes, "memory_budget", 0.0, math.inf, low_open=True)
        if network.layer_bytes is None:
            raise _fail(
                "memory_budget",
                f"network {network.name!r} has no layer_bytes; give per-layer parameter bytes "
                "or drop the memory budget",
            )
    if objective not in OBJECTIVES:
        raise _fail("objective", f"unknown objective {objective!r}; choose one of {OBJECTIVES}")
    if event_model not in EVENT_MODELS:
        raise _fail(
            "event_model", f"unknown event model {event_model!r}; choose one of {EVENT_MODELS}"
        )
    if objective == "maxmin_f1" and len({a.weight for a in apps}) > 1:
        raise _fail("objective", "per-app weights are not defined for 'maxmin_f1'; drop them")
    return Problem(
        apps=apps,
        network=network,
        budget=budget,
        stream_fps=int(float(stream_fps)),
        memory_budget_bytes=mem,
        objective=objective,
        event_model=event_model,
    )


# ----------------------------------------------------------------------- file formats


def _read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str, path: str) -> list[str]:
    if not rows:
        raise _fail(path, "has no data rows")
    if key not in rows[0]:
        raise _fail(path, f"has no column {key!r} (columns: {list(rows[0])})")
    return [r[key] for r in rows]


PIECE_COLUMNS = ("start", "end", "batch", "ms_per_frame")
# Optional column: the piece's first call in a runtime call (PieceCosts.first_ms_per_frame).
PIECE_FIRST_COLUMN = "first_ms_per_frame"


def _load_piece_costs(directory: str, spec: Any, num_layers: int, meta_path: str
                      ) -> PieceCosts:
    what = f"{meta_path}: piece_costs"
    if not isinstance(spec, Mapping) or set(spec) != {"file", "overhead_ms", "sync_ms"}:
        raise _fail(what, 'expected {"file": <csv>, "overhead_ms": <number>, "sync_ms": '
                    f"<number>}}, got {spec!r}")
    path = os.path.join(directory, str(spec["file"]))
    if not os.path.exists(path):
        raise _fail(what, f"file {path} does not exist")
    rows = _read_csv(path)
    cols = {c: _column(rows, c, path) for c in PIECE_COLUMNS}
    try:
        start, end, batch = (np.array([float(x) for x in cols[c]])
                             for c in ("start", "end", "batch"))
        cost = np.array([float(x) for x in cols["ms_per_frame"]])
        first_cost = (np.array([float(x) for x in _column(rows, PIECE_FIRST_COLUMN, path)])
                      if PIECE_FIRST_COLUMN in rows[0] else None)
    except ValueError as e:
        raise _fail(path, f"every entry must be a number ({e})") from e
    for name, col in (("start", start), ("end", end), ("batch", batch)):
        if np.any(col != np.round(col)):
            raise _fail(path, f"column {name!r} must hold whole numbers")
    bad = np.flatnonzero((start < 0) | (end > num_layers) | (start >= end))
    if bad.size:
        i = int(bad[0])
        raise _fail(path, f"row {i + 2}: piece ({int(start[i])}, {int(end[i])}) needs "
                    f"0 <= start < end <= {num_layers} (end {num_layers} = a branch to "
                    "the output)")
    batches = np.unique(batch)
    ms = np.full((batches.size, num_layers + 1, num_layers + 1), np.nan)
    first = None if first_cost is None else ms.copy()
    for i, (a, e, n, c) in enumerate(zip(start, end, batch, cost, strict=True)):
        s = int(np.searchsorted(batches, n))
        if np.isfinite(ms[s, int(a), int(e)]):
            raise _fail(path, f"row {i + 2}: piece ({int(a)}, {int(e)}) at batch {int(n)} "
                        "is listed twice")
        ms[s, int(a), int(e)] = c
        if first is not None:
            first[s, int(a), int(e)] = first_cost[i]
    return make_piece_costs(num_layers, batches, ms, spec["overhead_ms"], spec["sync_ms"],
                            first_ms_per_frame=first, what=path)


def load_profile_dir(directory: str, *, clean: bool = True) -> ProfileLibrary:
    """Loads a profile directory in the shipped CSV/JSON format.

    ``profile.json`` names the chokepoints, the app types (accuracy file and event
    parameters) and the scenario generator; ``layer_costs.csv`` has a ``relative_cost``
    column; the optional ``layer_params.csv`` a ``param_bytes`` column. An optional
    ``"piece_costs": {"file": "piece_costs.csv", "overhead_ms": x, "sync_ms": y}`` in
    ``profile.json`` names a table of measured piece costs (:class:`PieceCosts`), one
    row per piece and batch with columns ``start, end, batch, ms_per_frame`` (``end`` =
    the number of layers for a branch to the output).
    """
    meta_path = os.path.join(directory, "profile.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError as e:
        raise _fail(directory, "no profile.json here; is this a profile directory?") from e
    cost_path = os.path.join(directory, "layer_costs.csv")
    cost_rows = _read_csv(cost_path)
    costs = [float(x) for x in _column(cost_rows, "relative_cost", cost_path)]
    names = _column(cost_rows, "layer_name", cost_path)
    param_path = os.path.join(directory, "layer_params.csv")
    layer_bytes = None
    if os.path.exists(param_path):
        param_rows = _read_csv(param_path)
        layer_bytes = [float(x) for x in _column(param_rows, "param_bytes", param_path)]
    if "chokepoints" not in meta:
        raise _fail(meta_path, "missing field 'chokepoints'")
    pieces = None
    if meta.get("piece_costs") is not None:
        pieces = _load_piece_costs(directory, meta["piece_costs"], len(costs), meta_path)
    network = make_network(
        costs,
        meta["chokepoints"],
        layer_bytes=layer_bytes,
        layer_names=names,
        name=str(meta.get("model", os.path.basename(directory.rstrip("/")))),
        piece_costs=pieces,
    )
    app_types: dict[str, AppProfile] = {}
    for app_name, spec in meta.get("apps", {}).items():
        what = f"app {app_name!r}"
        for field in ("accuracy_file", "event_length_ms", "event_frequency",
                      "correlation_coefficient"):
            if field not in spec:
                raise _fail(what, f"missing field {field!r} in {meta_path}")
        acc_path = os.path.join(directory, spec["accuracy_file"])
        rows = _read_csv(acc_path)
        app_types[app_name] = make_app(
            app_name,
            network,
            num_frozen=[float(x) for x in _column(rows, "num_frozen", acc_path)],
            accuracy=[float(x) for x in _column(rows, "accuracy", acc_path)],
            false_positive_rate=[
                float(x) for x in _column(rows, "false_positive_rate", acc_path)
            ],
            event_length_ms=spec["event_length_ms"],
            event_frequency=spec["event_frequency"],
            correlation=spec["correlation_coefficient"],
            app_type=app_name,
            clean=clean,
        )
    if not app_types:
        raise _fail(meta_path, "lists no apps")
    return ProfileLibrary(
        network=network,
        app_types=app_types,
        scenario_generator=dict(meta.get("scenario_generator", {})),
        source=directory,
    )


def mobilenet_dir() -> str:
    """Path of the shipped MobileNet-224 profile directory (package data)."""
    return str(resources.files("mainstream_jax") / "data" / "mainstream_mobilenet")


_MOBILENET_CACHE: dict[bool, ProfileLibrary] = {}


def load_mobilenet(*, clean: bool = True) -> ProfileLibrary:
    """The shipped nine MobileNet-224 app profiles (cached; objects are immutable)."""
    if clean not in _MOBILENET_CACHE:
        _MOBILENET_CACHE[clean] = load_profile_dir(mobilenet_dir(), clean=clean)
    return _MOBILENET_CACHE[clean]


def mobilenet_v1_param_counts(num_classes: int = 2, head_width: int = 1024) -> list[tuple]:
    """Per-layer parameter counts of the profiled network (Keras layer indexing).

    Keras MobileNet v1 (alpha 1.0, no top) followed by the original fine-tuning head:
    global average pooling, Dense(``head_width``), Dense(``num_classes``). Batch-norm
    layers hold 4 vectors (gamma, beta, moving mean and variance), all needed for
    inference. Returns (layer_name, count) pairs; ``layer_params.csv`` is this times 4
    bytes (float32).
    """
    layers: list[tuple[str, int]] = [("input_1", 0), ("conv1", 3 * 3 * 3 * 32),
                                     ("conv1_bn", 4 * 32), ("conv1_relu", 0)]
    widths = [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    c_in = 32
    for i, c_out in enumerate(widths, start=1):
        layers += [
            (f"conv_dw_{i}", 3 * 3 * c_in),
            (f"conv_dw_{i}_bn", 4 * c_in),
            (f"conv_dw_{i}_relu", 0),
            (f"conv_pw_{i}", c_in * c_out),
            (f"conv_pw_{i}_bn", 4 * c_out),
            (f"conv_pw_{i}_relu", 0),
        ]
        c_in = c_out
    layers += [
        ("global_average_pooling2d_1", 0),
        ("dense_1", c_in * head_width + head_width),
        ("dense_2", head_width * num_classes + num_classes),
    ]
    return layers


def _problem_from_dict(spec: Mapping[str, Any], *, budget: Any = None) -> Problem:
    if not isinstance(spec, Mapping):
        raise _fail("problem", "the problem file must hold one JSON object")
    known = {"budget", "stream_fps", "memory_budget_mib", "objective", "event_model",
             "network", "apps", "description"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise _fail("problem", f"unknown fields {unknown}; known: {sorted(known)}")
    library = None
    net_spec = spec.get("network", "mobilenet")
    if net_spec == "mobilenet":
        library = load_mobilenet()
        network = library.network
    elif isinstance(net_spec, Mapping):
        for field in ("layer_costs", "chokepoints"):
            if field not in net_spec:
                raise _fail("network", f"missing field {field!r}")
        network = make_network(
            net_spec["layer_costs"],
            net_spec["chokepoints"],
            layer_bytes=net_spec.get("layer_bytes"),
            layer_names=net_spec.get("layer_names"),
            name=str(net_spec.get("name", "network")),
        )
    else:
        raise _fail("network", f"expected 'mobilenet' or an object, got {net_spec!r}")
    apps_spec = spec.get("apps")
    if not isinstance(apps_spec, list) or not apps_spec:
        raise _fail("apps", "give a non-empty list of apps")
    apps = []
    app_fields = {"name", "profile", "curves", "event_length_ms", "event_frequency",
                  "correlation", "weight", "x_vote"}
    for i, a in enumerate(apps_spec):
        if not isinstance(a, Mapping):
            raise _fail(f"apps[{i}]", "each app must be an object")
        name = a.get("name", a.get("profile", f"app{i}"))
        what = f"app {name!r}"
        unknown = sorted(set(a) - app_fields)
        if unknown:
            raise _fail(what, f"unknown fields {unknown}; known: {sorted(app_fields)}")
        if ("profile" in a) == ("curves" in a):
            raise _fail(what, "give exactly one of 'profile' (a shipped app type) or 'curves'")
        if "profile" in a:
            if library is None:
                raise _fail(what, "'profile' needs the shipped network (\"network\": "
                            "\"mobilenet\"); give 'curves' for a custom network")
            if a["profile"] not in library.app_types:
                raise _fail(f"{what}: profile", f"unknown app type {a['profile']!r}; "
                            f"shipped: {sorted(library.app_types)}")
            base = library.app_types[a["profile"]]
            params = {k: a[k] for k in ("event_length_ms", "event_frequency", "correlation",
                                        "weight", "x_vote") if k in a}
            apps.append(with_params(base, name=name, **params))
        else:
            curves = a["curves"]
            if not isinstance(curves, Mapping):
                raise _fail(f"{what}: curves", "must be an object with num_frozen, accuracy "
                            "and false_positive_rate lists")
            for field in ("num_frozen", "accuracy", "false_positive_rate",):
                if field not in curves:
                    raise _fail(f"{what}: curves", f"missing field {field!r}")
            for field in ("event_length_ms", "event_frequency", "correlation"):
                if field not in a:
                    raise _fail(what, f"missing field {field!r}")
            apps.append(make_app(
                name, network,
                num_frozen=curves["num_frozen"], accuracy=curves["accuracy"],
                false_positive_rate=curves["false_positive_rate"],
                event_length_ms=a["event_length_ms"], event_frequency=a["event_frequency"],
                correlation=a["correlation"], weight=a.get("weight", 1.0),
                x_vote=a.get("x_vote", 1)))
    if budget is None:
        if "budget" not in spec:
            raise _fail("budget", "the problem file has no 'budget'; add one or pass --budget")
        budget = spec["budget"]
    mem = spec.get("memory_budget_mib")
    if mem is not None:
        mem = _check_scalar(mem, "memory_budget_mib", 0.0, math.inf, low_open=True) * MIB
    return make_problem(
        apps, network, budget,
        stream_fps=spec.get("stream_fps", 10),
        memory_budget_bytes=mem,
        objective=spec.get("objective", "f1"),
        event_model=spec.get("event_model", "faithful"),
    )


def problem_from_dict(spec: Mapping[str, Any], *, budget: Any = None) -> Problem:
    """Builds a problem from a parsed problem file (see :data:`PROBLEM_FILE_DOC`).

    ``budget``, when given, overrides the file's budget.
    """
    return _problem_from_dict(spec, budget=budget)


def load_problem(path: str, *, budget: Any = None) -> Problem:
    """Loads and validates a JSON problem file (see :data:`PROBLEM_FILE_DOC`)."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError as e:
        raise _fail(path, "no such problem file") from e
    except json.JSONDecodeError as e:
        raise _fail(path, f"not valid JSON ({e})") from e
    return problem_from_dict(spec, budget=budget)
