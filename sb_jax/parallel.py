"""Device meshes, shardings and multi-host helpers for data-parallel training.

One mesh axis, ``data``, spans every device of every process. The training set's images
are split over it by blocks of example ids (device d holds ids ``[d n, (d+1) n)``, the
set padded to a multiple of the device count), the model and optimizer state are
replicated, and per-example policy state follows the images (see
:func:`state_shardings`). Everything here is built from ``jax.sharding`` and
``jax.distributed``; there is no communication code of our own beyond the collectives
inside ``jax.shard_map``.

Host arrays are turned into global arrays with :func:`put`
(``jax.make_array_from_callback``), so on many hosts each process only copies the rows
its own devices hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"
SCOPES = ("global", "per_shard")


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    cpu_collectives: str = "",
) -> None:
    """Joins this process to a multi-process JAX run (before any other JAX call).

    ``cpu_collectives`` ('gloo') enables cross-process collectives on the CPU backend,
    which has none by default; accelerators bring their own (NCCL, ICI).
    """
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes or None,
        process_id=process_id if num_processes else None,
    )


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` global devices (0 = all).

    Auto axis types: shardings of intermediates are left to the compiler (GSPMD), and
    per-device code is written explicitly with ``jax.shard_map``.
    """
    devices = jax.devices()
    if num_devices == 0:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(
            f"num_devices={num_devices} but only {len(devices)} devices are visible "
            f"({devices[0].platform}); use 0 for all of them"
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError(
            f"a multi-process run must use every device (num_devices=0), got {num_devices} "
            f"of {len(devices)}"
        )
    return jax.make_mesh(
        (num_devices,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
        devices=devices[:num_devices],
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rows(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the ``data`` axis."""
    return NamedSharding(mesh, P(DATA_AXIS))


def padded_size(num_examples: int, num_shards: int) -> int:
    """The smallest multiple of ``num_shards`` that holds ``num_examples``."""
    return math.ceil(num_examples / num_shards) * num_shards


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """``x`` padded with zero rows to ``size`` rows."""
    pad = size - x.shape[0]
    if pad < 0:
        raise ValueError(f"cannot pad {x.shape[0]} rows to {size}")
    return np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """A global array with ``sharding`` from a host value every process holds.

    Only the slices that live on this process's devices are copied, so each host
    transfers just its shard of the training set.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_tree(tree: Any, shardings: Any) -> Any:
    """:func:`put` on every leaf whose sharding is not already the wanted one."""

    def one(leaf, sharding):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        return put(np.asarray(leaf), sharding)

    return jax.tree.map(one, tree, shardings)


def state_shardings(
    abstract_state: Any, mesh: Mesh, *, num_examples: int, scope: str
) -> Any:
    """Shardings of a ``steps.TrainState`` (from ``jax.eval_shape``) on ``mesh``.

    ``per_shard``: the policy state, queue and cursor carry a leading device axis and
    are split over ``data``. ``global``: policy-state arrays with one entry per training
    example (Stale-SB's loss cache, RHO-LOSS's irreducible losses) are split by example
    id when the device count divides the number of examples, everything else is
    replicated; that layout does not depend on the device count, so such a checkpoint
    restores on any number of devices.
    """
    if scope not in SCOPES:
        raise ValueError(f"selection scope must be one of {SCOPES}, got {scope!r}")
    rep, split = replicated(mesh), rows(mesh)
    num_devices = mesh.devices.size

    def per_example(leaf):
        shape = getattr(leaf, "shape", ())
        if shape and shape[0] == num_examples and num_examples % num_devices == 0:
            return split
        return rep

    shardings = jax.tree.map(lambda _: rep, abstract_state)
    if scope == "per_shard":
        return shardings._replace(
            policy_state=jax.tree.map(lambda _: split, abstract_state.policy_state),
            queue=jax.tree.map(lambda _: split, abstract_state.queue),
            cursor=split,
        )
    return shardings._replace(policy_state=jax.tree.map(per_example, abstract_state.policy_state))


def fetch_rows(mesh: Mesh) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``fetch(table, ids)``: rows ``ids`` of a row-split ``table``, split by position.

    ``ids`` (replicated, length a multiple of the device count) may point anywhere:
    each device gathers the rows it owns (zeros elsewhere) and a reduce-scatter leaves
    device d with positions ``[d m, (d+1) m)``. The bytes moved are the fetched rows
    themselves, never the table.
    """

    def local(block, ids):
        size = block.shape[0]
        index = ids - jax.lax.axis_index(DATA_AXIS) * size
        owned = (index >= 0) & (index < size)
        gathered = block[jnp.clip(index, 0, size - 1)]
        gathered = jnp.where(owned.reshape(owned.shape + (1,) * (gathered.ndim - 1)),
                             gathered, jnp.zeros((), gathered.dtype))
        return jax.lax.psum_scatter(gathered, DATA_AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA_AXIS), P()),
                         out_specs=P(DATA_AXIS))


def to_host(x: Any) -> Any:
    """NumPy copies of a pytree of (possibly multi-host, sharded) arrays."""

    def one(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            if leaf.is_fully_replicated:
                return np.asarray(leaf.addressable_data(0))
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(one, x)


def is_primary() -> bool:
    """Whether this process writes metrics, plots and summaries (process 0)."""
    return jax.process_index() == 0
