"""Using a selection policy in your own flax/optax loop, without the project's trainer.

The loop below is the whole protocol: per chunk of ``policy.chunk_size`` ids, ask which
examples need an inference-mode loss, compute those, let the policy select, queue the
selected ids, and train on ``batch_size`` of them whenever that many are waiting, telling
the policy the training-mode losses. It is written for clarity (it syncs with the host
to skip the scoring pass); the project's trainer does the same with ``lax.cond``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

from sb_jax import selection


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


def train_with_policy(policy, num_epochs, batch_size=64, seed=0):
    """Trains an MLP on sklearn digits; returns test accuracy and examples trained per epoch."""
    digits = load_digits()
    x = jnp.asarray(digits.data / 16.0, jnp.float32)
    y = jnp.asarray(digits.target, jnp.int32)
    num_train = 1500
    model, tx = MLP(), optax.adam(1e-2)
    params = model.init(jax.random.key(seed), x[:1])
    opt_state = tx.init(params)
    policy_state = policy.init(num_train, jax.random.key(seed + 1))
    queue = selection.queue_for(batch_size, policy.max_selected)

    def losses_and_logits(params, ids):
        logits = model.apply(params, x[ids])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[ids]), logits

    @jax.jit
    def train_step(params, opt_state, ids, weights, valid):
        def mean_loss(params):
            losses, _ = losses_and_logits(params, ids)
            total = jnp.sum(jnp.where(valid, weights * losses, 0.0))
            return total / jnp.maximum(jnp.sum(valid), 1), losses

        (_, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    score = jax.jit(losses_and_logits)
    needs_scoring = jax.jit(policy.needs_scoring)
    select = jax.jit(policy.select)
    record_trained = jax.jit(policy.record_trained)
    push = jax.jit(selection.queue_push)
    pop = jax.jit(selection.queue_pop, static_argnums=1)

    def train_on_queue(queue, params, opt_state, policy_state, epoch):
        ids, weights, valid, queue = pop(queue, batch_size)  # Up to batch_size, oldest first.
        params, opt_state, losses = train_step(params, opt_state, ids, weights, valid)
        policy_state = record_trained(ids, losses, valid, policy_state, epoch)
        return int(valid.sum()), queue, params, opt_state, policy_state

    rng = np.random.default_rng(seed)
    chunk = policy.chunk_size
    trained_per_epoch = []
    for epoch in range(num_epochs):
        epoch_arr = jnp.int32(epoch)
        order = rng.permutation(num_train)
        order = np.concatenate([order, np.zeros(-num_train % chunk, order.dtype)])
        trained = 0

        for start in range(0, len(order), chunk):
            ids = jnp.asarray(order[start:start + chunk], jnp.int32)
            valid = jnp.arange(start, start + chunk) < num_train
            needs = needs_scoring(policy_state, ids, valid, epoch_arr)
            if bool(needs.any()):
                losses, logits = score(params, ids)
            else:
                losses, logits = jnp.zeros(chunk), jnp.zeros((chunk, 10))
            scores = selection.ChunkScores(
                ids=ids,
                valid=valid,
                scored=needs,
                losses=jnp.where(needs, losses, 0.0),
                logits=jnp.where(needs[:, None], logits, 0.0),
                labels=y[ids],
            )
            chosen, policy_state = select(scores, policy_state, epoch_arr)
            queue = push(queue, ids[chosen.indices], chosen.weights, chosen.valid)
            while int(queue.size) >= batch_size:
                n, queue, params, opt_state, policy_state = train_on_queue(
                    queue, params, opt_state, policy_state, epoch_arr
                )
                trained += n
        if int(queue.size) > 0:  # End of epoch: flush the partial batch.
            n, queue, params, opt_state, policy_state = train_on_queue(
                queue, params, opt_state, policy_state, epoch_arr
            )
            trained += n
        trained_per_epoch.append(trained)

    test_logits = model.apply(params, x[num_train:])
    accuracy = float(jnp.mean(jnp.argmax(test_logits, -1) == y[num_train:]))
    return accuracy, trained_per_epoch


def test_selective_backprop_in_a_custom_loop():
    policy = selection.make_policy("sb", beta=1.0, batch_size=64, history_size=256)
    accuracy, trained_per_epoch = train_with_policy(policy, num_epochs=3)
    assert trained_per_epoch[0] == 1500  # Priming epoch: everything.
    for trained in trained_per_epoch[1:]:  # beta = 1: about half of the examples.
        assert abs(trained / 1500 - 0.5) < 0.06, trained_per_epoch
    assert accuracy > 0.75, accuracy  # Chance is 0.1; traditional SGD reaches about 0.88.


def test_kath18_in_the_same_loop():
    policy = selection.make_policy("kath18", beta=1.0, batch_size=32, tau_threshold=1.0)
    accuracy, trained_per_epoch = train_with_policy(policy, num_epochs=2, batch_size=32)
    # One batch of b per pool of 2b: half of every epoch is trained on.
    # 23 full pools of 64 give 32 each; the last 28 ids give round(28 * 32 / 64) = 14.
    assert trained_per_epoch == [750, 750]
    assert accuracy > 0.7, accuracy
