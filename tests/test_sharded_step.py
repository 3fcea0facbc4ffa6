"""Same math on every mesh: one device, data=8, fsdp=8, data=2 x fsdp=2 x tensor=2 (8 simulated CPU
devices), and grad_accum=4 against grad_accum=1 on the same global batch.

Each compile costs seconds on CPU, so data=2 x fsdp=2 x tensor=2 runs full fine-tuning with
grad_accum=4 and LoRA (frozen weights sharded too) with grad_accum=1, both against one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ftjax.lora import apply_lora
from ftjax.config import default_config, validate
from ftjax.sharding import make_mesh, parse_rules
from ftjax.train.optimizer import make_optimizer
from ftjax.train.state import init_state, place_state
from ftjax.train.step import make_train_step
from train_helpers import make_batch, tiny_model

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5
STEPS = 2

# SGD with momentum keeps the update linear in the gradient. Adam's first steps are ~lr·sign(g), so
# an entry whose gradient is ~0 can flip by 2·lr on float rounding alone and no mesh could match.
OPTIM = ml_collections.ConfigDict(dict(name="sgd", lr=0.5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                                       clip_norm=0.0, min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9))

MESHES = {  # name: (data, fsdp, tensor, grad_accum)
    "data8": (8, 1, 1, 1),
    "fsdp8": (1, 8, 1, 1),
    "d2f2t2_accum4": (2, 2, 2, 4),
}


def host(tree):
    return jax.tree.map(np.asarray, tree)


def build(method):
    if method == "full":
        return lambda: tiny_model(0)
    return lambda: apply_lora(tiny_model(0), 4, 8.0, dropout=0.1, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def batch():
    return make_batch(16, 16, seed=1)


@pytest.fixture(scope="module")
def initial():
    """Each method's initial model, on the host, so every mesh starts from the very same numbers."""
    out = {}
    for method in ("full", "lora"):
        opt = make_optimizer(OPTIM, 10)
        filt = nnx.Param if method == "full" else nnx.LoRAParam
        mesh1 = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        state = init_state(build(method), opt.tx, mesh1, trainable=filt)
        out[method] = (state.graphdef, host(state.trainable), host(state.frozen), filt)
    return out


def train(initial, method, batch, data=1, fsdp=1, tensor=1, grad_accum=1, rules=None):
    """STEPS steps on a mesh; returns (losses, final trainable on the host, final trainable on device)."""
    graphdef, trainable, frozen, filt = initial[method]
    devices = jax.devices()[: data * fsdp * tensor]
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    opt = make_optimizer(OPTIM, 10)
    model = nnx.merge(graphdef, *jax.tree.map(jnp.asarray, (trainable, frozen)))
    state = place_state(model, opt.tx, mesh, trainable=filt, rules=rules)
    step = make_train_step(state, opt, mesh, grad_accum=grad_accum, loss_chunk=8, rules=rules)
    t, o = state.trainable, state.opt_state
    losses = []
    for i in range(STEPS):
        t, o, m = step(t, o, state.frozen, batch, jax.random.key(i))
        losses.append(m["loss"])
    assert step.traces == 1
    return [float(x) for x in losses], host(t), t


@pytest.fixture(scope="module")
def reference(initial, batch):
    return {method: train(initial, method, batch) for method in ("full", "lora")}


def assert_same_training(got, want, start, must_move=lambda path: True):
    (losses, params, _), (ref_losses, ref_params, _) = got, want
    np.testing.assert_allclose(losses, ref_losses, rtol=LOSS_RTOL)
    flat, ref_flat, start_flat = (dict(nnx.to_flat_state(x)) for x in (params, ref_params, start))
    assert set(flat) == set(ref_flat)
    for path, ref in ref_flat.items():
        ref, value, before = np.asarray(ref[...]), np.asarray(flat[path][...]), np.asarray(start_flat[path][...])
        tol = PARAM_RTOL * np.linalg.norm(ref)
        assert np.linalg.norm(value - ref) <= tol, path
        if must_move(path):  # not vacuous: training moved the tensor by more than the tolerance
            assert np.linalg.norm(ref - before) > tol, path


@pytest.mark.parametrize("name", list(MESHES))
@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_full_finetuning_same_on_every_mesh(initial, reference, batch, name):
    data, fsdp, tensor, accum = MESHES[name]
    got = train(initial, "full", batch, data, fsdp, tensor, accum)
    assert_same_training(got, reference["full"], initial["full"][1])
    q_kernel = got[2]["layers"]["self_attn"]["q_proj"]["kernel"]
    want = P(None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
    assert q_kernel[...].sharding.spec == want  # placed by the rules table, not replicated
    if fsdp > 1:
        shard = q_kernel[...].addressable_shards[0].data.shape
        assert shard[1] == q_kernel[...].shape[1] // fsdp


def test_mesh_rules_override_places_by_the_config_and_gives_the_same_training(initial, reference, batch):
    """mesh.rules swaps the roles of fsdp and tensor in the layers: the weights move, the losses do not."""
    c = default_config()
    c.mesh.rules = "embed=tensor, heads=fsdp,kv=fsdp,mlp=fsdp,act_heads=fsdp,act_kv=fsdp,act_mlp=fsdp"
    rules = parse_rules(validate(c).mesh.rules)
    got = train(initial, "full", batch, 2, 2, 2, 2, rules=rules)
    assert_same_training(got, reference["full"], initial["full"][1])
    assert got[2]["layers"]["self_attn"]["q_proj"]["kernel"][...].sharding.spec == P(None, "tensor", "fsdp")
    assert got[2]["layers"]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P(None, "fsdp", "tensor")


def test_lora_with_dropout_same_on_mesh(initial, reference, batch):
    got = train(initial, "lora", batch, 2, 2, 2)
    # B (zero at init) gets gradients at once; A only once B is non-zero, by too little to check here
    assert_same_training(got, reference["lora"], initial["lora"][1], must_move=lambda path: path[-1] == "lora_b")


def test_frozen_bf16_keeps_trainable_and_optimizer_fp32(initial, batch):
    graphdef, trainable, frozen, filt = initial["lora"]
    mesh = make_mesh(2, 2, 2)
    opt = make_optimizer(OPTIM, 10)
    model = nnx.merge(graphdef, *jax.tree.map(jnp.asarray, (trainable, frozen)))
    state = place_state(model, opt.tx, mesh, trainable=filt, frozen_dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    frozen_sharding = state.frozen["layers"]["mlp"]["up_proj"]["kernel"][...].sharding.spec
    assert frozen_sharding == P(None, "fsdp", "tensor")
