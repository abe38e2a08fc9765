"""The policy registry, the protocol every policy keeps, and hyperparameter validation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sb_jax.selection import POLICIES, ChunkScores, SelectionPolicy, make_policy

SMALL = {
    "traditional": dict(batch_size=8),
    "sb": dict(beta=1.0, batch_size=8, history_size=16),
    "stale_sb": dict(beta=1.0, batch_size=8, history_size=16, staleness=2),
    "random": dict(beta=1.0, batch_size=8),
    "topk": dict(beta=1.0, batch_size=8),
    "kath18": dict(beta=1.0, batch_size=4, tau_threshold=1e-3),  # Sampling on at once.
    "adapt_sb": dict(beta=1.0, batch_size=8, history_size=16, update_every=2),
    "rho_loss": dict(beta=1.0, batch_size=8),
}

@pytest.fixture(autouse=True)
def fresh_trace_counter():
    """assert_max_traces counts per source text: policies sharing a body share a count."""
    chex.clear_trace_counter()



def test_every_registered_policy_has_a_small_config():
    assert set(SMALL) == set(POLICIES)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_policy_protocol(name):
    """Shapes, padding and single tracing, the same for every policy."""
    policy = make_policy(name, **SMALL[name])
    assert isinstance(policy, SelectionPolicy) and policy.name == name
    size = policy.chunk_size
    num_examples = 3 * size
    state = policy.init(num_examples, jax.random.key(0))
    needs_scoring = jax.jit(chex.assert_max_traces(policy.needs_scoring, n=1))
    select = jax.jit(chex.assert_max_traces(policy.select, n=1))
    record_trained = jax.jit(chex.assert_max_traces(policy.record_trained, n=1))
    rng = np.random.default_rng(0)
    for epoch in range(3):
        for start in range(0, num_examples, size):
            ids = jnp.arange(start, start + size, dtype=jnp.int32)
            valid = jnp.asarray(rng.random(size) < 0.7)
            needs = needs_scoring(state, ids, valid, jnp.int32(epoch))
            assert needs.shape == (size,) and needs.dtype == jnp.bool_
            assert not np.any(np.asarray(needs) & ~np.asarray(valid))
            losses = jnp.where(needs, jnp.asarray(rng.lognormal(size=size), jnp.float32), 0.0)
            scores = ChunkScores(
                ids=ids,
                valid=valid,
                scored=needs,
                losses=losses,
                logits=jnp.where(needs[:, None], jnp.asarray(rng.normal(size=(size, 3))), 0.0),
                labels=jnp.asarray(rng.integers(0, 3, size), jnp.int32),
                # Only for the policies that ask (AdaptSB): features D = 4, G [D + 1, 3].
                features=jnp.where(needs[:, None], jnp.asarray(rng.normal(size=(size, 4))), 0.0)
                if policy.needs_features else None,
                heldout_grad=jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
                if policy.needs_heldout_grad else None,
            )
            selection, state = select(scores, state, jnp.int32(epoch))
            chex.assert_shape(
                [selection.indices, selection.valid, selection.weights], (policy.max_selected,)
            )
            chosen = np.asarray(selection.indices)[np.asarray(selection.valid)]
            assert np.all(np.asarray(valid)[chosen]), "padding was selected"
            count = int(np.sum(selection.valid))
            assert np.all(np.asarray(selection.valid)[:count])  # Valid entries first.
            state = record_trained(
                ids[selection.indices],
                losses[selection.indices],
                selection.valid,
                state,
                jnp.int32(epoch),
            )


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown selection policy 'sbb'.*'stale_sb'"):
        make_policy("sbb", beta=1)


def test_unknown_and_missing_hyperparameters():
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['betta'\]"):
        make_policy("sb", betta=1)
    with pytest.raises(ValueError, match=r"needs hyperparameter\(s\) \['beta'\]"):
        make_policy("kath18")


BAD_HYPERPARAMETERS = [
    ("sb", dict(beta=0), "beta"),
    ("sb", dict(beta=-1.0), "beta"),
    ("sb", dict(beta=float("nan")), "beta"),
    ("sb", dict(beta=float("inf")), "beta"),
    ("sb", dict(beta="2"), "beta"),
    ("sb", dict(beta=True), "beta"),
    ("sb", dict(beta=1, history_size=0), "history_size"),
    ("sb", dict(beta=1, history_size=2.5), "history_size"),
    ("sb", dict(beta=1, batch_size=0), "batch_size"),
    ("sb", dict(beta=1, prime_epochs=-1), "prime_epochs"),
    ("sb", dict(beta=1, p_min=-0.1), "p_min"),
    ("sb", dict(beta=1, p_min=1.5), "p_min"),
    ("stale_sb", dict(beta=1, staleness=0), "staleness"),
    ("stale_sb", dict(beta=0), "beta"),
    ("stale_sb", dict(beta=1, p_min=2), "p_min"),
    ("traditional", dict(batch_size=0), "batch_size"),
    ("random", dict(beta=0), "beta"),
    ("random", dict(beta=1, batch_size=-3), "batch_size"),
    ("topk", dict(beta=-2), "beta"),
    ("topk", dict(beta=1, prime_epochs=-1), "prime_epochs"),
    ("kath18", dict(beta=0), "beta"),
    ("kath18", dict(beta=1, score="gradnorm"), "score must be one of"),
    ("kath18", dict(beta=1, tau_source="ema"), "tau_source must be one of"),
    ("kath18", dict(beta=1, tau_ema=1.0), "tau_ema"),
    ("kath18", dict(beta=1, tau_threshold=0.0), "tau_threshold"),
    ("kath18", dict(beta=1, reweight="yes"), "reweight"),
    ("kath18", dict(beta=1, batch_size=0), "batch_size"),
    ("adapt_sb", dict(beta=0), "beta"),
    ("adapt_sb", dict(beta=1, floor=0.5), "floor"),
    ("rho_loss", dict(beta=0), "beta"),
    ("rho_loss", dict(beta=1, batch_size=0), "batch_size"),
]


@pytest.mark.parametrize("name,hyperparams,message", BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_raise(name, hyperparams, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **hyperparams)


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("num_examples", [0, 2.5])
def test_bad_num_examples_at_init(name, num_examples):
    policy = make_policy(name, **SMALL[name])
    with pytest.raises(ValueError, match="num_examples"):
        policy.init(num_examples, jax.random.key(0))
