"""RHO-LOSS's irreducible-loss model: a small model trained on held-out data.

:func:`irreducible_losses` trains a model (by default the small CNN) on the held-out
split with SGD and returns its inference-mode cross-entropy on every training example,
against the training labels (noisy ones included: a mislabeled example gets a high
irreducible loss, which is what makes RHO-LOSS skip it). Pure apart from the compute:
no I/O, deterministic given the key.

The train step is a top-level jitted call per batch, not a ``lax.scan``: on the CPU, XLA
runs convolution gradients ~20x slower nested in a loop (see :mod:`sb_jax.steps`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sb_jax.data import device as data_device

LR_SCHEDULES = ("constant", "cosine")


def _padded_batches(num: int, batch_size: int, order: np.ndarray):
    """(ids[batch], mask[batch]) covering ``order`` in batches, the last one padded."""
    num_batches = max(1, math.ceil(num / batch_size))
    padded = np.zeros(num_batches * batch_size, np.int32)
    padded[:num] = order
    mask = np.arange(num_batches * batch_size) < num
    return padded.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size)


def irreducible_losses(
    model: nn.Module,
    *,
    heldout_images: np.ndarray,
    heldout_labels: np.ndarray,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    mean: np.ndarray,
    std: np.ndarray,
    key: jax.Array,
    num_epochs: int = 10,
    batch_size: int = 128,
    learning_rate: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    eval_batch_size: int = 1000,
    lr_schedule: str = "constant",
    flip: bool = False,
) -> np.ndarray:
    """Trains ``model`` on the held-out split; returns its loss on each training example.

    Args:
      model: a model of :mod:`sb_jax.models` (``apply(variables, x, train=...)``).
      heldout_images, heldout_labels: uint8 [V, H, W, C] and int [V], the training data of
        the irreducible-loss model.
      train_images, train_labels: uint8 [N, H, W, C] and int [N], the examples to score.
      mean, std: per-channel normalisation of the main run.
      key: PRNG key (initialisation, batch order, dropout).
      num_epochs, batch_size, learning_rate, momentum, weight_decay: plain SGD with
        Nesterov momentum and coupled weight decay.
      eval_batch_size: examples per inference batch when scoring.
      lr_schedule: "constant" (``learning_rate`` throughout) or "cosine" (from
        ``learning_rate`` to 0 over the training steps). The trainer uses "cosine": on
        5,000 Fashion-MNIST examples the constant rate's last iterate is noisy and
        overconfident (WORKSPACE.md, "RHO-LOSS").
      flip: random left-right flips of the training batches (the main run's
        augmentation); scoring is always of the unflipped images.

    Returns:
      float32 [N]: cross-entropy of the trained model on each training example.
    """
    num_heldout = int(heldout_labels.shape[0])
    if num_heldout == 0:
        raise ValueError("the irreducible-loss model needs held-out data: set validation_size > 0")
    for name, value in (("num_epochs", num_epochs), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    init_key, order_key, dropout_key = jax.random.split(key, 3)
    flip_key = jax.random.fold_in(key, 7)
    heldout_labels = np.asarray(heldout_labels, np.int32)
    variables = model.init(
        {"params": init_key, "dropout": dropout_key},
        jnp.zeros((1,) + heldout_images.shape[1:], jnp.float32), train=False,
    )
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    total_steps = num_epochs * max(1, math.ceil(num_heldout / batch_size))
    schedule = (optax.cosine_decay_schedule(learning_rate, total_steps)
                if lr_schedule == "cosine" else learning_rate)
    tx = optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum or None, nesterov=bool(momentum)),
    )
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, batch_stats, opt_state, images, y, mask, step):
        x = data_device.normalize(images, mean, std)
        if flip:
            flips = jax.random.bernoulli(jax.random.fold_in(flip_key, step), 0.5, (x.shape[0],))
            x = data_device.flip_with_mask(x, flips)
        maskf = mask.astype(jnp.float32)

        def loss_fn(params):
            logits, new_vars = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True,
                rngs={"dropout": jax.random.fold_in(dropout_key, step)},
                mutable=["batch_stats"],
            )
            per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            loss = jnp.sum(per_example * maskf) / jnp.maximum(maskf.sum(), 1.0)
            return loss, new_vars.get("batch_stats", batch_stats)

        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state

    step = 0
    for epoch in range(num_epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(order_key, epoch),
                                                  num_heldout))
        batch_ids, batch_mask = _padded_batches(num_heldout, batch_size, order)
        for ids, mask in zip(batch_ids, batch_mask, strict=True):
            params, batch_stats, opt_state = train_step(
                params, batch_stats, opt_state, heldout_images[ids], heldout_labels[ids], mask,
                jnp.int32(step),
            )
            step += 1

    @jax.jit
    def score(params, batch_stats, images, y):
        x = data_device.normalize(images, mean, std)
        logits = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    train_labels = np.asarray(train_labels, np.int32)
    num_train = int(train_labels.shape[0])
    batch_ids, batch_mask = _padded_batches(num_train, eval_batch_size, np.arange(num_train))
    losses = np.concatenate([
        np.asarray(score(params, batch_stats, train_images[ids], train_labels[ids]))
        for ids in batch_ids
    ])
    return losses[batch_mask.reshape(-1)].astype(np.float32)
