"""Loss-blind and deterministic baselines from the Selective-Backprop paper.

* :func:`random`: keep each example with probability ``U ** beta``, ``U ~ Uniform(0, 1)``
  drawn independently of its loss. It keeps the same expected fraction 1/(beta+1) as SB
  (``E[U ** beta] = 1/(beta+1)``), so it isolates the value of looking at the loss.
* :func:`topk`: keep the ``round(b/(beta+1))`` highest losses of every chunk.

Both prime like SB (every example kept, nothing scored, during ``prime_epochs``), so
that comparisons against SB differ only in the selection rule.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy


class RandomState(NamedTuple):
    key: jax.Array
    counter: jax.Array  # int32 []: number of `select` calls so far.


class TopKState(NamedTuple):
    key: jax.Array  # Unused (topk is deterministic); kept so every state has one.


def _where_tree(condition: jax.Array, if_true, if_false):
    return jax.tree.map(lambda a, b: jnp.where(condition, a, b), if_true, if_false)


def random(
    beta: float, batch_size: int = 128, prime_epochs: int = 1
) -> SelectionPolicy:
    """Keeps each example with probability ``U ** beta``, U uniform and loss-independent.

    Args:
      beta: selectivity; about 1/(beta+1) of the examples are kept.
      batch_size: chunk size b.
      prime_epochs: epochs (from 0) during which every example is kept.
    """
    beta = _common.check_beta(beta)
    batch_size = _common.check_positive_int("batch_size", batch_size)
    prime_epochs = _common.check_positive_int("prime_epochs", prime_epochs, minimum=0)

    def init(num_examples: int, rng: jax.Array) -> RandomState:
        _common.check_num_examples(num_examples)
        return RandomState(key=rng, counter=jnp.zeros((), jnp.int32))

    def needs_scoring(state, ids, valid, epoch) -> jax.Array:
        del state, ids, epoch
        return jnp.zeros(valid.shape, bool)

    def select(scores: ChunkScores, state: RandomState, epoch) -> tuple[Selection, RandomState]:
        key_u, key_select = jax.random.split(_common.step_key(state.key, state.counter))
        probs = jax.random.uniform(key_u, scores.valid.shape, jnp.float32) ** beta
        chosen = _common.bernoulli_select(key_select, probs, scores.valid)
        selection = _where_tree(
            epoch < prime_epochs, _common.select_all_valid(scores.valid), chosen
        )
        return selection, RandomState(key=state.key, counter=state.counter + 1)

    def record_trained(ids, losses, valid, state, epoch):
        del ids, losses, valid, epoch
        return state

    return SelectionPolicy(
        name="random",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )


def topk_count(num_valid: int, beta: float) -> int:
    """round(num_valid / (beta + 1)) with halves rounded up (Python's round() is banker's)."""
    return int(math.floor(num_valid / (beta + 1.0) + 0.5))


def topk(beta: float, batch_size: int = 128, prime_epochs: int = 1) -> SelectionPolicy:
    """Keeps deterministically the ``round(b/(beta+1))`` highest losses of every chunk.

    A partial chunk (padding at the end of an epoch) with ``n`` valid examples keeps the
    top ``round(n/(beta+1))`` of them, so the kept fraction stays 1/(beta+1). Ties keep the
    earlier position in the chunk. Halves round up, and a chunk with any valid example keeps
    at least one.

    Args:
      beta: selectivity; 1/(beta+1) of each chunk is kept.
      batch_size: chunk size b.
      prime_epochs: epochs (from 0) during which every example is kept, unscored.
    """
    beta = _common.check_beta(beta)
    batch_size = _common.check_positive_int("batch_size", batch_size)
    prime_epochs = _common.check_positive_int("prime_epochs", prime_epochs, minimum=0)
    k = max(1, topk_count(batch_size, beta))

    def init(num_examples: int, rng: jax.Array) -> TopKState:
        _common.check_num_examples(num_examples)
        return TopKState(key=rng)

    def needs_scoring(state, ids, valid, epoch) -> jax.Array:
        del state, ids
        return valid & (epoch >= prime_epochs)

    def select(scores: ChunkScores, state: TopKState, epoch) -> tuple[Selection, TopKState]:
        valid = scores.valid
        num_valid = jnp.sum(valid, dtype=jnp.int32)
        # Same half-up rounding as `topk_count`, on device for the partial last chunk.
        keep = jnp.floor(num_valid.astype(jnp.float32) / (beta + 1.0) + 0.5).astype(jnp.int32)
        keep = jnp.where(num_valid > 0, jnp.clip(keep, 1, k), 0)
        keep = jnp.where(num_valid == batch_size, k, keep)
        masked = jnp.where(valid, scores.losses.astype(jnp.float32), -jnp.inf)
        _, top_positions = jax.lax.top_k(masked, k)  # Descending; ties: lower index first.
        kept = jnp.zeros(valid.shape, bool).at[top_positions].set(jnp.arange(k) < keep)
        kept = kept & valid
        # Rank order (highest loss first) is not needed downstream; chunk order is kept so
        # that every policy returns positions in the same, predictable order.
        chosen = _common.compact(kept)
        selection = _where_tree(epoch < prime_epochs, _common.select_all_valid(valid), chosen)
        return selection, state

    def record_trained(ids, losses, valid, state, epoch):
        del ids, losses, valid, epoch
        return state

    return SelectionPolicy(
        name="topk",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )
