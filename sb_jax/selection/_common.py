"""Building blocks shared by the selection policies.

Hyperparameter validation (plain Python, runs once in a factory), the per-call PRNG key,
compaction of a selection mask into a :class:`~sb_jax.selection.base.Selection`, and
the FIFO loss history with its percentile rule used by Selective-Backprop and Stale-SB.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection.base import Selection

# --- Hyperparameter validation -----------------------------------------------------------


def check_positive_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Returns ``value`` as an int, or raises ValueError if it is not an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def check_beta(beta: object) -> float:
    """Returns the selectivity ``beta`` as a float; it must be finite and > 0."""
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}.")
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"beta must be a finite number > 0 (beta=1 keeps about 50%), got {beta!r}."
        )
    return float(beta)


def check_unit_interval(name: str, value: object, *, closed_right: bool = True) -> float:
    """Returns ``value`` as a float in [0, 1] (or [0, 1) if not ``closed_right``)."""
    upper_ok = (lambda v: v <= 1.0) if closed_right else (lambda v: v < 1.0)
    interval = "[0, 1]" if closed_right else "[0, 1)"
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0.0
        or not upper_ok(value)
    ):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")
    return float(value)


def check_num_examples(num_examples: object) -> int:
    return check_positive_int("num_examples", num_examples)


# --- Randomness and selections -----------------------------------------------------------


def step_key(key: jax.Array, counter: jax.Array) -> jax.Array:
    """The key of one ``select`` call: the state's key folded with its call counter.

    Folding in a counter (rather than splitting and storing a new key) keeps the state's
    key constant, so two runs that make the same calls draw the same numbers.
    """
    return jax.random.fold_in(key, counter)


def compact(mask: jax.Array, weights: jax.Array | None = None) -> Selection:
    """The positions where ``mask`` is True, in order, compacted to the front.

    The result has ``mask.shape[0]`` entries; positions past the count point at 0 and are
    marked invalid, so gathers with them stay in bounds.
    """
    size = mask.shape[0]
    (indices,) = jnp.nonzero(mask, size=size, fill_value=0)
    indices = indices.astype(jnp.int32)
    valid = jnp.arange(size) < jnp.sum(mask)
    if weights is None:
        selected_weights = jnp.ones((size,), jnp.float32)
    else:
        selected_weights = weights[indices].astype(jnp.float32)
    selected_weights = jnp.where(valid, selected_weights, 0.0)
    return Selection(indices=indices, valid=valid, weights=selected_weights)


def select_all_valid(valid: jax.Array) -> Selection:
    """Every valid position of the chunk, with weight 1 (traditional SGD, priming)."""
    return compact(valid)


# --- Loss history and percentile rule (Selective-Backprop) -------------------------------


class LossHistory(NamedTuple):
    """FIFO ring buffer of the most recent losses.

    Slots ``0 .. count-1`` are filled (the buffer fills from slot 0 and, once full, every
    slot is), so the filled part never needs to be contiguous in time to be correct: the
    percentile rule only counts values.
    """

    values: jax.Array  # float32 [R]
    count: jax.Array  # int32 []: number of filled slots, at most R.
    next_slot: jax.Array  # int32 []: where the next loss is written.


def history_init(history_size: int) -> LossHistory:
    return LossHistory(
        values=jnp.zeros((history_size,), jnp.float32),
        count=jnp.zeros((), jnp.int32),
        next_slot=jnp.zeros((), jnp.int32),
    )


def history_append(history: LossHistory, losses: jax.Array, valid: jax.Array) -> LossHistory:
    """Appends the valid ``losses`` in chunk order; the oldest ones fall out.

    When a chunk holds more valid losses than the history has slots, only the last
    ``R`` are written, so no two writes hit the same slot (scatter order with duplicate
    indices is unspecified in XLA).
    """
    size = history.values.shape[0]
    valid = valid.astype(bool)
    num_new = jnp.sum(valid, dtype=jnp.int32)
    rank = jnp.cumsum(valid, dtype=jnp.int32) - 1
    keep = valid & (rank >= num_new - size)
    slot = jnp.where(keep, (history.next_slot + rank) % size, size)  # `size` -> dropped.
    values = history.values.at[slot].set(losses.astype(jnp.float32), mode="drop")
    return LossHistory(
        values=values,
        count=jnp.minimum(history.count + num_new, size),
        next_slot=(history.next_slot + num_new) % size,
    )


def history_percentiles(history: LossHistory, losses: jax.Array) -> jax.Array:
    """pct(L) = |{h in H : h < L}| / |H| over the filled part of the history.

    Every loss is compared with every slot (R x C comparisons, one fused pass): on the
    CPU that is 4x cheaper than sorting R = 1024 losses once and binary-searching them
    (30 vs 107 us per chunk of 128), and the selection runs once per chunk.
    """
    size = history.values.shape[0]
    filled = jnp.arange(size) < history.count
    below = (history.values[None, :] < losses.astype(jnp.float32)[:, None]) & filled
    num_less = jnp.sum(below, axis=1, dtype=jnp.int32)
    return num_less.astype(jnp.float32) / jnp.maximum(history.count, 1).astype(jnp.float32)


def sb_probabilities(pct: jax.Array, beta: float, p_min: float) -> jax.Array:
    """Selective-Backprop's selection probability p = max(p_min, pct ** beta)."""
    return jnp.maximum(p_min, pct**beta)


def bernoulli_select(key: jax.Array, probs: jax.Array, valid: jax.Array) -> Selection:
    """Selects each valid position independently with probability ``probs``.

    ``uniform < p`` is never true for p = 0 and always true for p = 1, since
    ``jax.random.uniform`` draws from [0, 1).
    """
    draws = jax.random.uniform(key, probs.shape, jnp.float32)
    return compact(valid & (draws < probs))
