"""The train step: `(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)`.

One code path for LoRA and full fine-tuning (only the filter that made `trainable` differs),
compiled once with explicit in/out shardings, trainable and optimizer state donated. Gradients
are accumulated over micro-batches by `lax.scan`; the loss is the token-weighted mean over the
whole global batch. Metrics stay on device; the loop fetches them every `log_every` steps.
Dropout masks do not depend on the mesh, but do on grad_accum (each micro-batch gets its own key).

Forgetting control (ftjax/train/regularizers.py): `kl_weight` adds KL(base ‖ tuned) on a retain batch of
the same shape; `l2_weight` adds Σ‖W − W_base‖². `base` is the step-0 copy of the trainable weights (full
fine-tuning); without it the KL's base is the same model with zero adapters (LoRA: no second copy).
`metrics["loss"]` stays the task cross-entropy; `kl_reg`, `l2_reg` (unweighted) and `loss_total` join it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.data.packing import BATCH_KEYS
from ftjax.errors import ConfigError
from ftjax.sharding import activation_sharding, batch_sharding, batch_shards
from ftjax.train.loss import chunked_cross_entropy, fused_cross_entropy
from ftjax.train.optimizer import Optimizer
from ftjax.train.regularizers import chunked_kl_to_base, l2_to_base, lora_base_trainable
from ftjax.train.state import StateShardings


def micro_batches(batch: dict, grad_accum: int) -> dict:
    """[B, ...] -> [A, B/A, ...]; micro-batch i holds rows i, A+i, 2A+i, ... so each device's rows
    are spread evenly over the micro-batches and no row moves between devices."""

    def one(x):
        rows = x.shape[0] // grad_accum
        return x.reshape(rows, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    return {k: one(batch[k]) for k in BATCH_KEYS}


def check_batch(batch: dict, grad_accum: int, shards: int) -> None:
    """Shapes that cannot be split are a config error, reported before compiling."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ConfigError(f"batch is missing {', '.join(missing)}")
    rows = batch["input_ids"].shape[0]
    if rows % (grad_accum * shards):
        raise ConfigError(f"global batch of {rows} rows does not split into train.grad_accum={grad_accum} "
                          f"micro-batches over {shards} batch shards (mesh.data x mesh.fsdp)")


class TrainStep:
    """The jitted step plus `traces`, a count of how often Python traced it (compile-once check).

    `batch` holds global [B, T] arrays laid out as `self.batch_sharding` (host numpy works on one
    process; on several, build them with `jax.make_array_from_process_local_data`). `grad_hook`
    (tests only) transforms the accumulated gradients before the optimizer, e.g. to inject a NaN.
    """

    def __init__(self, graphdef: nnx.GraphDef, optimizer: Optimizer, mesh: Mesh, shardings: StateShardings, *,
                 grad_accum: int = 1, loss_chunk: int = 512, rules: dict | None = None,
                 grad_hook: Callable[[Any], Any] | None = None, kl_weight: float = 0.0, l2_weight: float = 0.0,
                 with_base: bool = False):
        if grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {grad_accum}")
        if kl_weight < 0 or l2_weight < 0:
            raise ConfigError(f"forget.kl_weight and forget.l2_weight must be >= 0, got {kl_weight}, {l2_weight}")
        if l2_weight and not with_base:
            raise ConfigError("forget.l2_weight needs the step-0 copy of the weights (with_base=True)")
        self.graphdef, self.optimizer, self.mesh, self.rules = graphdef, optimizer, mesh, rules
        self.grad_accum, self.loss_chunk, self.grad_hook = grad_accum, loss_chunk, grad_hook
        self.kl_weight, self.l2_weight, self.with_base = float(kl_weight), float(l2_weight), with_base
        self.trainable_sharding = shardings.trainable
        self.traces = 0
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = batch_sharding(mesh, rules)
        self._micro_sharding = NamedSharding(mesh, PartitionSpec(None, *self.batch_sharding.spec))
        self._jitted = jax.jit(
            self._step,
            in_shardings=(shardings.trainable, shardings.opt_state, shardings.frozen, self.batch_sharding,
                          replicated, shardings.trainable if with_base else None,
                          self.batch_sharding if kl_weight else None),
            out_shardings=(shardings.trainable, shardings.opt_state, replicated),
            donate_argnums=(0, 1))

    def __call__(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array, base=None,
                 retain: dict | None = None):
        """`base`: the step-0 trainable copy (when built `with_base`); `retain`: a retain batch (kl_weight > 0)."""
        shards = batch_shards(self.mesh, self.rules)
        check_batch(batch, self.grad_accum, shards)
        if (base is not None) != self.with_base:
            raise ConfigError("this step was built " + ("with" if self.with_base else "without") +
                              " a base copy of the weights; pass base= accordingly")
        if self.kl_weight:
            if not self.with_base and self.traces == 0 and not _all_adapters(trainable):
                raise ConfigError("forget.kl_weight without a base copy needs LoRA trainables (zero adapters = "
                                  "the base); for full fine-tuning pass the step-0 weights as base=")
            if retain is None:
                raise ConfigError("forget.kl_weight > 0 needs a retain batch every step (retain=...)")
            check_batch(retain, self.grad_accum, shards)
            retain = {k: retain[k] for k in BATCH_KEYS}
        else:
            retain = None
        return self._jitted(trainable, opt_state, frozen, {k: batch[k] for k in BATCH_KEYS}, rng, base, retain)

    def _loss(self, trainable, frozen, base, micro: dict, retain: dict | None, rng, total_weight, retain_weight):
        """This micro-batch's share of the global mean loss: sum(w · CE) / total weight, plus
        kl_weight · its share of the retain batch's token-mean KL(base ‖ tuned). Aux: (CE, KL) shares."""
        model = nnx.merge(self.graphdef, trainable, frozen)
        h = model.hidden(micro["input_ids"], micro["positions"], micro["segment_ids"], rng=rng)
        if hasattr(model, "head_weight"):  # the head's matmuls fused with the loss: no logits recompute
            w, vocab_major = model.head_weight()
            loss_sum, _ = fused_cross_entropy(h.astype(w.dtype), w, micro["targets"], micro["loss_weights"],
                                              self.loss_chunk, vocab_major=vocab_major)
        else:
            loss_sum, _ = chunked_cross_entropy(model.logits, h, micro["targets"], micro["loss_weights"],
                                                self.loss_chunk)
        ce = loss_sum / total_weight
        if retain is None:
            return ce, (ce, jnp.zeros((), jnp.float32))
        base_trainable = base if base is not None else lora_base_trainable(trainable)
        base_model = nnx.merge(self.graphdef, jax.lax.stop_gradient(base_trainable), frozen)
        args = (retain["input_ids"], retain["positions"], retain["segment_ids"])
        h_tuned = model.hidden(*args, rng=jax.random.fold_in(rng, 1))
        h_base = base_model.hidden(*args)  # no dropout: the base distribution is deterministic
        kl_sum, _ = chunked_kl_to_base(model.logits, h_tuned, base_model.logits, h_base, retain["loss_weights"],
                                       self.loss_chunk)
        kl = kl_sum / retain_weight
        return ce + self.kl_weight * kl, (ce, kl)

    def _step(self, trainable, opt_state, frozen, batch, rng, base, retain):
        self.traces += 1
        with activation_sharding(self.mesh, self.rules):
            total_weight = _total_weight(batch)
            retain_weight = _total_weight(retain) if retain is not None else None
            micro = jax.lax.with_sharding_constraint(micro_batches(batch, self.grad_accum), self._micro_sharding)
            retain_micro = None
            if retain is not None:
                retain_micro = jax.lax.with_sharding_constraint(micro_batches(retain, self.grad_accum),
                                                                self._micro_sharding)
            rngs = jax.random.split(rng, self.grad_accum)
            grad_fn = jax.value_and_grad(self._loss, has_aux=True)

            def accumulate(acc, xs):
                mb, rmb, r = xs
                (_, (ce, kl)), grads = grad_fn(trainable, frozen, base, mb, rmb, r, total_weight, retain_weight)
                acc_ce, acc_kl, acc_grads = acc
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                acc_grads = jax.lax.with_sharding_constraint(acc_grads, self.trainable_sharding)
                return (acc_ce + ce, acc_kl + kl, acc_grads), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            scalar = jnp.zeros((), jnp.float32)
            (loss, kl, grads), _ = jax.lax.scan(accumulate, (scalar, scalar, zeros), (micro, retain_micro, rngs))
            extra = {}
            if retain is not None:
                extra["kl_reg"] = kl
            if self.l2_weight:
                l2, l2_grads = jax.value_and_grad(l2_to_base)(trainable, base)
                grads = jax.tree.map(lambda g, d: g + self.l2_weight * d.astype(g.dtype), grads, l2_grads)
                extra["l2_reg"] = l2
            if extra:
                extra["loss_total"] = (loss + self.kl_weight * extra.get("kl_reg", 0.0)
                                       + self.l2_weight * extra.get("l2_reg", 0.0))
            if self.grad_hook is not None:
                grads = self.grad_hook(grads)
            lr = self.optimizer.schedule(opt_state.applied)  # the lr this update uses
            updates, opt_state = self.optimizer.tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            metrics = {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
                "lr": jnp.asarray(lr, jnp.float32),
                "tokens": jnp.sum(batch["loss_weights"] > 0).astype(jnp.int32),
                "skipped": opt_state.skipped,
                "consecutive_skips": opt_state.consecutive,
                "longest_skip_run": opt_state.longest,
                **extra,
            }
        return trainable, opt_state, metrics


def _all_adapters(trainable) -> bool:
    """True when every trainable leaf is a LoRA factor (so all-zero trainables give the base model)."""
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0]]
    names = [" ".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p) for p in paths]
    return bool(names) and all("lora_a" in n or "lora_b" in n for n in names)


def _total_weight(batch: dict) -> jax.Array:
    """Σ loss weights of a global batch; an all-padding batch gives 1 (zero loss and gradients, not 0/0)."""
    weight_sum = jnp.sum(batch["loss_weights"].astype(jnp.float32))
    return jnp.where(weight_sum == 0, 1.0, weight_sum)


def make_train_step(state, optimizer: Optimizer, mesh: Mesh, *, grad_accum: int = 1, loss_chunk: int = 512,
                    rules: dict | None = None, grad_hook: Callable[[Any], Any] | None = None,
                    kl_weight: float = 0.0, l2_weight: float = 0.0, with_base: bool = False) -> TrainStep:
    """The step for a `TrainState` (its graphdef and shardings fix what the step compiles for)."""
    return TrainStep(state.graphdef, optimizer, mesh, state.shardings, grad_accum=grad_accum,
                     loss_chunk=loss_chunk, rules=rules, grad_hook=grad_hook, kl_weight=kl_weight,
                     l2_weight=l2_weight, with_base=with_base)
