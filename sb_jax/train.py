"""train_and_evaluate: the training loop around the pure steps of :mod:`sb_jax.steps`.

Host-side duties only: load data, build the model, policy and optimizer from the config,
restore or create the state, drive epochs of jitted dispatches, evaluate, write metrics
and checkpoints. Everything numeric happens in the jitted steps.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sb_jax import (
    checkpointing,
    config_lib,
    costs,
    irreducible_loss,
    metrics_io,
    parallel,
    schedules,
    steps,
)
from sb_jax.data import device as data_device
from sb_jax.data import load_dataset
from sb_jax.models import create_model
from sb_jax.selection import queue as queue_lib


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss is NaN or infinite."""


def _eval_arrays(images: np.ndarray, labels: np.ndarray, batch_size: int):
    """Pads a split to whole batches and reshapes to [num_batches, batch, ...]."""
    n = images.shape[0]
    nb = max(1, math.ceil(n / batch_size))
    pad = nb * batch_size - n
    images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    mask = np.arange(nb * batch_size) < n
    shape = (nb, batch_size)
    return (
        jnp.asarray(images.reshape(shape + images.shape[1:])),
        jnp.asarray(labels.reshape(shape)),
        jnp.asarray(mask.reshape(shape)),
    )


def _device_counters(state: steps.TrainState) -> dict[str, Any]:
    c = parallel.to_host(state.counters)
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in c._asdict().items()}


def _check_finite(state: steps.TrainState, epoch: int) -> None:
    bad_step = int(state.counters.first_nonfinite_step)
    if bad_step >= 0:
        loss = float(state.counters.nonfinite_loss)
        raise NonFiniteLossError(
            f"training loss became {loss} at optimizer step {bad_step} (epoch {epoch + 1}); "
            "the run stops here. Usual causes: learning rate too high for this model/batch "
            "size, or corrupted inputs. Lower --config.learning_rate or check the data."
        )


def build_run(config: ml_collections.ConfigDict, num_shards: int = 1):
    """Everything a run needs that is a pure function of the config (no state, no I/O).

    ``num_shards > 1`` (per-shard selection): the policy is one device's (batches / D).
    """
    dataset = load_dataset(
        config.dataset,
        config.data_dir or None,
        label_noise=config.label_noise,
        noise_kind=config.noise_kind,
        validation_size=config.validation_size,
        seed=config.seed,
        train_subset=config.train_subset or None,
    )
    model = create_model(config.model, dataset.num_classes, **config_lib.model_kwargs(config))
    policy = config_lib.make_policy_from_config(config, num_shards)
    tx = steps.make_optimizer(config.momentum, config.nesterov, config.weight_decay)
    lr_schedule = schedules.make_epoch_schedule(
        config.lr_schedule,
        config.learning_rate,
        num_epochs=config.num_epochs,
        boundaries=schedules.parse_int_list(config.lr_boundaries),
        decay=config.lr_decay,
        warmup_epochs=config.warmup_epochs,
    )
    return dataset, model, policy, tx, lr_schedule


def init_state(config, dataset, model, policy, tx, key: jax.Array,
               num_shards: int = 1) -> steps.TrainState:
    """The initial TrainState. ``num_shards > 1``: per-shard selection, so the policy
    state, queue and cursor get a leading device axis (shard d's policy covers its
    ``ceil(N / D)`` ids, with its own key)."""
    init_key, dropout_key, policy_key = jax.random.split(key, 3)
    sample = jnp.zeros((1,) + dataset.train_images.shape[1:], jnp.float32)
    variables = model.init({"params": init_key, "dropout": dropout_key}, sample, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    heldout_grad = None
    if policy.needs_heldout_grad:
        feature_dim, num_classes = params["head"]["kernel"].shape
        heldout_grad = jnp.zeros((feature_dim + 1, num_classes), jnp.float32)
    if num_shards == 1:
        policy_state = policy.init(dataset.num_train, policy_key)
        queue = queue_lib.queue_for(config.batch_size, policy.max_selected)
        cursor = jnp.zeros((), jnp.int32)
    else:
        num_local = parallel.padded_size(dataset.num_train, num_shards) // num_shards
        keys = jax.random.split(policy_key, num_shards)
        policy_state = jax.vmap(lambda k: policy.init(num_local, k))(keys)
        queue = jax.tree.map(
            lambda leaf: jnp.broadcast_to(leaf, (num_shards,) + leaf.shape),
            queue_lib.queue_for(config.batch_size // num_shards, policy.max_selected),
        )
        cursor = jnp.zeros((num_shards,), jnp.int32)
    return steps.TrainState(
        step=jnp.zeros((), jnp.int32),
        cursor=cursor,
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        policy_state=policy_state,
        queue=queue,
        counters=steps.counters_init(),
        heldout_grad=heldout_grad,
    )


def set_irreducible_loss(policy, policy_state, losses: np.ndarray, num_shards: int = 1):
    """Hands RHO-LOSS its irreducible losses (split by shard under per-shard selection)."""
    if num_shards == 1:
        return policy.set_irreducible_loss(policy_state, losses)
    padded = parallel.pad_rows(np.asarray(losses, np.float32),
                               parallel.padded_size(len(losses), num_shards))
    return jax.vmap(policy.set_irreducible_loss)(policy_state,
                                                 padded.reshape(num_shards, -1))


def make_mesh(config: ml_collections.ConfigDict):
    """The device mesh of this run, or None for the single-device program."""
    if config.num_devices == 1 and jax.process_count() == 1:
        return None
    mesh = parallel.make_mesh(config.num_devices)
    if mesh.devices.size == 1:
        return None
    config_lib.validate_parallel(config, mesh.devices.size)
    return mesh


def train_irreducible_loss(config, dataset, key: jax.Array) -> tuple[np.ndarray, float]:
    """RHO-LOSS's irreducible losses of the training set and the seconds they took."""
    t0 = time.perf_counter()
    model = create_model(config.rho_model, dataset.num_classes)
    losses = irreducible_loss.irreducible_losses(
        model,
        heldout_images=dataset.val_images,
        heldout_labels=dataset.val_labels,
        train_images=dataset.train_images,
        train_labels=dataset.train_labels,
        mean=dataset.mean,
        std=dataset.std,
        key=key,
        num_epochs=config.rho_epochs,
        batch_size=config.batch_size,
        learning_rate=config.rho_learning_rate,
        momentum=config.momentum,
        weight_decay=config.rho_weight_decay,
        eval_batch_size=config.eval_batch_size,
        lr_schedule=config.rho_lr_schedule,
        flip=config.flip,
    )
    return losses, time.perf_counter() - t0


class Run(NamedTuple):
    """What a training run is built from: a pure function of the config and the devices."""

    mesh: Any  # jax.sharding.Mesh, or None for the single-device program
    num_devices: int
    num_shards: int  # D under per-shard selection, else 1
    dataset: Any
    model: Any
    policy: Any  # one device's policy under per-shard selection
    tx: Any
    lr_schedule: Any
    fns: steps.StepFns
    data: steps.DeviceData
    test_arrays: Any
    val_arrays: Any
    abstract_state: Any
    shardings: Any  # of the TrainState on the mesh, or None
    fresh_state: Any  # () -> the initial TrainState
    init_key: Any
    data_key: Any


def setup_run(config: ml_collections.ConfigDict) -> Run:
    """Builds the data, model, policy, jitted steps and state layout of a run (no files)."""
    mesh = make_mesh(config)
    num_devices = 1 if mesh is None else mesh.devices.size
    per_shard = mesh is not None and config.selection_scope == "per_shard"
    num_shards = num_devices if per_shard else 1
    dataset, model, policy, tx, lr_schedule = build_run(config, num_shards)
    root = jax.random.PRNGKey(config.seed)
    init_key, data_key, aug_key, dropout_key = jax.random.split(root, 4)
    if mesh is not None:
        # Host copies: closed over by multi-device jits, where a single-device array
        # cannot go on many hosts.
        init_key, aug_key, dropout_key = (np.asarray(k) for k in (init_key, aug_key,
                                                                   dropout_key))
    logging.info(
        "dataset %s: %d train (%d noisy), %d test, %d val, %d classes, image %s",
        dataset.name, dataset.num_train, int(dataset.noisy.sum()), len(dataset.test_labels),
        len(dataset.val_labels), dataset.num_classes, dataset.image_shape,
    )
    if mesh is not None:
        logging.info("data parallel over %d devices (%d processes), %s selection",
                     num_devices, jax.process_count(), config.selection_scope)

    fresh_fn = functools.partial(init_state, config, dataset, model, policy, tx,
                                 num_shards=num_shards)
    abstract_state = jax.eval_shape(fresh_fn, init_key)
    shardings = None
    if mesh is not None:
        shardings = parallel.state_shardings(
            abstract_state, mesh, num_examples=dataset.num_train,
            scope=config.selection_scope,
        )
    fns = steps.make_step_fns(
        model=model,
        policy=policy,
        tx=tx,
        lr_schedule=lr_schedule,
        batch_size=config.batch_size,
        num_train=dataset.num_train,
        num_classes=dataset.num_classes,
        mean=dataset.mean,
        std=dataset.std,
        augment_cfg=steps.AugmentConfig(config.crop_padding, config.flip, config.cutout),
        aug_key=aug_key,
        dropout_key=dropout_key,
        flush=config.flush_partial_batch,
        steps_per_dispatch=config.steps_per_dispatch,
        heldout_size=config.heldout_size,
        heldout_every=config.heldout_every,
        mesh=mesh,
        selection_scope=config.selection_scope,
        state_sharding=shardings,
    )
    data, test_arrays, val_arrays = _device_data(config, dataset, policy, mesh)

    if mesh is None:
        jitted = jax.jit(fresh_fn)

        def fresh_state():
            return jitted(init_key)
    else:
        # No arguments: the key is a host constant, so the jit runs on every host alike.
        fresh_state = jax.jit(lambda: fresh_fn(init_key), out_shardings=shardings)
    return Run(mesh, num_devices, num_shards, dataset, model, policy, tx, lr_schedule, fns,
               data, test_arrays, val_arrays, abstract_state, shardings, fresh_state,
               init_key, data_key)


def epoch_inputs(run: Run, epoch: int):
    """(chunk ids, chunk valid, zero cursor, epoch) for one epoch's dispatches."""
    ids, valid, cursor = _epoch_chunks(run.dataset, run.policy.chunk_size, run.data_key,
                                       epoch, run.mesh, run.num_shards)
    if run.mesh is None:
        return ids, valid, cursor, jnp.asarray(epoch, jnp.int32)
    return (ids, valid, parallel.put(cursor, run.shardings.cursor),
            parallel.put(np.int32(epoch), parallel.replicated(run.mesh)))


# Checkpoint extra: how many per-device selection states the saved state holds.
SELECTION_SHARDS = "selection_shards"


def check_checkpoint_shards(ckpt: checkpointing.Checkpointer, num_shards: int,
                            num_devices: int) -> None:
    """Refuses a checkpoint whose per-shard selection state has another device count.

    Per-shard selection keeps a policy state (loss history, key, per-example caches of
    its own ids), a queue and a cursor per device; they have no meaning on another
    number of devices, so such a run resumes only on the device count it was saved on.
    ``config.num_devices=0`` (every device) passes ``check_resumable`` whatever the
    count, hence this check. Global selection (one shard) reshards freely.
    """
    extra = ckpt.latest_extra()
    if extra is None or SELECTION_SHARDS not in extra:  # no checkpoint, or an older one
        return
    saved = int(extra[SELECTION_SHARDS])
    if saved == num_shards:
        return
    path = os.path.join(ckpt.directory, str(ckpt.latest_epoch()))
    if saved > 1:
        wrote = f"per_shard selection on {saved} devices"
        why = (f"it holds one policy state, queue and cursor per device, so it resumes only "
               f"with the same config on {saved} devices")
    else:
        wrote = "one selection state (global selection, or a single device)"
        why = "per_shard selection needs one per device; resume it with a single device"
    raise checkpointing.CheckpointError(
        f"the checkpoint {path} was written with {wrote}, but this run has "
        f"{num_devices} device(s) with {num_shards} selection shard(s): {why}, or use a "
        "new --workdir to start over."
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains per ``config``, writing metrics, checkpoints and plots to ``workdir``.

    Re-running the same command on the same ``workdir`` resumes from the last checkpoint
    and ends with the same metrics as an uninterrupted run. Returns the summary dict.
    """
    config_lib.validate_config(config)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    config_lib.check_resumable(config, workdir)
    primary = parallel.is_primary()  # only process 0 writes files (orbax coordinates its own)

    run = setup_run(config)
    mesh, num_devices, num_shards = run.mesh, run.num_devices, run.num_shards
    dataset, policy, fns, data = run.dataset, run.policy, run.fns, run.data
    test_arrays, val_arrays, lr_schedule = run.test_arrays, run.val_arrays, run.lr_schedule
    per_shard = num_shards > 1
    init_key = run.init_key

    ckpt = checkpointing.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    try:
        check_checkpoint_shards(ckpt, num_shards, num_devices)
        restored = ckpt.restore_latest(run.abstract_state, run.shardings)
    except BaseException:
        ckpt.close()  # an open manager left behind makes orbax's threads fail at exit
        raise
    if restored is None:
        state = run.fresh_state()
        start_epoch, wall_s = 0, 0.0
        irreducible_s = 0.0
        if policy.set_irreducible_loss is not None:
            # Part of the run's cost: counted in wall_s. The losses live in the policy state,
            # so a resumed run restores them instead of training the model again.
            losses, irreducible_s = train_irreducible_loss(
                config, dataset, jax.random.fold_in(jnp.asarray(init_key), 1)
            )
            wall_s += irreducible_s
            state = state._replace(
                policy_state=set_irreducible_loss(policy, state.policy_state, losses,
                                                  num_shards)
            )
            if mesh is not None:
                state = parallel.put_tree(parallel.to_host(state), run.shardings)
            logging.info("irreducible-loss model: %.1fs, mean loss %.4f", irreducible_s,
                         float(np.mean(losses)))
        if primary:
            config_lib.save_config(config, workdir)
    else:
        state, start_epoch, extra = restored
        wall_s = float(extra["wall_s"])
        irreducible_s = float(extra.get("irreducible_model_wall_s", 0.0))
        logging.info("resumed from checkpoint after epoch %d (%s)", start_epoch, ckpt.directory)

    writer = (metrics_io.MetricWriter(workdir, resume_epoch=start_epoch,
                                      tensorboard=config.tensorboard) if primary else None)
    records = []
    chunk_size = policy.chunk_size
    num_chunks = math.ceil(dataset.num_train / (chunk_size * num_shards))
    progress = metrics_io.Progress(config.num_epochs * num_chunks, log_fn=logging.info)
    last_log = time.perf_counter()
    epoch_start_counters = _device_counters(state)
    sampler = None
    if config.unit_cost_every:
        sampler = costs.TrainerCostSampler(fns, chunk_size=chunk_size,
                                           batch_size=config.batch_size,
                                           num_train=dataset.num_train, seed=start_epoch)
    diagnostics = policy.diagnostics
    if diagnostics is not None and mesh is not None:
        if per_shard:
            # One value per device; the log shows their mean.
            def diagnostics(ps, _f=policy.diagnostics):
                return jax.tree.map(lambda a: jnp.mean(a, axis=0), jax.vmap(_f)(ps))
        diagnostics = jax.jit(diagnostics, out_shardings=parallel.replicated(mesh))

    try:
        for epoch in range(start_epoch, config.num_epochs):
            ids, valid, cursor, ep = epoch_inputs(run, epoch)
            state = state._replace(cursor=cursor)
            t_epoch = time.perf_counter()
            steps_before = int(state.step)
            # One dispatch stays in flight: `done` of dispatch i is read after dispatch
            # i+1 is queued, so the host never idles the device. The dispatch after the
            # one that finished the epoch is a no-op by construction.
            previous_done = None
            dispatches = 0
            while True:
                state, done = fns.train_dispatch(state, data, ids, valid, ep)
                if previous_done is not None and bool(previous_done):
                    break
                previous_done = done
                dispatches += 1
                if sampler is not None and dispatches % config.unit_cost_every == 0:
                    jax.block_until_ready(state)  # the dispatch's own time stays counted
                    paused = time.perf_counter()
                    sampler.sample(state, data, ep)
                    t_epoch += time.perf_counter() - paused
                if time.perf_counter() - last_log >= config.log_every_s:
                    _check_finite(state, epoch)  # also waits for the dispatch to finish
                    step_now = int(state.step)
                    cursor_now = int(np.max(parallel.to_host(state.cursor)))
                    now = time.perf_counter()
                    progress.update(
                        epoch * num_chunks + cursor_now, epoch=epoch + 1,
                        steps_per_s=(step_now - steps_before) / max(now - t_epoch, 1e-9),
                        extra=f"| step {step_now}",
                    )
                    last_log = now
            _check_finite(state, epoch)
            jax.block_until_ready(state)
            wall_s += time.perf_counter() - t_epoch

            now_counters = _device_counters(state)
            is_last = epoch + 1 == config.num_epochs
            if (epoch + 1) % config.eval_every == 0 or is_last:
                record = _evaluation_record(
                    fns, state, test_arrays, val_arrays, epoch, wall_s, now_counters,
                    epoch_start_counters, lr_schedule, dataset, policy, diagnostics,
                )
                unit = sampler.take() if sampler is not None else None
                if unit is not None:
                    record.update({f"unit_{k}": v for k, v in unit.items()})
                records.append(record)
                if writer is not None:
                    writer.write(record)
                logging.info(
                    "epoch %d: test error %.2f%%, train loss %.4f, backprop %d, wall %.1fs",
                    epoch + 1, record["test_error"], record["train_loss"],
                    record["examples_backward"], wall_s,
                )
                epoch_start_counters = now_counters
            if (epoch + 1) % config.checkpoint_every == 0 or is_last:
                ckpt.save(epoch + 1, state,
                          {"wall_s": wall_s, "irreducible_model_wall_s": irreducible_s,
                           SELECTION_SHARDS: num_shards})
    finally:
        if writer is not None:
            writer.close()
        ckpt.close()

    if not primary:
        # Other processes hold the same numbers but write nothing.
        return _summary(config, dataset, state, wall_s, records, num_devices)
    summary = _summary(config, dataset, state, wall_s, metrics_io.read_metrics(workdir),
                       num_devices)
    if policy.set_irreducible_loss is not None:
        summary["irreducible_model_wall_s"] = irreducible_s
    metrics_io.write_json(os.path.join(workdir, metrics_io.SUMMARY_FILE), summary)
    records = metrics_io.read_metrics(workdir)
    metrics_io.plot_error_curves(
        {config.selector: [(r["wall_s"], r["test_error"]) for r in records]},
        os.path.join(workdir, "test_error_vs_time.png"),
        title=f"{config.dataset} / {config.model}",
    )
    if any("priorities" in r for r in records):
        metrics_io.plot_priorities(
            records, os.path.join(workdir, "priorities.png"),
            title=f"{config.selector}: priority per class of examples",
            class_names=_priority_class_names(config),
        )
    return summary


def _priority_class_names(config) -> list[str] | None:
    """Names of AdaptSB's classes of examples, in the order of its priorities."""
    if config.selector != "adapt_sb":
        return None
    names = [f"loss bin {k}" for k in range(config.adapt_num_bins)]
    if config.adapt_split_by_alignment:
        names += [f"loss bin {k}, opposed" for k in range(config.adapt_num_bins)]
    return names


def _device_data(config, dataset, policy, mesh):
    """The training set on the device(s), and the evaluation splits in batches.

    On a mesh the training images are padded to a multiple of the device count and split
    by id (each host copies only its devices' rows); labels, the noise mask and the
    held-out split are replicated; evaluation batches are split over the devices when
    the evaluation batch size allows.
    """
    heldout = {}
    if policy.needs_heldout_grad:
        heldout = {"heldout_images": np.asarray(dataset.val_images),
                   "heldout_labels": np.asarray(dataset.val_labels, np.int32)}
    test = _eval_arrays(dataset.test_images, dataset.test_labels, config.eval_batch_size)
    val = (_eval_arrays(dataset.val_images, dataset.val_labels, config.eval_batch_size)
           if len(dataset.val_labels) else None)
    if mesh is None:
        data = steps.DeviceData(
            images=jnp.asarray(dataset.train_images),
            labels=jnp.asarray(dataset.train_labels, jnp.int32),
            noisy=jnp.asarray(dataset.noisy),
            **{k: jnp.asarray(v) for k, v in heldout.items()},
        )
        return data, test, val
    size = parallel.padded_size(dataset.num_train, mesh.devices.size)
    rep = parallel.replicated(mesh)
    data = steps.DeviceData(
        images=parallel.put(parallel.pad_rows(dataset.train_images, size), parallel.rows(mesh)),
        labels=parallel.put(parallel.pad_rows(np.asarray(dataset.train_labels, np.int32), size),
                            rep),
        noisy=parallel.put(parallel.pad_rows(np.asarray(dataset.noisy), size), rep),
        **{k: parallel.put(v, rep) for k, v in heldout.items()},
    )
    if config.eval_batch_size % mesh.devices.size == 0:
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            None, parallel.DATA_AXIS))
    else:
        split = rep

    def place(arrays):
        return None if arrays is None else tuple(parallel.put(np.asarray(a), split)
                                                 for a in arrays)

    return data, place(test), place(val)


def _epoch_chunks(dataset, chunk_size, data_key, epoch, mesh, num_shards):
    """(ids, valid, zero cursor) of one epoch: host arrays on a mesh (put by the caller)."""
    key = jax.random.fold_in(data_key, epoch)
    if num_shards > 1:
        ids, valid = steps.shard_permutation(key, dataset.num_train, num_shards, chunk_size)
        ids, valid = np.asarray(ids), np.asarray(valid)
        split = parallel.rows(mesh)
        return (parallel.put(ids, split), parallel.put(valid, split),
                np.zeros((num_shards,), np.int32))
    ids, valid = data_device.epoch_permutation(key, dataset.num_train, chunk_size)
    if mesh is None:
        return ids, valid, jnp.zeros((), jnp.int32)
    rep = parallel.replicated(mesh)
    return (parallel.put(np.asarray(ids), rep), parallel.put(np.asarray(valid), rep),
            np.zeros((), np.int32))


def _evaluation_record(fns, state, test_arrays, val_arrays, epoch, wall_s, counters,
                       since, lr_schedule, dataset, policy, diagnostics) -> dict[str, Any]:
    errs, loss = fns.evaluate(state.params, state.batch_stats, *test_arrays)
    n_test = int(test_arrays[2].sum())
    backward = counters["examples_backward"] - since["examples_backward"]
    seen = counters["examples_seen"] - since["examples_seen"]
    record = {
        "epoch": epoch + 1,
        "step": int(state.step),
        "wall_s": round(wall_s, 4),
        "lr": float(lr_schedule(float(epoch))),
        # Every forward pass: inference-mode scoring, the training forward of each
        # backpropagated example and AdaptSB's held-out forwards. Components reported too.
        "examples_forward": counters["examples_scored"] + counters["examples_backward"]
        + counters["examples_heldout"],
        "examples_scored": counters["examples_scored"],
        "examples_backward": counters["examples_backward"],
        "examples_selected": counters["examples_selected"],
        "train_loss": counters["train_loss_sum"] - since["train_loss_sum"],
        "selected_fraction": (counters["examples_selected"] - since["examples_selected"])
        / max(seen, 1),
        "test_error": 100.0 * int(errs) / n_test,
        "test_loss": float(loss) / n_test,
    }
    record["train_loss"] = record["train_loss"] / max(backward, 1)
    if dataset.noisy.any():
        noisy_bw = counters["noisy_backward"] - since["noisy_backward"]
        record["mislabeled_backward_fraction"] = noisy_bw / max(backward, 1)
        selected = counters["examples_selected"] - since["examples_selected"]
        noisy_sel = counters["noisy_selected"] - since["noisy_selected"]
        record["selected_mislabeled_fraction"] = noisy_sel / max(selected, 1)
    if policy.needs_heldout_grad:
        record["examples_heldout"] = counters["examples_heldout"]
    if diagnostics is not None:
        values = parallel.to_host(diagnostics(state.policy_state))
        record.update({name: np.asarray(value).tolist() for name, value in values.items()})
    if val_arrays is not None:
        verrs, vloss = fns.evaluate(state.params, state.batch_stats, *val_arrays)
        n_val = int(val_arrays[2].sum())
        record["val_error"] = 100.0 * int(verrs) / n_val
        record["val_loss"] = float(vloss) / n_val
    return record


def _summary(config, dataset, state, wall_s, records, num_devices) -> dict[str, Any]:
    counters = _device_counters(state)
    errors = [r["test_error"] for r in records]
    return {
        "config": json.loads(config.to_json_best_effort()),
        "dataset": dataset.name,
        "num_train": dataset.num_train,
        "epochs": config.num_epochs,
        "steps": int(state.step),
        "wall_s": wall_s,
        "final_test_error": errors[-1] if errors else None,
        "best_test_error": min(errors) if errors else None,
        "examples_scored": counters["examples_scored"],
        "examples_backward": counters["examples_backward"],
        "examples_per_s": counters["examples_seen"] / max(wall_s, 1e-9),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "num_devices": num_devices,
        "num_processes": jax.process_count(),
    }
