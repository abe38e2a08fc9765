"""Data-parallel training on 8 host-platform devices and across two processes.

JAX fixes its device count at start-up, so each scenario runs `tests/multidevice_driver.py`
in a subprocess (8 CPU devices via XLA_FLAGS, or two processes joined by
`jax.distributed` over loopback with gloo collectives). All subprocesses start together
when the first test asks for one, so they share the wall-clock time. The restart scenario
chains two runs per process: the driver until a simulated crash after the first
checkpoint, then the real `experiments.train` command line on the same workdir.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from sb_jax import checkpointing, config_lib, metrics_io, train
from tests import multidevice_driver as driver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTORS = ("sb", "stale_sb", "kath18", "adapt_sb")
TIMEOUT_S = 900


def _env(num_devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")


def _free_ports(count: int) -> list[int]:
    # All bound at once, so they are distinct.
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _one_after_another(*commands: list[str]) -> list[str]:
    """A command line running ``commands`` in turn, stopping at the first that fails."""
    return ["sh", "-c", " && ".join(shlex.join(c) for c in commands)]


def _deterministic_metrics(workdir) -> list[dict]:
    """metrics.jsonl without the wall-clock fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if "wall_s" not in k}
            for r in metrics_io.read_metrics(str(workdir))]


class _Runs:
    """The driver subprocesses, started at once; `result(name)` waits for one."""

    def __init__(self, tmp):
        self.tmp = tmp
        address, restart_address = (f"127.0.0.1:{port}" for port in _free_ports(2))
        cmd = [sys.executable, "-m", "tests.multidevice_driver"]
        specs = {
            "equality": (cmd + ["equality", str(tmp / "equality.json"), *SELECTORS], 8),
            "per_shard": (cmd + ["per_shard", str(tmp / "per_shard.json")], 8),
            "checkpoint": (cmd + ["checkpoint", str(tmp / "checkpoint.json"),
                                  str(tmp / "ckpt")], 8),
        }
        for pid in range(2):
            specs[f"distributed{pid}"] = (
                cmd + ["distributed", str(tmp / f"distributed{pid}.json"), str(tmp / "dist"),
                       address, "2", str(pid)], 2)
            # Both processes die after the epoch-1 checkpoint of a 2-epoch run; then each
            # host re-runs the training command (same coordinator address), which resumes.
            specs[f"restart{pid}"] = (_one_after_another(
                cmd + ["distributed", str(tmp / f"restart{pid}.json"), str(tmp / "restart"),
                       restart_address, "2", str(pid), "1"],
                [sys.executable, "-m", "experiments.train",
                 *driver.train_flags(driver.distributed_config()),
                 f"--workdir={tmp / 'restart'}", f"--coordinator_address={restart_address}",
                 "--num_processes=2", f"--process_id={pid}", "--cpu_collectives=gloo"],
            ), 2)
        self.procs = {
            name: subprocess.Popen(args, cwd=REPO, env=_env(n), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
            for name, (args, n) in specs.items()
        }

    def wait(self, name: str) -> str:
        """The output of a subprocess that succeeded."""
        proc = self.procs[name]
        output, _ = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, f"{name} failed:\n{output[-4000:]}"
        return output

    def result(self, name: str) -> dict:
        self.wait(name)
        with open(self.tmp / f"{name}.json") as f:
            return json.load(f)

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    started = _Runs(tmp_path_factory.mktemp("parallel"))
    yield started
    started.close()


@pytest.mark.parametrize("selector", SELECTORS)
def test_global_selection_on_8_devices_matches_1(runs, selector):
    result = runs.result("equality")[selector]
    # The queue after every dispatch (hence every selected id, in order) is identical.
    assert result["same_trace"]
    assert result["steps"] >= 4
    c1, c8 = result["counters_1"], result["counters_8"]
    assert c1["examples_selected"] < c1["examples_seen"]  # it did select
    for name, value in c1.items():
        if isinstance(value, int):
            assert c8[name] == value, name
        else:
            assert c8[name] == pytest.approx(value, rel=1e-5), name
    assert result["max_abs_param_diff"] < 1e-5 * max(1.0, result["max_abs_param"])
    # Every epoch's dispatches reuse one compilation (the sharded inputs keep their layout).
    assert result["dispatch_compilations_8"] == 1


def test_per_shard_selection_keeps_the_budget(runs):
    result = runs.result("per_shard")
    shard, single = result["per_shard"], result["global"]
    c = shard["counters"]
    assert shard["local_chunk"] == 32 // 8
    assert shard["queue_devices"] == 8  # one queue per device
    assert c["examples_seen"] == 3 * shard["num_train"]
    assert c["examples_scored"] == c["examples_seen"]
    # Each device's SB keeps its share: the selected fraction is one device's.
    fraction = c["examples_selected"] / c["examples_seen"]
    single_fraction = single["counters"]["examples_selected"] / c["examples_seen"]
    assert abs(fraction - single_fraction) < 0.03, (fraction, single_fraction)
    # Below 1/(beta+1) for both (the loss falls fast from a random start, so fresh losses
    # rank low in the history), but clearly a selective run.
    assert 0.15 < fraction < 1.0 / (driver.BETA + 1.0) + 0.05, fraction
    # Everything selected was trained on or still waits; nothing overflowed.
    assert shard["dropped"] == 0
    assert c["examples_backward"] + shard["waiting"] == c["examples_selected"]


def test_checkpoint_from_8_devices_restores_on_2_and_1(runs):
    result = runs.result("checkpoint")
    for num_devices in ("8", "2", "1"):
        r = result[num_devices]
        assert r["epoch"] == 2
        assert r["params_equal"] and r["cache_equal"] and r["counters_equal"], num_devices
        # Stale-SB's per-example cache is split by example id over the devices.
        assert r["cache_devices"] == int(num_devices)
    assert result["resumed_on_2"]["epochs"] == [1, 2, 3]
    assert result["resumed_on_2"]["num_devices"] == 2
    # And in this process, which has a single device.
    assert jax.device_count() == 1
    run = train.setup_run(driver.selector_config("stale_sb", staleness=2))
    ckpt = checkpointing.Checkpointer(str(runs.tmp / "ckpt" / "checkpoints"))
    state, epoch, _ = ckpt.restore_latest(run.abstract_state, run.shardings)
    ckpt.close()
    assert epoch == 3  # the run resumed on 2 devices saved epoch 3 on top of 8's epoch 2
    np.testing.assert_array_equal(driver.flat_params(state),
                                  np.load(runs.tmp / "ckpt" / "params_epoch3.npy"))


def test_per_shard_run_resumes_on_its_devices_and_refuses_others(runs):
    result = runs.result("checkpoint")["per_shard"]
    # Cut back to epoch 1 and re-run on the same 8 devices: it resumed (kept epoch 1's
    # record, wrote epoch 2 again) and ended as the straight run did.
    assert result["kept_epoch1_record"] and result["rewrote_epoch2_record"]
    assert result["epochs"] == [1, 2] and result["final_epoch"] == 2
    assert result["selection_shards"] == 8
    assert result["same_metrics"] and result["same_counters"] and result["params_equal"]
    assert 0 < result["examples_selected"] < result["examples_seen"]
    # The same config (num_devices=0: every device) here, on 1 device: refused, saying why,
    # before anything is trained or written.
    workdir = runs.tmp / "ckpt" / "per_shard" / "resumed"
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"per_shard selection on 8 devices.*this run has 1 device"):
        train.train_and_evaluate(driver.per_shard_config(num_epochs=3), str(workdir))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert [r["epoch"] for r in metrics_io.read_metrics(str(workdir))] == [1, 2]


def test_two_processes_train_together_and_agree(runs):
    r0, r1 = runs.result("distributed0"), runs.result("distributed1")
    assert (r0["process_index"], r1["process_index"]) == (0, 1)
    assert r0["process_count"] == 2 and r0["local_devices"] == 2 and r0["num_devices"] == 4
    assert r0["params"] == r1["params"]
    assert r0["counters"] == r1["counters"] and r0["steps"] == r1["steps"]
    # Only process 0 wrote metrics; both computed the same final evaluation.
    assert r0["final_test_error"] == r1["final_test_error"]
    assert os.path.exists(runs.tmp / "dist" / "metrics.jsonl")
    # Together they made one device's choices (global selection).
    config = driver.selector_config("stale_sb", num_epochs=2, staleness=2)
    _, _, state = driver.run_dispatches(config, config.num_epochs)
    single = driver.counters(state)
    for name, value in single.items():
        if isinstance(value, int):
            assert r0["counters"][name] == value, name
    np.testing.assert_allclose(np.asarray(r0["params"]), driver.flat_params(state),
                               atol=1e-5)


def test_two_processes_resume_after_both_hosts_restart(runs):
    outputs = [runs.wait(f"restart{pid}") for pid in range(2)]
    for pid, output in enumerate(outputs):
        # Each process died right after the epoch-1 checkpoint of its 2-epoch run ...
        with open(runs.tmp / f"restart{pid}.json") as f:
            assert json.load(f) == {"crashed_after_epoch": 1, "process_index": pid}
        # ... and the re-run command continued from that checkpoint (not from scratch).
        assert "resumed from checkpoint after epoch 1" in output, output[-4000:]
    runs.wait("distributed0")  # the same two-process run, uninterrupted
    restarted, straight = runs.tmp / "restart", runs.tmp / "dist"
    records = _deterministic_metrics(restarted)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records == _deterministic_metrics(straight)
    # The final states are identical: restore both here, on this process's one device.
    run = train.setup_run(driver.selector_config("stale_sb", staleness=2))
    final = {}
    for workdir in (restarted, straight):
        ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
        state, epoch, _ = ckpt.restore_latest(run.abstract_state, run.shardings)
        ckpt.close()
        assert epoch == 2
        final[workdir] = (driver.flat_params(state), driver.counters(state), int(state.step))
    (p_r, c_r, s_r), (p_s, c_s, s_s) = final[restarted], final[straight]
    assert s_r == s_s > 0 and c_r == c_s
    np.testing.assert_array_equal(p_r, p_s)


def test_parallel_config_errors():
    config = driver.small_config(num_devices=3)
    with pytest.raises(ValueError, match="batch_size=32 is not a multiple of the 3 devices"):
        config_lib.validate_config(config)
    with pytest.raises(ValueError, match="selection_scope"):
        config_lib.validate_config(driver.small_config(selection_scope="local"))
    with pytest.raises(ValueError, match="num_devices must be >= 0"):
        config_lib.validate_config(driver.small_config(num_devices=-1))
    with pytest.raises(ValueError, match="only 1 devices are visible"):
        train.setup_run(driver.small_config(num_devices=8))


def test_per_shard_run_does_not_resume_on_other_device_count(tmp_path):
    config = driver.small_config(num_devices=4, selection_scope="per_shard")
    config_lib.save_config(config, str(tmp_path))
    config_lib.check_resumable(driver.small_config(num_devices=4, selection_scope="per_shard"),
                               str(tmp_path))
    with pytest.raises(ValueError, match="num_devices"):
        config_lib.check_resumable(
            driver.small_config(num_devices=2, selection_scope="per_shard"), str(tmp_path))
    # Global selection may change the device count.
    global_config = driver.small_config(num_devices=8)
    config_lib.save_config(global_config, str(tmp_path))
    config_lib.check_resumable(driver.small_config(num_devices=2), str(tmp_path))
