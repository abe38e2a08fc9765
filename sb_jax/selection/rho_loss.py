"""RHO-LOSS (Mindermann et al., ICML 2022): select by reducible held-out loss.

Each chunk keeps its top ``round(b/(beta+1))`` examples by the *reducible loss*
``loss - irreducible_loss``, where the irreducible loss of a training example is the loss
of a small model trained on held-out data (:mod:`sb_jax.irreducible_loss`). Examples the
held-out model also gets wrong (mislabeled, ambiguous) have a high irreducible loss and
are skipped; examples that are learnable but not yet learned are kept. The selection rule
and its partial-chunk rounding are exactly :func:`~sb_jax.selection.baselines.topk`'s, on
the reducible loss instead of the loss, so the backward budget is the same.

The irreducible losses are computed once, before training, and stored in the policy
state (so a resumed run does not recompute them); the trainer hands them over with
``set_irreducible_loss`` and counts the held-out model's training in the run's time.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy
from sb_jax.selection.baselines import TopKState, topk


class RhoLossState(NamedTuple):
    key: jax.Array
    irreducible_loss: jax.Array  # float32 [N]: held-out model's loss of each example.


def rho_loss(beta: float, batch_size: int = 128, prime_epochs: int = 1) -> SelectionPolicy:
    """RHO-LOSS selection: the top ``round(b/(beta+1))`` reducible losses of each chunk.

    Until ``set_irreducible_loss`` is called the irreducible losses are 0 and the policy
    is :func:`topk`.

    Args:
      beta: selectivity; 1/(beta+1) of each chunk is kept.
      batch_size: chunk size b.
      prime_epochs: epochs (from 0) during which every example is kept, unscored.
    """
    ranked = topk(beta, batch_size=batch_size, prime_epochs=prime_epochs)

    def init(num_examples: int, rng: jax.Array) -> RhoLossState:
        num_examples = _common.check_num_examples(num_examples)
        return RhoLossState(key=rng, irreducible_loss=jnp.zeros((num_examples,), jnp.float32))

    def select(scores: ChunkScores, state: RhoLossState, epoch) -> tuple[Selection, RhoLossState]:
        num_examples = state.irreducible_loss.shape[0]
        irreducible = state.irreducible_loss[jnp.clip(scores.ids, 0, num_examples - 1)]
        reducible = scores._replace(losses=scores.losses - irreducible)
        selection, _ = ranked.select(reducible, TopKState(key=state.key), epoch)
        return selection, state

    def record_trained(ids, losses, valid, state: RhoLossState, epoch) -> RhoLossState:
        del ids, losses, valid, epoch
        return state

    def set_irreducible_loss(state: RhoLossState, irreducible_loss: jax.Array) -> RhoLossState:
        irreducible_loss = jnp.asarray(irreducible_loss, jnp.float32)
        if irreducible_loss.shape != state.irreducible_loss.shape:
            raise ValueError(
                f"irreducible_loss must have shape {state.irreducible_loss.shape} (one loss "
                f"per training example), got {irreducible_loss.shape}."
            )
        return state._replace(irreducible_loss=irreducible_loss)

    def diagnostics(state: RhoLossState) -> dict[str, jax.Array]:
        return {"irreducible_loss_mean": jnp.mean(state.irreducible_loss)}

    return SelectionPolicy(
        name="rho_loss",
        chunk_size=ranked.chunk_size,
        max_selected=ranked.max_selected,
        init=init,
        needs_scoring=lambda state, ids, valid, epoch: ranked.needs_scoring(
            TopKState(key=state.key), ids, valid, epoch
        ),
        select=select,
        record_trained=record_trained,
        set_irreducible_loss=set_irreducible_loss,
        diagnostics=diagnostics,
    )
