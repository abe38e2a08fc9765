"""A stem-sharing runtime: executes a schedule (per app k frozen layers at phi frames/s).

The stream is processed in windows of ``window_s`` seconds (``F * window_s`` frames;
the sampling pattern repeats every window), ``windows_per_call`` of them per jitted
call. An app at phi frames/s takes ``phi * window_s`` frames of each window, so
fractional rates (no-sharing's 0.1..0.9) need ``window_s = 10``.

The shared stem is the SPEC's segments: with branch points the distinct k_i > 0,
segment ``[a, e)`` runs once per selected frame at the highest rate of the apps still
attached to it (k_i >= e). Frames are chosen by nesting, so that what an
app needs was computed by its stem: segment t takes ``r_t`` frames spread evenly over the
frames of segment t-1 (all the window's frames for the first), and app i takes its
frames spread evenly over the frames of the segment that ends at k_i. Each segment and
each app's branch therefore runs on exactly its rate in frames per second, which is what
the cost model charges.

Branches of apps with the same (k, phi) have the same input and shapes; with
``batch_apps`` (default on accelerators) they run as one ``jax.vmap`` over their stacked
variables.

Execution (``fused=False``, the default): each stem segment and each branch group is its
own jitted function (cached per layer range, so schedules share compilations), dispatched
in order; input normalisation is folded into the pieces that read the frames. The cost of
a call is then linear in the work plus a fixed dispatch cost per piece:
:meth:`StemRuntime.predicted_call_ms` = the cost model's frames x layer costs + pieces x
the per-call overhead the profiler measures. ``fused=True`` jits the whole call as one
program; on the CPU that was not linear in the work (8 unshared apps in one XLA program
ran 44 % slower than the cost model's 8 x one app, see the benchmark's README). On a
CPU the throughput benchmark runs jitted calls inline (:func:`set_cpu_inline_dispatch`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mainstream_jax import profiles
from mainstream_jax.e2e import basenet


def set_cpu_inline_dispatch(inline: bool = True) -> None:
    """Makes the CPU backend run each jitted call inline, on the calling thread
    (``inline=True``), or hand it to XLA's worker thread and return at once (JAX's
    default, asynchronous dispatch). Process-wide, and only effective before the CPU
    backend starts (the first JAX computation or device query): afterwards a request
    for the other mode raises ``RuntimeError``; one for the mode in use is a no-op.

    Why inline on a CPU pinned to one core: with asynchronous dispatch a runtime call
    hands every piece to XLA's worker thread and then waits for it, and on one core the
    hand-off is paid in time, by an amount that depends on what runs around it. In the
    throughput benchmark (``benchmarks/results/README.md``) a branch ``[7, 14)`` timed
    in bursts of back-to-back calls cost 1.74 and 2.01 ms per 100 frames in two runs with
    asynchronous dispatch, while each added app's branch cost the runtime 1.39 and 1.53
    ms; inline, 1.42-1.76 ms in bursts against 1.34-1.60 ms per added branch (ten
    runs). What remains of a one-app call's surplus over its pieces' burst times is the
    first call of each program in a runtime call (``profiles.PieceCosts``'s
    ``first_ms_per_frame``). The e2e pipeline keeps asynchronous dispatch by default
    (``experiments/configs/mainstream_e2e.py`` says why).
    """
    from jax._src import xla_bridge  # noqa: PLC0415 (private, but the only way to ask)

    want_async = not inline
    if xla_bridge.backends_are_initialized():
        if bool(jax.config.read("jax_cpu_enable_async_dispatch")) != want_async:
            raise RuntimeError(
                "set_cpu_inline_dispatch must be called before the first JAX computation "
                "(the CPU backend has started with the other dispatch mode)")
        return
    jax.config.update("jax_cpu_enable_async_dispatch", want_async)


def cpu_inline_dispatch() -> bool:
    """Whether jitted calls on the CPU run inline (see :func:`set_cpu_inline_dispatch`;
    the mode the backend was started with, when set through it)."""
    return not bool(jax.config.read("jax_cpu_enable_async_dispatch"))


def even_subset(positions: np.ndarray, count: int) -> np.ndarray:
    """``count`` entries of ``positions`` spread evenly: positions[floor(j n / count)]."""
    n = positions.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"cannot take {count} of {n} frames")
    return positions[(np.arange(count) * n) // count]


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int  # first layer
    end: int  # one past the last layer
    rate: int  # frames per window it runs on (fps * window_s)
    positions: tuple[int, ...]  # frame offsets within a window, len == rate


@dataclasses.dataclass(frozen=True)
class RuntimePlan:
    """Where every segment and app runs; a pure function of (k, phi, F)."""

    stream_fps: int
    window_s: int
    num_frozen: tuple[int, ...]
    fps: tuple[int, ...]  # frames per window, per app (fps * window_s)
    segments: tuple[Segment, ...]
    app_source: tuple[int, ...]  # segment index each app reads (-1: the input frames)
    app_positions: tuple[tuple[int, ...], ...]  # frame offsets within a window, per app


def make_plan(num_frozen: Sequence[int], fps: Sequence[float], stream_fps: int,
              num_layers: int, window_s: int = 1) -> RuntimePlan:
    """Builds the :class:`RuntimePlan`; ``fps * window_s`` must be a whole number of
    frames in 1..F * window_s."""
    if window_s < 1 or int(window_s) != window_s:
        raise ValueError(f"window_s must be a whole number of seconds >= 1, got {window_s}")
    window = stream_fps * int(window_s)
    if len(num_frozen) != len(fps) or not num_frozen:
        raise ValueError("need one k and one fps per app (at least one app)")
    ks = [int(k) for k in num_frozen]
    for k in ks:
        if not 0 <= k < num_layers:
            raise ValueError(f"num_frozen {k} is outside [0, {num_layers - 1}]")
    rates = []
    for phi in fps:
        r = float(phi) * window_s
        if abs(r - round(r)) > 1e-9 or not 1 <= round(r) <= window:
            raise ValueError(
                f"fps {phi} is not a whole number of frames per {window_s} s window in "
                f"1..{window}; use integer fps, or a longer window_s for fractional fps")
        rates.append(int(round(r)))
    points = sorted({k for k in ks if k > 0})
    segments: list[Segment] = []
    prev = np.arange(window)
    start = 0
    for end in points:
        rate = max(r for k, r in zip(ks, rates, strict=True) if k >= end)
        pos = even_subset(prev, rate)
        segments.append(Segment(start, end, rate, tuple(int(p) for p in pos)))
        prev, start = pos, end
    sources, app_pos = [], []
    for k, r in zip(ks, rates, strict=True):
        src = points.index(k) if k > 0 else -1
        base = np.arange(window) if src < 0 else np.asarray(segments[src].positions)
        sources.append(src)
        app_pos.append(tuple(int(p) for p in even_subset(base, r)))
    return RuntimePlan(stream_fps, int(window_s), tuple(ks), tuple(rates), tuple(segments),
                       tuple(sources), tuple(app_pos))


def _window_indices(positions: Sequence[int], parent: Sequence[int], windows: int,
                    parent_rate: int) -> np.ndarray:
    """Rows of the parent's output [windows * len(parent)] holding ``positions``."""
    local = np.array([list(parent).index(p) for p in positions])
    return (np.arange(windows)[:, None] * parent_rate + local[None, :]).reshape(-1)


class RunResult(NamedTuple):
    frames: tuple[np.ndarray, ...]  # per app: stream frame indices it processed
    logits: tuple[np.ndarray, ...]  # per app: its logit on each of those frames
    wall_s: float  # time of the timed pass over the stream
    frames_per_s: float  # stream frames processed per second of wall time


class StemRuntime:
    """Runs N apps' detectors over a stream with shared stems (see the module docstring).

    Args:
      model: the app network (one-logit head).
      base_variables: the base network's variables; the stem uses its layers.
      app_variables: per app, its full variables; layers below its k must equal the
        base's (they are frozen), else it cannot share a stem: ``ValueError``.
      num_frozen, fps: the schedule (fps * window_s whole numbers).
      stream_fps: F.
      windows_per_call: windows of stream per jitted call.
      window_s: seconds per window.
      mean, std: input normalisation.
      batch_apps: vmap branches of apps with the same (k, fps). None (default): on any
        backend but the CPU. On the CPU the vmapped branches were not linear in the
        number of apps: XLA's batched matmul for the stacked 1x1 convs (4x4x64 -> 128)
        took 20x one app's time at 8 apps, and 8 apps' branches from k=7 ran 69 %
        slower than the cost model (``benchmarks/mainstream_e2e_throughput.py
        --batch_apps``, 5 rounds); one jitted call per app is linear and pays the
        per-call overhead that :meth:`predicted_call_ms` includes.
      fused: one jitted function per call, or (default) each stem segment and branch
        group jitted alone and dispatched in turn.
    """

    def __init__(
        self,
        model: basenet.ChokepointNet,
        base_variables: dict,
        app_variables: Sequence[dict],
        num_frozen: Sequence[int],
        fps: Sequence[float],
        *,
        stream_fps: int,
        windows_per_call: int,
        window_s: int = 1,
        mean: float,
        std: float,
        batch_apps: bool | None = None,
        fused: bool = False,
        check_frozen: bool = True,
    ):
        spec = model.spec
        if len(app_variables) != len(num_frozen):
            raise ValueError(f"{len(app_variables)} app variable sets for "
                             f"{len(num_frozen)} apps")
        if windows_per_call < 1:
            raise ValueError(f"windows_per_call must be >= 1, got {windows_per_call}")
        self.plan = make_plan(num_frozen, fps, stream_fps, spec.num_layers, window_s)
        if batch_apps is None:
            batch_apps = jax.default_backend() != "cpu"
        window = stream_fps * self.plan.window_s
        self.model = model
        self.windows_per_call = windows_per_call
        self.frames_per_call = windows_per_call * window
        if check_frozen:
            for i, (v, k) in enumerate(zip(app_variables, self.plan.num_frozen, strict=True)):
                _check_frozen(i, v, base_variables, spec, k)
        plan = self.plan
        # Each segment gets only its own layers' variables, so that its jitted function
        # sees the same inputs in every schedule and in the profiler's piece probes
        # (profiling.piece_probes): one compilation, one measured cost.
        seg_vars = [basenet.select_layers(base_variables, spec, seg.start, seg.end)
                    for seg in plan.segments]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, key in enumerate(zip(plan.num_frozen, plan.fps, strict=True)):
            groups.setdefault(key if batch_apps else (i, -1), []).append(i)
        self.groups = tuple(tuple(g) for g in groups.values())
        branch_vars = []
        for g in self.groups:
            k = plan.num_frozen[g[0]]
            parts = [basenet.select_layers(app_variables[i], spec, k, spec.num_layers)
                     for i in g]
            branch_vars.append(jax.tree.map(lambda *xs: jnp.stack(xs), *parts))
        self._variables = (seg_vars, branch_vars)
        w = windows_per_call
        seg_index = []
        parent, parent_rate = tuple(range(window)), window
        for seg in plan.segments:
            seg_index.append(jnp.asarray(_window_indices(seg.positions, parent, w,
                                                         parent_rate)))
            parent, parent_rate = seg.positions, seg.rate
        group_index = []
        for g in self.groups:
            i = g[0]
            src = plan.app_source[i]
            par = tuple(range(window)) if src < 0 else plan.segments[src].positions
            group_index.append(jnp.asarray(_window_indices(plan.app_positions[i], par, w,
                                                           len(par))))

        # The pieces of one call: stem segments, then branch groups; the pieces that read
        # the frames normalise them first. Unfused, each is a cached jitted function.
        first = [plan.app_source[g[0]] < 0 for g in self.groups]
        seg_fns = [_segment_fn(model, seg.start, seg.end, mean, std, i == 0, not fused)
                   for i, seg in enumerate(plan.segments)]
        grp_fns = [_group_fn(model, plan.num_frozen[g[0]], mean, std, f, not fused)
                   for g, f in zip(self.groups, first, strict=True)]
        self.num_pieces = len(seg_fns) + len(grp_fns)
        self.fused = fused

        def run_call(variables, frames):
            seg_v, branch_v = variables
            outs = [frames]
            for fn, sv, idx in zip(seg_fns, seg_v, seg_index, strict=True):
                outs.append(fn(sv, outs[-1], idx))
            return [fn(bv, outs[plan.app_source[g[0]] + 1], idx)
                    for fn, g, bv, idx in zip(grp_fns, self.groups, branch_v, group_index,
                                              strict=True)]

        self._call = jax.jit(run_call) if fused else run_call
        self._seg_frames = [int(idx.shape[0]) for idx in seg_index]
        self._grp_frames = [int(idx.shape[0]) * len(g)
                            for idx, g in zip(group_index, self.groups, strict=True)]

    @property
    def num_calls(self) -> int:
        """Jitted calls dispatched per runtime call (each pays the dispatch overhead)."""
        return 1 if self.fused else self.num_pieces

    @property
    def pieces(self) -> list[tuple[int, int, int, int]]:
        """The jitted calls of one (unfused) runtime call, in order, as (start, end,
        frames, apps): stem segments ``[start, end)`` and branch groups (``end`` = the
        number of layers: the branch from ``start`` to the output, run for ``apps``
        stacked apps) on ``frames`` frames each."""
        num_layers = self.model.spec.num_layers
        out = [(s.start, s.end, n, 1)
               for n, s in zip(self._seg_frames, self.plan.segments, strict=True)]
        out += [(self.plan.num_frozen[g[0]], num_layers, n // len(g), len(g))
                for n, g in zip(self._grp_frames, self.groups, strict=True)]
        return out

    def predicted_call_ms(self, layer_ms_per_frame: np.ndarray,
                          call_overhead_ms: float = 0.0,
                          piece_costs: profiles.PieceCosts | None = None) -> float:
        """Predicted time of one runtime call.

        Without ``piece_costs`` (or when fused): every segment's and app's frames times
        its layers' per-frame costs (the cost model's work, tested equal to
        ``cost_model.schedule_cost`` per window) plus ``num_calls`` x the per-call
        overhead. With ``piece_costs`` (unfused): the sum over the jitted calls of each
        piece's measured call time at its number of frames
        (:meth:`profiles.PieceCosts.call_ms`), plus the table's ``sync_ms`` once (the
        wait for the results). A call is priced as its function's first call in the
        runtime call when no earlier call of this runtime call ran the same piece on the
        same frame count (the same compiled program), else as a repeated call; the
        table's ``first_ms_per_frame`` makes the two differ (without it both are
        ``ms_per_frame``). A branch group of G ``vmap``-ed apps is one call with G times
        the piece's work (its time less the table's overhead; the G - 1 further apps at
        the repeated call's work). A piece the table lacks falls back to its per-layer
        sum plus ``call_overhead_ms``.
        """
        lam = np.asarray(layer_ms_per_frame, np.float64)
        num_layers = self.model.spec.num_layers
        if piece_costs is None or self.fused:
            work = sum(n * g * lam[a:min(b, num_layers)].sum()
                       for a, b, n, g in self.pieces)
            return float(work + self.num_calls * call_overhead_ms)
        if piece_costs.num_layers != num_layers:
            raise ValueError(f"piece costs for {piece_costs.num_layers} layers, the model "
                             f"has {num_layers}")
        total = piece_costs.sync_ms
        seen: set[tuple[int, int, int]] = set()
        for a, b, n, g in self.pieces:
            if piece_costs.has(a, b):
                o = piece_costs.overhead_ms
                first = (a, b, n) not in seen
                seen.add((a, b, n))
                total += (piece_costs.call_ms(a, b, n, first=first)
                          + (g - 1) * (piece_costs.call_ms(a, b, n) - o))
            else:
                total += call_overhead_ms + n * g * lam[a:b].sum()
        return float(total)

    def app_frames(self, app: int, num_frames: int) -> np.ndarray:
        """Stream frame indices app ``app`` processes in a stream of ``num_frames``."""
        f = self.plan.stream_fps * self.plan.window_s
        windows = num_frames // f
        pos = np.asarray(self.plan.app_positions[app])
        return (np.arange(windows)[:, None] * f + pos[None, :]).reshape(-1)

    def call(self, frames: jax.Array) -> list[jax.Array]:
        """One jitted call on ``frames_per_call`` frames; logits per group [G_i, n]."""
        return self._call(self._variables, frames)

    def stream_chunks(self, frames: np.ndarray) -> list[jax.Array]:
        """The stream's calls' inputs, on the device: whole calls only (a tail shorter
        than one call is an error)."""
        n = frames.shape[0]
        if n == 0 or n % self.frames_per_call:
            raise ValueError(f"the stream has {n} frames; give a positive multiple of "
                             f"{self.frames_per_call} (windows_per_call * window_s * "
                             "stream_fps)")
        return [jax.device_put(frames[i:i + self.frames_per_call])
                for i in range(0, n, self.frames_per_call)]

    def time_pass(self, chunks: Sequence[jax.Array]) -> float:
        """Seconds of one pass over the stream as :meth:`run` times it: the calls on
        ``chunks`` (:meth:`stream_chunks`) dispatched back to back, one
        ``block_until_ready``."""
        start = time.perf_counter()
        jax.block_until_ready([self.call(c) for c in chunks])
        return time.perf_counter() - start

    def run(self, frames: np.ndarray, *, warmup: int = 1) -> RunResult:
        """Runs every app over a stream (whole calls only; a tail shorter than one call is
        an error) and measures frames/s: the frames are put on the device first, the
        calls are dispatched back to back and the clock stops at ``block_until_ready``."""
        n = frames.shape[0]
        chunks = self.stream_chunks(frames)
        for _ in range(warmup):
            jax.block_until_ready(self.call(chunks[0]))
        start = time.perf_counter()
        outs = [self.call(c) for c in chunks]
        jax.block_until_ready(outs)
        wall = time.perf_counter() - start
        num_apps = len(self.plan.num_frozen)
        per_app: list[np.ndarray] = [np.empty(0)] * num_apps
        host = jax.device_get(outs)
        for gi, g in enumerate(self.groups):
            stacked = np.concatenate([o[gi] for o in host], axis=1)  # [G, n_frames]
            for row, i in enumerate(g):
                per_app[i] = stacked[row]
        frames_idx = tuple(self.app_frames(i, n) for i in range(num_apps))
        return RunResult(frames_idx, tuple(per_app), wall, n / wall)

    def time_calls(self, frames: jax.Array, repeats: int, calls: int = 1) -> np.ndarray:
        """Seconds per call, ``repeats`` times: ``calls`` calls on one chunk dispatched
        back to back (as :meth:`run` dispatches a stream's calls), one
        ``block_until_ready`` at the end; ``calls=1``: single calls waited for alone."""
        if calls < 1:
            raise ValueError(f"calls must be >= 1, got {calls}")
        out = np.empty(repeats)
        for r in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready([self.call(frames) for _ in range(calls)])
            out[r] = (time.perf_counter() - start) / calls
        return out


def _normalize(frames: jax.Array, mean: float, std: float) -> jax.Array:
    return (frames.astype(jnp.float32) / 255.0 - mean) / std


@functools.cache
def _segment_fn(model: basenet.ChokepointNet, start: int, end: int, mean: float, std: float,
                reads_frames: bool, jit: bool):
    def fn(v, h, idx):
        h = h[idx]
        if reads_frames:
            h = _normalize(h, mean, std)
        return model.apply(v, h, start, end, False)
    return jax.jit(fn) if jit else fn


@functools.cache
def _group_fn(model: basenet.ChokepointNet, k: int, mean: float, std: float,
              reads_frames: bool, jit: bool):
    one = lambda v, h: model.apply(v, h, k, None, False)[:, 0]  # noqa: E731

    def fn(v, h, idx):
        h = h[idx]
        if reads_frames:
            h = _normalize(h, mean, std)
        return jax.vmap(one, in_axes=(0, None))(v, h)
    return jax.jit(fn) if jit else fn


def _check_frozen(app: int, variables: dict, base: dict, spec: basenet.NetSpec, k: int):
    frozen = basenet.select_layers(variables, spec, 0, k)
    ref = basenet.select_layers(base, spec, 0, k)
    a_leaves = jax.tree.leaves_with_path(frozen)
    b_leaves = dict(jax.tree.leaves_with_path(ref))
    if len(a_leaves) != len(b_leaves):
        raise ValueError(f"app {app}: its layers below k={k} do not match the base network's")
    for path, leaf in a_leaves:
        if path not in b_leaves or not np.array_equal(np.asarray(leaf),
                                                      np.asarray(b_leaves[path])):
            raise ValueError(
                f"app {app}: {jax.tree_util.keystr(path)} differs from the base network, so "
                f"its first k={k} layers are not frozen and it cannot share the stem"
            )
