"""Checkpoints: sharded round trip, keep-latest + keep-best, partial saves never picked."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ftjax.checkpoint import Checkpoints
from ftjax.sharding import make_mesh


def _state(mesh, seed):
    k = jax.random.key(seed)
    w = jax.device_put(jax.random.normal(k, (8, 4)), NamedSharding(mesh, P("fsdp", None)))
    return {"params": {"w": w, "b": jnp.arange(3.0)}, "step": jnp.int32(seed), "rng": jax.random.key_data(k)}


def test_sharded_round_trip_restores_values_and_shardings(tmp_path):
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    ckpt = Checkpoints(tmp_path, keep=2)
    state = _state(mesh, 1)
    ckpt.save(5, state, {"data_state": {"epoch": 0, "index": 17}, "config": "x"})
    ckpt.wait()
    target = jax.tree.map(jnp.zeros_like, state)
    target["params"]["w"] = jax.device_put(target["params"]["w"], NamedSharding(mesh, P("fsdp", None)))
    restored, meta = ckpt.restore(5, target)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["params"]["w"].sharding.is_equivalent_to(state["params"]["w"].sharding, 2)
    assert meta == {"data_state": {"epoch": 0, "index": 17}, "config": "x"}
    ckpt.close()


def test_keeps_latest_n_and_the_best(tmp_path):
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    ckpt = Checkpoints(tmp_path, keep=2, keep_best=True, async_save=False)
    losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: 2.5, 5: 2.7}
    for step, loss in losses.items():
        ckpt.save(step, _state(mesh, step), {"step": step}, eval_loss=loss)
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2 and ckpt.latest_step() == 5
    ckpt.close()


def test_best_step_counts_a_save_still_in_flight(tmp_path):
    """The loop asks for the best step right after its last (async) save: that save's eval loss counts."""
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    first = Checkpoints(tmp_path, keep=2, keep_best=True)
    first.save(2, _state(mesh, 2), {"step": 2}, eval_loss=2.0)
    first.close()
    resumed = Checkpoints(tmp_path, keep=2, keep_best=True)  # a resumed run: step 2's metrics come from disk
    resumed.save(4, _state(mesh, 4), {"step": 4}, eval_loss=1.0)
    assert resumed.best_step() == 4
    resumed.close()


def test_partial_save_is_never_picked(tmp_path):
    mesh = make_mesh(data=1, fsdp=8, tensor=1)
    ckpt = Checkpoints(tmp_path, keep=3, async_save=False)
    ckpt.save(1, _state(mesh, 1), {"step": 1})
    ckpt.close()
    # A save killed mid-write leaves only Orbax's temporary folder behind.
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "junk").write_bytes(b"\0" * 10)
    again = Checkpoints(tmp_path, keep=3)
    assert again.latest_step() == 1 and again.all_steps() == [1]
    again.close()
