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

Optional capabilities, off by default so that a policy pays only for what it uses:

* ``needs_features``: the scoring forward also returns the penultimate features (the
  input of the model's final Dense ``head``) in ``ChunkScores.features``.
* ``needs_heldout_grad``: the trainer keeps the mean last-layer gradient of a small
  held-out batch (:func:`head_gradient`, refreshed every few optimizer steps by an
  inference-mode forward; no backward pass) and passes it in ``ChunkScores.heldout_grad``.
* ``set_irreducible_loss``: the trainer trains a small model on the held-out split
  before training and hands this function its per-example training-set losses (RHO-LOSS).
* ``diagnostics``: arrays the trainer logs with every evaluation (e.g. AdaptSB's
  priorities).

All functions are jittable, shape-static and free of Python side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PolicyState = Any


class ChunkScores(NamedTuple):
    """What the scoring forward pass knows about one chunk of examples."""

    ids: jax.Array  # int32 [C]: dense example ids (0..N-1).
    valid: jax.Array  # bool [C]: False for padding at the end of an epoch.
    scored: jax.Array  # bool [C]: True where `losses`/`logits` are fresh this step.
    losses: jax.Array  # float32 [C]: inference-mode cross-entropy (0 where not scored).
    logits: jax.Array  # float32 [C, K]: inference-mode logits (0 where not scored).
    labels: jax.Array  # int32 [C]: the (possibly noisy) training labels.
    # float32 [C, D]: inference-mode penultimate features (0 where not scored); only for
    # policies with `needs_features`, else None.
    features: jax.Array | None = None
    # float32 [D + 1, K]: mean last-layer gradient on the held-out batch (`head_gradient`);
    # only for policies with `needs_heldout_grad`, else None.
    heldout_grad: jax.Array | None = None


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
    # Optional capabilities (see the module docstring); the defaults cost nothing.
    needs_features: bool = False
    needs_heldout_grad: bool = False
    # (state, irreducible_loss float32 [N]) -> state; None if the policy needs none.
    set_irreducible_loss: Callable[[PolicyState, jax.Array], PolicyState] | None = None
    # state -> {name: array}, logged with every evaluation; None if nothing to log.
    diagnostics: Callable[[PolicyState], dict[str, jax.Array]] | None = None


def head_gradient(
    logits: jax.Array, features: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Weighted mean gradient of softmax cross-entropy w.r.t. the final Dense layer.

    For one example the gradient w.r.t. the head's kernel is ``outer(features,
    softmax(logits) - onehot(label))`` and w.r.t. its bias ``softmax(logits) -
    onehot(label)``; both come from a forward pass alone. They are returned stacked as
    one float32 ``[D + 1, K]`` array (kernel rows, then the bias row).

    Args:
      logits: float [n, K].
      features: float [n, D], the head's input.
      labels: int [n].
      weights: float [n] (e.g. a 0/1 mask); uniform if None. The mean divides by their sum.
    """
    logits = logits.astype(jnp.float32)
    residual = jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])
    inputs = jnp.concatenate(
        [features.astype(jnp.float32), jnp.ones(features.shape[:-1] + (1,), jnp.float32)], -1
    )
    if weights is None:
        weights = jnp.ones(labels.shape, jnp.float32)
    weights = weights.astype(jnp.float32)
    total = jnp.einsum("n,nd,nk->dk", weights, inputs, residual)
    return total / jnp.maximum(jnp.sum(weights), 1e-12)
