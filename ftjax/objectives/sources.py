"""Where a step's batch comes from. A source is asked for the next batch with the current trainable weights, so
one that samples from the policy (rollouts) fits as well as a dataset iterator, which ignores them."""

from __future__ import annotations

from typing import Any, Protocol


class BatchSource(Protocol):
    """The batches of a run, with a position the checkpoint keeps."""

    def next(self, trainable: Any) -> dict:
        """The global batch of the next step; `trainable`: the weights that step starts from."""

    def metrics(self, trainable: Any) -> dict:
        """Host figures of the step just dispatched (rollout rewards, generation time), logged with it; `trainable`:
        that step's result."""

    def state(self) -> dict:
        """The position to save (JSON-able)."""

    def restore(self, state: dict) -> None:
        """Continue from a saved position."""

    def close(self) -> None:
        """Stop any prefetching."""


class DatasetBatches:
    """A data iterator as a source: the same batches whatever the weights."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def next(self, trainable: Any) -> dict:
        return next(self.iterator)

    def metrics(self, trainable: Any) -> dict:
        return {}

    def state(self) -> dict:
        return self.iterator.get_state()

    def restore(self, state: dict) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        self.iterator.close()
