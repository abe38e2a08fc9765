r"""Throughput of N apps with and without a shared stem, against the cost model.

  taskset -c 1 python -m benchmarks.mainstream_e2e_throughput \
      --out=benchmarks/results/mainstream_e2e/throughput_cpu

For N = 1..8 apps, every app at the full stream rate, with no sharing and with the first
~50 / 80 / 95 % of the layers shared (the chokepoint nearest to that share of the layer
count), measures the stem-sharing runtime's frames/s (``measured_fps``: single runtime
calls of windows_per_call * F frames, warm, block_until_ready; also
``measured_fps_calls_back_to_back``: ``--calls`` calls dispatched back to back, as
StemRuntime.run dispatches a stream's calls; every timing of a round in a random order,
interleaved repeats, median) and compares it with the cost model's prediction from
costs profiled in the same rounds (so both see the same load from other jobs):

* ``predicted_fps`` (the goal's prediction): the profiled *piece* costs
  (profiling.piece_probes: the runtime's own jitted stem segments and branches, at the
  runtime's frames per call, timed in bursts of ``--burst`` back-to-back calls as in
  profiling.measure_piece_costs), summed over the runtime's jitted calls, plus one wait
  (StemRuntime.predicted_call_ms with piece_costs); ``predicted_fps_pieces_first_calls``:
  each program's first call in a runtime call at its first-call cost (the piece called
  alone after other pieces) and repeats at the repeated cost
  (profiling.piece_costs_from_times with alone_times); ``predicted_fps_pieces_alone``:
  every call at its time waited for alone;
* ``predicted_fps_layers``: the per-layer costs (profiling.cost_probes, scaled to the
  fused network) x frames, plus the jitted calls x the dispatch overhead.

On the CPU jitted calls run inline on the calling thread (``--inline_dispatch``,
runtime.set_cpu_inline_dispatch); ``--noinline_dispatch`` keeps JAX's asynchronous
dispatch. ``--all_pieces`` profiles every piece of the network (what the e2e profile holds), not
only those the configurations run. Weights are random (throughput does not depend on
them). Writes throughput.json and throughput.png.
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mainstream_jax import cost_model  # noqa: E402
from mainstream_jax.e2e import basenet, profiling, runtime, training  # noqa: E402

_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_NUM_APPS = flags.DEFINE_list("num_apps", ["1", "2", "3", "4", "5", "6", "7", "8"], "N.")
_SHARES = flags.DEFINE_list("shares", ["0", "0.5", "0.8", "0.95"],
                            "Shares of the layers frozen and shared (0 = no sharing).")
_FPS = flags.DEFINE_integer("stream_fps", 10, "F: frames per second of the stream.")
_WINDOWS = flags.DEFINE_integer("windows_per_call", 10, "Seconds of stream per call.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed rounds (median), each timing every "
                                "configuration and every layer-cost probe once.")
_BATCH_APPS = flags.DEFINE_bool("batch_apps", None, "vmap branches of identical apps "
                                 "(default: on any backend but the CPU).")
_FUSED = flags.DEFINE_bool("fused", False, "One jitted function per runtime call (else, "
                           "the default, one per stem segment and branch group).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random weights.")
_CALLS = flags.DEFINE_integer("calls", 4, "Runtime calls dispatched back to back per "
                              "timing for the secondary measure (as StemRuntime.run "
                              "dispatches a stream's calls); the goal's measure is a single "
                              "call waited for.")
_BURST = flags.DEFINE_integer("burst", 4, "Calls per timed burst of a piece "
                              "(profiling.measure_piece_costs).")
_INLINE = flags.DEFINE_bool("inline_dispatch", True, "Run jitted calls inline on the calling "
                            "thread on the CPU (runtime.set_cpu_inline_dispatch); false: "
                            "JAX's asynchronous dispatch.")
_ALL_PIECES = flags.DEFINE_bool("all_pieces", False, "Profile every piece of the network "
                                "(L (L + 1) / 2), not only those the configurations run.")
MEAN, STD = 0.3, 0.35

SHAPE = (28, 28, 1)


def main(argv):
    del argv
    runtime.set_cpu_inline_dispatch(_INLINE.value)
    t0 = time.perf_counter()
    spec = basenet.mobilenet_spec()
    model = basenet.ChokepointNet(spec, 1)
    base = basenet.init_variables(model, SHAPE, _SEED.value)
    F, W = _FPS.value, _WINDOWS.value
    probes = profiling.cost_probes(model, base, SHAPE, batch=F * W)
    probe_times = np.array([[profiling.time_call(fn, *args) for fn, args in probes]
                            for _ in range(3)])  # compile and warm up
    # Preliminary costs only to pick the share points; the final ones are measured
    # interleaved with the throughput rounds below.
    lam = profiling.costs_from_times(probe_times, F * W).ms_per_frame
    num_apps = [int(n) for n in _NUM_APPS.value]
    shares = [float(s) for s in _SHARES.value]
    cps = np.asarray(spec.chokepoints)
    points = []
    for s in shares:
        k = int(cps[np.argmin(np.abs(cps - s * spec.num_layers))])
        points.append({"share_target": s, "num_frozen": k,
                       "layer_share": k / spec.num_layers,
                       "cost_share": float(lam[:k].sum() / lam.sum())})
    branches = [basenet.init_variables(model, SHAPE, _SEED.value + 1 + a)
                for a in range(max(num_apps))]
    frames = jax.device_put(np.random.default_rng(0).integers(
        0, 256, (F * W, *SHAPE), dtype=np.uint8))
    configs = []
    for n in num_apps:
        for p in points:
            k = p["num_frozen"]
            apps = [training.assemble_app(base, basenet.select_layers(
                branches[a], spec, k, spec.num_layers), spec, k) for a in range(n)]
            rt = runtime.StemRuntime(model, base, apps, [k] * n, [F] * n, stream_fps=F,
                                     windows_per_call=W, mean=MEAN, std=STD,
                                     batch_apps=_BATCH_APPS.value, fused=_FUSED.value)
            rt.time_calls(frames, 2)  # compile and warm up
            configs.append((n, p, rt))
    used = sorted({(a, b) for _, _, rt in configs for a, b, _, _ in rt.pieces})
    sizes = sorted({m for _, _, rt in configs for _, _, m, _ in rt.pieces})
    if len(sizes) != 1:
        raise ValueError(f"pieces run on several frame counts {sizes}")
    piece_list = profiling.all_pieces(spec.num_layers) if _ALL_PIECES.value else used
    t_pieces = time.perf_counter()
    pprobes = profiling.piece_probes(model, base, SHAPE, batch=sizes[0], mean=MEAN, std=STD,
                                     pieces=piece_list)
    for _ in range(2):  # compile (shared with the runtime where the frames match) and warm up
        for _, fn, args in pprobes:
            profiling.time_call(fn, *args)
    piece_compile_s = time.perf_counter() - t_pieces
    # One round times every configuration and every cost probe once, in a random order
    # per round, so the profile and the throughputs see the same load from the other
    # processes on this machine and no probe always follows the same calls.
    times = np.zeros((_REPEATS.value, len(configs)))  # single calls (the goal's measure)
    stream_times = np.zeros((_REPEATS.value, len(configs)))  # --calls back to back
    probe_times = np.zeros((_REPEATS.value, len(probes)))
    # Pieces as the profiler times them (profiling.measure_piece_costs: in bursts, plus
    # the trivial op in a burst and alone), and, for comparison, each waited for alone.
    piece_times = np.zeros((_REPEATS.value, len(pprobes) + 2))
    alone_times = np.zeros((_REPEATS.value, len(pprobes) + 2))
    over_fn, over_args = probes[-1]
    m = _BURST.value
    tasks = []
    for c, (_, _, rt) in enumerate(configs):
        tasks.append((times, c, lambda rt=rt: rt.time_calls(frames, 1)[0]))
        tasks.append((stream_times, c, lambda rt=rt: rt.time_calls(frames, 1,
                                                                   _CALLS.value)[0]))
    for j, (fn, args) in enumerate(probes):
        tasks.append((probe_times, j, lambda fn=fn, args=args: profiling.time_call(fn, *args)))
    for j, (_, fn, args) in enumerate(pprobes):
        tasks.append((piece_times, j, lambda fn=fn, args=args: profiling.time_burst(
            fn, args, m)))
        tasks.append((alone_times, j, lambda fn=fn, args=args: profiling.time_call(
            fn, *args)))
    n_p = len(pprobes)
    tasks.append((piece_times, n_p, lambda: profiling.time_burst(over_fn, over_args, m)))
    tasks.append((piece_times, n_p + 1, lambda: profiling.time_call(over_fn, *over_args)))
    rng = np.random.default_rng(_SEED.value)
    for r in range(_REPEATS.value):
        for i in rng.permutation(len(tasks)):
            table, col, fn = tasks[i]
            table[r, col] = fn()
    alone_times[:, n_p:] = piece_times[:, [n_p + 1, n_p + 1]]
    costs = profiling.costs_from_times(probe_times, F * W)
    # The goal's prediction: every call at its piece's time per call in a burst
    # (profiling.measure_piece_costs' default table).
    pieces = profiling.piece_costs_from_times(piece_times, piece_list, sizes,
                                              spec.num_layers)
    # For comparison: a program's first call in a runtime call priced apart from its
    # repeats, from the bursts and the single calls (measure_piece_costs(first_calls=True)).
    first_calls = profiling.piece_costs_from_times(
        piece_times, piece_list, sizes, spec.num_layers, alone_times=alone_times[:, :n_p],
        burst=m)
    alone = profiling.piece_costs_from_times(alone_times, piece_list, sizes,
                                             spec.num_layers)
    lam = costs.ms_per_frame
    # Another calibration from the same timings, for comparison: each layer's own time
    # less the overhead, not scaled to the whole network's time.
    other_costs = {"layers_alone": np.maximum(costs.raw_ms - costs.overhead_ms, 0.0)
                   / costs.batch}
    rows = []
    for c, (n, p, rt) in enumerate(configs):
        measured = F * W / float(np.median(times[:, c]))
        stream = F * W / float(np.median(stream_times[:, c]))
        cost = float(cost_model.schedule_cost([p["num_frozen"]] * n, [F] * n, lam))
        call_ms = rt.predicted_call_ms(lam, costs.overhead_ms, pieces)
        predicted = F * W * 1000.0 / call_ms
        rows.append({"num_apps": n, **p, "measured_fps": measured,
                     "measured_fps_calls_back_to_back": stream,
                     "predicted_fps": predicted,
                     "predicted_fps_layers": F * W * 1000.0 / rt.predicted_call_ms(
                         lam, costs.overhead_ms),
                     "predicted_fps_pieces_alone": F * W * 1000.0 / rt.predicted_call_ms(
                         lam, costs.overhead_ms, alone),
                     "predicted_fps_pieces_first_calls": F * W * 1000.0 / rt.predicted_call_ms(
                         lam, costs.overhead_ms, first_calls),
                     "predicted_fps_pieces_no_sync": F * W * 1000.0 / (rt.predicted_call_ms(
                         lam, costs.overhead_ms, pieces) - pieces.sync_ms),
                     **{f"predicted_fps_{name}": F * W * 1000.0 / rt.predicted_call_ms(
                         alt, costs.overhead_ms) for name, alt in other_costs.items()},
                     "predicted_fps_no_overhead": F * 1000.0 / cost,
                     "jitted_calls_per_call": rt.num_calls,
                     "relative_error": measured / predicted - 1.0})
    by = {(r["num_apps"], r["share_target"]): r for r in rows}
    n_max, deepest = max(num_apps), max(shares)
    summary = {}
    if (n_max, 0.0) in by and (n_max, deepest) in by:
        summary[f"speedup_{n_max}_apps_shared_{deepest}_vs_unshared"] = (
            by[(n_max, deepest)]["measured_fps"] / by[(n_max, 0.0)]["measured_fps"])
    if (1, 0.0) in by and (n_max, deepest) in by:
        summary[f"{n_max}_apps_shared_{deepest}_vs_one_app"] = (
            by[(n_max, deepest)]["measured_fps"] / by[(1, 0.0)]["measured_fps"])
    summary["max_abs_relative_error"] = float(max(abs(r["relative_error"]) for r in rows))
    summary["points_within_15_percent"] = int(sum(abs(r["relative_error"]) <= 0.15
                                                  for r in rows))
    summary["points"] = len(rows)
    for name in other_costs:
        summary[f"points_within_15_percent_{name}"] = int(sum(
            abs(r["measured_fps"] / r[f"predicted_fps_{name}"] - 1.0) <= 0.15 for r in rows))
    summary["points_within_15_percent_layers"] = int(sum(
        abs(r["measured_fps"] / r["predicted_fps_layers"] - 1.0) <= 0.15 for r in rows))
    summary["points_within_15_percent_calls_back_to_back"] = int(sum(
        abs(r["measured_fps_calls_back_to_back"] / r["predicted_fps"] - 1.0) <= 0.15
        for r in rows))
    for name in ("pieces_alone", "pieces_first_calls", "pieces_no_sync"):
        summary[f"points_within_15_percent_{name}"] = int(sum(
            abs(r["measured_fps"] / r[f"predicted_fps_{name}"] - 1.0) <= 0.15 for r in rows))
    summary["points_within_15_percent_without_overhead_term"] = int(sum(
        abs(r["measured_fps"] / r["predicted_fps_no_overhead"] - 1.0) <= 0.15 for r in rows))
    out = {
        "command": "python -m benchmarks.mainstream_e2e_throughput " + " ".join(sys.argv[1:]),
        "device": str(jax.devices()[0]),
        "layer_ms_per_frame": lam.tolist(), "layer_alone_ms": costs.raw_ms.tolist(),
        "network_fused_ms": costs.full_ms,
        "overhead_ms": costs.overhead_ms, "cost_batch": costs.batch,
        "piece_batch": sizes[0], "piece_burst": m,
        "piece_overhead_ms": pieces.overhead_ms, "piece_sync_ms": pieces.sync_ms,
        "piece_ms_per_call": {f"{a},{b}": float(pieces.ms_per_frame[0, a, b] * sizes[0])
                              for a, b in pieces.pieces},
        "piece_repeated_ms_per_call": {f"{a},{b}": float(first_calls.ms_per_frame[0, a, b]
                                                         * sizes[0]) for a, b in pieces.pieces},
        "piece_first_ms_per_call": {f"{a},{b}": float(first_calls.first_ms_per_frame[0, a, b]
                                                      * sizes[0]) for a, b in pieces.pieces},
        "piece_alone_ms_per_call": {f"{a},{b}": float(alone.ms_per_frame[0, a, b] * sizes[0])
                                    for a, b in alone.pieces},
        "piece_compile_and_warmup_s": piece_compile_s,
        "repeats": _REPEATS.value, "calls_per_timing": _CALLS.value,
        "batch_apps": _BATCH_APPS.value, "fused": _FUSED.value,
        "cpu_inline_dispatch": runtime.cpu_inline_dispatch(),
        "rows": rows, "summary": summary, "wall_s": time.perf_counter() - t0,
    }
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "throughput.json"), "w") as f:
        json.dump(out, f, indent=1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, p in enumerate(points):
        rs = [by[(n, p["share_target"])] for n in num_apps]
        label = ("no sharing" if p["num_frozen"] == 0 else
                 f"{p['layer_share']:.0%} of layers shared (k={p['num_frozen']})")
        ax.plot(num_apps, [r["measured_fps"] for r in rs], "o-", color=f"C{i}", label=label)
        ax.plot(num_apps, [r["predicted_fps"] for r in rs], "--", color=f"C{i}", alpha=0.6)
    ax.set_xlabel("number of apps")
    ax.set_ylabel("frames/s (dashed: cost model, piece costs)")
    ax.set_yscale("log")
    ax.set_title(f"Stem-sharing runtime throughput ({out['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(_OUT.value, "throughput.png"), dpi=120)
    print(f"{'N':>3} {'k':>3} {'layers':>7} {'measured':>10} {'predicted':>10} {'error':>7}"
          f" {'layers':>8} {'alone':>7} {'first':>7} {'no sync':>7} {'calls':>7}")
    for r in rows:
        print(f"{r['num_apps']:>3} {r['num_frozen']:>3} {r['layer_share']:>7.0%} "
              f"{r['measured_fps']:>10.0f} {r['predicted_fps']:>10.0f} "
              f"{r['relative_error']:>+7.1%} "
              f"{r['measured_fps'] / r['predicted_fps_layers'] - 1:>+8.1%}"
              f"{r['measured_fps'] / r['predicted_fps_pieces_alone'] - 1:>+8.1%}"
              f"{r['measured_fps'] / r['predicted_fps_pieces_first_calls'] - 1:>+8.1%}"
              f"{r['measured_fps'] / r['predicted_fps_pieces_no_sync'] - 1:>+8.1%}"
              f"{r['measured_fps_calls_back_to_back'] / r['predicted_fps'] - 1:>+8.1%}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
