"""Orbax checkpoints of training state (the reference-model recipe and `flaxflux distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


class Checkpoints:
    """Orbax CheckpointManager over a train-state pytree, stored as its flat list of leaves (any
    pytree structure round-trips exactly through the template it is restored into). Orbax writes
    each step to a temporary folder and renames it: a run killed mid-save keeps the last whole one."""

    def __init__(self, folder: Path, keep: int = 2):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        folder.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(folder.resolve(), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, tree: Any) -> None:
        leaves = {f"{i:05d}": x for i, x in enumerate(jax.tree.leaves(tree))}
        self.manager.save(step, args=self._ocp.args.StandardSave(leaves), force=True)
        self.manager.wait_until_finished()

    def restore(self, step: int, template: Any) -> Any:
        """The checkpoint of `step` in the structure of `template` (arrays or ShapeDtypeStructs).

        Leaves of a template placed with a NamedSharding (a device mesh) are restored straight
        into that sharding, each device reading its own part; others come back as plain
        default-device arrays, like a fresh state's, so a compiled step is reused rather than
        recompiled for another input placement."""
        leaves, treedef = jax.tree.flatten(template)
        sharded = [isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) for x in leaves]
        abstract = {f"{i:05d}": jax.ShapeDtypeStruct(tuple(x.shape), x.dtype,
                                                      sharding=x.sharding if s else None)
                    for i, (x, s) in enumerate(zip(leaves, sharded))}
        got = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
        out = [got[f"{i:05d}"] if s else jnp.asarray(np.asarray(got[f"{i:05d}"])) for i, s in enumerate(sharded)]
        return jax.tree.unflatten(treedef, out)

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
