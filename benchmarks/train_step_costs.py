r"""Forward vs. train-step cost per example, and the cost of nesting the train step.

  python -m benchmarks.train_step_costs --models=small_cnn --out=benchmarks/results

Writes train_step_costs.json: per model, the median time of an inference forward pass
and of a full train step (training forward + backward + SGD update) at a batch size,
their per-example values and ratio, and the same train step run inside `lax.cond` and
`lax.scan` (the trainer keeps it at the top level because of the latter).
"""

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from sb_jax import costs, steps
from sb_jax.models import create_model

_MODELS = flags.DEFINE_list("models", ["small_cnn"], "Models to measure.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed repetitions (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results", "Output directory.")

INPUT_SHAPES = {"small_cnn": (28, 28, 1), "resnet18": (32, 32, 3), "wrn": (32, 32, 3),
                "mobilenet_v2": (32, 32, 3)}
MODEL_KWARGS = {"small_cnn": {"dropout": 0.0}, "wrn": {"depth": 16, "width": 8}}


def nested_costs(model, shape, batch_size, repeats):
    """Median seconds of the same train step at top level, in lax.cond, in lax.scan."""
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (batch_size, *shape))
    y = jnp.arange(batch_size) % 10
    variables = model.init({"params": key, "dropout": key}, x[:1], train=False)
    tx = steps.make_optimizer(0.9, True, 5e-4)
    carry = (variables["params"], variables.get("batch_stats", {}),
             tx.init(variables["params"]))

    def train_step(carry):
        params, batch_stats, opt_state = carry

        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                      train=True, rngs={"dropout": key},
                                      mutable=["batch_stats"])
            return jnp.mean(steps.softmax_xent(logits, y)), new.get("batch_stats", batch_stats)

        (_, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        d, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, d), bs, opt_state

    scan_len = 4
    # The predicate is a traced argument: a Python `True` would let JAX inline the branch.
    variants = {
        "top_level": (jax.jit(lambda c, flag: train_step(c)), 1),
        "in_cond": (jax.jit(lambda c, flag: jax.lax.cond(flag, train_step, lambda c: c, c)), 1),
        "in_scan": (jax.jit(lambda c, flag: jax.lax.scan(lambda c, _: (train_step(c), None), c,
                                                         None, length=scan_len)[0]), scan_len),
    }
    flag = jnp.asarray(True)
    out = {}
    for name, (fn, steps_per_call) in variants.items():
        jax.block_until_ready(fn(carry, flag))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(carry, flag))
            times.append((time.perf_counter() - t0) / steps_per_call)
        out[f"train_step_{name}_s"] = statistics.median(times)
    return out


def main(argv):
    del argv
    results = {"backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
               "batch_size": _BATCH.value, "jax": jax.__version__, "models": {}}
    for name in _MODELS.value:
        model = create_model(name, 10, **MODEL_KWARGS.get(name, {}))
        shape = INPUT_SHAPES[name]
        entry = costs.measure_step_costs(model, shape, batch_size=_BATCH.value,
                                         repeats=_REPEATS.value)
        entry.update(nested_costs(model, shape, _BATCH.value, max(3, _REPEATS.value // 2)))
        entry["input_shape"] = list(shape)
        results["models"][name] = entry
        print(name, json.dumps(entry, indent=1))
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, f"train_step_costs_{jax.default_backend()}.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print("wrote", path)


if __name__ == "__main__":
    app.run(main)
