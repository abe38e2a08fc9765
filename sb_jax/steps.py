"""Pure, jittable training and evaluation steps.

The selective train step works on chunks of example ids (SPEC.md section 1):

    score (inference-mode forward, only if the policy asks) -> policy.select ->
    enqueue the selected ids -> when ``batch_size`` are waiting, one optimizer step on
    exactly those examples (fresh training-mode forward, plain mean loss).

``traditional`` is the policy that selects every example and never asks for scores, so
one code path serves every selector. Many chunks run per dispatch under ``lax.scan``;
``lax.cond`` skips the scoring forward and the optimizer step when they are not due, so
a skipped forward pass costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sb_jax.data import device as data_device
from sb_jax.selection import queue as queue_lib
from sb_jax.selection.base import ChunkScores, SelectionPolicy


class Counters(NamedTuple):
    """Cumulative device-side counters (int32 counts, float32 sums)."""

    examples_scored: jax.Array  # inference-mode forward passes (selection scoring)
    examples_backward: jax.Array  # examples in optimizer steps (training fwd + bwd)
    examples_selected: jax.Array  # examples the policy put in the queue
    examples_seen: jax.Array  # valid examples drawn from the epoch permutations
    noisy_backward: jax.Array  # backpropagated examples whose label is corrupted
    train_loss_sum: jax.Array  # sum of training-mode losses of backpropagated examples
    first_nonfinite_step: jax.Array  # -1, or the optimizer step whose loss was not finite
    nonfinite_loss: jax.Array  # that loss value


def counters_init() -> Counters:
    # Distinct buffers per field: a donated state must not alias one array twice.
    def count():
        return jnp.zeros((), jnp.int32)

    return Counters(
        examples_scored=count(), examples_backward=count(), examples_selected=count(),
        examples_seen=count(), noisy_backward=count(),
        train_loss_sum=jnp.zeros((), jnp.float32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        nonfinite_loss=jnp.zeros((), jnp.float32),
    )


class TrainState(NamedTuple):
    """Everything that changes during training; a pytree that orbax checkpoints."""

    step: jax.Array  # int32 optimizer steps taken
    params: Any
    batch_stats: Any
    opt_state: Any
    policy_state: Any
    queue: queue_lib.SelectionQueue
    counters: Counters


class DeviceData(NamedTuple):
    """The training set, resident in device memory."""

    images: jax.Array  # uint8 [N, H, W, C]
    labels: jax.Array  # int32 [N] (noisy where label noise is on)
    noisy: jax.Array  # bool [N]


class AugmentConfig(NamedTuple):
    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0


class StepFns(NamedTuple):
    """The jitted functions a run needs; built once per configuration."""

    run_chunks: Callable  # (state, data, ids[K,C], valid[K,C], epoch, chunk0) -> state
    flush: Callable  # (state, data, epoch) -> state: a partial step on what is queued
    evaluate: Callable  # (params, batch_stats, images[nb,eb,...], labels, mask) -> (errs, loss)


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
    donate: bool = True,
) -> StepFns:
    """Builds the jitted step functions, closing over static configuration only."""
    chunk_size = policy.chunk_size
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

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
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x[None], train=False)
        return softmax_xent(logits, y[None])[0], logits[0]

    # Per-example inference losses: the vmap of the single-example loss (batched by XLA).
    score_batch = jax.vmap(single_example_loss, in_axes=(None, None, 0, 0))

    def train_step(state: TrainState, data: DeviceData, ids, weights, epochs, mask, lr):
        x = model_inputs(data.images[ids], ids, epochs)
        y = data.labels[ids]
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
        policy_state = policy.record_trained(
            ids, per_example, mask, state.policy_state, epochs.max()
        )
        c = state.counters
        n = mask.sum().astype(jnp.int32)
        bad = ~jnp.isfinite(loss) & (c.first_nonfinite_step < 0)
        counters = c._replace(
            examples_backward=c.examples_backward + n,
            noisy_backward=c.noisy_backward + jnp.sum(data.noisy[ids] & mask).astype(jnp.int32),
            train_loss_sum=c.train_loss_sum + jnp.sum(per_example * maskf),
            first_nonfinite_step=jnp.where(bad, state.step, c.first_nonfinite_step),
            nonfinite_loss=jnp.where(bad, loss, c.nonfinite_loss),
        )
        return state._replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
            policy_state=policy_state, counters=counters,
        )

    def train_from_queue(state, data, lr):
        epochs = state.queue.epochs[:batch_size]
        ids, weights, mask, queue = queue_lib.queue_pop(state.queue, batch_size)
        state = state._replace(queue=queue)
        return train_step(state, data, ids, weights, epochs, mask, lr)

    def process_chunk(state: TrainState, data: DeviceData, ids, valid, epoch, lr):
        need = policy.needs_scoring(state.policy_state, ids, valid, epoch) & valid

        def score(_):
            epochs = jnp.full_like(ids, epoch)
            x = model_inputs(data.images[ids], ids, epochs)
            losses, logits = score_batch(state.params, state.batch_stats, x, data.labels[ids])
            return losses * need, logits * need[:, None]

        def skip(_):
            return (jnp.zeros(ids.shape, jnp.float32),
                    jnp.zeros(ids.shape + (num_classes,), jnp.float32))

        losses, logits = jax.lax.cond(jnp.any(need), score, skip, None)
        scores = ChunkScores(ids=ids, valid=valid, scored=need, losses=losses, logits=logits,
                             labels=data.labels[ids])
        selection, policy_state = policy.select(scores, state.policy_state, epoch)
        keep = selection.valid & valid[selection.indices]
        queue = queue_lib.queue_push(state.queue, ids[selection.indices], selection.weights,
                                     keep, jnp.full(selection.indices.shape, epoch, jnp.int32))
        c = state.counters
        counters = c._replace(
            examples_scored=c.examples_scored + need.sum().astype(jnp.int32),
            examples_selected=c.examples_selected + keep.sum().astype(jnp.int32),
            examples_seen=c.examples_seen + valid.sum().astype(jnp.int32),
        )
        state = state._replace(policy_state=policy_state, queue=queue, counters=counters)
        return jax.lax.cond(
            queue.size >= batch_size,
            lambda s: train_from_queue(s, data, lr),
            lambda s: s,
            state,
        )

    def run_chunks(state, data, chunk_ids, chunk_valid, epoch, chunk0):
        def body(state, xs):
            k, ids, valid = xs
            frac_epoch = epoch + (chunk0 + k) * chunk_size / num_train
            return process_chunk(state, data, ids, valid, epoch, lr_schedule(frac_epoch)), None

        ks = jnp.arange(chunk_ids.shape[0], dtype=jnp.float32)
        state, _ = jax.lax.scan(body, state, (ks, chunk_ids, chunk_valid))
        return state

    def flush(state, data, epoch):
        lr = lr_schedule(epoch + 1.0 - 1e-6)
        return jax.lax.cond(
            state.queue.size > 0,
            lambda s: train_from_queue(s, data, lr),
            lambda s: s,
            state,
        )

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

    donate_state = (0,) if donate else ()
    return StepFns(
        run_chunks=jax.jit(run_chunks, donate_argnums=donate_state),
        flush=jax.jit(flush, donate_argnums=donate_state),
        evaluate=jax.jit(evaluate),
    )

