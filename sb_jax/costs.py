"""Measured per-example costs of the two passes Selective-Backprop trades between.

``measure_step_costs`` times, on the current default device, an inference-mode forward
pass (what scoring costs) and a full training step (training forward + backward +
optimizer update: what backpropagating costs) of a model at a batch size. The cost
model of an epoch is then

    t_epoch ~= scored * t_forward_per_example + backpropagated * t_train_per_example,

which benchmarks compare against the measured epoch time.

``measure_trainer_costs`` times the same two passes as the trainer runs them
(``StepFns.score_chunk`` and ``StepFns.train_batch``: the gather of the examples' images
from the device-resident training set and their augmentation included, which a bare
model call leaves out). With these unit costs the gap between the cost model and a
measured epoch is what the selection machinery itself adds (the policy's ``select``,
the queue, the dispatch's loop and selects), which is what the SB benchmark checks.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def measure_trainer_costs(
    fns: Any,
    state: Any,
    data: Any,
    *,
    chunk_size: int,
    batch_size: int,
    epoch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of the trainer's scoring of one chunk and of one optimizer step.

    ``fns`` are a run's ``steps.StepFns`` (one device), ``state`` a ``TrainState`` and
    ``data`` its ``DeviceData``. Every repeat draws fresh random example ids, as an epoch's
    permutation does. Returns the keys of :func:`measure_step_costs`, with forward_s the
    cost of scoring ``chunk_size`` examples and train_step_s that of a ``batch_size`` step.
    """
    if fns.score_chunk is None or fns.train_batch is None:
        raise ValueError("measure_trainer_costs needs the one-device StepFns "
                         "(score_chunk/train_batch are None on a mesh)")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    num_train = int(data.labels.shape[0])
    rng = np.random.default_rng(seed)
    epoch = jnp.asarray(epoch, jnp.int32)

    def median_s(fn, size):
        samples = []
        for i in range(warmup + repeats):
            ids = jnp.asarray(rng.choice(num_train, size, replace=False).astype(np.int32))
            jax.block_until_ready(ids)
            start = time.perf_counter()
            jax.block_until_ready(fn(state, data, ids, epoch))
            if i >= warmup:
                samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    fwd = median_s(fns.score_chunk, chunk_size)
    trn = median_s(fns.train_batch, batch_size)
    return {
        "chunk_size": chunk_size,
        "batch_size": batch_size,
        "forward_s": fwd,
        "train_step_s": trn,
        "forward_per_example_s": fwd / chunk_size,
        "train_step_per_example_s": trn / batch_size,
        "train_over_forward": (trn / batch_size) / (fwd / chunk_size),
        "backend": jax.default_backend(),
    }


def predicted_epoch_seconds(examples_scored: float, examples_backward: float,
                            costs: dict[str, float]) -> float:
    """The cost model: scoring forwards plus training steps, nothing else."""
    return (examples_scored * costs["forward_per_example_s"]
            + examples_backward * costs["train_step_per_example_s"])
