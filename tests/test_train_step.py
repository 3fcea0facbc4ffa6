"""The train step on one device: it learns, compiles once, accumulates exactly, guards NaNs, and
trains only what the filter selects."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ftjax.lora import apply_lora
from ftjax.objectives.loss import chunked_cross_entropy, token_cross_entropy
from ftjax.objectives.terms import StepTerm, cross_entropy
from ftjax.sharding import make_mesh
from ftjax.train.optimizer import (GuardState, NonFiniteError, decay_mask, make_optimizer, make_schedule,
                                   raise_if_diverged)
from ftjax.train.state import init_state, split, state_size
from ftjax.train.step import make_train_step
from train_helpers import TINY, make_batch, tiny_model

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5
RANK = 4


def optim(name="adamw", lr=1e-2, **kw):
    base = dict(name=name, lr=lr, schedule="constant", warmup_steps=0, weight_decay=0.0, clip_norm=1.0,
                min_lr_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8, momentum=0.9)
    return ml_collections.ConfigDict({**base, **kw})


def lora_build(seed=0):
    """LoRA on a tiny model whose head has pre-trained-like scale (std 0.6, not 0.02): behind the
    final norm a 0.02-std head caps |logits| below 1, and then no adapter could fit a batch."""

    def build():
        model = tiny_model(seed)
        model.lm_head.kernel[...] = 30.0 * model.lm_head.kernel[...]
        return apply_lora(model, RANK, 2.0 * RANK, rngs=nnx.Rngs(seed + 1))

    return build


def run(state, step, batch, steps, seed=0):
    """`steps` steps on one fixed batch; returns final (trainable, opt_state) and host metrics per step."""
    t, o = state.trainable, state.opt_state
    history = []
    for i in range(steps):
        t, o, m = step(t, o, state.frozen, batch, jax.random.key(seed + i))
        history.append(m)
    return t, o, jax.device_get(history)


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def mesh1():
    return make_mesh(1, 1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def batch():
    return make_batch(4, 16)


@pytest.fixture(scope="module")
def lora_run(mesh1, batch):
    """LoRA trained 30 steps on one batch: initial state (on host), final state, metrics, the step."""
    opt = make_optimizer(optim("adamw", lr=2e-2), 30)
    state = init_state(lora_build(), opt.tx, mesh1, trainable=nnx.LoRAParam)
    before = host((state.trainable, state.frozen, state.opt_state))
    step = make_train_step(state, opt, mesh1, loss_chunk=4)
    t, o, history = run(state, step, batch, 30)
    return dict(state=state, before=before, trainable=t, opt_state=o, history=history, step=step)


def test_lora_learns_and_compiles_once(lora_run):
    losses = [float(m["loss"]) for m in lora_run["history"]]
    assert losses[0] > 3.5  # at least log(64): a random model
    assert losses[-1] < 0.05  # memorized the batch
    assert lora_run["step"].traces == 1  # 30 calls, one trace
    m = lora_run["history"][-1]
    assert int(m["tokens"]) == int(np.sum(make_batch(4, 16)["loss_weights"] > 0))
    assert int(m["skipped"]) == 0 and float(m["lr"]) == pytest.approx(2e-2)
    assert float(m["grad_norm"]) > 0


def test_lora_trains_only_adapters(lora_run):
    state, (t0, f0, _) = lora_run["state"], lora_run["before"]
    # frozen weights are bitwise unchanged (still readable: they are never donated)
    jax.tree.map(np.testing.assert_array_equal, f0, host(state.frozen))
    flat0 = dict(nnx.to_flat_state(t0))
    flat1 = dict(nnx.to_flat_state(host(lora_run["trainable"])))
    assert set(flat0) == set(flat1) and all(p[-1] in ("lora_a", "lora_b") for p in flat0)
    for path in flat0:
        assert np.all(np.asarray(flat1[path][...]) != np.asarray(flat0[path][...])), path  # every entry moved


def test_lora_optimizer_state_holds_only_adapters(lora_run):
    state = lora_run["state"]
    _, n_lora = state_size(state.trainable)
    per_layer = sum(32 * RANK + RANK * o for o in (32, 16, 16, 32, 64, 64)) + 64 * RANK + RANK * 32
    assert n_lora == TINY.num_layers * per_layer
    leaves, size = state_size(state.opt_state)
    # AdamW: mu and nu per adapter param, plus a few scalar counters; nothing frozen-sized
    assert size == 2 * n_lora + (leaves - 2 * 14)
    assert leaves - 2 * 14 <= 8
    lora_shapes = {v.shape for v in jax.tree.leaves(state.trainable)}
    assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} == lora_shapes


def test_full_finetuning_learns(mesh1, batch):
    opt = make_optimizer(optim("adamw", lr=1e-2), 30)
    state = init_state(lambda: tiny_model(0), opt.tx, mesh1, trainable=nnx.Param)
    assert not jax.tree.leaves(state.frozen)
    step = make_train_step(state, opt, mesh1, loss_chunk=16)
    _, _, history = run(state, step, batch, 30)
    assert float(history[0]["loss"]) > 3.5 and float(history[-1]["loss"]) < 0.05


def test_chunked_cross_entropy_equals_unchunked(batch):
    """Loss and gradients (w.r.t. hidden states and head) match the plain [B, T, V] computation."""
    b, t = batch["targets"].shape
    d, v = 8, TINY.vocab_size
    kh, kw = jax.random.split(jax.random.key(0))
    h, w = jax.random.normal(kh, (b, t, d)), jax.random.normal(kw, (d, v))
    targets, weights = batch["targets"], batch["loss_weights"]

    def full(h, w):
        ce = token_cross_entropy(h @ w, targets)
        return jnp.sum(ce * weights) / jnp.sum(weights)

    def chunked(h, w, chunk):
        s, total = chunked_cross_entropy(lambda x: x @ w, h, targets, weights, chunk)
        return s / total

    want, want_g = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(h, w)
    for chunk in (5, 4):  # a ragged last chunk, even chunks
        got, got_g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1)), static_argnums=2)(h, w, chunk)
        np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=LOSS_RTOL), got_g, want_g)
    # no value as large as the whole [B, T, V] logits exists in the forward or backward pass
    jaxpr = jax.make_jaxpr(jax.grad(chunked, argnums=(0, 1)), static_argnums=2)(h, w, 4)
    assert max_logits_size(jaxpr.jaxpr) <= b * 4 * v
    assert max_logits_size(jax.make_jaxpr(jax.grad(full))(h, w).jaxpr) == b * t * v
    # closed form: uniform logits give log(V) per token
    uniform = lambda x: jnp.zeros(x.shape[:2] + (v,), jnp.float32)
    s, total = jax.jit(lambda h: chunked_cross_entropy(uniform, h, targets, weights, 4))(h)
    np.testing.assert_allclose(s / total, np.log(v), rtol=LOSS_RTOL)


def nan_in_one_entry() -> StepTerm:
    """A test-only term whose gradient is NaN in the first entry of every trainable array (and 0 elsewhere)."""
    return StepTerm("nan_probe", lambda t, base: sum(jnp.nan * x[(0,) * x.ndim] for x in jax.tree.leaves(t)))


def test_nonfinite_steps_are_skipped_and_counted(lora_run, mesh1, batch):
    state, step = lora_run["state"], lora_run["step"]  # after 30 good steps: non-trivial optimizer state
    nan_step = make_train_step(state, step.optimizer, mesh1, terms=[cross_entropy(4), nan_in_one_entry()])
    bad = dict(batch, loss_weights=batch["loss_weights"].copy())
    bad["loss_weights"][1, 3] = np.nan
    t, o, frozen = jax.tree.map(jnp.copy, (lora_run["trainable"], lora_run["opt_state"], state.frozen))

    def skipped(fn, b, t, o):
        t_before, o_before = host(t), host(o)
        t, o, m = fn(t, o, frozen, b, jax.random.key(1))
        jax.tree.map(np.testing.assert_array_equal, host(t), t_before)
        jax.tree.map(np.testing.assert_array_equal, host(o.inner), o_before.inner)
        return t, o, jax.device_get(m)

    t, o, m = skipped(step, bad, t, o)  # NaN in the loss weights
    assert (m["skipped"], m["consecutive_skips"], int(o.applied)) == (1, 1, 30)
    t, o, m = step(t, o, frozen, batch, jax.random.key(2))
    assert (int(m["skipped"]), int(m["consecutive_skips"]), int(o.applied)) == (1, 0, 31)
    t, o, m = skipped(nan_step, batch, t, o)  # NaN in the gradients
    t, o, m = skipped(nan_step, batch, t, o)
    assert (m["skipped"], m["consecutive_skips"], m["longest_skip_run"], int(o.applied)) == (3, 2, 2, 31)
    raise_if_diverged(m, 3)
    with pytest.raises(NonFiniteError):
        raise_if_diverged(m, 2)
    assert step.traces == 1 and nan_step.traces == 1  # bad batches and skips did not retrace


def test_adamw_mask_and_schedules():
    _, params, _ = split(nnx.eval_shape(lora_build()), nnx.Param)
    mask = {tuple(map(str, p)): bool(jax.tree.leaves(v)[0])
            for p, v in nnx.to_flat_state(decay_mask(params))}
    no_decay = sorted(".".join(p) for p, m in mask.items() if not m)
    assert no_decay == ["layers.input_layernorm.scale", "layers.post_attention_layernorm.scale", "norm.scale"]
    assert mask[("layers", "self_attn", "q_proj", "kernel")] and mask[("embed_tokens",)]
    assert mask[("layers", "self_attn", "q_proj", "lora", "lora_a")]
    # weight decay really skips the norm scales: with zero gradients only decayed params shrink
    opt = make_optimizer(optim("adamw", lr=0.1, weight_decay=0.5, clip_norm=0.0), 10)
    params = {"norm": {"scale": jnp.ones(3)}, "proj": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.tx.update(zeros, opt.tx.init(params), params)
    assert float(updates["proj"]["kernel"][0, 0]) == pytest.approx(-0.1 * 0.5)
    assert not np.any(updates["norm"]["scale"]) and not np.any(updates["proj"]["bias"])
    # warmup starts at lr/warmup on step 1, peaks, then decays to min_lr_ratio * lr
    cos = make_schedule("cosine", 1.0, 110, warmup_steps=10, min_lr_ratio=0.1)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
    assert float(cos(110)) == pytest.approx(0.1)
    lin = make_schedule("linear", 2.0, 20, warmup_steps=0)
    assert float(lin(10)) == pytest.approx(1.0) and float(lin(0)) == pytest.approx(2.0)
    assert float(make_schedule("constant", 3.0, 5, warmup_steps=2)(4)) == pytest.approx(3.0)


def max_logits_size(jaxpr) -> int:
    """Largest vocab-sized array ([..., V]) any equation produces, inside scans and remats too."""
    best = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            shape = getattr(v.aval, "shape", ())
            if shape and shape[-1] == TINY.vocab_size:
                best = max(best, int(np.prod(shape)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    best = max(best, max_logits_size(sub))
    return best


@pytest.mark.parametrize("name", ["sgd", "adafactor", "lion"])
def test_other_optimizers_step(name):
    params = {"w": jnp.ones((4, 3)), "scale": jnp.ones((3,))}
    opt = make_optimizer(optim(name, lr=0.1), 10)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = opt.tx.update(grads, opt.tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["w"][0, 0]) < 1.0  # every rule moves against a positive gradient
    assert isinstance(state, GuardState) and int(state.applied) == 1
