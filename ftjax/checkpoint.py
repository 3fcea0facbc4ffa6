"""Orbax checkpoints of a run: trainable params, optimizer state, RNG, step and JSON metadata.

A checkpoint is either complete or absent (Orbax writes to a temporary folder and renames it
when every host has finished), so resume always picks a complete one. The latest `keep` are
kept, and with `keep_best` also the one with the lowest eval loss. A save that cannot be written and a
checkpoint that cannot be read end in one line (ftjax/checkpoint_faults.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from ftjax import checkpoint_faults

STATE, META = "state", "meta"


class Checkpoints:
    """WORKDIR/checkpoints/<step>/{state, meta}; `state` is any pytree of (sharded) arrays."""

    def __init__(self, workdir: str | os.PathLike, *, keep: int = 2, keep_best: bool = False,
                 async_save: bool = True, read_only: bool = False):
        """`read_only` for readers of a workdir (export, load_model): they must not clean up the temporary
        folder of a save that a running training job is writing."""
        self.directory = Path(workdir).absolute() / "checkpoints"
        keepers: list[Any] = [policies.LatestN(n=max(keep, 1))]
        if keep_best:
            keepers.append(policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                                          keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=async_save,
            preservation_policy=policies.AnyPreservationPolicy(keepers),
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
            # best_fn makes Orbax write each step's metrics, which best_step() reads back.
            best_fn=(lambda m: m["eval_loss"]) if keep_best else None,
            best_mode="min",
        )
        self.manager = ocp.CheckpointManager(self.directory, item_names=(STATE, META), options=options)
        self._saving = (0, 0)  # (step, bytes) of the latest save started, for the line if it fails

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (partial saves are never listed)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self) -> int | None:
        """Step with the lowest recorded eval loss, else the latest (saves in flight counted: waits for them)."""
        self.wait()  # a save still being written has no metrics yet
        scored = [(m["eval_loss"], s) for s in self.all_steps() if (m := self.manager.metrics(s)) is not None
                  and m.get("eval_loss") is not None]
        return min(scored)[1] if scored else self.latest_step()

    def save(self, step: int, state: Any, meta: dict, eval_loss: float | None = None) -> None:
        """Start an (async) save of `state` + JSON `meta` at `step`."""
        metrics = {"eval_loss": float(eval_loss)} if eval_loss is not None else None
        with self._writing():  # the previous async save's failure surfaces here
            self.manager.check_for_errors()
        self._saving = (step, state_bytes(state))
        with self._writing():
            self.manager.save(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                                                META: ocp.args.JsonSave(meta)}),
                              metrics=metrics, force=True)

    def check(self) -> None:
        """Raise the one-line WriteError now if a background save has failed (called after every step)."""
        with self._writing():
            self.manager.check_for_errors()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed save becomes WriteError naming the path, the free space and the last complete checkpoint;
        Orbax's writer threads are shut down first, so none of theirs reaches the terminal."""
        try:
            yield
        except Exception as e:
            error = checkpoint_faults.save_failed(self.directory, *self._saving, e, jax.process_index() == 0)
            with contextlib.suppress(Exception):
                self.manager.close()
            raise error from None

    def room_warning(self, state: Any, keep: int) -> str:
        """One line when `keep` checkpoints of `state` will not fit on the disk (before the first save), or ''."""
        return checkpoint_faults.room_warning(self.directory, state_bytes(state), keep)

    def restore_newest(self, target: Any, say: Callable[[str], None]) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest checkpoint that reads; damaged newer ones are named and moved
        aside (kept). None when there is no checkpoint; LoadError when none reads."""
        workdir = self.directory.parent

        def set_aside(steps: list[int]) -> None:
            if jax.process_index() == 0:
                checkpoint_faults.move_aside(workdir, steps)
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("ftjax_damaged_checkpoints")
            self.manager.reload()

        found = checkpoint_faults.restore_newest(self.all_steps(), lambda s: self.restore(s, target), workdir,
                                                 say, set_aside)
        return None if found is None else (found[0], *found[1])

    def restore(self, step: int, target: Any) -> tuple[Any, dict]:
        """Restore into `target`'s structure, dtypes and shardings (abstract arrays are fine)."""
        abstract = jax.tree.map(_abstract, target)
        out = self.manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract),
                                                                    META: ocp.args.JsonRestore()}))
        return out[STATE], out[META]

    def restore_trainable(self, step: int, target: Any) -> Any:
        """Only the checkpoint's `trainable` (its optimizer state stays on disk), into `target`'s shardings."""
        abstract = jax.tree.map(_abstract, target)
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), abstract)
        args = ocp.args.PyTreeRestore(item={"trainable": abstract}, restore_args={"trainable": restore_args},
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["trainable"]

    def newest_meta(self) -> dict | None:
        """The metadata of the newest checkpoint whose metadata reads (a resume names damaged ones), or None."""
        for step in reversed(self.all_steps()):
            with contextlib.suppress(Exception):
                return self.read_meta(step)
        return None

    def read_meta(self, step: int) -> dict:
        """Only the JSON metadata of a checkpoint (config, data state, provenance)."""
        return self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]

    def wait(self) -> None:
        """Block until pending async saves are complete on every host."""
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()
        self.manager.close()


def state_bytes(state: Any) -> int:
    """What a save of `state` writes, about: its arrays' global bytes, plus Orbax's metadata (~2 KiB an array
    in its tree, sharding and array metadata files, 64 KiB for the rest; measured on the tiny model's saves)."""
    arrays = [x for x in jax.tree.leaves(state) if hasattr(x, "nbytes")]
    return sum(int(x.nbytes) for x in arrays) + 2048 * len(arrays) + 65536


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
