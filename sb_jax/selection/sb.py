"""Selective-Backprop (Jiang et al. 2019) and its Stale-SB variant.

Per chunk of b scored examples: append all b valid losses to a FIFO history of the R
most recent losses, then give each example the probability
``p = max(p_min, pct ** beta)`` with ``pct`` its loss's strict percentile in the updated
history, and keep it with an independent Bernoulli(p). Since pct is about uniform, the
kept fraction is about 1/(beta+1). During the priming epochs every example is kept and
nothing is scored.

Stale-SB caches each example's last loss and re-scores an example only when its cached
score is ``staleness`` epochs old; between re-scorings the cached loss is used for the
percentile rule and feeds the history, exactly as a fresh loss would.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy


class SBState(NamedTuple):
    key: jax.Array
    counter: jax.Array  # int32 []: number of `select` calls so far.
    history: _common.LossHistory


class StaleSBState(NamedTuple):
    key: jax.Array
    counter: jax.Array  # int32 []
    history: _common.LossHistory
    cached_loss: jax.Array  # float32 [N]: last scored or trained loss of each example.
    scored_epoch: jax.Array  # int32 [N]: epoch of the last scoring pass, -1 if never.


def _where_tree(condition: jax.Array, if_true, if_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def _sb_select(
    key: jax.Array,
    history: _common.LossHistory,
    losses: jax.Array,
    valid: jax.Array,
    priming: jax.Array,
    beta: float,
    p_min: float,
) -> tuple[Selection, _common.LossHistory]:
    """The SB rule on one chunk; while ``priming`` keeps everything, history untouched."""
    updated = _common.history_append(history, losses, valid)
    probs = _common.sb_probabilities(_common.history_percentiles(updated, losses), beta, p_min)
    chosen = _common.bernoulli_select(key, probs, valid)
    selection = _where_tree(priming, _common.select_all_valid(valid), chosen)
    return selection, _where_tree(priming, history, updated)


def _check_sb_hyperparameters(beta, history_size, batch_size, prime_epochs, p_min):
    return (
        _common.check_beta(beta),
        _common.check_positive_int("history_size", history_size),
        _common.check_positive_int("batch_size", batch_size),
        _common.check_positive_int("prime_epochs", prime_epochs, minimum=0),
        _common.check_unit_interval("p_min", p_min),
    )


def sb(
    beta: float,
    history_size: int = 1024,
    batch_size: int = 128,
    prime_epochs: int = 1,
    p_min: float = 0.0,
) -> SelectionPolicy:
    """Selective-Backprop.

    Args:
      beta: selectivity; about 1/(beta+1) of the examples are backpropagated.
      history_size: R, the number of most recent scored losses percentiles refer to.
      batch_size: b, the number of examples scored per chunk.
      prime_epochs: epochs (from 0) during which every example is kept, unscored.
      p_min: floor on the selection probability, in [0, 1].
    """
    beta, history_size, batch_size, prime_epochs, p_min = _check_sb_hyperparameters(
        beta, history_size, batch_size, prime_epochs, p_min
    )

    def init(num_examples: int, rng: jax.Array) -> SBState:
        _common.check_num_examples(num_examples)
        return SBState(
            key=rng,
            counter=jnp.zeros((), jnp.int32),
            history=_common.history_init(history_size),
        )

    def needs_scoring(state: SBState, ids, valid, epoch) -> jax.Array:
        del state, ids
        return valid & (epoch >= prime_epochs)

    def select(scores: ChunkScores, state: SBState, epoch) -> tuple[Selection, SBState]:
        selection, history = _sb_select(
            _common.step_key(state.key, state.counter),
            state.history,
            scores.losses,
            scores.valid,
            epoch < prime_epochs,
            beta,
            p_min,
        )
        return selection, SBState(key=state.key, counter=state.counter + 1, history=history)

    def record_trained(ids, losses, valid, state: SBState, epoch) -> SBState:
        del ids, losses, valid, epoch
        return state

    return SelectionPolicy(
        name="sb",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )


def stale_sb(
    beta: float,
    staleness: int = 3,
    history_size: int = 1024,
    batch_size: int = 128,
    prime_epochs: int = 1,
    p_min: float = 0.0,
) -> SelectionPolicy:
    """Stale-SB: Selective-Backprop that re-scores an example only every ``staleness`` epochs.

    An example needs scoring when it was never scored or when
    ``epoch - scored_epoch >= staleness``. Every fresh loss the trainer supplies
    (``scores.scored``) refreshes the cache and the scoring epoch, even if it was not
    requested. ``record_trained`` refreshes the cached loss with the training-mode loss
    (SPEC) but leaves the scoring epoch alone: the inference-mode re-scoring then runs on a
    fixed schedule of every ``staleness`` epochs, so its cost is predictable and does not
    depend on which examples happened to be selected. With ``staleness=1`` the policy
    makes the same choices as :func:`sb`.

    Args:
      beta, history_size, batch_size, prime_epochs, p_min: as in :func:`sb`.
      staleness: n >= 1, epochs between inference-mode re-scorings of an example.
    """
    beta, history_size, batch_size, prime_epochs, p_min = _check_sb_hyperparameters(
        beta, history_size, batch_size, prime_epochs, p_min
    )
    staleness = _common.check_positive_int("staleness", staleness)

    def init(num_examples: int, rng: jax.Array) -> StaleSBState:
        num_examples = _common.check_num_examples(num_examples)
        return StaleSBState(
            key=rng,
            counter=jnp.zeros((), jnp.int32),
            history=_common.history_init(history_size),
            cached_loss=jnp.zeros((num_examples,), jnp.float32),
            scored_epoch=jnp.full((num_examples,), -1, jnp.int32),
        )

    def needs_scoring(state: StaleSBState, ids, valid, epoch) -> jax.Array:
        last = state.scored_epoch[jnp.clip(ids, 0, state.scored_epoch.shape[0] - 1)]
        due = (last < 0) | (epoch - last >= staleness)
        return valid & due & (epoch >= prime_epochs)

    def select(
        scores: ChunkScores, state: StaleSBState, epoch
    ) -> tuple[Selection, StaleSBState]:
        num_examples = state.cached_loss.shape[0]
        priming = epoch < prime_epochs
        fresh = scores.valid & scores.scored & ~priming
        cached = state.cached_loss[jnp.clip(scores.ids, 0, num_examples - 1)]
        losses = jnp.where(fresh, scores.losses, cached)
        selection, history = _sb_select(
            _common.step_key(state.key, state.counter),
            state.history,
            losses,
            scores.valid,
            priming,
            beta,
            p_min,
        )
        target = jnp.where(fresh, scores.ids, num_examples)  # out of range -> dropped.
        new_state = StaleSBState(
            key=state.key,
            counter=state.counter + 1,
            history=history,
            cached_loss=state.cached_loss.at[target].set(scores.losses, mode="drop"),
            scored_epoch=state.scored_epoch.at[target].set(
                jnp.asarray(epoch, jnp.int32), mode="drop"
            ),
        )
        return selection, new_state

    def record_trained(ids, losses, valid, state: StaleSBState, epoch) -> StaleSBState:
        del epoch
        target = jnp.where(valid, ids, state.cached_loss.shape[0])
        cached = state.cached_loss.at[target].set(losses.astype(jnp.float32), mode="drop")
        return state._replace(cached_loss=cached)

    return SelectionPolicy(
        name="stale_sb",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )
