"""A fixed-capacity, on-device FIFO of selected example ids and their loss weights.

Selective trainers keep a constant backward batch B while each chunk yields a varying
number (at most S = ``policy.max_selected``) of selected examples: selections are
pushed here and a training step pops B of them whenever B are waiting. Right before a
push at most B - 1 entries wait, so a capacity of ``B + S - 1`` never overflows; use
:func:`queue_for` to build a queue with that guarantee checked.

The queue keeps its entries at the front of the buffer (shift semantics): ``ids[:size]``
are waiting, oldest first. A pop shifts the buffer left by a static ``n``; with the
small capacities involved (a few hundred) that copy is negligible next to a training
step and keeps push and pop free of modular index arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from sb_jax.selection import _common


class SelectionQueue(NamedTuple):
    ids: jax.Array  # int32 [capacity]: ids[:size] are waiting, oldest first.
    weights: jax.Array  # float32 [capacity]
    epochs: jax.Array  # int32 [capacity]: the epoch each entry was selected in.
    size: jax.Array  # int32 []
    num_dropped: jax.Array  # int32 []: pushes that did not fit; must stay 0.


def min_queue_capacity(batch_size: int, max_selected: int) -> int:
    """The smallest capacity that never overflows: B - 1 waiting plus S pushed."""
    batch_size = _common.check_positive_int("batch_size", batch_size)
    max_selected = _common.check_positive_int("max_selected", max_selected)
    return batch_size + max_selected - 1


def queue_init(capacity: int) -> SelectionQueue:
    """An empty queue with room for ``capacity`` entries."""
    capacity = _common.check_positive_int("capacity", capacity)
    return SelectionQueue(
        ids=jnp.zeros((capacity,), jnp.int32),
        weights=jnp.zeros((capacity,), jnp.float32),
        epochs=jnp.zeros((capacity,), jnp.int32),
        size=jnp.zeros((), jnp.int32),
        num_dropped=jnp.zeros((), jnp.int32),
    )


def queue_for(batch_size: int, max_selected: int, capacity: int | None = None) -> SelectionQueue:
    """An empty queue for backward batches of ``batch_size`` fed ``max_selected`` at a time.

    Raises ValueError if ``capacity`` is given and smaller than
    ``batch_size + max_selected - 1``; by default the queue gets exactly that capacity.
    """
    needed = min_queue_capacity(batch_size, max_selected)
    if capacity is None:
        capacity = needed
    capacity = _common.check_positive_int("capacity", capacity)
    if capacity < needed:
        raise ValueError(
            f"queue capacity {capacity} can overflow: a batch_size of {batch_size} with up to "
            f"{max_selected} selected per chunk needs capacity >= {needed} "
            "(batch_size + max_selected - 1)."
        )
    return queue_init(capacity)


def queue_push(
    queue: SelectionQueue,
    ids: jax.Array,
    weights: jax.Array,
    valid: jax.Array,
    epochs: jax.Array | None = None,
) -> SelectionQueue:
    """Appends the entries of ``ids``/``weights`` where ``valid``, in order.

    ``epochs`` (default 0) records the epoch each entry was selected in: a trainer that
    derives an example's augmentation from (id, epoch) trains on exactly the view that
    was scored, even for entries that wait in the queue across an epoch boundary. Read
    ``queue.epochs[:n]`` before :func:`queue_pop` to get the popped entries' epochs.

    Entries that do not fit are dropped and counted in ``num_dropped`` (a jitted function
    cannot raise); a queue built by :func:`queue_for` never drops.
    """
    capacity = queue.ids.shape[0]
    valid = valid.astype(bool)
    slot = queue.size + jnp.cumsum(valid, dtype=jnp.int32) - 1
    fits = valid & (slot < capacity)
    slot = jnp.where(fits, slot, capacity)  # `capacity` is out of range -> dropped.
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    num_fit = jnp.sum(fits, dtype=jnp.int32)
    return SelectionQueue(
        ids=queue.ids.at[slot].set(ids.astype(jnp.int32), mode="drop"),
        weights=queue.weights.at[slot].set(weights.astype(jnp.float32), mode="drop"),
        epochs=queue.epochs.at[slot].set(
            jnp.zeros_like(ids, jnp.int32) if epochs is None else epochs.astype(jnp.int32),
            mode="drop",
        ),
        size=queue.size + num_fit,
        num_dropped=queue.num_dropped + (num_valid - num_fit),
    )


def queue_pop(
    queue: SelectionQueue, n: int
) -> tuple[jax.Array, jax.Array, jax.Array, SelectionQueue]:
    """Removes the ``n`` oldest entries (``n`` static).

    Returns ``(ids, weights, valid, queue)``: ``ids``/``weights`` of shape [n] and a
    ``valid`` mask, False past the number waiting, so the end-of-epoch flush of a partial
    queue is the same call (invalid entries have id 0 and weight 0).
    """
    capacity = queue.ids.shape[0]
    n = _common.check_positive_int("n", n)
    if n > capacity:
        raise ValueError(f"queue_pop needs 1 <= n <= capacity={capacity}, got n={n}.")
    valid = jnp.arange(n) < queue.size
    ids = jnp.where(valid, queue.ids[:n], 0)
    weights = jnp.where(valid, queue.weights[:n], 0.0)
    remaining = jnp.arange(capacity) < queue.size - n
    shifted_ids = jnp.where(remaining, jnp.roll(queue.ids, -n), 0)
    shifted_weights = jnp.where(remaining, jnp.roll(queue.weights, -n), 0.0)
    shifted_epochs = jnp.where(remaining, jnp.roll(queue.epochs, -n), 0)
    new_queue = SelectionQueue(
        ids=shifted_ids,
        weights=shifted_weights,
        epochs=shifted_epochs,
        size=jnp.maximum(queue.size - n, 0),
        num_dropped=queue.num_dropped,
    )
    return ids, weights, valid, new_queue
