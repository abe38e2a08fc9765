"""Pre-training the base network and fine-tuning per-app detectors with k frozen layers.

Fine-tuning "with the first k layers frozen" is done the way it is cheapest and exactly
what it means numerically: the frozen stem ``[0, k)`` is run once, in inference mode with
the base network's variables, over the fine-tuning images (:func:`stem_features`); then
every app's branch ``[k, L)`` is trained on those features. The stem's parameters and
BatchNorm statistics are never an input to an optimizer, so they cannot move; the app's
full variables are the base's layers ``[0, k)`` merged with its trained branch
(:func:`assemble_app`). All apps of one k are trained together, ``jax.vmap``-ed over a
leading app axis (one compilation per k, one dispatch per step for all apps).

Branches start from the base network's weights (fine-tuning), except the head, which is
new: the base classifies the base classes, an app emits one logit ("target present").
Batches are class-balanced per app (half positives), so a logit threshold of 0 trades
missed targets against false alarms evenly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mainstream_jax.e2e import basenet
from sb_jax.models.layers import BN_MOMENTUM

# XLA CPU options for the fine-tuning and profiling programs, each compiled once per
# chokepoint and run a few to ~100 times:
# without LLVM's optimisations the vmapped k=0 step compiled in 7.7 s instead of 24.1 s
# and ran in 419 ms instead of 393 (one 5-app, batch-64 step; shared core), and
# compiling one step per chokepoint was most of the end-to-end run's time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def normalize(images: np.ndarray | jax.Array, mean: float, std: float) -> jax.Array:
    """uint8 images -> float32 network input."""
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def calibrate_batch_stats(
    model: basenet.ChokepointNet, variables: dict, x: jax.Array, start: int = 0
) -> dict:
    """Sets the BatchNorm running statistics of layers ``[start, L)`` to the exact batch
    statistics of ``x`` (the input of layer ``start``), so that inference mode on ``x``
    equals training mode on ``x``.

    With few optimizer steps the running averages (momentum 0.9) are still far from the
    final network's statistics, and inference-mode outputs are then wrong enough to
    break short runs (a 5-class base net at chance level). One training-mode pass
    updates ``ra' = m ra + (1 - m) b``, so ``b = (ra' - m ra) / (1 - m)`` exactly.
    """
    _, upd = model.apply(variables, x, start, None, True, mutable=["batch_stats"])
    m = BN_MOMENTUM
    old = variables["batch_stats"]
    ran = [k for k in model.spec.layer_names[start:] if k in old]
    new = jax.tree.map(lambda n, o: (n - m * o) / (1.0 - m),
                       {k: upd["batch_stats"][k] for k in ran}, {k: old[k] for k in ran})
    return {"params": variables["params"], "batch_stats": {**old, **new}}


class BaseTraining(NamedTuple):
    variables: dict
    losses: np.ndarray  # float [steps]: training loss per step
    test_accuracy: float  # on the held-out images of the base classes


def train_base(
    model: basenet.ChokepointNet,
    variables: dict,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    mean: float,
    std: float,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
    calibration_size: int = 2048,
) -> BaseTraining:
    """Trains the whole base network on the base task (softmax cross-entropy, Adam,
    cosine schedule; the last partial batch of each epoch is dropped: static shapes),
    then calibrates BatchNorm on ``calibration_size`` training images."""
    n = int(labels.shape[0])
    if n < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training images, got {n}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    steps_per_epoch = n // batch_size
    total = epochs * steps_per_epoch
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, total))
    params, stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)
    x_all = jnp.asarray(images)
    y_all = jnp.asarray(labels, jnp.int32)

    @jax.jit
    def step(params, stats, opt_state, idx):
        x = normalize(x_all[idx], mean, std)
        y = y_all[idx]

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, 0, None, True,
                                      mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(epochs):
        perm = rng.permutation(n)
        for s in range(steps_per_epoch):
            idx = jnp.asarray(perm[s * batch_size:(s + 1) * batch_size])
            params, stats, opt_state, loss = step(params, stats, opt_state, idx)
            losses.append(loss)
    cal = rng.choice(n, min(n, calibration_size), replace=False)
    variables = calibrate_batch_stats(model, {"params": params, "batch_stats": stats},
                                      normalize(images[cal], mean, std))
    acc = float("nan")
    if test_images is not None:
        logits = predict(model, variables, normalize(test_images, mean, std), 0)
        acc = float((np.argmax(logits, -1) == np.asarray(test_labels)).mean())
    return BaseTraining(variables, np.asarray(jax.device_get(losses), np.float64), acc)


@functools.cache
def _apply_fn(model: basenet.ChokepointNet, start: int, end: int | None):
    # One jitted function per (model, layer range), reused across calls: a fresh lambda
    # per call would be traced and compiled again every time.
    return jax.jit(lambda v, h: model.apply(v, h, start, end, False),
                   compiler_options=FAST_COMPILE)


def _batched(fn, x: jax.Array, batch_size: int, axis: int = 0) -> np.ndarray:
    """``fn`` over ``x`` in batches of ``batch_size``; the last batch is padded to the
    full size so that every call has one shape (one compilation)."""
    n = x.shape[0]
    batch_size = min(batch_size, n)
    outs = []
    for i in range(0, n, batch_size):
        chunk = x[i:i + batch_size]
        m = chunk.shape[0]
        if m < batch_size:
            chunk = jnp.concatenate([chunk, jnp.zeros((batch_size - m, *chunk.shape[1:]),
                                                      chunk.dtype)])
        outs.append(np.take(np.asarray(fn(chunk)), np.arange(m), axis=axis))
    return np.concatenate(outs, axis=axis)


def predict(
    model: basenet.ChokepointNet, variables: dict, x: jax.Array, start: int,
    end: int | None = None, batch_size: int = 512
) -> np.ndarray:
    """Inference-mode outputs of layers ``[start, end)`` over ``x``, in batches."""
    fn = _apply_fn(model, start, end)
    return _batched(lambda h: fn(variables, h), jnp.asarray(x), batch_size)


def stem_features(
    model: basenet.ChokepointNet, base_variables: dict, x: jax.Array, k: int,
    batch_size: int = 512
) -> jax.Array:
    """The frozen stem's output: base layers ``[0, k)`` in inference mode."""
    if k == 0:
        return jnp.asarray(x)
    return jnp.asarray(predict(model, base_variables, x, 0, k, batch_size))


def init_branches(
    app_model: basenet.ChokepointNet, base_variables: dict, k: int, num_apps: int,
    image_shape: Sequence[int], seed: int
) -> dict:
    """Stacked [A, ...] branch variables for layers ``[k, L)``: the base's weights, and a
    fresh one-logit head per app (seed ``seed + app``)."""
    spec = app_model.spec
    last = spec.num_layers - 1
    base_part = basenet.select_layers(base_variables, spec, k, last)
    heads = []
    for a in range(num_apps):
        full = basenet.init_variables(app_model, image_shape, seed + a)
        heads.append(basenet.select_layers(full, spec, last, last + 1))
    per_app = [basenet.merge_layers(base_part, h) for h in heads]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_app)
    stacked.setdefault("batch_stats", {})
    return stacked


class BranchTraining(NamedTuple):
    branches: dict  # stacked [A, ...] variables of layers [k, L)
    losses: np.ndarray  # float [steps, A]


def finetune_branches(
    app_model: basenet.ChokepointNet,
    branches: dict,
    features: jax.Array,
    positives: np.ndarray,
    k: int,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    calibration_size: int = 512,
) -> BranchTraining:
    """Trains every app's branch ``[k, L)`` on the stem ``features`` (one array for all
    apps); ``positives`` bool [A, n] marks each app's target images. Balanced batches;
    BatchNorm is calibrated at the end on a balanced set of ``calibration_size``."""
    positives = np.asarray(positives, bool)
    num_apps, n = positives.shape
    if features.shape[0] != n:
        raise ValueError(f"features hold {features.shape[0]} images, positives {n}")
    if batch_size < 2 or batch_size % 2:
        raise ValueError(f"batch_size must be an even number >= 2, got {batch_size}")
    for a in range(num_apps):
        if not positives[a].any() or positives[a].all():
            raise ValueError(f"app {a} needs both positive and negative training images")
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    params, stats = branches["params"], branches["batch_stats"]
    opt_state = jax.vmap(tx.init)(params)

    def one(params, stats, opt_state, x, y):
        def loss_fn(p):
            logits, upd = app_model.apply({"params": p, "batch_stats": stats}, x, k, None,
                                          True, mutable=["batch_stats"])
            loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean()
            return loss, upd.get("batch_stats", {})

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    vstep = jax.vmap(one)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step(params, stats, opt_state, features, idx, y):
        # features is an argument, not a closed-over constant baked into the program.
        return vstep(params, stats, opt_state, features[idx], y)

    rng = np.random.default_rng(seed)
    pos_ids = [np.flatnonzero(positives[a]) for a in range(num_apps)]
    neg_ids = [np.flatnonzero(~positives[a]) for a in range(num_apps)]
    half = batch_size // 2
    y = jnp.asarray(np.repeat([[1.0] * half + [0.0] * half], num_apps, axis=0), jnp.float32)
    losses = []
    for _ in range(steps):
        idx = np.stack([np.concatenate([rng.choice(pos_ids[a], half),
                                        rng.choice(neg_ids[a], half)])
                        for a in range(num_apps)])
        params, stats, opt_state, loss = step(params, stats, opt_state, features,
                                             jnp.asarray(idx), y)
        losses.append(loss)
    half_cal = calibration_size // 2
    cal = np.stack([np.concatenate([rng.choice(pos_ids[a], half_cal),
                                    rng.choice(neg_ids[a], half_cal)])
                    for a in range(num_apps)])
    calibrate = jax.jit(jax.vmap(lambda v, h: calibrate_batch_stats(app_model, v, h, k)),
                        compiler_options=FAST_COMPILE)
    tuned = calibrate({"params": params, "batch_stats": stats}, features[jnp.asarray(cal)])
    return BranchTraining(tuned,
                          np.asarray(jax.device_get(losses), np.float64).reshape(steps, -1))


def branch_logits(
    app_model: basenet.ChokepointNet, branches: dict, features: jax.Array, k: int,
    batch_size: int = 512
) -> np.ndarray:
    """Inference-mode logits [A, n] of every stacked branch on the same stem features."""
    fn = _branch_logits_fn(app_model, k)
    return _batched(lambda h: fn(branches, h), jnp.asarray(features), batch_size, axis=1)


@functools.cache
def _branch_logits_fn(app_model: basenet.ChokepointNet, k: int):
    return jax.jit(jax.vmap(lambda v, h: app_model.apply(v, h, k, None, False)[:, 0],
                            in_axes=(0, None)), compiler_options=FAST_COMPILE)


def unstack(tree: dict, index: int) -> dict:
    """Entry ``index`` of a stacked [A, ...] variable tree."""
    return jax.tree.map(lambda x: x[index], tree)


def assemble_app(base_variables: dict, branch: dict, spec: basenet.NetSpec, k: int) -> dict:
    """An app's full variables: the base's frozen layers ``[0, k)`` + its branch."""
    return basenet.merge_layers(basenet.select_layers(base_variables, spec, 0, k), branch)
