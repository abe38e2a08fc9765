"""Importance sampling of Katharopoulos & Fleuret (ICML 2018), the SB paper's kath18.

Each chunk is a *pool* of ``B = b * (beta + 1)`` examples. While importance sampling is
on, the pool is scored and ``b`` positions are drawn with replacement with probability
``g_i = s_i / sum_j s_j``, where the score ``s`` is the loss (the variant the SB paper
ran) or the norm of the loss's gradient with respect to the logits,
``||softmax(z) - onehot(y)||`` (the paper's upper bound on the per-example gradient
norm, up to a factor shared by all examples). ``reweight=True`` multiplies each drawn
example's loss by ``1 / (B g_i)`` so that the gradient stays unbiased.

Importance sampling only pays when it reduces the gradient variance enough to make up
for scoring B examples to train on b. The paper measures the variance reduction of a
sampling distribution g over N examples against uniform sampling u = 1/N as an
equivalent batch-size increase tau (their section "is importance sampling worth it",
and ``VarianceReductionCondition`` in their released code):

    1 / tau**2 = 1 - ||g - u||**2 / ||g||**2.

Because sum(g) = 1, ||g - u||**2 = ||g||**2 - 1/N, so tau = sqrt(N ||g||**2); that form
is used here since it has no cancellation. tau = 1 for uniform scores and sqrt(N) when
one example holds all the score. Scoring costs about one third of a forward-backward
step, so sampling b out of B breaks even at tau_th = (B + 3b) / (3b); importance
sampling is on while an EMA (momentum 0.9, starting at 0) of tau exceeds tau_th.

While it is off, the policy trains on the first b valid entries of the pool (the pool is
a slice of a random permutation, so that is a uniform sample) and tau has to be
estimated some other way. A partial pool of n < B valid examples at the end of an epoch
gives round(n b / B) examples (at least one), so every epoch trains on about b/B of the
data either way. ``tau_source`` picks how:

* ``"trained"`` (default, as the paper's code): the pool is not scored; tau is updated in
  ``record_trained`` from the training-mode losses of the b examples just trained on.
  Free, but b losses give a noisier estimate than B, and with
  ``score="grad_norm_bound"`` the losses only give the proxy ``1 - exp(-loss)`` (the
  true-class part of the logit-gradient norm, within a factor sqrt(2) of the norm).
* ``"pool"``: the pool is scored even while off and tau is updated from its B scores.
  Accurate and exactly the score kind in use, but every step then pays the B-example
  scoring forward pass, about (B/b)/3 of a training step, even when it is not used.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy

SCORE_KINDS = ("loss", "grad_norm_bound")
TAU_SOURCES = ("trained", "pool")


class Kath18State(NamedTuple):
    key: jax.Array
    counter: jax.Array  # int32 []: number of `select` calls so far.
    tau: jax.Array  # float32 []: EMA of the variance-reduction estimate.
    sampled: jax.Array  # bool []: whether the last `select` used importance sampling.


def logit_gradient_norm(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """||softmax(logits) - onehot(labels)||_2 per example: the cross-entropy's logit grad."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    return jnp.linalg.norm(probs - onehot, axis=-1)


def sampling_distribution(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """g_i = s_i / sum(s) over valid entries (0 elsewhere); uniform if all scores are 0."""
    scores = jnp.where(valid, jnp.maximum(scores.astype(jnp.float32), 0.0), 0.0)
    total = jnp.sum(scores)
    num_valid = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    uniform = jnp.where(valid, 1.0 / num_valid, 0.0)
    return jnp.where(total > 0, scores / jnp.where(total > 0, total, 1.0), uniform)


def variance_reduction(scores: jax.Array, valid: jax.Array) -> jax.Array:
    """tau = 1 / sqrt(1 - ||g - u||^2 / ||g||^2) = sqrt(N ||g||^2) over the valid entries."""
    g = sampling_distribution(scores, valid)
    num_valid = jnp.sum(valid).astype(jnp.float32)
    return jnp.sqrt(num_valid * jnp.sum(g**2))


def kath18(
    beta: float,
    score: str = "loss",
    reweight: bool = False,
    tau_threshold: float | None = None,
    tau_ema: float = 0.9,
    batch_size: int = 128,
    tau_source: str = "trained",
) -> SelectionPolicy:
    """Importance sampling with the variance-reduction switch of Katharopoulos & Fleuret.

    Args:
      beta: pool size B = round(b * (beta + 1)), so 1/(beta+1) of the pool is trained on.
      score: ``"loss"`` or ``"grad_norm_bound"`` (norm of the gradient w.r.t. the logits).
      reweight: multiply drawn examples' losses by 1/(B g_i) (unbiased); the SB paper's
        comparison ran without.
      tau_threshold: switch-on threshold; default (B + 3b) / (3b).
      tau_ema: momentum of the EMA of tau, in [0, 1).
      batch_size: b, the number of examples drawn per pool.
      tau_source: how tau is estimated while importance sampling is off (module doc).
    """
    beta = _common.check_beta(beta)
    batch_size = _common.check_positive_int("batch_size", batch_size)
    if score not in SCORE_KINDS:
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {score!r}.")
    if tau_source not in TAU_SOURCES:
        raise ValueError(f"tau_source must be one of {TAU_SOURCES}, got {tau_source!r}.")
    if not isinstance(reweight, bool):
        raise ValueError(f"reweight must be True or False, got {reweight!r}.")
    tau_ema = _common.check_unit_interval("tau_ema", tau_ema, closed_right=False)
    pool_size = int(round(batch_size * (beta + 1.0)))
    if tau_threshold is None:
        tau_threshold = (pool_size + 3.0 * batch_size) / (3.0 * batch_size)
    elif (
        isinstance(tau_threshold, bool)
        or not isinstance(tau_threshold, numbers.Real)
        or not math.isfinite(tau_threshold)
        or tau_threshold <= 0
    ):
        raise ValueError(
            f"tau_threshold must be a number > 0 (tau >= 1 always), got {tau_threshold!r}."
        )
    tau_threshold = float(tau_threshold)
    score_pool_while_off = tau_source == "pool"

    def ema(tau: jax.Array, estimate: jax.Array, update: jax.Array) -> jax.Array:
        return jnp.where(update, tau_ema * tau + (1.0 - tau_ema) * estimate, tau)

    def init(num_examples: int, rng: jax.Array) -> Kath18State:
        _common.check_num_examples(num_examples)
        return Kath18State(
            key=rng,
            counter=jnp.zeros((), jnp.int32),
            tau=jnp.zeros((), jnp.float32),
            sampled=jnp.zeros((), bool),
        )

    def needs_scoring(state: Kath18State, ids, valid, epoch) -> jax.Array:
        del ids, epoch
        return valid & ((state.tau > tau_threshold) | score_pool_while_off)

    def select(scores: ChunkScores, state: Kath18State, epoch) -> tuple[Selection, Kath18State]:
        del epoch
        valid = scores.valid
        num_valid = jnp.sum(valid, dtype=jnp.int32)
        # A partial pool (end of epoch) keeps the fraction b/B: round(n b / B), at least 1.
        num_drawn = jnp.floor(num_valid * (batch_size / pool_size) + 0.5).astype(jnp.int32)
        num_drawn = jnp.where(num_valid == pool_size, batch_size, num_drawn)
        num_drawn = jnp.where(num_valid > 0, jnp.clip(num_drawn, 1, batch_size), 0)
        drawn_valid = jnp.arange(batch_size) < num_drawn
        sampling = state.tau > tau_threshold

        if score == "loss":
            pool_scores = scores.losses
        else:
            pool_scores = logit_gradient_norm(scores.logits, scores.labels)
        g = sampling_distribution(pool_scores, valid)
        log_g = jnp.where(g > 0, jnp.log(jnp.where(g > 0, g, 1.0)), -jnp.inf)
        key = _common.step_key(state.key, state.counter)
        drawn = jax.random.categorical(key, log_g, shape=(batch_size,)).astype(jnp.int32)
        if reweight:
            pool_n = jnp.maximum(num_valid, 1).astype(jnp.float32)
            weights = 1.0 / (pool_n * jnp.maximum(g[drawn], 1e-30))
        else:
            weights = jnp.ones((batch_size,), jnp.float32)
        sampled = Selection(
            indices=drawn,
            valid=drawn_valid,
            weights=jnp.where(drawn_valid, weights, 0.0),
        )

        (first_valid,) = jnp.nonzero(valid, size=batch_size, fill_value=0)
        uniform = Selection(
            indices=first_valid.astype(jnp.int32),
            valid=drawn_valid,
            weights=drawn_valid.astype(jnp.float32),
        )
        selection = jax.tree.map(lambda a, b: jnp.where(sampling, a, b), sampled, uniform)

        pool_was_scored = (sampling | score_pool_while_off) & (num_valid > 0)
        tau = ema(state.tau, variance_reduction(pool_scores, valid), pool_was_scored)
        new_state = Kath18State(
            key=state.key, counter=state.counter + 1, tau=tau, sampled=sampling
        )
        return selection, new_state

    def record_trained(ids, losses, valid, state: Kath18State, epoch) -> Kath18State:
        del ids, epoch
        if score_pool_while_off:
            return state
        losses = losses.astype(jnp.float32)
        proxy = losses if score == "loss" else 1.0 - jnp.exp(-losses)
        update = ~state.sampled & jnp.any(valid)
        return state._replace(tau=ema(state.tau, variance_reduction(proxy, valid), update))

    return SelectionPolicy(
        name="kath18",
        chunk_size=pool_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )
