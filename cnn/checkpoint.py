"""Kill-safe checkpoints of a run directory: one orbax checkpoint per finished epoch.

Orbax writes each checkpoint to a temporary folder and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. A run directory remembers the config that made
it; resuming with an incompatible config is refused instead of overwriting the user's run.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from cnn.files import atomic_write_text

# Settings that may change between a run and its resumption without changing what is trained
# up to the epochs already done.
RESUMABLE_KEYS = frozenset(
    {
        "num_epochs",
        "progress",
        "tensorboard",
        "compilation_cache",
        "compilation_cache_dir",
        "steps_per_dispatch",
        "keep_checkpoints",
        "require_full_field",
        "data_dir",
        "data_source",
        "eval_batch_size",
    }
)


class IncompatibleWorkdirError(ValueError):
    """The run directory holds a run of another config."""


def check_workdir_config(workdir: pathlib.Path, config: dict[str, Any]) -> None:
    """Records config in workdir, or checks it against the one recorded there."""
    path = workdir / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = {
            k: (saved.get(k), config.get(k))
            for k in sorted(set(saved) | set(config))
            if k not in RESUMABLE_KEYS and saved.get(k) != config.get(k)
        }
        if diffs:
            listed = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diffs.items())
            raise IncompatibleWorkdirError(
                f"{workdir} holds a run of a different config ({listed}). Its checkpoints are"
                " kept as they are: pass a new --workdir, or the same settings to resume it."
                f" Only {', '.join(sorted(RESUMABLE_KEYS))} may change on resume."
            )
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


class Checkpointer:
    """Saves and restores a pytree of arrays per epoch under workdir/checkpoints."""

    def __init__(self, workdir: pathlib.Path, keep: int = 2):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            pathlib.Path(workdir).absolute() / "checkpoints", options=options
        )

    def latest_epoch(self) -> int:
        """The last finished epoch that has a checkpoint, 0 if none."""
        step = self._manager.latest_step()
        return 0 if step is None else int(step)

    def save(self, epoch: int, tree: Any) -> None:
        self._manager.save(epoch, args=ocp.args.StandardSave(tree))
        self._manager.wait_until_finished()

    def restore(self, epoch: int, like: Any) -> Any:
        """The checkpoint of `epoch`, with the structure, shapes and dtypes of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(epoch, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
