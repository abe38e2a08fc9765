"""Pure, jittable training and evaluation steps.

The selective train step works on chunks of example ids (SPEC.md section 1):

    score (inference-mode forward, only if the policy asks) -> policy.select ->
    enqueue the selected ids -> when ``batch_size`` are waiting, one optimizer step on
    exactly those examples (fresh training-mode forward, plain mean loss).

``traditional`` is the policy that selects every example and never asks for scores, so
one code path serves every selector. Policies with ``needs_features`` get the scoring
pass's penultimate features too; for policies with ``needs_heldout_grad`` (AdaptSB) each
dispatch whose optimizer step is a multiple of ``heldout_every`` first recomputes the mean
last-layer gradient on the next ``heldout_size`` held-out examples (an inference-mode
forward, no backward) and keeps it in ``TrainState.heldout_grad``.

One *dispatch* (a call of ``train_dispatch``) runs a ``lax.while_loop`` over chunks of
the epoch until ``batch_size`` examples are queued or the epoch's chunks are used up,
then one optimizer step at the top level of the jitted function. The step is applied
only when a full batch is waiting (or, with ``flush``, a partial one at the end of the
epoch); otherwise the state is left exactly as it was, so extra dispatches are no-ops.

Why the optimizer step is not inside ``lax.cond``/``lax.scan``: with jaxlib 0.10 on the
CPU, XLA rewrites convolution weight-gradients into fast kernels only at the top level
of a computation; nested in a cond or while body the same train step ran about 20x
slower (small CNN, batch 128: 30 ms at the top level, 574 ms in ``lax.cond``, 704 ms per
step in ``lax.scan``; ``python -m benchmarks.train_step_costs``, results in
benchmarks/results/train_step_costs_cpu.json). ``steps_per_dispatch > 1`` scans several dispatches
for accelerators, where per-call overhead matters and nesting costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sb_jax import parallel
from sb_jax.data import device as data_device
from sb_jax.selection import queue as queue_lib
from sb_jax.selection.base import ChunkScores, SelectionPolicy, head_gradient


class Counters(NamedTuple):
    """Cumulative device-side counters (int32 counts, float32 sums)."""

    examples_scored: jax.Array  # inference-mode forward passes (selection scoring)
    examples_backward: jax.Array  # examples in optimizer steps (training fwd + bwd)
    examples_selected: jax.Array  # examples the policy put in the queue
    examples_seen: jax.Array  # valid examples drawn from the epoch permutations
    noisy_backward: jax.Array  # backpropagated examples whose label is corrupted
    noisy_selected: jax.Array  # selected (queued) examples whose label is corrupted
    examples_heldout: jax.Array  # held-out inference forwards (AdaptSB's signal)
    train_loss_sum: jax.Array  # sum of training-mode losses of backpropagated examples
    first_nonfinite_step: jax.Array  # -1, or the optimizer step whose loss was not finite
    nonfinite_loss: jax.Array  # that loss value


def counters_init() -> Counters:
    # Distinct buffers per field: a donated state must not alias one array twice.
    def count():
        return jnp.zeros((), jnp.int32)

    return Counters(
        examples_scored=count(), examples_backward=count(), examples_selected=count(),
        examples_seen=count(), noisy_backward=count(), noisy_selected=count(),
        examples_heldout=count(),
        train_loss_sum=jnp.zeros((), jnp.float32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        nonfinite_loss=jnp.zeros((), jnp.float32),
    )


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree that orbax checkpoints."""

    step: jax.Array  # int32 optimizer steps taken
    cursor: jax.Array  # int32 next chunk of the current epoch (0 at epoch boundaries)
    params: Any
    batch_stats: Any
    opt_state: Any
    policy_state: Any
    queue: queue_lib.SelectionQueue
    counters: Counters
    # float32 [D + 1, K]: mean last-layer gradient on the current held-out batch
    # (`selection.head_gradient`); None unless the policy `needs_heldout_grad`.
    heldout_grad: Any = None


class DeviceData(NamedTuple):
    """The training set, resident in device memory."""

    images: jax.Array  # uint8 [N, H, W, C]
    labels: jax.Array  # int32 [N] (noisy where label noise is on)
    noisy: jax.Array  # bool [N]
    # The held-out (validation) split, clean labels; only for `needs_heldout_grad` policies.
    heldout_images: jax.Array | None = None  # uint8 [V, H, W, C]
    heldout_labels: jax.Array | None = None  # int32 [V]


class AugmentConfig(NamedTuple):
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0


class StepFns(NamedTuple):
    """The jitted functions a run needs; built once per configuration."""

    # (state, data, chunk_ids[n, C], chunk_valid[n, C], epoch) -> (state, epoch_done)
    train_dispatch: Callable
    # (params, batch_stats, images[nb, eb, ...], labels, mask) -> (errors, loss_sum)
    evaluate: Callable
    # The two pieces a dispatch is made of, alone, for measuring the cost model's unit
    # costs on the trainer's own code (`costs.measure_trainer_costs`); one device only
    # (None on a mesh). Neither donates its inputs.
    # (state, data, ids[C], epoch) -> scoring outputs (losses, logits[, features]): gather,
    # augment, inference forward of one chunk, as `process_chunk` runs it.
    score_chunk: Callable | None = None
    # (state, data, ids[B], epoch) -> (params, batch_stats, opt_state): gather, augment
    # and one optimizer step on a full batch, as `train_from_queue` runs it.
    train_batch: Callable | None = None


def make_optimizer(
    momentum: float, nesterov: bool, weight_decay: float
) -> optax.GradientTransformation:
    """SGD direction without the learning rate, PyTorch-style coupled weight decay.

    The learning rate is applied outside (``updates * -lr``) because it is a function of
    the fractional epoch, which the step computes itself.
    """
    parts = []
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay))
    if momentum:
        parts.append(optax.trace(decay=momentum, nesterov=nesterov))
    return optax.chain(*parts) if parts else optax.identity()


def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_step_fns(
    *,
    model: nn.Module,
    policy: SelectionPolicy,
    tx: optax.GradientTransformation,
    lr_schedule: Callable[[jax.Array], jax.Array],
    batch_size: int,
    num_train: int,
    num_classes: int,
    mean: jax.Array,
    std: jax.Array,
    augment_cfg: AugmentConfig,
    aug_key: jax.Array,
    dropout_key: jax.Array,
    flush: bool = False,
    steps_per_dispatch: int = 1,
    donate: bool = True,
    heldout_size: int = 256,
    heldout_every: int = 10,
    mesh: Mesh | None = None,
    selection_scope: str = "global",
    state_sharding: Any = None,
) -> StepFns:
    """Builds the jitted step functions, closing over static configuration only.

    ``heldout_size`` and ``heldout_every`` matter only for a policy that
    ``needs_heldout_grad``: examples per held-out batch (a sliding window over
    ``DeviceData.heldout_images``) and optimizer steps between refreshes.

    With a ``mesh`` (see :mod:`sb_jax.parallel`) the dispatch is data-parallel over its
    ``data`` axis, with ``state_sharding`` (``parallel.state_shardings``) for the state and
    the training images split by id. ``selection_scope="global"`` selects from the whole
    chunk exactly as one device does; ``"per_shard"`` runs ``policy`` (built for the
    per-device chunk and batch sizes) on each device over its own examples, with the
    policy state, queue and cursor carrying a leading device axis (see
    :func:`_per_shard_dispatch`). ``batch_size`` is always the global backward batch.
    """
    if steps_per_dispatch < 1:
        raise ValueError(f"steps_per_dispatch must be >= 1, got {steps_per_dispatch}")
    if policy.needs_heldout_grad and (heldout_size < 1 or heldout_every < 1):
        raise ValueError(
            f"heldout_size and heldout_every must be >= 1, got {heldout_size} and "
            f"{heldout_every}"
        )
    chunk_size = policy.chunk_size
    if mesh is None:
        mean = jnp.asarray(mean, jnp.float32)
        std = jnp.asarray(std, jnp.float32)
    else:
        # Host constants: a closed-over single-device array cannot enter a multi-host jit.
        mean = np.asarray(mean, np.float32)
        std = np.asarray(std, np.float32)

    def model_inputs(images_u8, ids, epochs):
        x = data_device.normalize(images_u8, mean, std)
        if augment_cfg == AugmentConfig():
            return x
        # One key per (example, epoch): the view an example is scored on is exactly the
        # view it is trained on, even when it waits in the queue across a chunk boundary.
        keys = jax.vmap(lambda i, e: jax.random.fold_in(jax.random.fold_in(aug_key, e), i))(
            ids, epochs
        )

        def one(key, image):
            return data_device.augment(
                key, image[None], crop_padding=augment_cfg.crop_padding,
                flip=augment_cfg.flip, cutout=augment_cfg.cutout,
            )[0]

        return jax.vmap(one)(keys, x)

    def single_example_loss(params, batch_stats, x, y):
        variables = {"params": params, "batch_stats": batch_stats}
        if policy.needs_features:
            logits, features = model.apply(variables, x[None], train=False, return_features=True)
            return softmax_xent(logits, y[None])[0], logits[0], features[0]
        logits = model.apply(variables, x[None], train=False)
        return softmax_xent(logits, y[None])[0], logits[0]

    # Per-example inference losses: the vmap of the single-example loss (batched by XLA).
    score_batch = jax.vmap(single_example_loss, in_axes=(None, None, 0, 0))

    def score_examples(params, batch_stats, images_u8, labels, ids, epoch):
        """The scoring pass of a chunk: its augmented view at ``epoch``, inference mode."""
        x = model_inputs(images_u8, ids, jnp.full_like(ids, epoch))
        return score_batch(params, batch_stats, x, labels)

    def train_core(state: TrainState, images_u8, labels, noisy, ids, weights, epochs, mask, lr):
        """One optimizer step on the given examples; the policy is not told (see below)."""
        x = model_inputs(images_u8, ids, epochs)
        y = labels
        rng = jax.random.fold_in(dropout_key, state.step)
        maskf = mask.astype(jnp.float32)
        denom = jnp.maximum(maskf.sum(), 1.0)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats}, x, train=True,
                rngs={"dropout": rng}, mutable=["batch_stats"],
            )
            per_example = softmax_xent(logits, y)
            loss = jnp.sum(per_example * weights * maskf) / denom
            return loss, (per_example, new_vars.get("batch_stats", state.batch_stats))

        (loss, (per_example, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        direction, opt_state = tx.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
        c = state.counters
        n = mask.sum().astype(jnp.int32)
        bad = ~jnp.isfinite(loss) & (c.first_nonfinite_step < 0)
        counters = c._replace(
            examples_backward=c.examples_backward + n,
            noisy_backward=c.noisy_backward + jnp.sum(noisy & mask).astype(jnp.int32),
            train_loss_sum=c.train_loss_sum + jnp.sum(per_example * maskf),
            first_nonfinite_step=jnp.where(bad, state.step, c.first_nonfinite_step),
            nonfinite_loss=jnp.where(bad, loss, c.nonfinite_loss),
        )
        new_state = state._replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
            counters=counters,
        )
        return new_state, per_example

    def train_step(state: TrainState, data: DeviceData, ids, weights, epochs, mask, lr,
                   images_of=None):
        images = data.images[ids] if images_of is None else images_of(ids)
        state, per_example = train_core(state, images, data.labels[ids], data.noisy[ids], ids,
                                        weights, epochs, mask, lr)
        policy_state = policy.record_trained(
            ids, per_example, mask, state.policy_state, epochs.max()
        )
        return state._replace(policy_state=policy_state)

    def train_from_queue(state, data, lr, images_of=None):
        epochs = state.queue.epochs[:batch_size]
        ids, weights, mask, queue = queue_lib.queue_pop(state.queue, batch_size)
        state = state._replace(queue=queue)
        return train_step(state, data, ids, weights, epochs, mask, lr, images_of)

    def chunk_step(params, batch_stats, heldout_grad, policy_state, queue, counters,
                   images_of, labels, noisy, policy_ids, ids, valid, epoch,
                   replicate=lambda outputs: outputs):
        """Scores (if asked), selects and enqueues one chunk.

        ``images_of(ids)`` returns the chunk's uint8 images; ``policy_ids`` are the ids the
        policy indexes its per-example state with (the shard-local ids in ``per_shard``);
        ``replicate`` places the scores where the selection runs.
        """
        need = policy.needs_scoring(policy_state, policy_ids, valid, epoch) & valid

        def score(_):
            outputs = replicate(
                score_examples(params, batch_stats, images_of(ids), labels[ids], ids, epoch))
            # Zero where not requested: (losses, logits[, features]).
            return tuple(o * need.reshape(need.shape + (1,) * (o.ndim - 1)) for o in outputs)

        def skip(_):
            return jax.tree.map(
                lambda o: jnp.zeros(o.shape, o.dtype), jax.eval_shape(score, None)
            )

        outputs = jax.lax.cond(jnp.any(need), score, skip, None)
        scores = ChunkScores(
            ids=policy_ids, valid=valid, scored=need, losses=outputs[0], logits=outputs[1],
            labels=labels[ids],
            features=outputs[2] if policy.needs_features else None,
            heldout_grad=heldout_grad if policy.needs_heldout_grad else None,
        )
        selection, policy_state = policy.select(scores, policy_state, epoch)
        keep = selection.valid & valid[selection.indices]
        queue = queue_lib.queue_push(queue, ids[selection.indices], selection.weights,
                                     keep, jnp.full(selection.indices.shape, epoch, jnp.int32))
        c = counters
        noisy_kept = noisy[ids[selection.indices]] & keep
        counters = c._replace(
            examples_scored=c.examples_scored + need.sum().astype(jnp.int32),
            examples_selected=c.examples_selected + keep.sum().astype(jnp.int32),
            examples_seen=c.examples_seen + valid.sum().astype(jnp.int32),
            noisy_selected=c.noisy_selected + noisy_kept.sum().astype(jnp.int32),
        )
        return policy_state, queue, counters

    def process_chunk(state: TrainState, data: DeviceData, ids, valid, epoch,
                      images_of=None, replicate=lambda outputs: outputs):
        if images_of is None:
            def images_of(i):
                return data.images[i]
        policy_state, queue, counters = chunk_step(
            state.params, state.batch_stats, state.heldout_grad, state.policy_state,
            state.queue, state.counters, images_of, data.labels, data.noisy, ids, ids, valid,
            epoch, replicate,
        )
        return state._replace(policy_state=policy_state, queue=queue, counters=counters)

    def heldout_gradient(state: TrainState, data: DeviceData) -> jax.Array:
        """Mean head gradient on the held-out window of this refresh (inference mode)."""
        num_heldout = data.heldout_labels.shape[0]
        # Consecutive refreshes use consecutive windows, so the whole split is used in turn.
        start = (state.step // heldout_every) * heldout_size
        ids = (start + jnp.arange(heldout_size)) % num_heldout
        x = data_device.normalize(data.heldout_images[ids], mean, std)
        logits, features = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, x, train=False,
            return_features=True,
        )
        return head_gradient(logits, features, data.heldout_labels[ids])

    def refresh_heldout(state: TrainState, data: DeviceData) -> TrainState:
        if data.heldout_images is None or state.heldout_grad is None:
            raise ValueError(
                f"policy {policy.name!r} needs a held-out gradient: give DeviceData "
                "heldout_images/heldout_labels and TrainState.heldout_grad (zeros [D + 1, K])"
            )
        # Refreshes happen at steps 0, every, 2 * every, ...; a dispatch that trains nothing
        # (end of epoch, the host's extra dispatch) must not redo the refresh of its step,
        # so count the refreshes done so far from the held-out examples already scored.
        refreshes_done = state.counters.examples_heldout // heldout_size
        due = (state.step % heldout_every == 0) & (refreshes_done <= state.step // heldout_every)
        grad = jax.lax.cond(
            due, lambda: heldout_gradient(state, data).astype(state.heldout_grad.dtype),
            lambda: state.heldout_grad,
        )
        c = state.counters
        counters = c._replace(
            examples_heldout=c.examples_heldout + jnp.where(due, heldout_size, 0).astype(jnp.int32)
        )
        return state._replace(heldout_grad=grad, counters=counters)

    def one_dispatch(state: TrainState, data: DeviceData, chunk_ids, chunk_valid, epoch,
                     images_of=None, replicate=lambda outputs: outputs):
        num_chunks = chunk_ids.shape[0]
        if policy.needs_heldout_grad:
            state = refresh_heldout(state, data)

        def more_chunks(s):
            return (s.queue.size < batch_size) & (s.cursor < num_chunks)

        def next_chunk(s):
            s = process_chunk(s, data, chunk_ids[s.cursor], chunk_valid[s.cursor], epoch,
                              images_of, replicate)
            return s._replace(cursor=s.cursor + 1)

        state = jax.lax.while_loop(more_chunks, next_chunk, state)
        exhausted = state.cursor >= num_chunks
        do_train = state.queue.size >= batch_size
        if flush:
            do_train |= exhausted & (state.queue.size > 0)
        lr = lr_schedule(epoch + jnp.minimum(state.cursor * chunk_size, num_train) / num_train)
        # Computed unconditionally at the top level (see the module docstring), kept only
        # when a batch was due (`_keep_if`).
        trained = train_from_queue(state, data, jnp.where(do_train, lr, 0.0), images_of)
        state = _keep_if(do_train, trained, state)
        done = exhausted & (state.queue.size < batch_size)
        if flush:
            done &= state.queue.size == 0
        return state, done

    if mesh is None:
        dispatch_once = one_dispatch
    elif selection_scope == "global":
        dispatch_once = _global_dispatch(mesh, one_dispatch)
    elif selection_scope == "per_shard":
        dispatch_once = _per_shard_dispatch(
            mesh, policy=policy, batch_size=batch_size, num_train=num_train, flush=flush,
            lr_schedule=lr_schedule, chunk_step=chunk_step, train_core=train_core,
            refresh_heldout=refresh_heldout if policy.needs_heldout_grad else None,
        )
    else:
        raise ValueError(
            f"selection_scope must be 'global' or 'per_shard', got {selection_scope!r}"
        )

    def train_dispatch(state, data, chunk_ids, chunk_valid, epoch):
        if steps_per_dispatch == 1:
            return dispatch_once(state, data, chunk_ids, chunk_valid, epoch)

        def body(state, _):
            return dispatch_once(state, data, chunk_ids, chunk_valid, epoch)

        state, done = jax.lax.scan(body, state, None, length=steps_per_dispatch)
        return state, done[-1]

    def evaluate(params, batch_stats, images, labels, mask):
        def body(carry, xs):
            imgs, labs, m = xs
            x = data_device.normalize(imgs, mean, std)
            logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
            errs = jnp.sum((jnp.argmax(logits, -1) != labs) & m)
            loss = jnp.sum(softmax_xent(logits, labs) * m)
            return (carry[0] + errs, carry[1] + loss), None

        (errs, loss), _ = jax.lax.scan(
            body, (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)), (images, labels, mask)
        )
        return errs, loss

    def score_chunk(state, data, ids, epoch):
        return score_examples(state.params, state.batch_stats, data.images[ids],
                              data.labels[ids], ids, epoch)

    def train_batch(state, data, ids, epoch):
        ones = jnp.ones(ids.shape, jnp.float32)
        trained, _ = train_core(state, data.images[ids], data.labels[ids], data.noisy[ids],
                                ids, ones, jnp.full_like(ids, epoch), ones > 0,
                                lr_schedule(epoch))
        return trained.params, trained.batch_stats, trained.opt_state

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return StepFns(
            train_dispatch=jax.jit(train_dispatch, donate_argnums=donate_argnums),
            evaluate=jax.jit(evaluate),
            score_chunk=jax.jit(score_chunk),
            train_batch=jax.jit(train_batch),
        )
    if state_sharding is None:
        raise ValueError("a mesh needs state_sharding (parallel.state_shardings)")
    rep, split = parallel.replicated(mesh), parallel.rows(mesh)
    chunks = split if selection_scope == "per_shard" else rep
    data_sharding = DeviceData(images=split, labels=rep, noisy=rep,
                               heldout_images=rep if policy.needs_heldout_grad else None,
                               heldout_labels=rep if policy.needs_heldout_grad else None)
    return StepFns(
        train_dispatch=jax.jit(
            train_dispatch, donate_argnums=donate_argnums,
            in_shardings=(state_sharding, data_sharding, chunks, chunks, rep),
            out_shardings=(state_sharding, rep),
        ),
        evaluate=jax.jit(evaluate, out_shardings=(rep, rep)),
    )


def _keep_if(do_train: jax.Array, trained: TrainState, state: TrainState) -> TrainState:
    """`trained` where `do_train`, else `state`; `trained` must come from a zero learning
    rate when `do_train` is false.

    That zero rate leaves the parameters bitwise unchanged (p - 0 * d == p for the finite
    d of a masked-out batch), so only the rest of the state needs the select: the select
    over the parameters cost a full extra pass over them per step.
    """
    kept = jax.tree.map(lambda new, old: jnp.where(do_train, new, old),
                        trained._replace(params=None), state._replace(params=None))
    return kept._replace(params=trained.params)


def _global_dispatch(mesh: Mesh, one_dispatch: Callable) -> Callable:
    """Global selection: one device's program, with the examples' work split over ``data``.

    Every chunk's (and batch's) images are fetched from the id-split training set into a
    position-split batch (``parallel.fetch_rows``: each device gathers the rows it owns,
    one reduce-scatter), the scoring forward and the optimizer step run on that split
    batch (the compiler adds the gradient and BatchNorm all-reduces), and the chunk's
    scores are all-gathered so that the policy selects from the whole chunk with the same
    numbers, and makes the same choices, as on one device.
    """
    fetch = parallel.fetch_rows(mesh)
    rep = parallel.replicated(mesh)

    def dispatch(state, data, chunk_ids, chunk_valid, epoch):
        def images_of(ids):
            return fetch(data.images, ids)

        def replicate(outputs):
            return jax.tree.map(lambda o: jax.lax.with_sharding_constraint(o, rep), outputs)

        return one_dispatch(state, data, chunk_ids, chunk_valid, epoch, images_of, replicate)

    return dispatch


def _per_shard_dispatch(
    mesh: Mesh, *, policy: SelectionPolicy, batch_size: int, num_train: int, flush: bool,
    lr_schedule: Callable, chunk_step: Callable, train_core: Callable,
    refresh_heldout: Callable | None,
) -> Callable:
    """Per-shard selection: each device selects from its own examples.

    Device d walks its own permutation of the ids it holds (``chunk_ids[d]``, from
    :func:`shard_permutation`) with its own copy of the policy (``policy_state[d]``, built
    for ``n = N / D`` examples and indexed by shard-local ids) and its own queue, in a
    ``lax.while_loop`` inside ``jax.shard_map`` that needs no communication: no image
    leaves its device. When every device has ``batch_size / D`` examples waiting (or has
    run out of chunks) each pops its share and one optimizer step runs on the union at
    the top level (the compiler adds the gradient and BatchNorm all-reduces). Devices
    that ran out contribute what they have (a masked, smaller batch at the epoch's end);
    the epoch is done when every device is out of chunks and none has a full share.
    """
    spec = P(parallel.DATA_AXIS)
    axis = parallel.DATA_AXIS
    num_devices = mesh.devices.size
    local_batch = batch_size // num_devices
    chunk_size = policy.chunk_size

    def unstack(tree):
        return jax.tree.map(lambda a: a[0], tree)

    def restack(tree):
        return jax.tree.map(lambda a: a[None], tree)

    def select_phase(state: TrainState, data: DeviceData, chunk_ids, chunk_valid, epoch):
        def body(policy_state, queue, cursor, images, chunk_ids, chunk_valid, shared):
            params, batch_stats, heldout_grad, labels, noisy, epoch = shared
            policy_state, queue, cursor = unstack((policy_state, queue, cursor))
            chunk_ids, chunk_valid = chunk_ids[0], chunk_valid[0]
            offset = jax.lax.axis_index(axis) * images.shape[0]
            num_chunks = chunk_ids.shape[0]

            def images_of(ids):
                return images[ids - offset]

            def more_chunks(carry):
                _, q, cur, _ = carry
                return (q.size < local_batch) & (cur < num_chunks)

            def next_chunk(carry):
                ps, q, cur, c = carry
                ids = chunk_ids[cur]
                ps, q, c = chunk_step(params, batch_stats, heldout_grad, ps, q, c, images_of,
                                      labels, noisy, ids - offset, ids, chunk_valid[cur], epoch)
                return ps, q, cur + 1, c

            policy_state, queue, cursor, counts = jax.lax.while_loop(
                more_chunks, next_chunk, (policy_state, queue, cursor, counters_init())
            )
            counts = jax.tree.map(lambda v: jax.lax.psum(v, axis), counts)
            return (*restack((policy_state, queue, cursor)), counts)

        shared = (state.params, state.batch_stats, state.heldout_grad, data.labels, data.noisy,
                  epoch)
        # check_vma=False: the loop carries mix per-device values (queue) with replicated
        # ones (counts start equal); the only collective is the psum after the loop.
        policy_state, queue, cursor, counts = jax.shard_map(
            body, mesh=mesh, in_specs=(spec, spec, spec, spec, spec, spec, P()),
            out_specs=(spec, spec, spec, P()), check_vma=False,
        )(state.policy_state, state.queue, state.cursor, data.images, chunk_ids, chunk_valid,
          shared)
        c = state.counters
        counters = c._replace(
            examples_scored=c.examples_scored + counts.examples_scored,
            examples_selected=c.examples_selected + counts.examples_selected,
            examples_seen=c.examples_seen + counts.examples_seen,
            noisy_selected=c.noisy_selected + counts.noisy_selected,
        )
        return state._replace(policy_state=policy_state, queue=queue, cursor=cursor,
                              counters=counters)

    def pop_local(queue, images):
        queue = unstack(queue)
        offset = jax.lax.axis_index(axis) * images.shape[0]
        epochs = queue.epochs[:local_batch]
        ids, weights, mask, queue = queue_lib.queue_pop(queue, local_batch)
        # Unused entries (id 0) may belong to another device; any row will do, masked.
        rows = images[jnp.clip(ids - offset, 0, images.shape[0] - 1)]
        return ids, weights, mask, epochs, rows, restack(queue)

    pop = jax.shard_map(pop_local, mesh=mesh, in_specs=(spec, spec),
                        out_specs=(spec,) * 6, check_vma=False)

    def record_local(policy_state, ids, losses, mask, shared):
        (epoch, num_local) = shared
        offset = jax.lax.axis_index(axis) * num_local
        state = policy.record_trained(ids - offset, losses, mask, unstack(policy_state), epoch)
        return restack(state)

    record = jax.shard_map(record_local, mesh=mesh, in_specs=(spec, spec, spec, spec, P()),
                           out_specs=spec, check_vma=False)

    def dispatch(state: TrainState, data: DeviceData, chunk_ids, chunk_valid, epoch):
        num_chunks = chunk_ids.shape[1]
        if refresh_heldout is not None:
            state = refresh_heldout(state, data)
        state = select_phase(state, data, chunk_ids, chunk_valid, epoch)
        size = state.queue.size
        ready = size >= local_batch
        exhausted = state.cursor >= num_chunks
        do_train = jnp.all(ready | exhausted) & jnp.any(ready)
        if flush:
            do_train |= jnp.all(exhausted) & jnp.any(size > 0)
        drawn = jnp.minimum(jnp.sum(state.cursor) * chunk_size, num_train)
        lr = lr_schedule(epoch + drawn / num_train)
        ids, weights, mask, epochs, images, queue = pop(state.queue, data.images)
        trained, per_example = train_core(state._replace(queue=queue), images,
                                          data.labels[ids], data.noisy[ids], ids, weights,
                                          epochs, mask, jnp.where(do_train, lr, 0.0))
        num_local = data.images.shape[0] // num_devices
        trained = trained._replace(policy_state=record(
            trained.policy_state, ids, per_example, mask, (jnp.max(epochs), num_local)))
        state = _keep_if(do_train, trained, state)
        ready = state.queue.size >= local_batch
        done = jnp.all(exhausted) & ~jnp.any(ready)
        if flush:
            done &= jnp.all(state.queue.size == 0)
        return state, done

    return dispatch


def shard_permutation(
    rng: jax.Array, num_examples: int, num_shards: int, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
    """Per-shard epoch orders for ``per_shard`` selection.

    Shard d holds ids ``[d n, (d+1) n)`` with ``n = ceil(N / D)``; it walks its own
    random order of them in chunks of ``chunk_size``. Returns ``(ids, valid)`` of shape
    ``[D, num_chunks, chunk_size]`` with global ids; ids past ``N`` (padding of the last
    shard) and the padded tail of the last chunk are ``valid=False``.
    """
    num_local = -(-num_examples // num_shards)

    def one(shard):
        ids, valid = data_device.epoch_permutation(
            jax.random.fold_in(rng, shard), num_local, chunk_size
        )
        ids = ids + shard * num_local
        return ids, valid & (ids < num_examples)

    return jax.vmap(one)(jnp.arange(num_shards))
