"""Example-selection policies: Selective-Backprop, Stale-SB, AdaptSB and the baselines.

Every policy is a factory returning a :class:`SelectionPolicy` (see ``base.py`` for the
protocol). Build one by name with :func:`make_policy`, e.g.
``make_policy("sb", beta=2, batch_size=128)``, or call the factory directly.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from sb_jax.selection.adapt_sb import adapt_sb
from sb_jax.selection.base import (
    ChunkScores,
    PolicyState,
    Selection,
    SelectionPolicy,
    head_gradient,
)
from sb_jax.selection.baselines import random, topk
from sb_jax.selection.kath18 import kath18
from sb_jax.selection.queue import (
    SelectionQueue,
    min_queue_capacity,
    queue_for,
    queue_init,
    queue_pop,
    queue_push,
)
from sb_jax.selection.rho_loss import rho_loss
from sb_jax.selection.sb import sb, stale_sb
from sb_jax.selection.traditional import traditional

POLICIES: dict[str, Callable[..., SelectionPolicy]] = {
    "traditional": traditional,
    "sb": sb,
    "stale_sb": stale_sb,
    "random": random,
    "topk": topk,
    "kath18": kath18,
    "adapt_sb": adapt_sb,
    "rho_loss": rho_loss,
}


def make_policy(name: str, **hyperparams) -> SelectionPolicy:
    """Builds the policy registered as ``name`` from keyword hyperparameters.

    Raises ValueError for an unknown name, an unknown or missing hyperparameter, or a
    bad hyperparameter value.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown selection policy {name!r}; known: {sorted(POLICIES)}.")
    factory = POLICIES[name]
    parameters = inspect.signature(factory).parameters
    unknown = sorted(set(hyperparams) - set(parameters))
    if unknown:
        raise ValueError(
            f"policy {name!r} got unknown hyperparameter(s) {unknown}; "
            f"it accepts {list(parameters)}."
        )
    missing = [
        p for p, spec in parameters.items() if spec.default is spec.empty and p not in hyperparams
    ]
    if missing:
        raise ValueError(f"policy {name!r} needs hyperparameter(s) {missing}.")
    return factory(**hyperparams)


__all__ = [
    "POLICIES",
    "ChunkScores",
    "PolicyState",
    "Selection",
    "SelectionPolicy",
    "SelectionQueue",
    "adapt_sb",
    "head_gradient",
    "kath18",
    "make_policy",
    "min_queue_capacity",
    "queue_for",
    "queue_init",
    "queue_pop",
    "queue_push",
    "random",
    "rho_loss",
    "sb",
    "stale_sb",
    "topk",
    "traditional",
]
