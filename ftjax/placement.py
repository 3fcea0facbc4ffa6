"""Rows of an eval or generation batch split over the mesh's batch axes, as the train step splits its batch.

Without this a model placed on N devices computes every eval row on all N of them (its inputs arrive
replicated): N times the work, on GPUs and TPUs as on simulated CPU devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from ftjax.sharding import RULES, active_mesh, activation_sharding, batch_sharding, batch_shards


def model_mesh(state: Any) -> Mesh | None:
    """The multi-device mesh a model's state (`nnx.split`'s, which callers already hold) is placed on (None: one
    device, or not placed by a mesh)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh if sharding.mesh.size > 1 else None
    return None


@dataclasses.dataclass(frozen=True)
class RowSplit:
    """How a batch's leading (row) dimension is split: `shards` ways by `sharding` (None: one device)."""

    sharding: NamedSharding | None
    shards: int

    def rows(self, n: int) -> int:
        """`n` rounded up to a multiple of the shards (callers pad with rows that count for nothing)."""
        return -(-n // self.shards) * self.shards

    def put(self, *arrays: np.ndarray) -> tuple[Any, ...]:
        """Host arrays (the same on every process) as global arrays split by rows; as given on one device."""
        if self.sharding is None:
            return arrays
        return tuple(jax.make_array_from_callback(a.shape, self.sharding, lambda idx, a=a: a[idx]) for a in arrays)


def fetch(x: jax.Array) -> np.ndarray:
    """A (possibly row-split, possibly multi-process) result as one host array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


@contextlib.contextmanager
def split_rows(state: Any) -> Iterator[RowSplit]:
    """The row split for computations of a model (its `state`) traced inside this context: over the active
    activation mesh (the training loop's, with its `mesh.rules`), else over the mesh the state lives on with the
    default rules, whose activation constraints then apply too. One device: no split."""
    active = active_mesh()
    if active is not None:
        mesh, rules = active
        yield _split(mesh, rules)
        return
    mesh = model_mesh(state)
    if mesh is None:
        yield RowSplit(None, 1)
        return
    with activation_sharding(mesh, RULES):
        yield _split(mesh, RULES)


def _split(mesh: Mesh, rules: dict) -> RowSplit:
    shards = batch_shards(mesh, rules)
    return RowSplit(batch_sharding(mesh, rules) if shards > 1 else None, shards)
