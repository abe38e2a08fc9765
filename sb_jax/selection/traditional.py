"""Traditional minibatch SGD expressed as a selection policy: keep every example."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy


class TraditionalState(NamedTuple):
    """Traditional SGD keeps no state; the key is there so every policy state has one."""

    key: jax.Array


def traditional(batch_size: int = 128) -> SelectionPolicy:
    """Selects every valid example of each chunk of ``batch_size``; never scores.

    Args:
      batch_size: chunk size b; with the trainer's backward batch B = b every chunk
        becomes exactly one training step, i.e. plain minibatch SGD.
    """
    batch_size = _common.check_positive_int("batch_size", batch_size)

    def init(num_examples: int, rng: jax.Array) -> TraditionalState:
        _common.check_num_examples(num_examples)
        return TraditionalState(key=rng)

    def needs_scoring(state, ids, valid, epoch) -> jax.Array:
        del state, ids, epoch
        return jnp.zeros(valid.shape, bool)

    def select(scores: ChunkScores, state, epoch) -> tuple[Selection, TraditionalState]:
        del epoch
        return _common.select_all_valid(scores.valid), state

    def record_trained(ids, losses, valid, state, epoch) -> TraditionalState:
        del ids, losses, valid, epoch
        return state

    return SelectionPolicy(
        name="traditional",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
    )
