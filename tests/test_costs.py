"""The cost model's unit-cost measurements."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from sb_jax import costs, steps
from sb_jax.selection import make_policy
from tests.test_steps import build, make_data


def _run(n=40):
    images, labels, noisy = make_data(n)
    fns, state = build(make_policy("traditional", batch_size=8), batch_size=8, n=n)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    return fns, state, data


def test_measure_trainer_costs_reports_per_example_costs():
    fns, state, data = _run()
    got = costs.measure_trainer_costs(fns, state, data, chunk_size=16, batch_size=8,
                                      repeats=3, warmup=1)
    assert got["forward_s"] > 0 and got["train_step_s"] > 0
    assert got["forward_per_example_s"] == pytest.approx(got["forward_s"] / 16)
    assert got["train_step_per_example_s"] == pytest.approx(got["train_step_s"] / 8)
    assert got["train_over_forward"] == pytest.approx(
        got["train_step_per_example_s"] / got["forward_per_example_s"])
    predicted = costs.predicted_epoch_seconds(100, 10, got)
    assert predicted == pytest.approx(100 * got["forward_per_example_s"]
                                      + 10 * got["train_step_per_example_s"])


def test_measure_trainer_costs_rejects_bad_arguments():
    fns, state, data = _run()
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        costs.measure_trainer_costs(fns, state, data, chunk_size=16, batch_size=8, repeats=0)
    with pytest.raises(ValueError, match="one-device StepFns"):
        costs.measure_trainer_costs(fns._replace(score_chunk=None), state, data,
                                    chunk_size=16, batch_size=8)


def test_sampler_means_per_example_costs_over_the_warm_calls_of_its_bursts():
    fns, state, data = _run()
    # A fake clock's readings, two per call; bursts of 2 after one call left out (9 s
    # each, the first one compiling). Forward: 1.6 s per chunk of 16, steps: 0.8 s and
    # 2.4 s per batch of 8; means 0.1 and 0.2 s per example.
    cold = [0.0, 9.0]
    readings = iter(cold + [0.0, 1.6, 0.0, 1.6] + cold + [0.0, 0.8, 0.0, 2.4]
                    + cold + [0.0, 1.6, 0.0, 1.6] + cold + [0.0, 0.8, 0.0, 2.4])
    sampler = costs.TrainerCostSampler(fns, chunk_size=16, batch_size=8, num_train=40,
                                       burst=2, clock=lambda: next(readings))
    assert sampler.take() is None
    sampler.sample(state, data, jnp.asarray(1))
    sampler.sample(state, data, jnp.asarray(1))
    got = sampler.take()
    assert got == {"forward_per_example_s": pytest.approx(0.1),
                   "train_step_per_example_s": pytest.approx(0.2), "samples": 2}
    assert sampler.take() is None  # `take` starts a new window


def test_sampler_draws_fresh_ids_within_the_training_set():
    fns, state, data = _run()
    seen = []
    real_score = fns.score_chunk

    def score(state, data, ids, epoch):
        seen.append(ids.tolist())
        return real_score(state, data, ids, epoch)

    sampler = costs.TrainerCostSampler(fns._replace(score_chunk=score), chunk_size=16,
                                       batch_size=8, num_train=40, burst=2)
    for _ in range(3):
        sampler.sample(state, data, jnp.asarray(1))
    assert len(seen) == 9  # three calls per burst
    for ids in seen:
        assert len(set(ids)) == 16 and all(0 <= i < 40 for i in ids)
    assert len({tuple(ids) for ids in seen}) == 9


def test_sampler_rejects_bad_arguments():
    fns, _, _ = _run()
    with pytest.raises(ValueError, match="one-device StepFns"):
        costs.TrainerCostSampler(fns._replace(train_batch=None), chunk_size=16,
                                 batch_size=8, num_train=40)
    with pytest.raises(ValueError, match="burst must be >= 1"):
        costs.TrainerCostSampler(fns, chunk_size=16, batch_size=8, num_train=40, burst=0)
