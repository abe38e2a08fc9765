"""AdaptSB: Selective-Backprop whose priority per class of examples is tuned in training.

Selective-Backprop's priority curve ``pct ** beta`` is fixed. AdaptSB (the thesis;
SPEC.md section 2) makes it a learned quantity, held as optimizer-like state:

* **Classes of examples.** ``num_bins`` (K) equal bins of the loss percentile, the same
  percentile SB computes against its FIFO history of recent losses.
* **Priorities.** A selection probability ``q_k`` per bin, initialised to SB's curve
  averaged over the bin, ``mean(pct ** beta)``, and always projected back onto the budget
  ``mean_k q_k = 1/(beta+1)`` with ``floor <= q_k <= 1``. Percentiles are about uniform,
  so each bin holds about 1/K of the examples and the expected selected fraction stays
  1/(beta+1): the backward budget is SB's.
* **Signal.** Backpropagating example i moves the last layer by ``-lr g_i``, which lowers
  the held-out loss by ``lr <g_i, G>`` to first order, with G the held-out batch's mean
  last-layer gradient (``ChunkScores.heldout_grad``, from the trainer). For softmax
  cross-entropy ``g_i = outer([f_i, 1], softmax(z_i) - onehot(y_i))``, known from the
  scoring forward pass (features f_i, logits z_i), so ``<g_i, G> = [f_i, 1]^T G r_i``
  costs no backward pass. Over a window of ``update_every`` scored chunks each bin
  accumulates ``a_i = <g_i, G/|G|>`` and ``|g_i|^2`` of all its scored examples (selected
  or not). The bin's signal is

  - ``"cosine"`` (default): ``mean(a_i) / rms(|g_i|)``, in [-1, 1]. It is the direction
    part of the first-order decrease: how well the bin's gradients agree with the
    held-out gradient per unit of gradient size. Gradient size already grows with the
    loss, which is what SB's prior encodes, so the adaptation only has to learn what
    the prior cannot know: whether a bin's gradients point the right way. Mislabeled
    examples have large gradients that point away from the clean held-out gradient.
  - ``"dot"``: ``mean(a_i)`` divided by the largest ``|mean(a_j)|`` over bins: the
    first-order decrease per backpropagated example itself (SPEC's wording), scale-free.

* **Update.** Exponentiated gradient on the log-priorities at the end of each window,
  with a pull towards SB's prior that keeps the state from random-walking on noise:
  ``theta = log q; theta += step_size * s - prior_pull * (theta - log q_SB)``, then
  ``q = clip(c exp(theta), floor, 1)`` with c set so the budget holds. At a fixed signal
  the priorities settle at ``q_SB * exp((step_size / prior_pull) * s)`` (projected):
  a bin whose gradients oppose the held-out gradient (s < 0) loses priority, its budget
  goes to the helpful bins, and with ``prior_pull = 0`` the update is the plain
  multiplicative-weights rule.

* **Optional split** (``split_by_alignment=True``, off by default): each loss bin is
  split in two classes by the sign of the example's own alignment ``<g_i, G>``, giving
  2K classes. A mislabeled example's gradient tends to oppose the held-out gradient
  while a hard clean example's agrees, so the split can tell apart what a loss bin
  mixes. Class sizes are then no longer 1/K each, so the budget is kept against the
  measured share of each class (``occupancy``, half-weight running average of the
  window counts).

During the ``prime_epochs`` every example is kept, nothing is scored and the priorities
and history stay untouched, as in SB.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sb_jax.selection import _common
from sb_jax.selection.base import ChunkScores, Selection, SelectionPolicy

SIGNALS = ("cosine", "dot")
_TINY = 1e-12
_BISECTION_STEPS = 48  # Halves a log-range of < 2**7 below float32 resolution.


class AdaptSBState(NamedTuple):
    key: jax.Array
    counter: jax.Array  # int32 []: number of `select` calls so far.
    history: _common.LossHistory
    # Per class of examples (C = K, or 2K with `split_by_alignment`):
    priorities: jax.Array  # float32 [C]: selection probability q_k.
    occupancy: jax.Array  # float32 [C]: share of examples in each class (sums to 1).
    alignment_sum: jax.Array  # float32 [C]: window sum of <g_i, G / |G|>.
    grad_sq_sum: jax.Array  # float32 [C]: window sum of |g_i|^2.
    count: jax.Array  # float32 [C]: scored examples in the window.
    signal: jax.Array  # float32 [C]: the signal s_k of the last update.
    window_chunks: jax.Array  # int32 []: scored chunks accumulated in the window.
    num_updates: jax.Array  # int32 []: priority updates so far.


def sb_bin_priorities(beta: float, num_bins: int) -> np.ndarray:
    """SB's curve averaged over each of ``num_bins`` equal percentile bins (float64 [K]).

    ``mean over [k/K, (k+1)/K] of pct**beta = K ((k+1)^(b+1) - k^(b+1)) / ((b+1) K^(b+1))``;
    the bins' mean is exactly 1/(beta+1).
    """
    edges = np.arange(num_bins + 1, dtype=np.float64) / num_bins
    return num_bins * (edges[1:] ** (beta + 1) - edges[:-1] ** (beta + 1)) / (beta + 1)


def project_to_budget(
    log_weights: jax.Array, budget: float, floor: float, occupancy: jax.Array | None = None
) -> jax.Array:
    """``q = clip(c * exp(log_weights), floor, 1)`` with c such that ``sum(occupancy q) ==
    budget``: the expected selected fraction when class k holds ``occupancy[k]`` of the
    examples (uniform if None, i.e. ``mean(q) == budget``).

    The expected fraction is continuous and nondecreasing in c, from ``floor`` (every q at
    the floor) to 1 (every q at the cap), so for ``floor <= budget <= 1`` bisection on
    log c finds it. Requires finite ``log_weights`` and ``occupancy`` summing to 1.
    """
    log_weights = log_weights.astype(jnp.float32)
    if occupancy is None:
        occupancy = jnp.full(log_weights.shape, 1.0 / log_weights.shape[0], jnp.float32)

    def mean_at(log_c):
        return jnp.sum(occupancy * jnp.clip(jnp.exp(log_c + log_weights), floor, 1.0))

    def halve(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        below = mean_at(mid) < budget
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    bounds = (math.log(floor) - jnp.max(log_weights), -jnp.min(log_weights))
    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, bounds)
    return jnp.clip(jnp.exp(0.5 * (lo + hi) + log_weights), floor, 1.0)


def percentile_bins(pct: jax.Array, num_bins: int) -> jax.Array:
    """The bin ``floor(pct * K)`` (clipped to 0..K-1) of each percentile in [0, 1]."""
    return jnp.clip(jnp.floor(pct * num_bins).astype(jnp.int32), 0, num_bins - 1)


def alignment_terms(
    logits: jax.Array, features: jax.Array, labels: jax.Array, heldout_grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per example: ``<g_i, G / |G|>`` and ``|g_i|^2`` of the last-layer gradient g_i.

    ``g_i = outer([f_i, 1], r_i)`` with ``r_i = softmax(z_i) - onehot(y_i)``, so
    ``<g_i, G> = [f_i, 1]^T G r_i`` and ``|g_i|^2 = |[f_i, 1]|^2 |r_i|^2`` need no
    [D+1, K] array per example. A zero G (not computed yet) gives zero alignments.
    """
    logits = logits.astype(jnp.float32)
    residual = jax.nn.softmax(logits) - jax.nn.one_hot(labels, logits.shape[-1])
    inputs = jnp.concatenate(
        [features.astype(jnp.float32), jnp.ones(features.shape[:-1] + (1,), jnp.float32)], -1
    )
    heldout_grad = heldout_grad.astype(jnp.float32)
    direction = heldout_grad / jnp.maximum(jnp.linalg.norm(heldout_grad), _TINY)
    alignment = jnp.sum((inputs @ direction) * residual, axis=-1)
    grad_sq = jnp.sum(inputs**2, axis=-1) * jnp.sum(residual**2, axis=-1)
    return alignment, grad_sq


def _check_hyperparameters(
    beta, num_bins, step_size, update_every, floor, prior_pull, signal, split_by_alignment
):
    beta = _common.check_beta(beta)
    num_bins = _common.check_positive_int("num_bins", num_bins, minimum=2)
    if (
        isinstance(step_size, bool)
        or not isinstance(step_size, numbers.Real)
        or not math.isfinite(step_size)
        or step_size < 0
    ):
        raise ValueError(f"step_size must be a finite number >= 0, got {step_size!r}.")
    update_every = _common.check_positive_int("update_every", update_every)
    budget = 1.0 / (beta + 1.0)
    if (
        isinstance(floor, bool)
        or not isinstance(floor, numbers.Real)
        or not 0.0 < floor < budget
    ):
        raise ValueError(
            f"floor must be a number in (0, 1/(beta+1)) = (0, {budget:.4g}) so that the "
            f"budget can be kept, got {floor!r}."
        )
    prior_pull = _common.check_unit_interval("prior_pull", prior_pull, closed_right=False)
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {list(SIGNALS)}, got {signal!r}.")
    if not isinstance(split_by_alignment, bool | np.bool_):
        raise ValueError(f"split_by_alignment must be True or False, got {split_by_alignment!r}.")
    return (beta, num_bins, float(step_size), update_every, float(floor), prior_pull, signal,
            bool(split_by_alignment))


def adapt_sb(
    beta: float,
    num_bins: int = 8,
    step_size: float = 0.1,
    update_every: int = 8,
    floor: float = 0.01,
    prior_pull: float = 0.02,
    signal: str = "cosine",
    split_by_alignment: bool = False,
    history_size: int = 1024,
    batch_size: int = 128,
    prime_epochs: int = 1,
) -> SelectionPolicy:
    """AdaptSB (see the module docstring).

    Args:
      beta: selectivity; the expected selected fraction is 1/(beta+1), as in SB.
      num_bins: K >= 2 loss-percentile bins (classes of examples).
      step_size: exponentiated-gradient step on the log-priorities, >= 0 (0 = SB's binned
        curve, frozen).
      update_every: M, scored chunks per priority update (the signal is averaged over them).
      floor: exploration floor of every q_k, in (0, 1/(beta+1)).
      prior_pull: in [0, 1): fraction of the way the log-priorities move back towards SB's
        prior at each update (0 = plain multiplicative weights).
      signal: "cosine" or "dot" (see the module docstring).
      split_by_alignment: if True, each loss bin is split in two classes by the sign of the
        example's own held-out alignment ``<g_i, G>`` (2K classes; see the module
        docstring).
      history_size: R, recent losses the percentiles refer to.
      batch_size: b, examples scored per chunk.
      prime_epochs: epochs (from 0) during which every example is kept, unscored.
    """
    (beta, num_bins, step_size, update_every, floor, prior_pull, signal,
     split_by_alignment) = _check_hyperparameters(
        beta, num_bins, step_size, update_every, floor, prior_pull, signal, split_by_alignment
    )
    history_size = _common.check_positive_int("history_size", history_size)
    batch_size = _common.check_positive_int("batch_size", batch_size)
    prime_epochs = _common.check_positive_int("prime_epochs", prime_epochs, minimum=0)
    budget = 1.0 / (beta + 1.0)
    num_classes = num_bins * (2 if split_by_alignment else 1)
    # SB's binned curve, lifted to the floor and put back on the budget: the starting
    # point and the prior the update pulls towards (the same for both halves of a split).
    sb_curve = np.tile(sb_bin_priorities(beta, num_bins), num_classes // num_bins)
    prior = np.asarray(
        project_to_budget(jnp.log(jnp.asarray(np.maximum(sb_curve, floor))), budget, floor)
    )
    log_prior = np.log(prior).astype(np.float32)

    def init(num_examples: int, rng: jax.Array) -> AdaptSBState:
        _common.check_num_examples(num_examples)

        def zeros():
            return jnp.zeros((num_classes,), jnp.float32)

        return AdaptSBState(
            key=rng,
            counter=jnp.zeros((), jnp.int32),
            history=_common.history_init(history_size),
            priorities=jnp.asarray(prior, jnp.float32),
            occupancy=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
            alignment_sum=zeros(),
            grad_sq_sum=zeros(),
            count=zeros(),
            signal=zeros(),
            window_chunks=jnp.zeros((), jnp.int32),
            num_updates=jnp.zeros((), jnp.int32),
        )

    def needs_scoring(state: AdaptSBState, ids, valid, epoch) -> jax.Array:
        del state, ids
        return valid & (epoch >= prime_epochs)

    def updated_priorities(state: AdaptSBState) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(priorities, occupancy, signal) at the end of a window."""
        count = state.count
        seen = count > 0
        per_example = jnp.maximum(count, 1.0)
        mean_alignment = state.alignment_sum / per_example
        if signal == "cosine":
            rms_norm = jnp.sqrt(state.grad_sq_sum / per_example)
            s = mean_alignment / jnp.maximum(rms_norm, _TINY)
        else:
            s = mean_alignment / jnp.maximum(jnp.max(jnp.abs(mean_alignment)), _TINY)
        s = jnp.where(seen, s, 0.0)
        occupancy = state.occupancy
        if split_by_alignment:
            # Loss bins hold 1/K each by construction; how each splits must be measured.
            # Half the weight on the last window keeps the estimate steady.
            measured = count / jnp.maximum(jnp.sum(count), 1.0)
            occupancy = jnp.where(jnp.sum(count) > 0, 0.5 * (occupancy + measured), occupancy)
        theta = jnp.log(state.priorities)
        theta = theta + step_size * s - prior_pull * (theta - log_prior)
        return project_to_budget(theta, budget, floor, occupancy), occupancy, s

    def select(scores: ChunkScores, state: AdaptSBState, epoch) -> tuple[Selection, AdaptSBState]:
        if scores.features is None or scores.heldout_grad is None:
            raise ValueError(
                "adapt_sb needs ChunkScores.features and ChunkScores.heldout_grad; the "
                "trainer fills them for policies with needs_features/needs_heldout_grad."
            )
        priming = epoch < prime_epochs
        valid = scores.valid
        history = _common.history_append(state.history, scores.losses, valid)
        classes = percentile_bins(_common.history_percentiles(history, scores.losses), num_bins)
        alignment, grad_sq = alignment_terms(
            scores.logits, scores.features, scores.labels, scores.heldout_grad
        )
        if split_by_alignment:
            classes = classes + num_bins * (alignment < 0).astype(jnp.int32)
        chosen = _common.bernoulli_select(
            _common.step_key(state.key, state.counter), state.priorities[classes], valid
        )
        selection = jax.tree.map(
            lambda a, b: jnp.where(priming, a, b), _common.select_all_valid(valid), chosen
        )

        used = (valid & scores.scored & ~priming).astype(jnp.float32)
        membership = jax.nn.one_hot(classes, num_classes, dtype=jnp.float32) * used[:, None]
        accumulated = state._replace(
            counter=state.counter + 1,
            history=jax.tree.map(
                lambda old, new: jnp.where(priming, old, new), state.history, history
            ),
            alignment_sum=state.alignment_sum + membership.T @ alignment,
            grad_sq_sum=state.grad_sq_sum + membership.T @ grad_sq,
            count=state.count + jnp.sum(membership, axis=0),
            window_chunks=state.window_chunks + jnp.where(priming, 0, 1).astype(jnp.int32),
        )
        priorities, occupancy, s = updated_priorities(accumulated)
        due = accumulated.window_chunks >= update_every
        zeros = jnp.zeros((num_classes,), jnp.float32)
        updated = accumulated._replace(
            priorities=priorities,
            occupancy=occupancy,
            alignment_sum=zeros,
            grad_sq_sum=zeros,
            count=zeros,
            window_chunks=jnp.zeros((), jnp.int32),
            signal=s,
            num_updates=accumulated.num_updates + 1,
        )
        new_state = jax.tree.map(lambda a, b: jnp.where(due, a, b), updated, accumulated)
        return selection, new_state

    def record_trained(ids, losses, valid, state: AdaptSBState, epoch) -> AdaptSBState:
        del ids, losses, valid, epoch
        return state

    def diagnostics(state: AdaptSBState) -> dict[str, jax.Array]:
        logged = {"priorities": state.priorities, "priority_signal": state.signal}
        if split_by_alignment:
            logged["class_occupancy"] = state.occupancy
        return logged

    return SelectionPolicy(
        name="adapt_sb",
        chunk_size=batch_size,
        max_selected=batch_size,
        init=init,
        needs_scoring=needs_scoring,
        select=select,
        record_trained=record_trained,
        needs_features=True,
        needs_heldout_grad=True,
        diagnostics=diagnostics,
    )
