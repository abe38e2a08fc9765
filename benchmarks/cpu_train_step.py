r"""Train step vs. forward pass on the CPU: XLA's native ops against sb_jax's CPU forms.

  taskset -c 0 python -m benchmarks.cpu_train_step --out=benchmarks/results/cpu_train_step

For each model (batch 128) and each formulation of its convolutions and pools
(`ops="xla"`: the straightforward flax/XLA program; `ops="cpu"`:
sb_jax/models/fast_ops.py), measures the inference forward pass and the full train
step (training forward, backward, SGD-Nesterov update), interleaved round by round so
both formulations see the same machine; checks that both compute the same function
(logits and gradients); profiles where the train step's time goes by jax operation;
and times traditional Fashion-MNIST epochs with the trainer for the small CNN in its
max-pool form (the straightforward flax model) with either formulation.
Writes results.json, table.md and profiles.txt.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from experiments import cli
from experiments.configs import fashion_mnist
from sb_jax import metrics_io, steps, train
from sb_jax.models import create_model, op_profile

MODELS = {
    # name: (registry name, kwargs, input shape)
    "small_cnn_maxpool": ("small_cnn", {"downsample": "max_pool"}, (28, 28, 1)),
    "small_cnn_stride": ("small_cnn", {"downsample": "conv_stride"}, (28, 28, 1)),
    "resnet18": ("resnet18", {}, (32, 32, 3)),
    "wrn_16_8": ("wrn", {"depth": 16, "width": 8}, (32, 32, 3)),
}
OPS = ("xla", "cpu")

_MODELS = flags.DEFINE_list("models", list(MODELS), f"Models, from {list(MODELS)}.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds (xla, cpu, xla, ...).")
_REPEATS = flags.DEFINE_integer("repeats", 4, "Timed calls per formulation per round.")
_BIG_REPEATS = flags.DEFINE_integer(
    "big_model_repeats", 1, "Timed calls per round for resnet18 / wrn_16_8."
)
_PROFILE_TOP = flags.DEFINE_integer("profile_top", 12, "Operations listed per profile.")
_EPOCHS = flags.DEFINE_integer(
    "epochs", 2, "Trainer epochs per formulation (0: skip); the last one is the timed epoch."
)
_OUT = flags.DEFINE_string("out", "benchmarks/results/cpu_train_step", "Output directory.")


def _programs(model, shape, batch_size):
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch_size, *shape))
    y = jnp.arange(batch_size) % 10
    variables = jax.jit(lambda: model.init({"params": key}, x, train=False))()
    tx = steps.make_optimizer(0.9, True, 5e-4)
    lr = 0.05

    @jax.jit
    def forward(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    def loss_fn(params, batch_stats, x, y):
        logits, new = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True,
            rngs={"dropout": key}, mutable=["batch_stats"],
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, new["batch_stats"], opt_state, loss

    grads = jax.jit(jax.grad(lambda p, bs, x, y: loss_fn(p, bs, x, y)[0]))
    params, batch_stats = variables["params"], variables["batch_stats"]
    return {
        "forward": (forward, (params, batch_stats, x)),
        "train_step": (train_step, (params, batch_stats, tx.init(params), x, y)),
        "grads": (grads, (params, batch_stats, x, y)),
    }


def _time_calls(fn, args, calls):
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - start)
    return samples


def _max_rel_diff(a, b):
    diffs = [float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    return max(diffs)


def measure_model(label, batch_size, rounds, repeats, profile_top):
    name, kwargs, shape = MODELS[label]
    programs = {ops: _programs(create_model(name, 10, ops=ops, **kwargs), shape, batch_size)
                for ops in OPS}
    compile_s = {}
    for ops in OPS:
        start = time.perf_counter()
        for key in ("forward", "train_step"):
            fn, args = programs[ops][key]
            jax.block_until_ready(fn(*args))
        compile_s[ops] = time.perf_counter() - start
    samples = {(ops, key): [] for ops in OPS for key in ("forward", "train_step")}
    for _ in range(rounds):
        for ops in OPS:
            for key in ("forward", "train_step"):
                fn, args = programs[ops][key]
                samples[(ops, key)] += _time_calls(fn, args, repeats)
    result = {"model": name, "kwargs": kwargs, "input_shape": list(shape),
              "compile_and_first_call_s": compile_s}
    for ops in OPS:
        fwd = 1e3 * statistics.median(samples[(ops, "forward")])
        step = 1e3 * statistics.median(samples[(ops, "train_step")])
        result[ops] = {"forward_ms": fwd, "train_step_ms": step, "ratio": step / fwd,
                       "samples": len(samples[(ops, "forward")])}
    result["speedup_train_step"] = result["xla"]["train_step_ms"] / result["cpu"]["train_step_ms"]
    result["speedup_forward"] = result["xla"]["forward_ms"] / result["cpu"]["forward_ms"]
    outputs = {ops: programs[ops]["forward"][0](*programs[ops]["forward"][1]) for ops in OPS}
    grads = {ops: programs[ops]["grads"][0](*programs[ops]["grads"][1]) for ops in OPS}
    result["max_rel_diff_logits"] = _max_rel_diff(outputs["cpu"], outputs["xla"])
    result["max_rel_diff_grads"] = _max_rel_diff(grads["cpu"], grads["xla"])
    profiles = {}
    for ops in OPS:
        fn, args = programs[ops]["train_step"]
        rows = op_profile.profile_by_op(fn, *args, calls=2)
        result[ops]["profile_train_step"] = [
            {"jax_op": op, "ms": ms} for op, ms in op_profile.group_by_jax_op(rows)[:profile_top]
        ]
        profiles[ops] = op_profile.format_profile(rows, top=profile_top)
    return result, profiles


def epoch_times(epochs):
    """Steady-state epoch seconds of the trainer (max-pool small CNN), per formulation."""
    out = {}
    for ops in OPS:
        config = fashion_mnist.get_config()
        config.num_epochs = epochs
        config.small_cnn_downsample = "max_pool"
        config.model_ops = ops
        config.tensorboard = False
        workdir = tempfile.mkdtemp(prefix=f"cpu_step_{ops}_")
        try:
            summary = train.train_and_evaluate(config, workdir)
            curve = metrics_io.read_metrics(workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        walls = [row["wall_s"] for row in curve]
        out[ops] = {
            "epoch_s": [b - a for a, b in zip([0.0, *walls[:-1]], walls, strict=True)],
            "test_error": [row["test_error"] for row in curve],
            "final_test_error": summary["final_test_error"],
        }
        out[ops]["timed_epoch_s"] = out[ops]["epoch_s"][-1]
    out["speedup_timed_epoch"] = out["xla"]["timed_epoch_s"] / out["cpu"]["timed_epoch_s"]
    return out


def _table(results):
    lines = [
        "| model | ops | forward ms | train step ms | step / forward | step speedup |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results["models"].items():
        for ops in OPS:
            speedup = f"{r['speedup_train_step']:.2f}x" if ops == "cpu" else ""
            lines.append(
                f"| {label} | {ops} | {r[ops]['forward_ms']:.2f} | {r[ops]['train_step_ms']:.2f} "
                f"| {r[ops]['ratio']:.2f} | {speedup} |"
            )
    if "epochs" in results:
        e = results["epochs"]
        lines += ["", "| trainer, small_cnn max_pool | timed epoch s | final test error % |",
                  "|---|---|---|"]
        for ops in OPS:
            row = e[ops]
            lines.append(f"| {ops} | {row['timed_epoch_s']:.1f} | {row['final_test_error']} |")
        lines.append(f"\nEpoch speedup: {e['speedup_timed_epoch']:.2f}x")
    return "\n".join(lines)


def main(argv):
    del argv
    cli.setup_logging()
    unknown = sorted(set(_MODELS.value) - set(MODELS))
    if unknown:
        raise app.UsageError(f"unknown --models {unknown}; choose from {list(MODELS)}")
    results = {
        "command": "python -m benchmarks.cpu_train_step " + " ".join(sys.argv[1:]),
        "backend": jax.default_backend(), "jax": jax.__version__,
        "batch_size": _BATCH.value, "rounds": _ROUNDS.value, "models": {},
    }
    all_profiles = []
    for label in _MODELS.value:
        big = label in ("resnet18", "wrn_16_8")
        repeats = _BIG_REPEATS.value if big else _REPEATS.value
        result, profiles = measure_model(label, _BATCH.value, _ROUNDS.value, repeats,
                                         _PROFILE_TOP.value)
        results["models"][label] = result
        for ops in OPS:
            all_profiles.append(f"== {label}, ops={ops}, train step\n{profiles[ops]}\n")
        print(label, json.dumps({k: v for k, v in result.items()
                                 if k not in OPS}, indent=1), flush=True)
        for ops in OPS:
            print(f"  {ops}: forward {result[ops]['forward_ms']:.2f} ms, train step "
                  f"{result[ops]['train_step_ms']:.2f} ms, ratio {result[ops]['ratio']:.2f}",
                  flush=True)
    if _EPOCHS.value:
        results["epochs"] = epoch_times(_EPOCHS.value)
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(_OUT.value, "profiles.txt"), "w") as f:
        f.write("\n".join(all_profiles))
    table = _table(results)
    with open(os.path.join(_OUT.value, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    app.run(main)
