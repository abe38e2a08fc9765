"""The interface every example-selection policy implements.

A policy is an optax-style transformation: a factory validates hyperparameters and
returns a :class:`SelectionPolicy`, a NamedTuple of pure functions over a policy state
(itself a NamedTuple of arrays). The trainer never looks inside the state, so adding a
policy never touches the train step.

One training iteration of the selective trainer works on a *chunk* of ``chunk_size``
example ids drawn from the epoch's permutation:

1. ``needs_scoring(state, ids, valid, epoch)`` says which examples of the chunk need a
   fresh inference-mode loss. The trainer runs the scoring forward pass only when any
   entry is True (``lax.cond``), so policies that do not need losses (traditional,
   random, the priming epoch, Stale-SB between re-scorings) skip its cost.
2. ``select(scores, state, epoch)`` returns a :class:`Selection` (positions into the
   chunk, at most ``max_selected`` of them, compacted to the front) and the new state.
3. The selected ids go to the trainer's on-device queue; when ``B`` are waiting a
   training step runs on them, and ``record_trained(ids, losses, valid, state, epoch)``
   lets the policy see the training-mode losses of what was backpropagated (Stale-SB
   refreshes its cache with them; kath18 tracks its variance-reduction estimate).

All functions are jittable, shape-static and free of Python side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

PolicyState = Any


class ChunkScores(NamedTuple):
    """What the scoring forward pass knows about one chunk of examples."""

    ids: jax.Array  # int32 [C]: dense example ids (0..N-1).
    valid: jax.Array  # bool [C]: False for padding at the end of an epoch.
    scored: jax.Array  # bool [C]: True where `losses`/`logits` are fresh this step.
    losses: jax.Array  # float32 [C]: inference-mode cross-entropy (0 where not scored).
    logits: jax.Array  # float32 [C, K]: inference-mode logits (0 where not scored).
    labels: jax.Array  # int32 [C]: the (possibly noisy) training labels.


class Selection(NamedTuple):
    """Which examples of a chunk to backpropagate.

    ``indices[j]`` is a position into the chunk; entries with ``valid[j] == False`` are
    ignored. Valid entries come first. ``weights`` multiply each selected example's loss
    (1 unless a policy reweights, e.g. kath18's unbiased 1/(N p)). A position may repeat
    (sampling with replacement).
    """

    indices: jax.Array  # int32 [S]
    valid: jax.Array  # bool [S]
    weights: jax.Array  # float32 [S]


class SelectionPolicy(NamedTuple):
    """Pure functions of a selection policy plus the static shapes it needs."""

    name: str
    chunk_size: int  # C: examples scored per iteration (kath18: its pool size).
    max_selected: int  # S: upper bound on selected entries per chunk.
    init: Callable[[int, jax.Array], PolicyState]  # (num_examples, rng) -> state
    needs_scoring: Callable[[PolicyState, jax.Array, jax.Array, jax.Array], jax.Array]
    select: Callable[[ChunkScores, PolicyState, jax.Array], tuple[Selection, PolicyState]]
    record_trained: Callable[
        [jax.Array, jax.Array, jax.Array, PolicyState, jax.Array], PolicyState
    ]
