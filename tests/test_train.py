"""The trainer end to end on sklearn's digits: smoke, resume-after-kill, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from experiments.configs import digits as digits_config
from sb_jax import config_lib, metrics_io, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Figures that must be identical between an interrupted-and-resumed run and a straight one.
DETERMINISTIC_FIELDS = (
    "epoch", "step", "examples_forward", "examples_scored", "examples_backward",
    "examples_selected", "train_loss", "test_error", "test_loss", "selected_fraction", "lr",
)


def tiny_config(**overrides):
    config = digits_config.get_config()
    config.num_epochs = 2
    config.train_subset = 512
    config.tensorboard = False
    config.log_every_s = 0.0
    for key, value in overrides.items():
        config[key] = value
    return config


def _deterministic(records):
    return [{k: r[k] for k in DETERMINISTIC_FIELDS if k in r} for r in records]


def test_smoke_writes_outputs(tmp_path):
    config = tiny_config(tensorboard=True)
    summary = train.train_and_evaluate(config, str(tmp_path))
    records = metrics_io.read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("epoch", "step", "wall_s", "examples_forward", "examples_backward",
                "train_loss", "test_error"):
        assert key in records[-1]
    # Traditional: every example of every epoch is backpropagated, never scored.
    assert records[-1]["examples_backward"] == 2 * 512 - (2 * 512) % config.batch_size
    assert records[-1]["examples_scored"] == 0
    assert summary["final_test_error"] == records[-1]["test_error"]
    assert summary["final_test_error"] < 50.0  # 10 classes: chance is 90 % error
    for name in ("summary.json", "config.json", "test_error_vs_time.png"):
        assert os.path.exists(tmp_path / name), name
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["config"]["dataset"] == "digits"


def test_unit_costs_are_timed_in_the_run_outside_its_wall_clock(tmp_path, monkeypatch):
    samples = []
    real = train.costs.TrainerCostSampler.sample

    def slow_sample(self, state, data, epoch):
        samples.append(int(epoch))
        time.sleep(0.5)
        return real(self, state, data, epoch)

    monkeypatch.setattr(train.costs.TrainerCostSampler, "sample", slow_sample)
    config = tiny_config(selector="sb", unit_cost_every=2)
    train.train_and_evaluate(config, str(tmp_path))
    records = metrics_io.read_metrics(str(tmp_path))
    # One sample every 2 dispatches; an epoch's dispatches are its optimizer steps, plus
    # one that finds the epoch done, plus the extra one in flight that is not counted.
    steps = [records[0]["step"], records[1]["step"] - records[0]["step"]]
    assert samples == [0] * ((steps[0] + 1) // 2) + [1] * ((steps[1] + 1) // 2)
    for record, n in zip(records, steps, strict=True):
        assert record["unit_samples"] == (n + 1) // 2
        assert 0 < record["unit_forward_per_example_s"] < 0.1
        assert 0 < record["unit_train_step_per_example_s"] < 0.1
    # The 0.5 s pauses of sampling are not the run's.
    without = tmp_path / "without"
    train.train_and_evaluate(tiny_config(selector="sb"), str(without))
    plain = metrics_io.read_metrics(str(without))
    assert "unit_forward_per_example_s" not in plain[-1]
    assert records[-1]["wall_s"] < plain[-1]["wall_s"] + 1.0
    assert _deterministic(records) == _deterministic(plain)


def test_resume_in_process_matches_straight_run(tmp_path):
    straight = tmp_path / "straight"
    train.train_and_evaluate(tiny_config(num_epochs=3), str(straight))
    resumed = tmp_path / "resumed"
    train.train_and_evaluate(tiny_config(num_epochs=2), str(resumed))
    train.train_and_evaluate(tiny_config(num_epochs=3), str(resumed))  # extends the run
    assert _deterministic(metrics_io.read_metrics(str(resumed))) == _deterministic(
        metrics_io.read_metrics(str(straight))
    )


def _train_cmd(workdir, epochs):
    return [
        sys.executable, "-m", "experiments.train",
        "--config=experiments/configs/digits.py", f"--workdir={workdir}",
        f"--config.num_epochs={epochs}", "--config.tensorboard=False",
        "--config.train_subset=1024",
    ]


def test_kill_9_then_rerun_resumes_to_identical_metrics(tmp_path):
    epochs = 6
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(_train_cmd(straight, epochs), cwd=REPO, env=env, check=True,
                   capture_output=True)
    proc = subprocess.Popen(_train_cmd(killed, epochs), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = killed / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.exists() and any(p.name.isdigit() and int(p.name) >= 2
                                     for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = metrics_io.read_metrics(str(killed))
    assert len(partial) < epochs
    subprocess.run(_train_cmd(killed, epochs), cwd=REPO, env=env, check=True,
                   capture_output=True)
    assert _deterministic(metrics_io.read_metrics(str(killed))) == _deterministic(
        metrics_io.read_metrics(str(straight))
    )


def test_non_finite_loss_stops_with_step(tmp_path):
    config = tiny_config(learning_rate=1e9, weight_decay=0.0)
    with pytest.raises(train.NonFiniteLossError, match=r"optimizer step \d+ \(epoch \d+\)"):
        train.train_and_evaluate(config, str(tmp_path))


def test_other_config_in_workdir_is_rejected(tmp_path):
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
    with pytest.raises(ValueError, match="different config.*learning_rate"):
        train.train_and_evaluate(tiny_config(num_epochs=1, learning_rate=0.01), str(tmp_path))


@pytest.mark.parametrize("field, value", [("adapt_update_every", 3), ("rho_epochs", 1),
                                          ("kath18_reweight", True)])
def test_another_selectors_fields_do_not_block_a_resume(tmp_path, field, value):
    config_lib.save_config(tiny_config(selector="traditional"), str(tmp_path))
    config_lib.check_resumable(tiny_config(selector="traditional", **{field: value}),
                               str(tmp_path))  # no error
    owner = config_lib.SELECTOR_FIELD_PREFIXES[field.split("_")[0] + "_"]
    config_lib.save_config(tiny_config(selector=owner), str(tmp_path))
    with pytest.raises(ValueError, match=f"different config.*{field}"):
        config_lib.check_resumable(tiny_config(selector=owner, **{field: value}),
                                   str(tmp_path))
    with pytest.raises(ValueError, match="different config.*selector"):
        config_lib.check_resumable(tiny_config(selector="sb", **{field: value}),
                                   str(tmp_path))


def test_corrupted_checkpoint_is_a_clear_error(tmp_path):
    train.train_and_evaluate(tiny_config(num_epochs=1), str(tmp_path))
    ckpt = tmp_path / "checkpoints" / "1"
    for root, _, files in os.walk(ckpt):
        for name in files:
            path = os.path.join(root, name)
            if os.path.getsize(path) > 64:
                with open(path, "r+b") as f:
                    f.truncate(8)
    from sb_jax.checkpointing import CheckpointError

    with pytest.raises(CheckpointError, match="cannot restore the checkpoint"):
        train.train_and_evaluate(tiny_config(num_epochs=2), str(tmp_path))


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dataset", "imagenet", "unknown dataset 'imagenet'"),
        ("model", "vgg", "unknown model 'vgg'"),
        ("label_noise", 1.5, r"label_noise must be in \[0, 1\]"),
        ("num_epochs", 0, "num_epochs must be >= 1"),
        ("batch_size", 0, "batch_size must be >= 1"),
        ("lr_schedule", "linear", "unknown lr_schedule 'linear'"),
        ("learning_rate", -1.0, "learning_rate must be > 0"),
        ("selector", "bogus", "bogus"),
        ("unit_cost_every", -1, "unit_cost_every must be >= 0"),
        ("num_devices", 2, "unit_cost_every > 0 times the one-device pieces"),
    ],
)
def test_bad_config_values(field, value, message, tmp_path):
    config = tiny_config(unit_cost_every=1 if field == "num_devices" else 0)
    config[field] = value
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path))


def test_unknown_config_field_is_rejected():
    config = tiny_config()
    config.lerning_rate = 0.1
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['lerning_rate'\]"):
        config_lib.validate_config(config)


def test_cli_rejects_misspelt_override(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/digits.py", f"--workdir={tmp_path}",
           "--config.lerning_rate=0.1"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "lerning_rate" in out.stderr


def test_cli_rejects_wrong_type(tmp_path):
    cmd = [sys.executable, "-m", "experiments.train",
           "--config=experiments/configs/digits.py", f"--workdir={tmp_path}",
           "--config.num_epochs=lots"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "num_epochs" in out.stderr


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"selector": "sb", "beta": 0.0}, "beta"),
        ({"selector": "sb", "beta": -1.0}, "beta"),
        ({"selector": "stale_sb", "staleness": 0}, "staleness"),
        ({"selector": "sb", "history_size": 0}, "history_size"),
        ({"selector": "kath18", "kath18_score": "entropy"}, "entropy"),
        ({"selector": "sb", "scoring_batch_size": 64, "batch_size": 32}, "batch_size"),
        ({"selector": "nope"}, r"unknown selection policy 'nope'"),
    ],
)
def test_bad_selector_configs(overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(config)


def held_out_config(selector, epochs):
    return tiny_config(selector=selector, num_epochs=epochs, train_subset=256,
                       validation_size=200, heldout_size=64, heldout_every=2, label_noise=0.2,
                       adapt_update_every=2, rho_epochs=2)


def test_adapt_sb_logs_priorities_and_resumes_exactly(tmp_path):
    """AdaptSB end to end: per-epoch priorities and noise share; the held-out gradient and
    the priorities are checkpointed, so a resumed run ends exactly as a straight one."""
    straight = tmp_path / "straight"
    train.train_and_evaluate(held_out_config("adapt_sb", 3), str(straight))
    records = metrics_io.read_metrics(str(straight))
    assert [r["epoch"] for r in records] == [1, 2, 3]
    bins = held_out_config("adapt_sb", 3).adapt_num_bins
    for record in records:
        assert 0.0 <= record["selected_mislabeled_fraction"] <= 1.0
        assert len(record["priorities"]) == bins and len(record["priority_signal"]) == bins
    assert records[-1]["priorities"] != records[0]["priorities"]  # Updated after priming.
    assert os.path.exists(straight / "priorities.png")
    resumed = tmp_path / "resumed"
    train.train_and_evaluate(held_out_config("adapt_sb", 2), str(resumed))
    train.train_and_evaluate(held_out_config("adapt_sb", 3), str(resumed))
    fields = DETERMINISTIC_FIELDS + ("selected_mislabeled_fraction", "priorities",
                                     "priority_signal")
    assert [{k: r[k] for k in fields} for r in metrics_io.read_metrics(str(resumed))] == [
        {k: r[k] for k in fields} for r in records
    ]


def test_rho_loss_counts_its_model_and_restores_it_on_resume(tmp_path):
    first = train.train_and_evaluate(held_out_config("rho_loss", 1), str(tmp_path))
    model_s = first["irreducible_model_wall_s"]
    assert 0 < model_s < first["wall_s"]  # Counted in the run's time.
    resumed = train.train_and_evaluate(held_out_config("rho_loss", 2), str(tmp_path))
    # Restored with the state, not trained again: the same losses, the same recorded cost.
    assert resumed["irreducible_model_wall_s"] == model_s
    records = metrics_io.read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[0]["irreducible_loss_mean"] == records[1]["irreducible_loss_mean"] > 0
    assert records[0]["wall_s"] > model_s
    assert 0.0 <= records[1]["selected_mislabeled_fraction"] <= 1.0


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(selector="adapt_sb", validation_size=0), "set validation_size > 0"),
        (dict(selector="rho_loss", validation_size=0), "set validation_size > 0"),
        (dict(selector="adapt_sb", validation_size=100, heldout_size=200),
         "heldout_size=200 exceeds validation_size=100"),
        (dict(selector="adapt_sb", validation_size=100, heldout_every=0),
         "heldout_every must be >= 1"),
        (dict(selector="adapt_sb", validation_size=100, adapt_floor=0.5), "floor must be"),
        (dict(selector="rho_loss", validation_size=100, rho_model="vgg"),
         "unknown rho_model 'vgg'"),
        (dict(selector="rho_loss", validation_size=100, rho_epochs=0),
         "rho_epochs must be >= 1"),
        (dict(selector="rho_loss", validation_size=100, rho_lr_schedule="step"),
         "rho_lr_schedule must be one of"),
        (dict(selector="rho_loss", validation_size=100, rho_weight_decay=-1.0),
         "rho_weight_decay must be >= 0"),
    ],
)
def test_held_out_policy_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.validate_config(tiny_config(**overrides))
