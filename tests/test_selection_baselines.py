"""traditional, random and topk against NumPy references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax.selection import ChunkScores, random, topk, traditional
from sb_jax.selection.baselines import topk_count


@pytest.fixture(autouse=True)
def fresh_trace_counter():
    """assert_max_traces counts per source text: policies sharing a body share a count."""
    chex.clear_trace_counter()



def jit_policy(policy):
    """The policy with its per-chunk functions jitted (eager dispatch is slow in tests)."""
    return policy._replace(
        needs_scoring=jax.jit(policy.needs_scoring),
        select=jax.jit(policy.select),
        record_trained=jax.jit(policy.record_trained),
    )


def chunk(valid, losses) -> ChunkScores:
    valid = jnp.asarray(valid, bool)
    size = valid.shape[0]
    return ChunkScores(
        ids=jnp.arange(size, dtype=jnp.int32),
        valid=valid,
        scored=valid,
        losses=jnp.asarray(losses, jnp.float32),
        logits=jnp.zeros((size, 2), jnp.float32),
        labels=jnp.zeros((size,), jnp.int32),
    )


def selected_positions(selection) -> np.ndarray:
    valid = np.asarray(selection.valid)
    count = int(valid.sum())
    assert valid[:count].all() and not valid[count:].any()  # Valid entries first.
    return np.asarray(selection.indices)[:count]


def test_traditional_keeps_every_valid_example_and_never_scores():
    policy = jit_policy(traditional(batch_size=8))
    assert (policy.chunk_size, policy.max_selected) == (8, 8)
    state = policy.init(100, jax.random.key(0))
    valid = np.arange(8) < 5
    select = jax.jit(policy.select)
    for epoch in [0, 3]:
        needs = policy.needs_scoring(state, jnp.arange(8), jnp.asarray(valid), jnp.int32(epoch))
        assert not np.any(needs)
        selection, state = select(chunk(valid, np.zeros(8)), state, jnp.int32(epoch))
        np.testing.assert_array_equal(selected_positions(selection), np.arange(5))
        np.testing.assert_array_equal(np.asarray(selection.weights)[:5], 1.0)


def count_selected(policy, losses, epoch=1, valid=None):
    """Total examples kept over a stream of chunks (rows of `losses`), in one scan."""
    state = policy.init(losses.size, jax.random.key(0))
    if valid is None:
        valid = np.ones(losses.shape, bool)

    def step(state, xs):
        chunk_losses, chunk_valid = xs
        selection, state = policy.select(chunk(chunk_valid, chunk_losses), state, epoch)
        return state, selection.valid

    _, kept = jax.lax.scan(step, state, (jnp.asarray(losses), jnp.asarray(valid)))
    return np.asarray(kept)


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_random_fraction_is_one_over_beta_plus_one(beta):
    losses = np.random.default_rng(0).lognormal(size=(200, 128)).astype(np.float32)
    kept = count_selected(random(beta, batch_size=128), losses)
    assert abs(kept.mean() - 1 / (beta + 1)) < 0.03, kept.mean()


def test_random_ignores_losses_and_padding():
    policy = jit_policy(random(1.0, batch_size=64))
    state = policy.init(64, jax.random.key(5))
    valid = np.arange(64) < 50
    select = jax.jit(policy.select)
    needs = policy.needs_scoring(state, jnp.arange(64), jnp.asarray(valid), jnp.int32(1))
    assert not np.any(needs)
    rng = np.random.default_rng(0)
    first, _ = select(chunk(valid, rng.random(64)), state, jnp.int32(1))
    second, _ = select(chunk(valid, 100 * rng.random(64)), state, jnp.int32(1))
    chex.assert_trees_all_equal(first, second)
    assert np.all(selected_positions(first) < 50)


def test_random_primes_and_draws_fresh_numbers_each_call():
    policy = random(2.0, batch_size=32)
    state = policy.init(32, jax.random.key(0))
    select = jax.jit(policy.select)
    priming, state = select(chunk(np.ones(32, bool), np.zeros(32)), state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(priming), np.arange(32))
    first, state = select(chunk(np.ones(32, bool), np.zeros(32)), state, jnp.int32(1))
    second, state = select(chunk(np.ones(32, bool), np.zeros(32)), state, jnp.int32(1))
    assert not np.array_equal(np.asarray(first.valid), np.asarray(second.valid))


def reference_topk(losses, valid, beta):
    num_valid = int(np.sum(valid))
    keep = 0 if num_valid == 0 else max(1, topk_count(num_valid, beta))
    order = np.argsort(-np.where(valid, losses, -np.inf), kind="stable")
    return np.sort(order[:keep])


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0, 4.0])
def test_topk_selects_exactly_the_largest_losses(beta):
    policy = topk(beta, batch_size=20)
    state = policy.init(100, jax.random.key(0))
    select = jax.jit(policy.select)
    rng = np.random.default_rng(int(beta))
    for num_valid in [20, 20, 13, 1, 7]:
        losses = np.round(rng.random(20), 1).astype(np.float32)  # Ties included.
        valid = np.arange(20) < num_valid
        losses[~valid] = 1e9
        selection, state = select(chunk(valid, losses), state, jnp.int32(2))
        np.testing.assert_array_equal(
            selected_positions(selection), reference_topk(losses, valid, beta)
        )


def test_topk_count_rounds_half_up():
    assert [topk_count(128, b) for b in (1, 2, 3, 4)] == [64, 43, 32, 26]
    assert topk_count(5, 1) == 3  # 2.5 -> 3, where Python's round() gives 2.


def test_topk_primes_without_scoring():
    policy = jit_policy(topk(3.0, batch_size=8))
    state = policy.init(10, jax.random.key(0))
    valid = jnp.arange(8) < 6
    assert not np.any(policy.needs_scoring(state, jnp.arange(8), valid, jnp.int32(0)))
    np.testing.assert_array_equal(
        policy.needs_scoring(state, jnp.arange(8), valid, jnp.int32(1)), np.asarray(valid)
    )
    selection, _ = jax.jit(policy.select)(chunk(valid, np.zeros(8)), state, jnp.int32(0))
    np.testing.assert_array_equal(selected_positions(selection), np.arange(6))


@pytest.mark.parametrize("factory", [random, topk])
def test_select_is_traced_once(factory):
    policy = factory(2.0, batch_size=16)
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    state = policy.init(16, jax.random.key(0))
    for epoch in range(3):
        _, state = select(chunk(np.ones(16, bool), np.arange(16.0) * epoch), state, epoch)
