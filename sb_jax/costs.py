"""Measured per-example costs of the two passes Selective-Backprop trades between.

``measure_step_costs`` times, on the current default device, an inference-mode forward
pass (what scoring costs) and a full training step (training forward + backward +
optimizer update: what backpropagating costs) of a model at a batch size. The cost
model of an epoch is then

    t_epoch ~= scored * t_forward_per_example + backpropagated * t_train_per_example,

which benchmarks compare against the measured epoch time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sb_jax import steps


def _median_seconds(fn, args, repeats: int, warmup: int) -> float:
    out = None
    for _ in range(warmup):
        out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_step_costs(
    model: nn.Module,
    image_shape: Sequence[int],
    *,
    batch_size: int = 128,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of an inference forward and of a train step at ``batch_size``.

    Returns forward_s, train_step_s (per batch), their per-example values and the
    ratio train_step / forward.
    """
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(key, (batch_size, *image_shape), jnp.float32)
    variables = model.init({"params": key, "dropout": key}, x[:1], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    logits = model.apply(variables, x[:1], train=False)
    labels = jnp.arange(batch_size) % logits.shape[-1]
    tx = steps.make_optimizer(0.9, True, 5e-4)
    opt_state = tx.init(params)

    @jax.jit
    def forward(params, batch_stats, x, y):
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return steps.softmax_xent(logits, y)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": batch_stats}, x, train=True,
                rngs={"dropout": key}, mutable=["batch_stats"],
            )
            return jnp.mean(steps.softmax_xent(logits, y)), new.get("batch_stats", batch_stats)

        (_, bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        direction, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda d: -0.1 * d, direction))
        return params, bs, opt_state

    fwd = _median_seconds(forward, (params, batch_stats, x, labels), repeats, warmup)
    trn = _median_seconds(train_step, (params, batch_stats, opt_state, x, labels), repeats,
                          warmup)
    return {
        "batch_size": batch_size,
        "forward_s": fwd,
        "train_step_s": trn,
        "forward_per_example_s": fwd / batch_size,
        "train_step_per_example_s": trn / batch_size,
        "train_over_forward": trn / fwd,
        "backend": jax.default_backend(),
    }


def predicted_epoch_seconds(examples_scored: float, examples_backward: float,
                            costs: dict[str, float]) -> float:
    """The cost model: scoring forwards plus training steps, nothing else."""
    return (examples_scored * costs["forward_per_example_s"]
            + examples_backward * costs["train_step_per_example_s"])
