"""Times a model's inference forward and SGD train step (jitted, warm, median of repeats).

    python -m sb_jax.models.benchmark --model small_cnn --input 28,28,1 --batch 128

The inference forward is what Selective-Backprop pays per scored example, the train
step (forward + backward + SGD update) what it pays per selected one; their ratio is the
number its cost model needs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sb_jax.models.registry import create_model


class Timing(NamedTuple):
    """Median wall-clock milliseconds per call, over `repeats` calls."""

    forward_ms: float
    train_step_ms: float
    repeats: int


def _median_ms(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def time_model(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    *,
    num_classes: int,
    repeats: int = 20,
    warmup: int = 3,
    seed: int = 0,
    rng_impl: str | None = None,
) -> Timing:
    """Times eval-mode forward and one train step (value_and_grad + SGD) of `model`.

    `rng_impl` picks the PRNG (None: JAX's default threefry; "rbg" compiles faster on CPU).
    """
    key = jax.random.key(seed, impl=rng_impl)
    key_params, key_dropout, key_x, key_y = jax.random.split(key, 4)
    x = jax.random.normal(key_x, (batch_size, *input_shape), jnp.float32)
    y = jax.random.randint(key_y, (batch_size,), 0, num_classes)
    variables = jax.jit(lambda: model.init({"params": key_params}, x, train=False))()
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)

    @jax.jit
    def forward(params, batch_stats, x):
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    @jax.jit
    def train_step(params, batch_stats, opt_state, x, y):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                rngs={"dropout": key_dropout},
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, new_batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_batch_stats, opt_state, loss

    forward_ms = _median_ms(lambda: forward(params, batch_stats, x), warmup, repeats)
    # Timing the same step repeatedly from the same state is enough: cost does not depend
    # on parameter values.
    train_ms = _median_ms(lambda: train_step(params, batch_stats, opt_state, x, y), warmup, repeats)
    return Timing(forward_ms, train_ms, repeats)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--input", default="28,28,1", help="H,W,C of one example")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--kwargs", default="{}", help="model hyper-parameters as JSON, e.g. '{\"depth\": 16}'"
    )
    args = parser.parse_args(argv)
    input_shape = tuple(int(s) for s in args.input.split(","))
    model = create_model(args.model, args.num_classes, **json.loads(args.kwargs))
    timing = time_model(
        model, input_shape, args.batch, num_classes=args.num_classes, repeats=args.repeats
    )
    print(
        json.dumps(
            {
                "model": args.model,
                "kwargs": json.loads(args.kwargs),
                "input": input_shape,
                "batch": args.batch,
                "device": str(jax.devices()[0]),
                **timing._asdict(),
            }
        )
    )


if __name__ == "__main__":
    main()
