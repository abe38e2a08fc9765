"""The on-device FIFO of selected ids against a Python deque."""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax.selection import (
    min_queue_capacity,
    queue_for,
    queue_init,
    queue_pop,
    queue_push,
)

BATCH, MAX_SELECTED = 6, 5

@pytest.fixture(autouse=True)
def fresh_trace_counter():
    """assert_max_traces counts per source text: policies sharing a body share a count."""
    chex.clear_trace_counter()



def test_push_pop_preserves_order_like_a_deque():
    rng = np.random.default_rng(0)
    queue = queue_for(BATCH, MAX_SELECTED)
    assert queue.ids.shape == (BATCH + MAX_SELECTED - 1,)
    push = jax.jit(chex.assert_max_traces(queue_push, n=1))
    pop = jax.jit(chex.assert_max_traces(queue_pop, n=1), static_argnums=1)
    reference = collections.deque()
    next_id, batches = 0, 0
    for _ in range(60):
        ids = np.arange(next_id, next_id + MAX_SELECTED)
        next_id += MAX_SELECTED
        weights = rng.random(MAX_SELECTED).astype(np.float32)
        valid = rng.random(MAX_SELECTED) < 0.6
        queue = push(queue, jnp.asarray(ids), jnp.asarray(weights), jnp.asarray(valid))
        reference.extend(zip(ids[valid], weights[valid], strict=True))
        assert int(queue.size) == len(reference)
        while int(queue.size) >= BATCH:  # The trainer's loop.
            got_ids, got_weights, got_valid, queue = pop(queue, BATCH)
            expected = [reference.popleft() for _ in range(BATCH)]
            np.testing.assert_array_equal(got_ids, [i for i, _ in expected])
            np.testing.assert_array_equal(got_weights, [w for _, w in expected])
            assert np.all(got_valid)
            batches += 1
    assert batches > 10
    assert int(queue.num_dropped) == 0
    # End-of-epoch flush: a partial batch with the missing entries marked invalid.
    remaining = len(reference)
    got_ids, got_weights, got_valid, queue = pop(queue, BATCH)
    np.testing.assert_array_equal(got_valid, np.arange(BATCH) < remaining)
    np.testing.assert_array_equal(got_ids[:remaining], [i for i, _ in reference])
    np.testing.assert_array_equal(got_weights[remaining:], 0.0)
    assert int(queue.size) == 0


@pytest.mark.parametrize("spare", [0, -1])
def test_minimum_capacity_is_exactly_enough(spare):
    capacity = min_queue_capacity(BATCH, MAX_SELECTED) + spare
    queue = queue_init(capacity)
    ids, weights = jnp.arange(MAX_SELECTED), jnp.ones(MAX_SELECTED)
    valid = jnp.ones(MAX_SELECTED, bool)
    push, pop = jax.jit(queue_push), jax.jit(queue_pop, static_argnums=1)
    for _ in range(20):  # Full pushes reach B - 1 waiting before a push of S.
        queue = push(queue, ids, weights, valid)
        if int(queue.size) >= BATCH:
            *_, queue = pop(queue, BATCH)
    assert (int(queue.num_dropped) == 0) == (spare == 0)


def test_overflow_is_counted_not_silent():
    queue = queue_init(4)
    push = jax.jit(queue_push)
    queue = push(queue, jnp.arange(3), jnp.ones(3), jnp.ones(3, bool))
    queue = push(queue, jnp.arange(3, 6), jnp.ones(3), jnp.ones(3, bool))
    assert int(queue.size) == 4 and int(queue.num_dropped) == 2
    np.testing.assert_array_equal(queue.ids, [0, 1, 2, 3])


def test_queue_for_rejects_a_capacity_that_can_overflow():
    assert min_queue_capacity(128, 128) == 255
    assert queue_for(128, 128, capacity=300).ids.shape == (300,)
    with pytest.raises(ValueError, match="capacity >= 255"):
        queue_for(128, 128, capacity=254)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: queue_init(0), "capacity"),
        (lambda: queue_for(0, 4), "batch_size"),
        (lambda: queue_for(4, 0), "max_selected"),
        (lambda: queue_pop(queue_init(4), 5), "n <= capacity"),
        (lambda: queue_pop(queue_init(4), 0), "n must be"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()
