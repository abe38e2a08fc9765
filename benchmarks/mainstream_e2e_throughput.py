r"""Throughput of N apps with and without a shared stem, against the cost model.

  taskset -c 1 python -m benchmarks.mainstream_e2e_throughput \
      --out=benchmarks/results/mainstream_e2e/throughput_cpu

For N = 1..8 apps, every app at the full stream rate, with no sharing and with the first
~50 / 80 / 95 % of the layers shared (the chokepoint nearest to that share of the layer
count), measures the stem-sharing runtime's frames/s (jitted calls of
windows_per_call * F frames, warm, block_until_ready, interleaved repeats, median) and
compares it with the cost model's prediction from layer costs profiled in the same
rounds (profiling.cost_probes, interleaved with the throughput calls): the cost model's
frames x per-frame layer costs, plus the runtime's jitted calls per call x the profiled
per-call dispatch overhead (StemRuntime.predicted_call_ms). Weights are random
(throughput does not depend on them). Writes throughput.json and throughput.png.
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

SHAPE = (28, 28, 1)


def main(argv):
    del argv
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
                                     windows_per_call=W, mean=0.3, std=0.35,
                                     batch_apps=_BATCH_APPS.value, fused=_FUSED.value)
            rt.time_calls(frames, 2)  # compile and warm up
            configs.append((n, p, rt))
    # One round times every configuration and every cost probe once, so the profile and
    # the throughputs see the same load from the other processes on this machine.
    times = np.zeros((_REPEATS.value, len(configs)))
    probe_times = np.zeros((_REPEATS.value, len(probes)))
    for r in range(_REPEATS.value):
        for c, (_, _, rt) in enumerate(configs):
            times[r, c] = rt.time_calls(frames, 1)[0]
        probe_times[r] = [profiling.time_call(fn, *args) for fn, args in probes]
    costs = profiling.costs_from_times(probe_times, F * W)
    lam = costs.ms_per_frame
    # Another calibration from the same timings, for comparison: each layer's own time
    # less the overhead, not scaled to the whole network's time.
    other_costs = {"layers_alone": np.maximum(costs.raw_ms - costs.overhead_ms, 0.0)
                   / costs.batch}
    rows = []
    for c, (n, p, rt) in enumerate(configs):
        measured = F * W / float(np.median(times[:, c]))
        cost = float(cost_model.schedule_cost([p["num_frozen"]] * n, [F] * n, lam))
        call_ms = rt.predicted_call_ms(lam, costs.overhead_ms)
        predicted = F * W * 1000.0 / call_ms
        rows.append({"num_apps": n, **p, "measured_fps": measured,
                     "predicted_fps": predicted,
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
    summary["points_within_15_percent_without_overhead_term"] = int(sum(
        abs(r["measured_fps"] / r["predicted_fps_no_overhead"] - 1.0) <= 0.15 for r in rows))
    out = {
        "command": "python -m benchmarks.mainstream_e2e_throughput " + " ".join(sys.argv[1:]),
        "device": str(jax.devices()[0]),
        "layer_ms_per_frame": lam.tolist(), "layer_alone_ms": costs.raw_ms.tolist(),
        "network_fused_ms": costs.full_ms,
        "overhead_ms": costs.overhead_ms, "cost_batch": costs.batch,
        "repeats": _REPEATS.value, "batch_apps": _BATCH_APPS.value, "fused": _FUSED.value,
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
    ax.set_ylabel("frames/s (dashed: cost model)")
    ax.set_yscale("log")
    ax.set_title(f"Stem-sharing runtime throughput ({out['device']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(_OUT.value, "throughput.png"), dpi=120)
    print(f"{'N':>3} {'k':>3} {'layers':>7} {'measured':>10} {'predicted':>10} {'error':>7}")
    for r in rows:
        print(f"{r['num_apps']:>3} {r['num_frozen']:>3} {r['layer_share']:>7.0%} "
              f"{r['measured_fps']:>10.0f} {r['predicted_fps']:>10.0f} "
              f"{r['relative_error']:>+7.1%}")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    app.run(main)
