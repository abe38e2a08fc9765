"""Orbax checkpoints of the whole TrainState, one per completed epoch.

A checkpoint that exists but cannot be restored (truncated files, a different model or
selector) is an error with a clear message: a run never silently starts over.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used for this run."""


class Checkpointer:
    """Saves/restores (state, epoch, host-side extras) under ``directory``."""

    def __init__(self, directory: str, *, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                # Synchronous: a checkpoint is complete on disk before training goes on,
                # so a kill -9 right after save() cannot lose it.
                enable_async_checkpointing=False,
                create=True,
            ),
        )

    def latest_epoch(self) -> int | None:
        return self._manager.latest_step()

    def save(self, epoch: int, state: Any, extra: dict[str, Any]) -> None:
        self._manager.save(
            epoch,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                extra=ocp.args.JsonSave(extra),
            ),
        )
        self._manager.wait_until_finished()

    def latest_extra(self) -> dict[str, Any] | None:
        """The host-side extras of the newest checkpoint (not its state), or None.

        Cheap, and readable whatever layout the state was written with, so a run can
        check that it is able to use a checkpoint before restoring it.
        """
        epoch = self._manager.latest_step()
        if epoch is None:
            return None
        try:
            restored = self._manager.restore(
                epoch, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        except Exception as e:  # orbax raises many types; all mean the same to a user
            raise _unusable(os.path.join(self.directory, str(epoch)), e) from e
        return dict(restored.extra)

    def restore_latest(
        self, abstract_state: Any, shardings: Any = None
    ) -> tuple[Any, int, dict[str, Any]] | None:
        """(state, epoch, extra) of the newest checkpoint, or None if there is none.

        ``shardings`` (a tree of ``jax.sharding.Sharding`` like ``abstract_state``) places
        the restored arrays; it need not match the layout the checkpoint was written
        with, so a run saved on D devices resumes on D' (orbax reads each device's slice).
        Without it every array lands on the default device.
        """
        epoch = self._manager.latest_step()
        if epoch is None:
            return None
        path = os.path.join(self.directory, str(epoch))
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract_state)
        target = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            abstract_state, shardings,
        )
        try:
            restored = self._manager.restore(
                epoch,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target),
                    extra=ocp.args.JsonRestore(),
                ),
            )
        except Exception as e:  # orbax raises many types; all mean the same to a user
            raise _unusable(path, e) from e
        _check_structure(restored.state, abstract_state, path)
        return restored.state, int(epoch), dict(restored.extra)

    def close(self) -> None:
        self._manager.close()


def _unusable(path: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"cannot restore the checkpoint {path} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). It is corrupted or was written "
        "by an incompatible model/selector/version. Delete that directory to resume "
        "from an earlier checkpoint, or use a new --workdir to start over."
    )


def _check_structure(restored: Any, abstract: Any, path: str) -> None:
    want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), abstract)
    got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), restored)
    if jax.tree.structure(want) != jax.tree.structure(got) or jax.tree.leaves(
        want
    ) != jax.tree.leaves(got):
        raise CheckpointError(
            f"the checkpoint {path} does not match this run's state (shapes or dtypes differ: "
            "another model, dataset or selector). Use a new --workdir to start over."
        )

