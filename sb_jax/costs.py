"""Measured per-example costs of the two passes Selective-Backprop trades between.

``measure_step_costs`` times, on the current default device, an inference-mode forward
pass (what scoring costs) and a full training step (training forward + backward +
optimizer update: what backpropagating costs) of a model at a batch size. The cost
model of an epoch is then

    t_epoch ~= scored * t_forward_per_example + backpropagated * t_train_per_example,

which benchmarks compare against the measured epoch time.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from sb_jax.models import benchmark


def measure_step_costs(
    model: nn.Module,
    image_shape: Sequence[int],
    *,
    batch_size: int = 128,
    num_classes: int = 10,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of an inference forward and of a train step at ``batch_size``.

    Returns forward_s, train_step_s (per batch), their per-example values and the
    ratio train_step / forward. The timing itself is :func:`sb_jax.models.benchmark.time_model`.
    """
    timing = benchmark.time_model(model, image_shape, batch_size, num_classes=num_classes,
                                  repeats=repeats, warmup=warmup, seed=seed)
    fwd, trn = timing.forward_ms / 1e3, timing.train_step_ms / 1e3
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
