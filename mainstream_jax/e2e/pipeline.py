"""profile -> plan -> run: Mainstream end to end on real images.

:func:`run_e2e` trains the base network on the base classes, fine-tunes every app's
detector at every chokepoint, profiles accuracy / false-positive rate on held-out
(jittered) test images and the per-layer cost on this device, writes the profile
directory and reads it back for the planners, builds a stream from the remaining test
images, then plans with each planner at each budget, runs the schedules with the
stem-sharing runtime and compares what the planner predicted with what happened.

Data use (Fashion-MNIST by default): the base network trains on training images of the
base classes only; the apps' targets are other classes (the base never saw them).
Fine-tuning draws from the training split (all classes); profiling and the stream use
disjoint parts of the test split.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mainstream_jax import planners, profiles, schedule
from mainstream_jax.e2e import basenet, profiling, runtime, streams, training
from sb_jax.data import load_dataset

FASHION_MNIST_CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                         "sneaker", "bag", "ankle_boot")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field for inconsistent settings."""
    n = len(config.app_targets)
    if n == 0:
        raise ValueError("app_targets: give at least one app")
    for field in ("event_length_ms", "event_frequency"):
        if len(config[field]) != n:
            raise ValueError(f"{field}: needs one entry per app ({n}), got "
                             f"{len(config[field])}")
    if set(config.app_targets) & set(config.base_classes):
        raise ValueError("app_targets must be classes the base network never saw "
                         f"(base_classes = {list(config.base_classes)})")
    for p in config.planners:
        if p not in planners.PLANNERS:
            raise ValueError(f"planners: unknown planner {p!r}; choose from "
                             f"{sorted(planners.PLANNERS)}")
    if not config.budget_fractions or min(config.budget_fractions) <= 0:
        raise ValueError("budget_fractions: give positive fractions of the no-sharing, "
                         "full-rate cost")
    if config.event_model not in profiles.EVENT_MODELS:
        raise ValueError(f"event_model: choose one of {profiles.EVENT_MODELS}")


def _split(ds, config):
    rng = np.random.default_rng([config.seed, 7])
    base_cls = np.asarray(config.base_classes)
    m = np.isin(ds.train_labels, base_cls)
    base_ids = np.flatnonzero(m)
    if config.base_train_size:
        base_ids = np.sort(rng.choice(base_ids, min(config.base_train_size, base_ids.size),
                                      replace=False))
    ft_ids = np.sort(rng.choice(ds.num_train, config.finetune_pool_size, replace=False))
    test_perm = rng.permutation(ds.num_test)
    prof_ids = test_perm[:config.profile_size]
    stream_ids = test_perm[config.profile_size:]
    return base_ids, ft_ids, prof_ids, stream_ids


def _runtime_pieces(spec: basenet.NetSpec) -> list[tuple[int, int]]:
    """Pieces a StemRuntime can run with this spec's chokepoints: stem segments between
    chokepoints (from the input) and branches from every chokepoint."""
    points = [k for k in spec.chokepoints if k > 0]
    L = spec.num_layers
    return sorted([(a, b) for a in [0, *points] for b in points if a < b]
                  + [(k, L) for k in spec.chokepoints])


def _time_schedule(rt: runtime.StemRuntime, frames: np.ndarray,
                   probe_table: dict[int, dict[tuple[int, int], tuple]], num_layers: int,
                   config: ml_collections.ConfigDict, rounds: int) -> dict[str, Any] | None:
    """Times the schedule's stream passes and the pieces its calls run in the same rounds
    (:func:`profiling.measure_pieces_interleaved`: in each round, in a random order, one
    pass over the stream and every piece in a burst at every profiled frame count).
    Returns {"pieces": the pieces' table from those rounds (only the pieces) in bursts of
    the pass's number of runtime calls, "pieces_profile_burst": the same in bursts of
    the profile's length (``piece_burst``), "pass_s": seconds per pass, per round}, or
    None without probes, rounds or when fused (one
    jitted call: no pieces)."""
    if not probe_table or rounds < 1 or rt.fused:
        return None
    batches = sorted(probe_table)
    used = sorted({(a, b) for a, b, _, _ in rt.pieces} & set(probe_table[batches[0]]))
    if not used:
        return None
    probes = [(p, *probe_table[b][p]) for b in batches for p in used]
    chunks = rt.stream_chunks(frames)
    # Bursts of the profile's length, and of the pass's: a pass issues each piece once
    # per runtime call, all calls back to back with one wait at the end.
    bursts = sorted({int(config.piece_burst), len(chunks)})
    tables, pass_s = profiling.measure_pieces_interleaved(
        probes, batches, num_layers, [lambda: rt.time_pass(chunks)], bursts=bursts,
        repeats=rounds, seed=config.seed)
    by_burst = dict(zip(bursts, tables, strict=True))
    return {"pieces": by_burst[len(chunks)], "pass_burst": len(chunks),
            "pieces_profile_burst": by_burst[int(config.piece_burst)],
            "profile_burst": int(config.piece_burst), "pass_s": pass_s[:, 0].tolist()}


def _table_summary(t: profiles.PieceCosts) -> dict[str, Any]:
    """A piece table as ms per call: {"batch": {"a-b": ms}}, the overhead and the wait."""
    return {"ms_per_call": {str(int(b)): {f"{a}-{e}": float(t.ms_per_frame[s, a, e] * b)
                                          for a, e in t.pieces}
                            for s, b in enumerate(t.batches)},
            "overhead_ms": float(t.overhead_ms), "sync_ms": float(t.sync_ms)}


def run_e2e(config: ml_collections.ConfigDict, out_dir: str, log=print) -> dict[str, Any]:
    """Runs the whole loop and writes ``report.json``, ``report.md`` and the profile
    directory (``profile/``) under ``out_dir``; returns the report."""
    validate_config(config)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name, t0):
        phases[name] = time.perf_counter() - t0
        log(f"[{name}] {phases[name]:.1f} s")

    t0 = time.perf_counter()
    ds = load_dataset(config.dataset, config.data_dir or None)
    base_ids, ft_ids, prof_ids, stream_ids = _split(ds, config)
    base_cls = np.asarray(config.base_classes)
    targets = np.asarray(config.app_targets)
    names = [FASHION_MNIST_CLASSES[t] if config.dataset == "fashion_mnist" else f"class{t}"
             for t in targets]
    image_shape = ds.image_shape
    base_imgs = ds.train_images[base_ids]
    mean = float(base_imgs.mean() / 255.0)
    std = float(base_imgs.std() / 255.0)
    spec = basenet.mobilenet_spec(tuple(config.widths), tuple(config.strides),
                                  config.stem_width, config.stem_strides, config.hidden)
    base_model = basenet.ChokepointNet(spec, len(base_cls))
    app_model = basenet.ChokepointNet(spec, 1)
    phase("data", t0)

    t0 = time.perf_counter()
    test_base = np.isin(ds.test_labels, base_cls)
    base = training.train_base(
        base_model, basenet.init_variables(base_model, image_shape, config.seed),
        base_imgs, np.searchsorted(base_cls, ds.train_labels[base_ids]),
        mean=mean, std=std, epochs=config.base_epochs, batch_size=config.base_batch_size,
        learning_rate=config.base_learning_rate, seed=config.seed,
        test_images=ds.test_images[test_base],
        test_labels=np.searchsorted(base_cls, ds.test_labels[test_base]))
    base_vars = base.variables
    log(f"base network: {len(base_cls)}-class test accuracy {base.test_accuracy:.4f}")
    phase("train_base", t0)

    # Fine-tune every app at every chokepoint; profile on jittered held-out images.
    t0 = time.perf_counter()
    jrng = np.random.default_rng([config.seed, 11])
    prof_imgs = streams.jitter_images(
        ds.test_images[prof_ids],
        jrng.integers(-config.jitter, config.jitter + 1, size=(prof_ids.size, 2)))
    prof_labels = ds.test_labels[prof_ids]
    prof_pos = prof_labels[None, :] == targets[:, None]
    # False-positive rates are measured on the mix of negatives the stream shows (mostly
    # background images, plus the other apps' targets): per held-out image, its class's
    # share of the app's non-event stream frames over the class's held-out count.
    shares = streams.negative_class_shares(ds.test_labels[stream_ids], targets.tolist(),
                                           config.event_frequency, base_cls.tolist())
    class_counts = np.bincount(prof_labels, minlength=shares.shape[1])
    neg_w = shares[:, prof_labels] / np.maximum(class_counts[prof_labels], 1)[None, :]
    ft_pos = ds.train_labels[ft_ids][None, :] == targets[:, None]
    x_ft = training.normalize(ds.train_images[ft_ids], mean, std)
    x_prof = training.normalize(prof_imgs, mean, std)
    acc = np.zeros((len(targets), len(spec.chokepoints)))
    fpr = np.zeros_like(acc)
    fpr_all = np.zeros_like(acc)  # over all held-out negatives alike (the earlier profile)
    branches: dict[int, dict] = {}
    for j, k in enumerate(spec.chokepoints):
        feats = training.stem_features(base_model, base_vars, x_ft, k)
        init = training.init_branches(app_model, base_vars, k, len(targets), image_shape,
                                      config.seed + 100)
        tuned = training.finetune_branches(
            app_model, init, feats, ft_pos, k, steps=config.finetune_steps,
            batch_size=config.finetune_batch_size, learning_rate=config.finetune_learning_rate,
            seed=config.seed + k)
        logits = training.branch_logits(
            app_model, tuned.branches, training.stem_features(base_model, base_vars, x_prof, k),
            k)
        acc[:, j], fpr[:, j] = profiling.detection_rates(logits, prof_pos, neg_w)
        fpr_all[:, j] = profiling.detection_rates(logits, prof_pos)[1]
        branches[k] = jax.device_get(tuned.branches)
        log(f"k={k:2d}: accuracy {np.round(acc[:, j], 3).tolist()}  fpr "
            f"{np.round(fpr[:, j], 3).tolist()}")
    phase("finetune_and_profile_accuracy", t0)

    t0 = time.perf_counter()
    F = config.stream_fps
    frames_per_call = config.windows_per_call * config.window_s * F
    batch = frames_per_call
    costs = profiling.measure_layer_costs(app_model, basenet.init_variables(
        app_model, image_shape, 0), image_shape, batch=batch, repeats=config.cost_repeats)
    phase("profile_layer_costs", t0)
    # Every piece the runtime can run (stem segments and branches between chokepoints),
    # timed with the runtime's own jitted functions at the frame counts in
    # config.piece_batches (a runtime call runs a piece on 60 x fps frames here).
    t0 = time.perf_counter()
    pieces = None
    if config.piece_batches:
        pieces = profiling.measure_piece_costs(
            app_model, basenet.init_variables(app_model, image_shape, 0), image_shape,
            batches=list(config.piece_batches), mean=mean, std=std,
            pieces=_runtime_pieces(spec), burst=config.piece_burst,
            repeats=config.piece_repeats)
    phase("profile_piece_costs", t0)
    t0 = time.perf_counter()
    layer_bytes = basenet.layer_param_bytes(basenet.init_variables(app_model, image_shape, 0),
                                            spec)
    network = profiles.make_network(costs.ms_per_frame, spec.chokepoints,
                                    layer_bytes=layer_bytes, layer_names=spec.layer_names,
                                    name=f"e2e MobileNet-style ({len(spec.layers)} layers)",
                                    piece_costs=pieces)
    apps = [profiles.make_app(
        n, network, num_frozen=spec.chokepoints, accuracy=acc[a], false_positive_rate=fpr[a],
        event_length_ms=config.event_length_ms[a], event_frequency=config.event_frequency[a],
        correlation=config.correlation, clean=False) for a, n in enumerate(names)]
    profile_dir = os.path.join(out_dir, "profile")
    profiling.write_profile_dir(profile_dir, network, apps, metadata={
        "base_classes": list(map(int, base_cls)), "app_targets": list(map(int, targets)),
        "cost_batch": batch, "cost_overhead_ms": costs.overhead_ms,
        "network_fused_ms": costs.full_ms,
        "device": str(jax.devices()[0]),
        "cpu_inline_dispatch": runtime.cpu_inline_dispatch()})
    # The planner reads what was written, as measured: the original's monotone clean-up
    # (a larger k's accuracy *and* false-positive rate replace a lower accuracy) made
    # the model describe other detectors than those run; e.g. every k of an app whose
    # head-only detector hit 100 % took k = 13's false-positive rate (0.20 against 0.06
    # measured at k = 0), predicting precision 0.35 where the stream showed 0.76.
    library = profiles.load_profile_dir(profile_dir, clean=False)
    phase("write_profile", t0)

    t0 = time.perf_counter()
    call_s = config.windows_per_call * config.window_s
    duration = config.duration_s - config.duration_s % call_s
    stream = streams.make_stream(
        ds.test_images[stream_ids], ds.test_labels[stream_ids], targets.tolist(),
        config.event_length_ms, config.event_frequency, background_classes=base_cls.tolist(),
        correlation=config.correlation, stream_fps=F, duration_s=duration,
        jitter=config.jitter, seed=config.seed)
    sstats = streams.stream_stats(stream, len(targets))
    phase("stream", t0)

    t0 = time.perf_counter()
    loaded_apps = [library.app_types[n] for n in names]
    full_cost = len(names) * F * library.network.total_cost
    # Rates the runtime can run: whole frames per window (fractional ones need window_s 10).
    options = planners.PlannerOptions(
        fps_options=tuple(float(r) for r in range(1, F + 1)),
        no_sharing_fractional_fps=bool(config.no_sharing_fractional_fps))
    # The same schedules under the earlier model (c between samples, FPR over all held-out
    # negatives), reported next to the prediction the planners used.
    old_apps = [profiles.make_app(
        a.name, library.network, num_frozen=library.network.chokepoints, accuracy=a.accuracy,
        false_positive_rate=fpr_all[i], event_length_ms=a.event_length_ms,
        event_frequency=a.event_frequency, correlation=a.correlation, clean=False)
        for i, a in enumerate(loaded_apps)]
    # The pieces' probes (the profile's functions and inputs, already compiled by the
    # piece profile), re-timed per schedule in rounds that alternate with its stream
    # passes (schedule_timing_rounds > 0).
    rounds = int(config.get("schedule_timing_rounds", 0))
    probe_table: dict[int, dict[tuple[int, int], tuple]] = {}
    if rounds and config.piece_batches:
        probe_vars = basenet.init_variables(app_model, image_shape, 0)
        for b in sorted(config.piece_batches):
            probe_table[int(b)] = {p: (fn, args) for p, fn, args in profiling.piece_probes(
                app_model, probe_vars, image_shape, batch=int(b), mean=mean, std=std,
                pieces=_runtime_pieces(spec))}
    runs = []
    for frac in config.budget_fractions:
        problem = profiles.make_problem(loaded_apps, library.network, frac * full_cost,
                                        stream_fps=F, event_model=config.event_model)
        for pname in config.planners:
            try:
                sched = planners.plan(problem, pname, options)
            except planners.InfeasibleError as e:
                runs.append({"budget_fraction": frac, "planner": pname, "infeasible": str(e)})
                continue
            ks = [a.num_frozen for a in sched.apps]
            app_vars = [training.assemble_app(base_vars, training.unstack(branches[k], a),
                                              spec, k) for a, k in enumerate(ks)]
            rt = runtime.StemRuntime(app_model, base_vars, app_vars, ks,
                                     [a.fps for a in sched.apps], stream_fps=F,
                                     windows_per_call=config.windows_per_call,
                                     window_s=config.window_s, mean=mean, std=std,
                                     batch_apps=config.batch_apps, fused=config.fused)
            res = rt.run(stream.frames)
            measured_cost = res.wall_s * 1e3 / (stream.frames.shape[0] / F)
            timing = _time_schedule(rt, stream.frames, probe_table, spec.num_layers,
                                    config, rounds)
            old = schedule.build_schedule(
                profiles.make_problem(old_apps, library.network, problem.budget,
                                      stream_fps=F, event_model="corrected"),
                [list(library.network.chokepoints).index(k) for k in ks],
                [a.fps for a in sched.apps], planner=pname)
            # Every jitted call of the runtime pays the dispatch overhead the profiler
            # measured; the cost model's per-frame work does not include it.
            predicted_call = rt.predicted_call_ms(library.network.layer_costs,
                                                  costs.overhead_ms)
            # The measured piece costs (the profile's table) summed over the calls.
            profile_piece_call = (
                rt.predicted_call_ms(library.network.layer_costs, costs.overhead_ms,
                                     library.network.piece_costs)
                if library.network.piece_costs is not None else float("nan"))
            # The same sum over the pieces re-timed in the schedule's own rounds.
            piece_call = (rt.predicted_call_ms(library.network.layer_costs,
                                               costs.overhead_ms, timing["pieces"])
                          if timing else profile_piece_call)
            burst_call = (rt.predicted_call_ms(library.network.layer_costs,
                                               costs.overhead_ms,
                                               timing["pieces_profile_burst"])
                          if timing else float("nan"))
            per_app = []
            for a, asg in enumerate(sched.apps):
                obs = streams.score_app(stream, a, res.frames[a], res.logits[a] > 0)
                per_app.append({
                    "app": asg.name, "num_frozen": asg.num_frozen, "fps": asg.fps,
                    "predicted": {"recall": asg.recall, "precision": asg.precision,
                                  "f1": asg.f1},
                    "observed": {"recall": obs.recall, "precision": obs.precision,
                                 "f1": obs.f1},
                    "events": obs.num_events, "detected": obs.detected,
                    "false_alarms": obs.false_alarms, "windows": obs.num_windows})
            first_pass_cost = measured_cost
            frames_per_s = res.frames_per_s
            if timing:
                pass_s = float(np.median(timing["pass_s"]))
                measured_cost = pass_s * 1e3 / (stream.frames.shape[0] / F)
                frames_per_s = stream.frames.shape[0] / pass_s
            runs.append({
                "budget_fraction": frac, "budget": problem.budget, "planner": pname,
                "predicted_mean_f1": sched.mean_f1,
                "predicted_mean_f1_corrected_model": old.mean_f1,
                "observed_mean_f1": float(np.mean([p["observed"]["f1"] for p in per_app])),
                "predicted_cost_ms_per_s": sched.total_cost,
                "call_overhead_ms_per_s": predicted_call / call_s - sched.total_cost,
                "piece_predicted_cost_ms_per_s": piece_call / call_s,
                "profile_piece_predicted_cost_ms_per_s": profile_piece_call / call_s,
                "rounds_profile_burst_piece_predicted_cost_ms_per_s": burst_call / call_s,
                "piece_timing": ("interleaved" if timing else "profile"),
                "timing_rounds": rounds if timing else 0,
                "piece_burst_rounds": timing["pass_burst"] if timing else None,
                "timed_piece_tables": ({
                    f"burst_{timing['pass_burst']}": _table_summary(timing["pieces"]),
                    f"burst_{timing['profile_burst']}": _table_summary(
                        timing["pieces_profile_burst"])} if timing else None),
                "jitted_calls_per_call": rt.num_calls,
                "measured_cost_ms_per_s": measured_cost,
                "measured_cost_rounds_ms_per_s": (
                    (np.asarray(timing["pass_s"]) * 1e3 / (stream.frames.shape[0] / F)
                     ).tolist() if timing else [measured_cost]),
                "first_pass_cost_ms_per_s": first_pass_cost,
                "timed_pieces": (timing["pieces"].pieces if timing else None),
                "frames_per_s": frames_per_s, "apps": per_app})
            log(f"budget {frac:g} {pname:>12}: F1 predicted {sched.mean_f1:.3f} observed "
                f"{runs[-1]['observed_mean_f1']:.3f}; cost predicted {sched.total_cost:.3f} "
                f"pieces {piece_call / call_s:.3f} (profile {profile_piece_call / call_s:.3f})"
                f" measured {measured_cost:.3f} ms per stream-second")
    phase("plan_and_run", t0)
    beats = {}
    summary = {key: prediction_summary(runs, key) for key in
               ("piece_predicted_cost_ms_per_s",
                "rounds_profile_burst_piece_predicted_cost_ms_per_s",
                "profile_piece_predicted_cost_ms_per_s")}
    for frac in config.budget_fractions:
        obs = {r["planner"]: r.get("observed_mean_f1", 0.0) for r in runs
               if r["budget_fraction"] == frac}
        if "mainstream" in obs and len(obs) > 1:
            beats[str(frac)] = all(obs["mainstream"] > v for p, v in obs.items()
                                   if p != "mainstream")
    report = {
        "config": config.to_dict(),
        "device": str(jax.devices()[0]),
        "base_test_accuracy": base.test_accuracy,
        "apps": names,
        "chokepoints": list(map(int, spec.chokepoints)),
        "accuracy": acc.tolist(), "false_positive_rate": fpr.tolist(),
        "false_positive_rate_all_negatives": fpr_all.tolist(),
        "layer_ms_per_frame": costs.ms_per_frame.tolist(),
        "layer_alone_ms": costs.raw_ms.tolist(), "network_fused_ms": costs.full_ms,
        "cost_overhead_ms": costs.overhead_ms,
        "stream": {"frames": int(stream.frames.shape[0]),
                   "event_frequency": sstats.event_frequency.tolist(),
                   "mean_event_frames": sstats.mean_event_frames.tolist(),
                   "num_events": sstats.num_events.tolist(),
                   "repeat_fraction": sstats.repeat_fraction},
        "runs": runs,
        "measured_vs_pieces": summary,
        "mainstream_observed_beats_every_baseline": beats,
        "phases_s": phases,
        "wall_s": time.perf_counter() - t_start,
    }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=profiling._json_default)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(format_report(report))
    return report


def prediction_summary(runs: list[dict[str, Any]], key: str,
                       tolerance: float = 0.15) -> dict[str, Any]:
    """Over the runs (schedules) with a finite prediction ``key``: the range of
    measured / predicted - 1 and how many are within ``tolerance``."""
    err = np.array([r["measured_cost_ms_per_s"] / r[key] - 1 for r in runs
                    if key in r and np.isfinite(r[key]) and r[key] > 0])
    if err.size == 0:
        return {"schedules": 0}
    return {"schedules": int(err.size), "min_error": float(err.min()),
            "max_error": float(err.max()),
            "within": int(np.sum(np.abs(err) <= tolerance)), "tolerance": tolerance}


def _summary_line(name: str, s: dict[str, Any]) -> str:
    if not s.get("schedules"):
        return f"measured / {name}: no schedules"
    return (f"measured / {name}: {s['min_error']:+.1%} to {s['max_error']:+.1%}; "
            f"{s['within']} of {s['schedules']} schedules within {s['tolerance']:.0%}")


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables: per planner and budget, predicted vs observed F1 and cost; per app
    predicted vs observed recall / precision / F1."""
    lines = [f"# Mainstream end to end ({report['device']})", "",
             f"base test accuracy {report['base_test_accuracy']:.4f}; wall "
             f"{report['wall_s']:.0f} s", "",
             "Costs are ms of compute per second of stream; 'cost predicted' is the cost model "
             "on the profiled layer costs, '+ overhead' adds the measured dispatch cost of the "
             "runtime's calls. 'pieces (profile)' sums the piece costs of the profile's table "
             "(timed once, bursts of 4 back-to-back calls, before the schedules ran) over "
             "the runtime's calls; 'pieces (rounds)' is the same sum over the schedule's "
             "pieces re-timed (the same probes and frame counts, medians) in rounds that "
             "alternate with its stream passes, each piece in a burst of as many calls as a "
             "pass makes of it (one per runtime call, all back to back, one wait), and "
             "'cost measured' is the median pass of those rounds. The same rounds also "
             "time each piece in the profile's bursts (report.json: "
             "'rounds_profile_burst_piece_predicted_cost_ms_per_s'; every run's piece "
             "tables: 'timed_piece_tables'; the first pass, which scored the stream: "
             "'first_pass_cost_ms_per_s').", "",
             "'F1 predicted' is the planner's event model; 'earlier model' evaluates the same "
             "schedule with c between samples and the false-positive rate over all held-out "
             "negatives.", "",
             "| budget (x no-sharing full) | planner | F1 predicted | F1 observed | gap | "
             "F1 earlier model | cost predicted | + overhead | pieces (profile) | "
             "pieces (rounds) | cost measured | measured / (+ overhead) | "
             "measured / pieces (profile) | measured / pieces (rounds) | frames/s |",
             "|" + "---|" * 15]
    for r in report["runs"]:
        if "infeasible" in r:
            lines.append(f"| {r['budget_fraction']:g} | {r['planner']} | infeasible "
                         "(F1 0) |||||||||||")
            continue
        with_overhead = r["predicted_cost_ms_per_s"] + r["call_overhead_ms_per_s"]
        pieces = r.get("piece_predicted_cost_ms_per_s", float("nan"))
        profile_pieces = r.get("profile_piece_predicted_cost_ms_per_s", pieces)
        if r.get("piece_timing", "profile") == "profile":
            pieces = float("nan")  # no re-timed pieces: the profile's column only
        lines.append(
            f"| {r['budget_fraction']:g} | {r['planner']} | {r['predicted_mean_f1']:.3f} | "
            f"{r['observed_mean_f1']:.3f} | "
            f"{r['observed_mean_f1'] - r['predicted_mean_f1']:+.3f} | "
            f"{r.get('predicted_mean_f1_corrected_model', float('nan')):.3f} | "
            f"{r['predicted_cost_ms_per_s']:.3f} | "
            f"{with_overhead:.3f} | {profile_pieces:.3f} | {pieces:.3f} | "
            f"{r['measured_cost_ms_per_s']:.3f} | "
            f"{r['measured_cost_ms_per_s'] / with_overhead - 1:+.1%} | "
            f"{r['measured_cost_ms_per_s'] / profile_pieces - 1:+.1%} | "
            f"{r['measured_cost_ms_per_s'] / pieces - 1:+.1%} | "
            f"{r['frames_per_s']:.0f} |")
    summary = report.get("measured_vs_pieces", {})
    if summary:
        lines += [""] + [
            "- " + _summary_line(name, summary[key]) for name, key in
            [("pieces (rounds)", "piece_predicted_cost_ms_per_s"),
             ("pieces (rounds, the profile's bursts)",
              "rounds_profile_burst_piece_predicted_cost_ms_per_s"),
             ("pieces (profile)", "profile_piece_predicted_cost_ms_per_s")]
            if key in summary]
    beats = report.get("mainstream_observed_beats_every_baseline", {})
    if beats:
        lines += ["", "Mainstream's observed F1 above every baseline's: " + ", ".join(
            f"{b}: {'yes' if v else 'no'}" for b, v in beats.items())]
    lines += ["", "| budget | planner | app | k | fps | recall pred/obs | precision pred/obs"
              " | F1 pred/obs |", "|" + "---|" * 8]
    for r in report["runs"]:
        for a in r.get("apps", []):
            p, o = a["predicted"], a["observed"]
            lines.append(
                f"| {r['budget_fraction']:g} | {r['planner']} | {a['app']} | {a['num_frozen']}"
                f" | {a['fps']:g} | {p['recall']:.3f} / {o['recall']:.3f} | "
                f"{p['precision']:.3f} / {o['precision']:.3f} | {p['f1']:.3f} / {o['f1']:.3f} |")
    return "\n".join(lines) + "\n"
