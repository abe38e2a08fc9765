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
