"""The SB benchmark's cost model against hand-computed epochs (no training)."""

from __future__ import annotations

import pytest

from benchmarks import selective_backprop as bench


def record(epoch, wall_s, scored, backward, unit=None):
    r = {"epoch": epoch, "wall_s": wall_s, "examples_scored": scored,
         "examples_backward": backward}
    if unit is not None:
        r["unit_forward_per_example_s"], r["unit_train_step_per_example_s"] = unit
    return r


def test_in_run_cost_model_uses_each_epochs_own_timings():
    ms = 1e-3
    run = [record(1, 10.0, 0, 1000, (9 * ms, 9 * ms)),
           record(2, 13.0, 1000, 1500, (2 * ms, 5 * ms)),
           record(3, 15.0, 1500, 1800, (2 * ms, 4 * ms))]
    model = bench.epoch_cost_model([run])
    # Epoch 2: 1000 scored and 500 backward at (2, 5) ms: 2 + 2.5 s.
    # Epoch 3: 500 scored and 300 backward at (2, 4) ms: 1 + 1.2 s.
    assert model["measured_epoch_s"] == pytest.approx((3.0 + 2.0) / 2)
    assert model["predicted_epoch_s"] == pytest.approx((4.5 + 2.2) / 2)
    assert model["per_run_measured_over_predicted"] == [pytest.approx(5.0 / 6.7)]


def test_between_runs_cost_model_uses_one_unit_cost_per_run():
    runs = [[record(1, 5.0, 0, 100), record(2, 7.0, 100, 150)],
            [record(1, 5.0, 0, 100), record(2, 8.0, 100, 200)]]
    unit = [{"forward_per_example_s": 0.01, "train_step_per_example_s": 0.02},
            {"forward_per_example_s": 0.02, "train_step_per_example_s": 0.01}]
    model = bench.epoch_cost_model(runs, unit)
    # Run 0: 100 x 0.01 + 50 x 0.02 = 2.0 s for 2.0 measured; run 1: 2.0 + 1.0 = 3.0 s.
    assert model["per_run_measured_over_predicted"] == [pytest.approx(1.0),
                                                        pytest.approx(1.0)]
    assert model["measured_over_predicted"] == pytest.approx(1.0)


def test_epochs_without_in_run_timings_are_left_out():
    old = [record(1, 5.0, 0, 100), record(2, 7.0, 100, 150)]  # a run made before the field
    assert bench.epoch_cost_model([old]) == {}
    mixed = [record(1, 5.0, 0, 100, (0.01, 0.02)), record(2, 7.0, 100, 150),
             record(3, 9.0, 200, 200, (0.01, 0.02))]
    # Only epoch 3 has timings: 100 x 0.01 + 50 x 0.02 = 2 s.
    model = bench.epoch_cost_model([mixed])
    assert model["measured_over_predicted"] == pytest.approx(1.0)
    assert model["measured_epoch_s"] == pytest.approx(2.0)


def test_priming_epochs_are_skipped():
    run = [record(1, 50.0, 0, 100, (0.01, 0.02)), record(2, 52.0, 100, 150, (0.01, 0.02))]
    assert bench.epoch_cost_model([run])["measured_epoch_s"] == pytest.approx(2.0)
    assert bench.epoch_cost_model([run], skip_epochs=2) == {}
