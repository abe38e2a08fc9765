"""Runs the trainer on several (host-platform) devices; called by tests/test_parallel.py.

The device count is fixed when JAX starts, so the tests run this module in a subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (or under
``jax.distributed``) and compare what it writes to a JSON file:

  python -m tests.multidevice_driver equality OUT.json sb stale_sb kath18 adapt_sb
  python -m tests.multidevice_driver per_shard OUT.json
  python -m tests.multidevice_driver checkpoint OUT.json WORKDIR
  python -m tests.multidevice_driver distributed OUT.json WORKDIR ADDRESS NPROC PID [CRASH]

With CRASH = k the process dies (``os._exit``, no clean-up) right after the checkpoint
of epoch k is on disk, as a host does when it goes down; :func:`train_flags` gives the
``experiments.train`` command line that resumes that run.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

BETA = 2.0


def small_config(**overrides):
    from experiments.configs import digits

    config = digits.get_config()
    config.train_subset = 256
    config.num_epochs = 2
    config.prime_epochs = 1
    config.beta = BETA
    config.batch_size = 32
    config.scoring_batch_size = 32
    config.tensorboard = False
    config.log_every_s = 1e9
    config.eval_batch_size = 304  # the 297 test images in one batch, a multiple of 8
    for key, value in overrides.items():
        config[key] = value
    return config


def distributed_config():
    """The config the two-process runs train (every process the same)."""
    return selector_config("stale_sb", num_devices=0, num_epochs=2, staleness=2)


def train_flags(config) -> list[str]:
    """``experiments.train`` arguments that rebuild ``config`` from the digits config file.

    Every field that differs from the file's becomes a ``--config.NAME=VALUE`` override,
    so the command line trains exactly what the driver trains.
    """
    from experiments.configs import digits

    base = digits.get_config()
    flags = ["--config=experiments/configs/digits.py"]
    for name, value in sorted(config.items()):
        if value != base[name]:
            flags.append(f"--config.{name}={value}")
    return flags


def selector_config(selector: str, **overrides):
    extra = {"prime_epochs": 0}  # every epoch selects
    if selector == "adapt_sb":
        extra.update(validation_size=64, heldout_size=32, heldout_every=2, adapt_update_every=2)
    if selector == "kath18":
        extra.update(beta=1.0)  # pool of 64 = 2 x 32; it starts off, so force it on below
    extra.update(overrides)
    return small_config(selector=selector, **extra)


def run_dispatches(config, num_epochs: int, force_kath18_on: bool = False):
    """Trains through the real setup (`train.setup_run`) and records every dispatch.

    Returns (trace, state): trace[i] = (optimizer step, the ids waiting in the queue) after
    dispatch i, which pins down every selection the policy made.
    """
    import jax

    from sb_jax import parallel, train

    run = train.setup_run(config)
    state = run.fresh_state()
    if force_kath18_on:
        # kath18's EMA of tau starts at 0 (off); start it high so sampling is exercised.
        ps = state.policy_state._replace(tau=state.policy_state.tau + 100.0)
        state = state._replace(policy_state=ps)
        if run.mesh is not None:
            state = parallel.put_tree(parallel.to_host(state), run.shardings)
    trace = []
    for epoch in range(num_epochs):
        ids, valid, cursor, ep = train.epoch_inputs(run, epoch)
        state = state._replace(cursor=cursor)
        for _ in range(10_000):
            state, done = run.fns.train_dispatch(state, run.data, ids, valid, ep)
            queue = parallel.to_host(state.queue)
            size = queue.size.reshape(-1)
            waiting = [queue.ids.reshape(len(size), -1)[d, : size[d]].tolist()
                       for d in range(len(size))]
            trace.append((int(state.step), waiting))
            if bool(done):
                break
    jax.block_until_ready(state)
    return trace, run, state


def flat_params(state) -> np.ndarray:
    import jax

    from sb_jax import parallel

    leaves = jax.tree.leaves(parallel.to_host((state.params, state.batch_stats)))
    return np.concatenate([np.ravel(x) for x in leaves])


def counters(state) -> dict:
    from sb_jax import parallel

    return {k: v.item() for k, v in parallel.to_host(state.counters)._asdict().items()}


def equality(out: str, selectors: list[str]) -> None:
    results = {}
    for selector in selectors:
        runs = {}
        for num_devices in (1, 8):
            config = selector_config(selector, num_devices=num_devices, num_epochs=3,
                                     train_subset=192)
            trace, run, state = run_dispatches(config, config.num_epochs,
                                               force_kath18_on=selector == "kath18")
            runs[num_devices] = (trace, flat_params(state), counters(state),
                                 run.fns.train_dispatch._cache_size())
        (t1, p1, c1, _), (t8, p8, c8, traces_8) = runs[1], runs[8]
        results[selector] = {
            "same_trace": t1 == t8,
            "num_dispatches": len(t1),
            "steps": t1[-1][0],
            "max_abs_param_diff": float(np.max(np.abs(p1 - p8))),
            "max_abs_param": float(np.max(np.abs(p1))),
            "counters_1": c1,
            "counters_8": c8,
            "dispatch_compilations_8": traces_8,
        }
    with open(out, "w") as f:
        json.dump(results, f)


def per_shard(out: str) -> None:
    """Per-shard selection on 8 devices next to the single-device run of the same config."""
    from sb_jax import parallel

    result = {}
    for num_devices, scope in ((8, "per_shard"), (1, "global")):
        config = selector_config("sb", num_devices=num_devices, selection_scope=scope,
                                 num_epochs=3, train_subset=1024)
        _, run, state = run_dispatches(config, config.num_epochs)
        queue = parallel.to_host(state.queue)
        result[scope] = {
            "counters": counters(state), "num_train": run.dataset.num_train,
            "local_chunk": run.policy.chunk_size,
            "queue_devices": len(state.queue.ids.sharding.device_set),
            "waiting": int(np.sum(queue.size)), "dropped": int(np.sum(queue.num_dropped)),
        }
    with open(out, "w") as f:
        json.dump(result, f)


def checkpoint(out: str, workdir: str) -> None:
    """Writes a checkpoint on 8 devices and restores it on 8, 2 and 1 (and resumes on 2);
    then a per-shard run resumed on its own 8 devices (:func:`per_shard_resume`)."""
    from sb_jax import checkpointing, metrics_io, train

    config = selector_config("stale_sb", num_devices=8, num_epochs=2, staleness=2)
    train.train_and_evaluate(config, workdir)
    restored = {}
    for num_devices in (8, 2, 1):
        run = train.setup_run(selector_config("stale_sb", num_devices=num_devices,
                                              staleness=2))
        ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints")
        state, epoch, _ = ckpt.restore_latest(run.abstract_state, run.shardings)
        ckpt.close()
        cache = state.policy_state.cached_loss
        restored[num_devices] = {
            "epoch": epoch,
            "params": flat_params(state),
            "cached_loss": np.asarray(cache),
            "cache_devices": len(cache.sharding.device_set),
            "counters": counters(state),
        }
    ref = restored[8]
    result = {
        str(d): {
            "epoch": r["epoch"],
            "params_equal": bool(np.array_equal(r["params"], ref["params"])),
            "cache_equal": bool(np.array_equal(r["cached_loss"], ref["cached_loss"])),
            "cache_devices": r["cache_devices"],
            "counters_equal": r["counters"] == ref["counters"],
        }
        for d, r in restored.items()
    }
    # Resume the 8-device run on 2 devices for one more epoch.
    summary = train.train_and_evaluate(
        selector_config("stale_sb", num_devices=2, num_epochs=3, staleness=2), workdir)
    result["resumed_on_2"] = {
        "epochs": [r["epoch"] for r in metrics_io.read_metrics(workdir)],
        "steps": summary["steps"], "num_devices": summary["num_devices"],
        "final_test_error": summary["final_test_error"],
    }
    run = train.setup_run(selector_config("stale_sb", num_devices=2, staleness=2))
    ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints")
    state, _, _ = ckpt.restore_latest(run.abstract_state, run.shardings)
    ckpt.close()
    np.save(f"{workdir}/params_epoch3.npy", flat_params(state))
    result["per_shard"] = per_shard_resume(f"{workdir}/per_shard")
    with open(out, "w") as f:
        json.dump(result, f)


def per_shard_config(**overrides):
    """A per-shard run on every visible device (``num_devices=0``)."""
    return selector_config("sb", num_devices=0, selection_scope="per_shard", **overrides)


def per_shard_resume(workdir: str) -> dict:
    """A per-shard run cut back to its epoch-1 checkpoint and resumed (same devices),
    next to the straight run it was copied from.

    The copy without its epoch-2 checkpoint is the workdir of a run killed during epoch
    2 (its metrics still hold the epoch-2 record, which a resume must drop), at the
    cost of one training run less. Leaves ``{workdir}/resumed`` with its epoch-2
    checkpoint for the test to try on one device.
    """
    import shutil

    from sb_jax import checkpointing, metrics_io, train

    resumed, straight = f"{workdir}/resumed", f"{workdir}/straight"
    train.train_and_evaluate(per_shard_config(num_epochs=2), straight)
    shutil.copytree(straight, resumed)
    shutil.rmtree(f"{resumed}/checkpoints/2")
    train.train_and_evaluate(per_shard_config(num_epochs=2), resumed)
    run = train.setup_run(per_shard_config())
    final = {}
    for name, path in (("resumed", resumed), ("straight", straight)):
        ckpt = checkpointing.Checkpointer(f"{path}/checkpoints")
        state, epoch, extra = ckpt.restore_latest(run.abstract_state, run.shardings)
        ckpt.close()
        final[name] = {
            "epoch": epoch, "params": flat_params(state), "counters": counters(state),
            "selection_shards": extra[train.SELECTION_SHARDS],
            "metrics": metrics_io.read_metrics(path),
        }
    r, s = final["resumed"], final["straight"]

    def deterministic(records):
        return [{k: v for k, v in rec.items() if "wall_s" not in k} for rec in records]

    return {
        # Epoch 1's record, wall time included, is the copied one: the run resumed from
        # the checkpoint rather than starting over (which would also end the same).
        "kept_epoch1_record": r["metrics"][0] == s["metrics"][0],
        "rewrote_epoch2_record": r["metrics"][1]["wall_s"] != s["metrics"][1]["wall_s"],
        "epochs": [m["epoch"] for m in r["metrics"]],
        "final_epoch": r["epoch"],
        "selection_shards": r["selection_shards"],
        "same_metrics": deterministic(r["metrics"]) == deterministic(s["metrics"]),
        "same_counters": r["counters"] == s["counters"],
        "params_equal": bool(np.array_equal(r["params"], s["params"])),
        "examples_selected": r["counters"]["examples_selected"],
        "examples_seen": r["counters"]["examples_seen"],
    }


def _crash_after_checkpoint(epoch: int, out: str) -> None:
    """Makes this process die right after the checkpoint of ``epoch`` is written.

    ``os._exit`` skips every clean-up (no ``jax.distributed.shutdown``, no orbax close),
    like a host that loses power; ``out`` records that it got there.
    """
    import jax

    from sb_jax import checkpointing

    save = checkpointing.Checkpointer.save

    def save_then_die(self, epoch_done, state, extra):
        save(self, epoch_done, state, extra)
        if epoch_done == epoch:
            with open(out, "w") as f:
                json.dump({"crashed_after_epoch": epoch_done,
                           "process_index": jax.process_index()}, f)
            os._exit(0)

    checkpointing.Checkpointer.save = save_then_die


def distributed(out: str, workdir: str, address: str, num_processes: int, pid: int,
                crash_after_epoch: int = 0) -> None:
    from sb_jax import parallel

    parallel.initialize_distributed(address, num_processes, pid, cpu_collectives="gloo")
    import jax

    from sb_jax import train

    if crash_after_epoch:
        _crash_after_checkpoint(crash_after_epoch, out)
    config = distributed_config()
    summary = train.train_and_evaluate(config, workdir)
    run = train.setup_run(config)
    from sb_jax import checkpointing

    ckpt = checkpointing.Checkpointer(f"{workdir}/checkpoints")
    state, _, _ = ckpt.restore_latest(run.abstract_state, run.shardings)
    ckpt.close()
    params = flat_params(state)
    with open(out, "w") as f:
        json.dump({
            "process_index": jax.process_index(), "process_count": jax.process_count(),
            "num_devices": summary["num_devices"], "local_devices": jax.local_device_count(),
            "steps": summary["steps"], "final_test_error": summary["final_test_error"],
            "counters": counters(state), "params": params.tolist(),
        }, f)
    jax.distributed.shutdown()


def main(argv: list[str]) -> None:
    mode, out = argv[1], argv[2]
    if mode == "equality":
        equality(out, argv[3:])
    elif mode == "per_shard":
        per_shard(out)
    elif mode == "checkpoint":
        checkpoint(out, argv[3])
    elif mode == "distributed":
        distributed(out, argv[3], argv[4], int(argv[5]), int(argv[6]),
                    int(argv[7]) if len(argv) > 7 else 0)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv)
