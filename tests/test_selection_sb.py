"""Selective-Backprop and Stale-SB against a slow NumPy reference."""

from __future__ import annotations

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax.selection import ChunkScores, _common, sb, stale_sb

NUM_CLASSES = 3

@pytest.fixture(autouse=True)
def fresh_trace_counter():
    """assert_max_traces counts per source text: policies sharing a body share a count."""
    chex.clear_trace_counter()



def chunk(ids, valid, losses, scored=None) -> ChunkScores:
    ids = jnp.asarray(ids, jnp.int32)
    valid = jnp.asarray(valid, bool)
    if scored is None:
        scored = valid
    return ChunkScores(
        ids=ids,
        valid=valid,
        scored=jnp.asarray(scored, bool),
        losses=jnp.asarray(losses, jnp.float32),
        logits=jnp.zeros((ids.shape[0], NUM_CLASSES), jnp.float32),
        labels=jnp.zeros(ids.shape, jnp.int32),
    )


def uniforms(key, counter, size) -> np.ndarray:
    """The draws behind the counter-th `select` call (the documented key schedule)."""
    return np.asarray(
        jax.random.uniform(jax.random.fold_in(key, counter), (size,), jnp.float32)
    )


def jit_policy(policy):
    """The policy with its per-chunk functions jitted (eager dispatch is slow in tests)."""
    return policy._replace(
        needs_scoring=jax.jit(policy.needs_scoring),
        select=jax.jit(policy.select),
        record_trained=jax.jit(policy.record_trained),
    )


class ReferenceSB:
    """Selective-Backprop, written the obvious way."""

    def __init__(self, beta, history_size, p_min=0.0):
        self.beta, self.p_min = beta, p_min
        self.history = collections.deque(maxlen=history_size)

    def probabilities(self, losses, valid):
        losses = np.asarray(losses, np.float32)
        for loss, is_valid in zip(losses, valid, strict=True):
            if is_valid:
                self.history.append(loss)
        h = np.array(self.history, np.float32)
        pct = np.array(
            [np.sum(h < loss) / max(len(h), 1) for loss in losses], np.float32
        )
        return np.maximum(np.float32(self.p_min), pct ** np.float32(self.beta))

    def select(self, losses, valid, draws):
        probs = self.probabilities(losses, valid)
        return np.flatnonzero(np.asarray(valid) & (draws < probs))


def selected_positions(selection) -> np.ndarray:
    valid = np.asarray(selection.valid)
    # Valid entries must come first.
    assert not np.any(valid[np.argmin(valid):]) or valid.all()
    return np.asarray(selection.indices)[valid]


def history_in_order(history: _common.LossHistory) -> np.ndarray:
    values = np.asarray(history.values)
    count, size = int(history.count), values.shape[0]
    return np.roll(values, -int(history.next_slot))[size - count:]


def test_history_fifo_wraparound_matches_deque():
    rng = np.random.default_rng(0)
    size = 5
    history = _common.history_init(size)
    reference = collections.deque(maxlen=size)
    append = jax.jit(_common.history_append)
    for chunk_size in [3, 2, 4, 8, 1, 6]:  # 8 > size exercises "keep the last R".
        losses = rng.random(chunk_size).astype(np.float32)
        valid = rng.random(chunk_size) < 0.7
        history = append(history, jnp.asarray(losses), jnp.asarray(valid))
        reference.extend(losses[valid])
        np.testing.assert_array_equal(history_in_order(history), np.array(reference))


def test_percentile_is_strict_and_uses_updated_history():
    append = jax.jit(_common.history_append)
    history = append(_common.history_init(8), jnp.array([2.0, 5.0]), jnp.array([True, True]))
    losses = jnp.array([1.0, 2.0, 2.0, 3.0])
    updated = append(history, losses, jnp.ones(4, bool))
    pct = np.asarray(jax.jit(_common.history_percentiles)(updated, losses))
    reference_history = np.array([2.0, 5.0, 1.0, 2.0, 2.0, 3.0])
    expected = [np.mean(reference_history < loss) for loss in np.asarray(losses)]
    np.testing.assert_allclose(pct, expected, rtol=1e-6)
    # The smallest loss of the chunk has nothing strictly below it, ties do not count.
    assert pct[0] == 0.0 and pct[1] == pct[2] == pytest.approx(1 / 6)


@pytest.mark.parametrize("beta,p_min", [(1.0, 0.0), (2.0, 0.1), (3.5, 0.0)])
def test_select_matches_reference(beta, p_min):
    rng = np.random.default_rng(1)
    chunk_size, history_size = 16, 40  # 30 chunks of 16 wrap the history many times.
    policy = sb(beta, history_size=history_size, batch_size=chunk_size, p_min=p_min)
    key = jax.random.key(7)
    state = policy.init(1000, key)
    select = jax.jit(policy.select)
    reference = ReferenceSB(beta, history_size, p_min)
    epoch = jnp.int32(1)
    for step in range(30):
        # Rounded losses make ties; some chunks end in padding with a huge loss.
        losses = np.round(rng.lognormal(size=chunk_size), 1).astype(np.float32)
        num_valid = chunk_size if step % 4 else int(rng.integers(1, chunk_size))
        valid = np.arange(chunk_size) < num_valid
        losses[~valid] = 1e9
        ids = rng.permutation(1000)[:chunk_size]
        selection, state = select(chunk(ids, valid, losses), state, epoch)
        expected = reference.select(losses, valid, uniforms(key, step, chunk_size))
        np.testing.assert_array_equal(selected_positions(selection), expected)
        np.testing.assert_array_equal(np.asarray(selection.weights)[: len(expected)], 1.0)
    assert int(state.counter) == 30
    np.testing.assert_array_equal(
        history_in_order(state.history), np.array(reference.history)
    )


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_selected_fraction_is_one_over_beta_plus_one(beta):
    # The percentile rule only sees ranks, so the loss distribution does not matter; a
    # heavy-tailed one checks nothing depends on the scale.
    chunk_size, num_chunks = 128, 200
    rng = np.random.default_rng(int(beta))
    losses = rng.lognormal(sigma=2.0, size=(num_chunks, chunk_size)).astype(np.float32)
    policy = sb(beta, history_size=1024, batch_size=chunk_size)
    state = policy.init(num_chunks * chunk_size, jax.random.key(0))
    ids = jnp.arange(chunk_size, dtype=jnp.int32)
    valid = jnp.ones(chunk_size, bool)

    def step(state, chunk_losses):
        selection, state = policy.select(chunk(ids, valid, chunk_losses), state, jnp.int32(1))
        return state, jnp.sum(selection.valid)

    _, counts = jax.lax.scan(step, state, jnp.asarray(losses))
    fraction = float(np.sum(counts)) / losses.size
    assert abs(fraction - 1 / (beta + 1)) < 0.03, fraction


def test_priming_selects_everything_without_scoring():
    policy = jit_policy(sb(2.0, history_size=16, batch_size=8, prime_epochs=2))
    state = policy.init(100, jax.random.key(0))
    ids = jnp.arange(8, dtype=jnp.int32)
    valid = jnp.arange(8) < 6
    for epoch in [0, 1]:
        assert not np.any(policy.needs_scoring(state, ids, valid, jnp.int32(epoch)))
        selection, new_state = policy.select(
            chunk(ids, valid, np.zeros(8), scored=np.zeros(8, bool)), state, jnp.int32(epoch)
        )
        np.testing.assert_array_equal(selected_positions(selection), np.arange(6))
        assert int(new_state.history.count) == 0
        state = new_state
    np.testing.assert_array_equal(
        policy.needs_scoring(state, ids, valid, jnp.int32(2)), np.asarray(valid)
    )


def test_padding_is_never_selected_and_never_enters_history():
    policy = jit_policy(sb(1.0, history_size=64, batch_size=8, p_min=1.0))  # Keeps all valid.
    state = policy.init(100, jax.random.key(0))
    valid = np.array([True, False, True, True, False, True, False, False])
    losses = np.where(valid, np.arange(8.0), 1e9)
    selection, state = policy.select(chunk(np.arange(8), valid, losses), state, jnp.int32(3))
    np.testing.assert_array_equal(selected_positions(selection), np.flatnonzero(valid))
    assert int(state.history.count) == valid.sum()
    assert np.all(history_in_order(state.history) < 1e9)


def test_select_is_traced_once():
    policy = sb(2.0, history_size=32, batch_size=8)
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    state = policy.init(100, jax.random.key(0))
    for epoch in range(4):
        losses = np.linspace(0, 1, 8) + epoch
        _, state = select(chunk(np.arange(8), np.ones(8, bool), losses), state, jnp.int32(epoch))


# --- Stale-SB ---------------------------------------------------------------------------


class ReferenceStaleSB(ReferenceSB):
    def __init__(self, beta, history_size, num_examples, staleness, prime_epochs):
        super().__init__(beta, history_size)
        self.staleness, self.prime_epochs = staleness, prime_epochs
        self.cache = np.zeros(num_examples, np.float32)
        self.scored_epoch = np.full(num_examples, -1)

    def needs_scoring(self, ids, valid, epoch):
        if epoch < self.prime_epochs:
            return np.zeros(len(ids), bool)
        last = self.scored_epoch[ids]
        return np.asarray(valid) & ((last < 0) | (epoch - last >= self.staleness))

    def select(self, ids, valid, fresh_losses, scored, epoch, draws):
        if epoch < self.prime_epochs:
            return np.flatnonzero(valid)
        fresh = np.asarray(valid) & np.asarray(scored)
        losses = np.where(fresh, fresh_losses, self.cache[ids]).astype(np.float32)
        self.cache[ids[fresh]] = fresh_losses[fresh]
        self.scored_epoch[ids[fresh]] = epoch
        return super().select(losses, valid, draws)

    def record_trained(self, ids, losses):
        self.cache[ids] = losses


def run_trainer(policy, reference, num_examples, num_epochs, key, seed):
    """A minimal trainer: scores what is asked, trains each selection right away."""
    rng = np.random.default_rng(seed)
    true_loss = rng.lognormal(size=num_examples).astype(np.float32)
    state = policy.init(num_examples, key)
    needs_scoring = jax.jit(policy.needs_scoring)
    select = jax.jit(policy.select)
    record_trained = jax.jit(policy.record_trained)
    size = policy.chunk_size
    calls = 0
    for epoch in range(num_epochs):
        order = rng.permutation(num_examples)
        order = np.concatenate([order, np.zeros(-len(order) % size, int)])
        for start in range(0, len(order), size):
            ids = order[start:start + size]
            valid = np.arange(start, start + size) < num_examples
            epoch_arr = jnp.int32(epoch)
            needs = needs_scoring(state, jnp.asarray(ids), jnp.asarray(valid), epoch_arr)
            needs = np.asarray(needs)
            if reference is not None:
                np.testing.assert_array_equal(needs, reference.needs_scoring(ids, valid, epoch))
            true_loss *= np.float32(0.97)  # Training lowers every loss a little.
            scored_losses = np.where(needs, true_loss[ids], 0.0).astype(np.float32)
            selection, state = select(chunk(ids, valid, scored_losses, needs), state, epoch_arr)
            got = selected_positions(selection)
            if reference is not None:
                expected = reference.select(
                    ids, valid, scored_losses, needs, epoch, uniforms(key, calls, size)
                )
                np.testing.assert_array_equal(got, expected)
            calls += 1
            trained = ids[got]
            train_losses = (true_loss[trained] * 1.1).astype(np.float32)  # Training mode.
            padded_ids = np.zeros(size, int)
            padded_ids[: len(got)] = trained
            padded_losses = np.zeros(size, np.float32)
            padded_losses[: len(got)] = train_losses
            state = record_trained(
                jnp.asarray(padded_ids),
                jnp.asarray(padded_losses),
                jnp.arange(size) < len(got),
                state,
                epoch_arr,
            )
            if reference is not None:
                reference.record_trained(trained, train_losses)
            yield epoch, ids, valid, needs, got, state


def test_stale_sb_schedule_and_cache_match_reference():
    num_examples, staleness, prime_epochs = 22, 3, 1
    policy = stale_sb(2.0, staleness=staleness, history_size=16, batch_size=5)
    reference = ReferenceStaleSB(2.0, 16, num_examples, staleness, prime_epochs)
    steps = list(
        run_trainer(policy, reference, num_examples, num_epochs=8, key=jax.random.key(3), seed=4)
    )
    scored_per_epoch = collections.Counter()
    for epoch, _, _, needs, _, _ in steps:
        scored_per_epoch[epoch] += int(needs.sum())
    state = steps[-1][-1]
    # Everything is scored after priming and then every `staleness` epochs, nothing else.
    expected = {e: num_examples if e in (1, 4, 7) else 0 for e in range(8)}
    assert dict(scored_per_epoch) == expected
    np.testing.assert_array_equal(np.asarray(state.scored_epoch), reference.scored_epoch)
    np.testing.assert_allclose(np.asarray(state.cached_loss), reference.cache, rtol=1e-6)


def test_stale_sb_record_trained_refreshes_loss_not_scoring_epoch():
    policy = jit_policy(stale_sb(1.0, staleness=2, history_size=8, batch_size=4))
    state = policy.init(10, jax.random.key(0))
    ids = jnp.array([3, 5, 7, 0], jnp.int32)
    epoch = jnp.int32(1)
    _, state = policy.select(chunk(ids, np.ones(4, bool), [1.0, 2.0, 3.0, 4.0]), state, epoch)
    state = policy.record_trained(
        ids, jnp.array([9.0, 8.0, 7.0, 6.0]), jnp.array([True, True, False, False]), state, epoch
    )
    np.testing.assert_array_equal(np.asarray(state.cached_loss)[[3, 5, 7, 0]], [9, 8, 3, 4])
    np.testing.assert_array_equal(np.asarray(state.scored_epoch)[[3, 5, 7, 0]], 1)
    assert not np.any(policy.needs_scoring(state, ids, jnp.ones(4, bool), jnp.int32(2)))
    assert np.all(policy.needs_scoring(state, ids, jnp.ones(4, bool), jnp.int32(3)))


def test_stale_sb_with_staleness_one_is_sb():
    key = jax.random.key(11)
    runs = []
    for policy in [
        sb(2.0, history_size=16, batch_size=5),
        stale_sb(2.0, staleness=1, history_size=16, batch_size=5),
    ]:
        runs.append(
            [got.tolist() for *_, got, _ in run_trainer(policy, None, 17, 4, key, seed=5)]
        )
    assert runs[0] == runs[1]
    assert any(len(got) < 5 for got in runs[0][8:])  # SB did drop examples after priming.


def test_stale_sb_select_is_traced_once():
    policy = stale_sb(2.0, staleness=2, history_size=32, batch_size=8)
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    needs_scoring = jax.jit(chex.assert_max_traces(policy.needs_scoring, n=1))
    state = policy.init(16, jax.random.key(0))
    ids = jnp.arange(8, dtype=jnp.int32)
    for epoch in range(4):
        needs = needs_scoring(state, ids, jnp.ones(8, bool), jnp.int32(epoch))
        losses = jnp.linspace(0, 1, 8) + epoch
        _, state = select(chunk(ids, np.ones(8, bool), losses, needs), state, jnp.int32(epoch))
