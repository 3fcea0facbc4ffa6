"""Batches for the train step, on Grain: shuffled by seed each epoch, split per process, prefetched, resumable.

Global batch s is rows `order[s*B : (s+1)*B]` of one flat index space over epochs, where `order` is
Grain's per-epoch shuffle of the rows. Process p of P reads only its slice `[p*B/P, (p+1)*B/P)` of
every global batch, so the processes' shares concatenate (in process order) to the global batch,
and with `sharding` they are assembled with `jax.make_array_from_process_local_data`. The state is
`{"batches": s, ...}`: the next batch's index, which determines everything that follows.
"""

from __future__ import annotations

from typing import Any, Iterator

import grain
import numpy as np

from ftjax.data.packing import PackedRows
from ftjax.errors import DataError

STATE_VERSION = 1


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    import jax

    p = jax.process_index() if process_index is None else int(process_index)
    n = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= p < n:
        raise DataError(f"process index {p} is not in [0, {n})")
    return p, n


def _local_size(batch_size: int, count: int) -> int:
    if batch_size < 1 or batch_size % count:
        raise DataError(f"the global batch size {batch_size} must be a positive multiple of the process count {count}")
    return batch_size // count


def to_global(batch: dict[str, np.ndarray], sharding: Any, batch_size: int) -> dict[str, Any]:
    """Process-local rows -> global jax Arrays [batch_size, T] laid out by `sharding` (batch axis sharded); a
    nested dict (another stream of the same rows, e.g. `batch["teacher"]`) likewise."""
    import jax

    return {k: to_global(v, sharding, batch_size) if isinstance(v, dict)
            else jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in batch.items()}


class TrainIterator:
    """Endless (or `num_epochs`-long) iterator of batches; `get_state()`/`set_state()` resume it exactly."""

    def __init__(self, rows: PackedRows, batch_size: int, *, seed: int, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None, sharding: Any = None,
                 prefetch: int = 4):
        if not len(rows):
            raise DataError("no training rows")
        self.rows, self.batch_size, self.seed, self.sharding = rows, int(batch_size), int(seed) % 2**32, sharding
        self.process_index, self.process_count = _process(process_index, process_count)
        local = _local_size(self.batch_size, self.process_count)
        lo = self.process_index * local
        order = grain.MapDataset.range(len(rows)).shuffle(seed=self.seed).repeat(num_epochs)
        self._dataset = (order.batch(self.batch_size, drop_remainder=True)
                         .map(lambda ids: rows.batch(ids[lo:lo + local])))
        self._options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=int(prefetch))
        self._iter = self._dataset.to_iter_dataset(self._options).__iter__()
        self._next = 0

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iter)
        self._next += 1
        return to_global(batch, self.sharding, self.batch_size) if self.sharding is not None else batch

    def __len__(self) -> int:
        """Batches in the whole run (a huge number when it repeats forever)."""
        return len(self._dataset)

    def epoch(self) -> float:
        """Epochs completed by the batches returned so far."""
        return self._next * self.batch_size / len(self.rows)

    def get_state(self) -> dict[str, Any]:
        """A small JSON-able state: the next batch index plus what must match on restore."""
        return {"version": STATE_VERSION, "batches": self._next, "seed": self.seed, "rows": len(self.rows),
                "batch_size": self.batch_size, "seq_len": self.rows.seq_len}

    def close(self) -> None:
        """Stop the background prefetch thread."""
        close = getattr(self._iter, "close", None)
        if close is not None:
            close()

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue with batch `state["batches"]`; refuses a state from different data or batch shape."""
        mine = self.get_state()
        for k in ("version", "seed", "rows", "batch_size", "seq_len"):
            if state.get(k) != mine[k]:
                raise DataError(f"cannot resume the data iterator: its saved {k} is {state.get(k)!r} but this run "
                                f"has {mine[k]!r} (the data, seed or batch shape changed)")
        self._next = int(state["batches"])
        self._iter.set_state({"next_index": self._next})


def train_iterator(rows: PackedRows, batch_size: int, *, seed: int, num_epochs: int | None = None,
                   process_index: int | None = None, process_count: int | None = None, sharding: Any = None,
                   prefetch: int = 4) -> TrainIterator:
    """Training batches (see TrainIterator); process index/count default to JAX's."""
    return TrainIterator(rows, batch_size, seed=seed, num_epochs=num_epochs, process_index=process_index,
                         process_count=process_count, sharding=sharding, prefetch=prefetch)


def eval_iterator(rows: PackedRows, batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None, sharding: Any = None) -> Iterator[dict[str, Any]]:
    """Eval batches in fixed row order; the last batch is filled with padding rows (all weights 0)."""
    p, n = _process(process_index, process_count)
    local = _local_size(batch_size, n)
    steps = -(-len(rows) // batch_size)
    for s in range(steps):
        ids = np.arange(s * batch_size + p * local, s * batch_size + (p + 1) * local)
        batch = rows.batch(np.where(ids < len(rows), ids, -1))
        yield to_global(batch, sharding, batch_size) if sharding is not None else batch


__all__ = ["TrainIterator", "eval_iterator", "to_global", "train_iterator"]
