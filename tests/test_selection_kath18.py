"""kath18 importance sampling: distribution, weights and the variance-reduction switch."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from sb_jax.selection import ChunkScores, kath18
from sb_jax.selection.kath18 import logit_gradient_norm, variance_reduction

BATCH, BETA, NUM_CLASSES = 8, 2.0, 4
POOL = 24  # BATCH * (BETA + 1)

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


def pool_chunk(losses, valid, logits=None, labels=None) -> ChunkScores:
    valid = jnp.asarray(valid, bool)
    size = valid.shape[0]
    if logits is None:
        logits = np.zeros((size, NUM_CLASSES))
    if labels is None:
        labels = np.zeros(size, int)
    return ChunkScores(
        ids=jnp.arange(size, dtype=jnp.int32),
        valid=valid,
        scored=valid,
        losses=jnp.asarray(losses, jnp.float32),
        logits=jnp.asarray(logits, jnp.float32),
        labels=jnp.asarray(labels, jnp.int32),
    )


def reference_grad_norm(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return np.sqrt((p**2).sum(axis=1))


def reference_tau(scores):
    """The paper's form, 1 / sqrt(1 - ||g - u||^2 / ||g||^2), in float64."""
    scores = np.asarray(scores, np.float64)
    g = scores / scores.sum()
    u = 1.0 / len(scores)
    return 1.0 / np.sqrt(1.0 - np.sum((g - u) ** 2) / np.sum(g**2))


def test_shapes_and_default_threshold():
    policy = jit_policy(kath18(BETA, batch_size=BATCH))
    assert (policy.chunk_size, policy.max_selected) == (POOL, BATCH)
    state = policy.init(100, jax.random.key(0))
    # (B + 3b) / (3b) = (24 + 24) / 24 = 2: just above tau 2 switches sampling on.
    on = state._replace(tau=jnp.float32(2.01))
    off = state._replace(tau=jnp.float32(1.99))
    valid = jnp.ones(POOL, bool)
    assert np.all(policy.needs_scoring(on, jnp.arange(POOL), valid, jnp.int32(0)))
    assert not np.any(policy.needs_scoring(off, jnp.arange(POOL), valid, jnp.int32(0)))


def test_logit_gradient_norm_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, NUM_CLASSES)) * 3
    labels = rng.integers(0, NUM_CLASSES, 10)
    np.testing.assert_allclose(
        logit_gradient_norm(jnp.asarray(logits, jnp.float32), jnp.asarray(labels)),
        reference_grad_norm(logits, labels),
        rtol=1e-5,
    )


def test_variance_reduction_matches_paper_formula():
    rng = np.random.default_rng(1)
    tau = jax.jit(variance_reduction)
    for scores in [rng.lognormal(size=30), rng.random(7) + 0.5, np.array([0.0, 0, 3, 0])]:
        valid = np.ones(len(scores), bool)
        got = float(tau(jnp.asarray(scores, jnp.float32), jnp.asarray(valid)))
        assert got == pytest.approx(reference_tau(scores), rel=1e-5)
    assert float(tau(jnp.ones(30), jnp.ones(30, bool))) == pytest.approx(1.0)
    # Padding is left out: only the 4 valid entries count.
    padded = jnp.array([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = jnp.array([True, True, True, True, False])
    assert float(tau(padded, mask)) == pytest.approx(reference_tau([1, 2, 3, 4]))


def draw_many(policy, chunk_scores, num_draws, tau=10.0):
    state = policy.init(POOL, jax.random.key(42))._replace(tau=jnp.float32(tau))

    def step(state, _):
        selection, new_state = policy.select(chunk_scores, state, jnp.int32(3))
        # Hold tau fixed so every draw uses importance sampling.
        return new_state._replace(tau=state.tau), selection

    _, selections = jax.lax.scan(step, state, None, length=num_draws)
    return jax.tree.map(np.asarray, selections)


@pytest.mark.parametrize("score", ["loss", "grad_norm_bound"])
def test_importance_sampling_distribution_chi_square(score):
    rng = np.random.default_rng(2)
    losses = rng.lognormal(size=POOL).astype(np.float32)
    losses[5] = 0.0  # A zero score is never drawn.
    logits = (rng.normal(size=(POOL, NUM_CLASSES)) * 2).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, POOL)
    logits[5] = 0.0
    logits[5, labels[5]] = 50.0  # Confident and right: gradient norm about 0.
    valid = np.arange(POOL) < 20
    policy = kath18(BETA, score=score, batch_size=BATCH)
    selections = draw_many(policy, pool_chunk(losses, valid, logits, labels), 700)
    # A partial pool of 20 keeps the fraction b/B: round(20 * 8 / 24) = 7 draws.
    assert np.all(selections.valid == (np.arange(BATCH) < 7))
    drawn = selections.indices[selections.valid]
    scores = losses if score == "loss" else reference_grad_norm(logits, labels)
    expected = np.where(valid, scores, 0.0).astype(np.float64)
    expected = expected / expected.sum()
    counts = np.bincount(drawn, minlength=POOL)
    assert counts[~valid].sum() == 0 and counts[5] == 0
    support = expected > 1e-6
    expected_counts = expected[support] / expected[support].sum() * drawn.size
    result = stats.chisquare(counts[support], expected_counts)
    assert result.pvalue > 1e-3, result


def test_reweighting_is_one_over_pool_size_times_probability():
    rng = np.random.default_rng(3)
    losses = rng.lognormal(size=POOL).astype(np.float32)
    valid = np.arange(POOL) < 18
    policy = kath18(BETA, reweight=True, batch_size=BATCH)
    selections = draw_many(policy, pool_chunk(losses, valid), 5)
    g = np.where(valid, losses, 0.0) / losses[valid].sum()
    expected = np.where(
        selections.valid, 1.0 / (valid.sum() * g[selections.indices]), 0.0
    )
    np.testing.assert_allclose(selections.weights, expected, rtol=1e-4)
    assert selections.valid.sum() == 5 * 6  # round(18 * 8 / 24) = 6 per pool.
    unweighted = draw_many(kath18(BETA, batch_size=BATCH), pool_chunk(losses, valid), 5)
    np.testing.assert_array_equal(unweighted.weights, unweighted.valid.astype(np.float32))


def test_off_takes_first_valid_entries_and_trained_losses_drive_tau():
    policy = jit_policy(kath18(BETA, batch_size=BATCH, tau_ema=0.9))
    threshold = 2.0
    state = policy.init(100, jax.random.key(0))
    select, record = policy.select, policy.record_trained
    valid = np.ones(POOL, bool)
    valid[[1, 4]] = False
    pool = pool_chunk(np.zeros(POOL), valid)

    # Off: no scoring, the first b valid pool entries, weight 1, tau untouched by select.
    assert not np.any(policy.needs_scoring(state, pool.ids, pool.valid, jnp.int32(0)))
    selection, state = select(pool, state, jnp.int32(0))
    kept = 7  # round(22 * 8 / 24): a partial pool keeps the fraction b/B.
    np.testing.assert_array_equal(selection.valid, np.arange(BATCH) < kept)
    np.testing.assert_array_equal(
        np.asarray(selection.indices)[:kept], np.flatnonzero(valid)[:kept]
    )
    np.testing.assert_array_equal(selection.weights, np.arange(BATCH) < kept)
    assert float(state.tau) == 0.0 and not bool(state.sampled)

    # Skewed training losses push the EMA of tau up until sampling switches on.
    skewed = np.array([20.0] + [0.1] * (BATCH - 1), np.float32)
    trained_valid = jnp.ones(BATCH, bool)
    expected_tau, steps = 0.0, 0
    while expected_tau <= threshold:
        state = record(jnp.arange(BATCH), jnp.asarray(skewed), trained_valid, state, jnp.int32(0))
        expected_tau = 0.9 * expected_tau + 0.1 * reference_tau(skewed)
        steps += 1
        assert float(state.tau) == pytest.approx(expected_tau, rel=1e-5)
    assert steps > 1
    assert np.all(policy.needs_scoring(state, pool.ids, pool.valid, jnp.int32(0))[valid])

    # On: the pool is sampled, tau follows the pool's scores, training losses are ignored.
    uniform_pool = pool_chunk(np.ones(POOL), valid)
    tau_before = float(state.tau)
    selection, state = select(uniform_pool, state, jnp.int32(0))
    assert bool(state.sampled)
    assert float(state.tau) == pytest.approx(0.9 * tau_before + 0.1 * 1.0, rel=1e-5)
    assert np.all(valid[np.asarray(selection.indices)])
    tau_after_select = float(state.tau)
    state = record(jnp.arange(BATCH), jnp.asarray(skewed), trained_valid, state, jnp.int32(0))
    assert float(state.tau) == tau_after_select

    # Uniform pools bring tau back under the threshold: sampling switches off.
    while float(state.tau) > threshold:
        _, state = select(uniform_pool, state, jnp.int32(0))
    assert not np.any(policy.needs_scoring(state, pool.ids, pool.valid, jnp.int32(0)))


def test_pool_tau_source_scores_while_off():
    policy = jit_policy(kath18(BETA, batch_size=BATCH, tau_source="pool"))
    state = policy.init(100, jax.random.key(0))
    valid = jnp.ones(POOL, bool)
    assert np.all(policy.needs_scoring(state, jnp.arange(POOL), valid, jnp.int32(0)))
    losses = np.linspace(0.1, 5.0, POOL).astype(np.float32)
    selection, state = policy.select(pool_chunk(losses, valid), state, jnp.int32(0))
    np.testing.assert_array_equal(selection.indices, np.arange(BATCH))  # Still off.
    assert float(state.tau) == pytest.approx(0.1 * reference_tau(losses), rel=1e-5)
    tau = float(state.tau)
    state = policy.record_trained(
        jnp.arange(BATCH), jnp.ones(BATCH), jnp.ones(BATCH, bool), state, jnp.int32(0)
    )
    assert float(state.tau) == tau


def test_select_and_record_are_traced_once():
    policy = kath18(BETA, batch_size=BATCH, score="grad_norm_bound", reweight=True)
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    record = jax.jit(chex.assert_max_traces(policy.record_trained, n=1))
    state = policy.init(POOL, jax.random.key(0))
    rng = np.random.default_rng(0)
    for epoch in range(3):
        pool = pool_chunk(rng.random(POOL), np.ones(POOL, bool), rng.normal(size=(POOL, 4)))
        selection, state = select(pool, state, jnp.int32(epoch))
        state = record(selection.indices, jnp.ones(BATCH), selection.valid, state, epoch)
