"""The jitted train/eval steps against a NumPy reference on a tiny linear model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax import schedules, steps
from sb_jax.selection import make_policy, queue_for

NUM_CLASSES = 3
MEAN, STD = np.array([0.4], np.float32), np.array([0.25], np.float32)


class Linear(nn.Module):
    """Softmax regression on flattened pixels: the smallest model with the trainer's API."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))


def make_data(n=10, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 2, 2, 1), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, size=(n,)).astype(np.int32)
    noisy = np.zeros(n, bool)
    noisy[:3] = True
    return images, labels, noisy


def build(policy, *, batch_size, lr=0.1, momentum=0.9, wd=5e-4, n=10, donate=False,
          flush=False):
    model = Linear()
    tx = steps.make_optimizer(momentum, True, wd)
    fns = steps.make_step_fns(
        model=model, policy=policy, tx=tx,
        lr_schedule=schedules.make_epoch_schedule("constant", lr, num_epochs=1),
        batch_size=batch_size, num_train=n, num_classes=NUM_CLASSES, mean=MEAN, std=STD,
        augment_cfg=steps.AugmentConfig(), aug_key=jax.random.PRNGKey(1),
        dropout_key=jax.random.PRNGKey(2), flush=flush, donate=donate,
    )
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))["params"]
    state = steps.TrainState(
        step=jnp.zeros((), jnp.int32), cursor=jnp.zeros((), jnp.int32), params=params,
        batch_stats={},
        opt_state=tx.init(params), policy_state=policy.init(n, jax.random.PRNGKey(3)),
        queue=queue_for(batch_size, policy.max_selected), counters=steps.counters_init(),
    )
    return fns, state


def run_epoch(fns, state, data, ids, valid, epoch, max_dispatches=100):
    """Dispatches until the epoch is done, as the trainer does; returns (state, count)."""
    state = state._replace(cursor=jnp.zeros((), jnp.int32))
    for count in range(1, max_dispatches + 1):
        state, done = fns.train_dispatch(state, data, ids, valid, jnp.int32(epoch))
        if bool(done):
            return state, count
    raise AssertionError("epoch did not finish")


def numpy_sgd_reference(params, images, labels, batches, lr, momentum, wd):
    """Plain NumPy: mean softmax cross-entropy, coupled weight decay, Nesterov momentum."""
    w = np.array(params["Dense_0"]["kernel"], np.float64)
    b = np.array(params["Dense_0"]["bias"], np.float64)
    tw, tb = np.zeros_like(w), np.zeros_like(b)
    x_all = ((images.astype(np.float64) / 255.0 - MEAN) / STD).reshape(len(images), -1)
    for ids in batches:
        x, y = x_all[ids], labels[ids]
        logits = x @ w + b
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        d = p.copy()
        d[np.arange(len(ids)), y] -= 1.0
        d /= len(ids)
        gw, gb = x.T @ d + wd * w, d.sum(0) + wd * b
        tw, tb = momentum * tw + gw, momentum * tb + gb
        w, b = w - lr * (gw + momentum * tw), b - lr * (gb + momentum * tb)
    return w, b


def test_traditional_steps_match_numpy():
    images, labels, noisy = make_data()
    policy = make_policy("traditional", batch_size=4)
    fns, state = build(policy, batch_size=4)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    ids = jnp.asarray([[3, 1, 4, 0], [9, 2, 6, 5]], jnp.int32)
    valid = jnp.ones((2, 4), bool)
    new, dispatches = run_epoch(fns, state, data, ids, valid, 0)
    assert dispatches == 2
    # A dispatch after the end of the epoch changes nothing.
    again, done = fns.train_dispatch(new, data, ids, valid, jnp.int32(0))
    assert bool(done)
    jax.tree.map(np.testing.assert_array_equal, again, new)
    w, b = numpy_sgd_reference(state.params, images, labels, np.asarray(ids), 0.1, 0.9, 5e-4)
    np.testing.assert_allclose(new.params["Dense_0"]["kernel"], w, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(new.params["Dense_0"]["bias"], b, rtol=2e-5, atol=2e-6)
    assert int(new.step) == 2
    c = new.counters
    assert (int(c.examples_backward), int(c.examples_scored)) == (8, 0)
    # ids 0 and 2 are among the three corrupted ids {0, 1, 2}: 1 too.
    assert int(c.noisy_backward) == 3


def test_partial_chunk_carries_over_or_flushes():
    images, labels, noisy = make_data()
    policy = make_policy("traditional", batch_size=4)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    ids = jnp.asarray([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]], jnp.int32)
    valid = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]], bool)
    fns, state = build(policy, batch_size=4)
    carried, _ = run_epoch(fns, state, data, ids, valid, 0)
    assert int(carried.step) == 2 and int(carried.queue.size) == 2  # 8, 9 carried over
    fns, state = build(policy, batch_size=4, flush=True)
    flushed, _ = run_epoch(fns, state, data, ids, valid, 0)
    assert int(flushed.step) == 3 and int(flushed.queue.size) == 0
    assert int(flushed.counters.examples_backward) == 10
    # The flush step is a mean over the 2 real examples, not over a padded 4.
    ref_w, _ = numpy_sgd_reference(
        state.params, images, labels, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], 0.1, 0.9, 5e-4
    )
    np.testing.assert_allclose(flushed.params["Dense_0"]["kernel"], ref_w, rtol=2e-5, atol=2e-6)


def test_sb_scores_then_trains_only_selected():
    images, labels, noisy = make_data(n=64)
    policy = make_policy("sb", beta=1.0, batch_size=8, history_size=32, prime_epochs=1)
    fns, state = build(policy, batch_size=8, n=64)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    ids = jnp.arange(64, dtype=jnp.int32).reshape(8, 8)
    valid = jnp.ones((8, 8), bool)
    # Epoch 0 is the priming epoch: no scoring, everything trained.
    state, _ = run_epoch(fns, state, data, ids, valid, 0)
    assert int(state.counters.examples_scored) == 0
    assert int(state.counters.examples_backward) == 64
    state, _ = run_epoch(fns, state, data, ids, valid, 1)
    c = state.counters
    assert int(c.examples_scored) == 64
    selected = int(c.examples_selected) - 64
    assert 8 <= selected <= 56  # about half of 64 at beta = 1
    assert int(c.examples_backward) - 64 == 8 * (selected // 8)
    assert int(state.queue.size) == selected % 8
    assert int(state.queue.num_dropped) == 0


@pytest.mark.parametrize("selector", ["traditional", "sb"])
def test_train_dispatch_traced_once(selector):
    images, labels, noisy = make_data(n=32)
    kwargs = {"batch_size": 8} if selector == "traditional" else {
        "beta": 2.0, "batch_size": 8, "history_size": 16}
    policy = make_policy(selector, **kwargs)
    fns, state = build(policy, batch_size=8, n=32, donate=True)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    ids = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
    for epoch in range(3):
        state, _ = run_epoch(fns, state, data, ids, jnp.ones((4, 8), bool), epoch)
    assert fns.train_dispatch._cache_size() == 1


def test_evaluate_counts_errors_and_ignores_padding():
    images, labels, noisy = make_data(n=10)
    policy = make_policy("traditional", batch_size=4)
    fns, state = build(policy, batch_size=4)
    imgs = np.concatenate([images, np.zeros((2, 2, 2, 1), np.uint8)]).reshape(3, 4, 2, 2, 1)
    labs = np.concatenate([labels, np.zeros(2, np.int32)]).reshape(3, 4)
    mask = (np.arange(12) < 10).reshape(3, 4)
    errs, loss = fns.evaluate(state.params, {}, jnp.asarray(imgs), jnp.asarray(labs),
                              jnp.asarray(mask))
    w = np.asarray(state.params["Dense_0"]["kernel"])
    b = np.asarray(state.params["Dense_0"]["bias"])
    x = ((images / 255.0 - MEAN) / STD).reshape(10, -1)
    logits = x @ w + b
    ref_errs = int(np.sum(np.argmax(logits, 1) != labels))
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    ref_loss = float(np.sum(lse - logits[np.arange(10), labels]))
    assert int(errs) == ref_errs
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)


class HeadModel(nn.Module):
    """A hidden layer and a `head`, returning (logits, features) like the model zoo."""

    @nn.compact
    def __call__(self, x, train: bool = False, return_features: bool = False):
        features = nn.relu(nn.Dense(4, name="dense")(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(NUM_CLASSES, name="head")(features)
        return (logits, features) if return_features else logits


def numpy_head_gradient(params, images, labels):
    """Mean last-layer gradient [D + 1, K] of HeadModel in float64."""
    x = ((images.astype(np.float64) / 255.0 - MEAN) / STD).reshape(len(images), -1)
    dense, head = params["dense"], params["head"]
    f = np.maximum(x @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"]), 0.0)
    logits = f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"])
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return np.concatenate([f, np.ones((len(f), 1))], 1).T @ p / len(labels)


def build_adapt(n, *, batch_size, heldout_size, heldout_every, donate=False):
    model = HeadModel()
    policy = make_policy("adapt_sb", beta=1.0, batch_size=batch_size, history_size=16,
                         update_every=1, prime_epochs=0)
    tx = steps.make_optimizer(0.9, True, 5e-4)
    fns = steps.make_step_fns(
        model=model, policy=policy, tx=tx,
        lr_schedule=schedules.make_epoch_schedule("constant", 0.1, num_epochs=1),
        batch_size=batch_size, num_train=n, num_classes=NUM_CLASSES, mean=MEAN, std=STD,
        augment_cfg=steps.AugmentConfig(), aug_key=jax.random.PRNGKey(1),
        dropout_key=jax.random.PRNGKey(2), donate=donate, heldout_size=heldout_size,
        heldout_every=heldout_every,
    )
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))["params"]
    state = steps.TrainState(
        step=jnp.zeros((), jnp.int32), cursor=jnp.zeros((), jnp.int32), params=params,
        batch_stats={}, opt_state=tx.init(params),
        policy_state=policy.init(n, jax.random.PRNGKey(3)),
        queue=queue_for(batch_size, policy.max_selected), counters=steps.counters_init(),
        heldout_grad=jnp.zeros((4 + 1, NUM_CLASSES), jnp.float32),
    )
    return fns, state


def adapt_data(n, num_heldout):
    images, labels, noisy = make_data(n=n)
    held_images, held_labels, _ = make_data(n=num_heldout, seed=1)
    data = steps.DeviceData(
        jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy),
        heldout_images=jnp.asarray(held_images), heldout_labels=jnp.asarray(held_labels),
    )
    return data, held_images, held_labels


def test_heldout_gradient_refreshes_on_schedule_with_sliding_window():
    data, held_images, held_labels = adapt_data(64, num_heldout=6)
    fns, state = build_adapt(64, batch_size=4, heldout_size=4, heldout_every=2)
    ids = jnp.arange(64, dtype=jnp.int32).reshape(16, 4)
    valid = jnp.ones((16, 4), bool)
    params_by_step = {}
    grads_by_step = {}
    steps_seen = set()
    for _ in range(12):
        steps_seen.add(int(state.step))
        params_by_step.setdefault(int(state.step), state.params)
        state, _ = fns.train_dispatch(state, data, ids, valid, jnp.int32(0))
        # The gradient a dispatch used is the one refreshed at its start.
        grads_by_step.setdefault(int(state.step) - 1, np.asarray(state.heldout_grad))
    assert int(state.step) >= 5
    for step in (0, 2, 4):
        window = (np.arange(4) + (step // 2) * 4) % 6  # Windows 0-3, 4-5+0-1, 2-5.
        expected = numpy_head_gradient(params_by_step[step], held_images[window],
                                       held_labels[window])
        np.testing.assert_allclose(grads_by_step[step], expected, rtol=1e-4, atol=1e-6)
    # Between refreshes the gradient is kept: step 1 trained with step 0's gradient.
    np.testing.assert_array_equal(grads_by_step[1], grads_by_step[0])
    assert int(state.policy_state.num_updates) > 0
    c = state.counters
    assert int(c.examples_scored) == int(c.examples_seen)  # prime_epochs=0: all scored.
    # One refresh per step that is a multiple of 2, however many dispatches saw that step
    # (dispatches that train nothing, at the end of the epoch, must not repeat it).
    assert int(c.examples_heldout) == 4 * len({s for s in steps_seen if s % 2 == 0})
    again, _ = fns.train_dispatch(state, data, ids, valid, jnp.int32(0))
    again, _ = fns.train_dispatch(again, data, ids, valid, jnp.int32(0))
    assert int(again.step) == int(state.step)  # the epoch's chunks are used up
    assert int(again.counters.examples_heldout) == int(c.examples_heldout)


def test_adapt_sb_dispatch_traced_once():
    data, _, _ = adapt_data(32, num_heldout=8)
    fns, state = build_adapt(32, batch_size=8, heldout_size=4, heldout_every=3, donate=True)
    ids = jnp.arange(32, dtype=jnp.int32).reshape(4, 8)
    for epoch in range(2):
        state, _ = run_epoch(fns, state, data, ids, jnp.ones((4, 8), bool), epoch)
    assert fns.train_dispatch._cache_size() == 1


def test_missing_heldout_data_is_a_clear_error():
    images, labels, noisy = make_data(n=16)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    fns, state = build_adapt(16, batch_size=4, heldout_size=4, heldout_every=1)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(4, 4)
    with pytest.raises(ValueError, match="needs a held-out gradient"):
        fns.train_dispatch(state, data, ids, jnp.ones((4, 4), bool), jnp.int32(0))


def test_noisy_selected_counts_selected_mislabeled_examples():
    images, labels, noisy = make_data(n=12)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    # topk with beta=1 keeps the 2 highest-loss examples of each chunk of 4.
    policy = make_policy("topk", beta=1.0, batch_size=4, prime_epochs=0)
    fns, state = build(policy, batch_size=4, n=12)
    ids = jnp.asarray([[0, 5, 6, 7], [1, 2, 8, 9], [3, 4, 10, 11]], jnp.int32)
    new, _ = run_epoch(fns, state, data, ids, jnp.ones((3, 4), bool), 0)
    # The first two chunks are scored by the initial model (the first step needs 4 queued).
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    x = ((images / 255.0 - MEAN) / STD).reshape(12, -1)
    logits = x @ w + b
    losses = np.log(np.exp(logits).sum(1)) - logits[np.arange(12), labels]
    first_two = [row[np.argsort(-losses[row], kind="stable")[:2]] for row in np.asarray(ids)[:2]]
    assert int(new.counters.examples_selected) == 6
    # The third chunk (scored after the first optimizer step) holds no corrupted id.
    expected = int(np.sum(noisy[np.concatenate(first_two)]))
    assert 0 < expected < 3  # The selection, not the ids alone, decides the count.
    assert int(new.counters.noisy_selected) == expected


def test_dispatches_that_train_nothing_do_not_repeat_the_heldout_refresh():
    data, _, _ = adapt_data(32, num_heldout=8)
    fns, state = build_adapt(32, batch_size=4, heldout_size=4, heldout_every=1)
    ids = jnp.arange(32, dtype=jnp.int32).reshape(8, 4)
    valid = jnp.ones((8, 4), bool)
    state, _ = run_epoch(fns, state, data, ids, valid, 0)
    for _ in range(2):  # the host's extra dispatch after the epoch, and one more
        state, done = fns.train_dispatch(state, data, ids, valid, jnp.int32(0))
        assert bool(done)
    # Every step from 0 to the last is refreshed exactly once (heldout_every=1).
    assert int(state.counters.examples_heldout) == 4 * (int(state.step) + 1)


def test_cost_pieces_are_the_dispatch_pieces():
    """score_chunk gives the dispatch's inference losses; train_batch its optimizer step."""
    images, labels, noisy = make_data()
    policy = make_policy("traditional", batch_size=4)
    fns, state = build(policy, batch_size=4)
    data = steps.DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(noisy))
    ids = jnp.asarray([3, 1, 4, 0], jnp.int32)
    losses, logits = fns.score_chunk(state, data, ids, jnp.int32(0))
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    x = ((images[np.asarray(ids)].astype(np.float64) / 255.0 - MEAN) / STD).reshape(4, -1)
    z = x @ w + b
    np.testing.assert_allclose(logits, z, rtol=1e-5, atol=1e-5)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    np.testing.assert_allclose(losses, -log_p[np.arange(4), labels[np.asarray(ids)]],
                               rtol=1e-5, atol=1e-5)
    params, batch_stats, _ = fns.train_batch(state, data, ids, jnp.int32(0))
    w1, b1 = numpy_sgd_reference(state.params, images, labels, [np.asarray(ids)],
                                 0.1, 0.9, 5e-4)
    np.testing.assert_allclose(params["Dense_0"]["kernel"], w1, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(params["Dense_0"]["bias"], b1, rtol=2e-5, atol=2e-6)
    # Not donated: the state can be timed again.
    assert not state.params["Dense_0"]["kernel"].is_deleted()
