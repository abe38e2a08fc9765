"""Measured per-example costs of the two passes Selective-Backprop trades between.

``measure_step_costs`` times, on the current default device, an inference-mode forward
pass (what scoring costs) and a full training step (training forward + backward +
optimizer update: what backpropagating costs) of a model at a batch size. The cost
model of an epoch is then

    t_epoch ~= scored * t_forward_per_example + backpropagated * t_train_per_example,

which benchmarks compare against the measured epoch time.

``TrainerCostSampler`` times those pieces in between a run's own dispatches
(``config.unit_cost_every``), so that each epoch is compared with unit costs measured
under the same machine conditions as the epoch itself.

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
from collections.abc import Callable, Sequence
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


def _time_on_fresh_ids(fn: Callable, state: Any, data: Any, epoch: jax.Array,
                       rng: np.random.Generator, num_train: int, size: int,
                       clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one call of a trainer piece on ``size`` distinct random example ids."""
    ids = jnp.asarray(rng.choice(num_train, size, replace=False).astype(np.int32))
    jax.block_until_ready(ids)
    start = clock()
    jax.block_until_ready(fn(state, data, ids, epoch))
    return clock() - start


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
        samples = [_time_on_fresh_ids(fn, state, data, epoch, rng, num_train, size)
                   for _ in range(warmup + repeats)]
        return statistics.median(samples[warmup:])

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


class TrainerCostSampler:
    """Times the trainer's pieces in between a run's own dispatches.

    On a shared CPU the speed of identical work drifts by 5-20 % between processes and
    within a minute (benchmarks/results/README.md), so unit costs timed before or after a
    run, or after an epoch, do not describe the epoch. The trainer calls :meth:`sample`
    every few dispatches (with the epoch's clock paused); :meth:`take` returns the means
    since the last call (means, not medians: an epoch's time is a sum, spikes included).

    Each sample runs each piece ``burst + 1`` times back to back on fresh random ids with
    the current state and keeps the last ``burst`` timings: the first call after another
    program ran is 10-25 % slower (measured: scoring 5.6-6.5 vs 5.0-5.3 ms, step 19.7-21.3
    vs 17.4-19.1 ms), while an epoch is a steady stream of the same dispatch. The first
    sample also compiles the pieces, in its untimed calls.
    """

    def __init__(self, fns: Any, *, chunk_size: int, batch_size: int, num_train: int,
                 burst: int = 2, seed: int = 0,
                 clock: Callable[[], float] = time.perf_counter):
        if fns.score_chunk is None or fns.train_batch is None:
            raise ValueError("TrainerCostSampler needs the one-device StepFns "
                             "(score_chunk/train_batch are None on a mesh)")
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._fns = fns
        self._chunk_size, self._batch_size, self._num_train = chunk_size, batch_size, num_train
        self._burst = burst
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._forward: list[float] = []
        self._train: list[float] = []

    def _burst_of(self, fn, state, data, size, epoch) -> list[float]:
        timings = [_time_on_fresh_ids(fn, state, data, epoch, self._rng, self._num_train,
                                      size, self._clock)
                   for _ in range(self._burst + 1)]
        return timings[1:]

    def sample(self, state: Any, data: Any, epoch: jax.Array) -> None:
        """One burst of each piece on the current ``state``."""
        jax.block_until_ready(state)
        self._forward += self._burst_of(self._fns.score_chunk, state, data,
                                        self._chunk_size, epoch)
        self._train += self._burst_of(self._fns.train_batch, state, data,
                                      self._batch_size, epoch)

    def take(self) -> dict[str, float] | None:
        """Mean per-example seconds since the last ``take`` (None if nothing sampled)."""
        if not self._forward:
            return None
        result = {
            "forward_per_example_s": statistics.mean(self._forward) / self._chunk_size,
            "train_step_per_example_s": statistics.mean(self._train) / self._batch_size,
            "samples": len(self._forward) // self._burst,
        }
        self._forward, self._train = [], []
        return result


def predicted_epoch_seconds(examples_scored: float, examples_backward: float,
                            costs: dict[str, float]) -> float:
    """The cost model: scoring forwards plus training steps, nothing else."""
    return (examples_scored * costs["forward_per_example_s"]
            + examples_backward * costs["train_step_per_example_s"])
