"""Cost (compute) and memory of a schedule with shared stems, vectorised (NumPy).

Reference: docs/SPEC.md section 3. App i freezes the first k_i layers (they are shared
with every other app that freezes them too) and samples phi_i frames/s. A shared prefix
runs once, at the highest rate of the apps still attached to it; every app runs its own
branch, layers [k_i, L), at its own rate. Per layer l that is

    cost_l = lambda_l * (sum_i phi_i [k_i <= l]  +  max_i phi_i [k_i > l])

(max over no apps = 0), which equals the SPEC's segment-by-segment formula. Memory (an
extension; the original has none) counts the parameter bytes that must be resident: one
copy of every base layer some app still shares (k_i > l) plus each app's own branch:

    mem_l = bytes_l * ([exists i: k_i > l]  +  #{i: k_i <= l}).

The planners work on chokepoints, where a schedule's shared part is a *stem*: the rate
each chokepoint segment [c_{t-1}, c_t) runs at, i.e. the max phi over apps with k >= c_t
(:class:`ChokepointCosts`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def schedule_cost(num_frozen, fps, layer_costs) -> np.ndarray:
    """Total compute cost of schedules; batched.

    Args:
      num_frozen: int [..., N] frozen layers per app (0..L).
      fps: float [..., N] sampling rate per app.
      layer_costs: float [L].

    Returns:
      float64 [...]: cost per schedule (layer-cost units x frames/s).
    """
    k = np.asarray(num_frozen)[..., :, None]
    phi = np.asarray(fps, np.float64)[..., :, None]
    lam = np.asarray(layer_costs, np.float64)
    layer = np.arange(lam.shape[0])
    branched = k <= layer  # [..., N, L]
    own = (phi * branched).sum(axis=-2)
    shared = np.where(branched, 0.0, phi).max(axis=-2)
    return ((own + shared) * lam).sum(axis=-1)


def schedule_memory(num_frozen, layer_bytes) -> np.ndarray:
    """Resident parameter bytes of schedules; batched like :func:`schedule_cost`."""
    k = np.asarray(num_frozen)[..., :, None]
    nbytes = np.asarray(layer_bytes, np.float64)
    layer = np.arange(nbytes.shape[0])
    branched = k <= layer
    copies = branched.sum(axis=-2) + (~branched).any(axis=-2)
    return (copies * nbytes).sum(axis=-1)


class ChokepointCosts(NamedTuple):
    """Per-chokepoint cost tables of a network (K chokepoints, T = K - 1 segments).

    Segment t (1..T) is layers [c_{t-1}, c_t); an app at chokepoint index j shares
    segments 1..j. Arrays are indexed by chokepoint index j or segment index t - 1.
    """

    chokepoints: np.ndarray  # int64 [K]
    branch_cost: np.ndarray  # float64 [K]: sum of lambda over layers [c_j, L)
    segment_cost: np.ndarray  # float64 [T]: sum of lambda over segment t
    branch_bytes: np.ndarray  # float64 [K]: parameter bytes of layers [c_j, L)
    segment_bytes: np.ndarray  # float64 [T]
    prefix_cost: np.ndarray  # float64 [K]: sum of lambda over [0, c_j)
    prefix_bytes: np.ndarray  # float64 [K]: bytes of [0, c_j)


def chokepoint_costs(layer_costs, chokepoints, layer_bytes=None) -> ChokepointCosts:
    """Builds :class:`ChokepointCosts`; ``layer_bytes`` None means zero bytes."""
    lam = np.asarray(layer_costs, np.float64)
    cps = np.asarray(chokepoints, np.int64)
    nbytes = np.zeros_like(lam) if layer_bytes is None else np.asarray(layer_bytes, np.float64)
    cum_cost = np.concatenate([[0.0], np.cumsum(lam)])
    cum_bytes = np.concatenate([[0.0], np.cumsum(nbytes)])
    prefix_cost = cum_cost[cps]
    prefix_bytes = cum_bytes[cps]
    return ChokepointCosts(
        chokepoints=cps,
        branch_cost=cum_cost[-1] - prefix_cost,
        segment_cost=np.diff(prefix_cost),
        branch_bytes=cum_bytes[-1] - prefix_bytes,
        segment_bytes=np.diff(prefix_bytes),
        prefix_cost=prefix_cost,
        prefix_bytes=prefix_bytes,
    )


def stem_rates(k_index, fps, num_segments: int) -> np.ndarray:
    """The stem of schedules: rate of each segment, float64 [..., T].

    Segment t (1-based) runs at max phi_i over apps with k_index_i >= t (0 if none).
    """
    j = np.asarray(k_index)[..., :, None]
    phi = np.asarray(fps, np.float64)[..., :, None]
    t = np.arange(1, num_segments + 1)
    return np.where(j >= t, phi, 0.0).max(axis=-2)


def chokepoint_schedule_cost(k_index, fps, costs: ChokepointCosts) -> np.ndarray:
    """:func:`schedule_cost` for apps at chokepoints (k_index into ``costs.chokepoints``)."""
    j = np.asarray(k_index)
    phi = np.asarray(fps, np.float64)
    branches = (costs.branch_cost[j] * phi).sum(axis=-1)
    stem = stem_rates(j, phi, costs.segment_cost.shape[0]) @ costs.segment_cost
    return branches + stem


def chokepoint_schedule_memory(k_index, costs: ChokepointCosts) -> np.ndarray:
    """:func:`schedule_memory` for apps at chokepoints."""
    j = np.asarray(k_index)
    return costs.branch_bytes[j].sum(axis=-1) + costs.prefix_bytes[j.max(axis=-1)]
