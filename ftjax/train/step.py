"""The train step: `(trainable, opt_state, frozen, batch, rng) -> (trainable, opt_state, metrics)`.

One code path for LoRA and full fine-tuning (only the filter that made `trainable` differs),
compiled once with explicit in/out shardings, trainable and optimizer state donated. Gradients
are accumulated over micro-batches by `lax.scan`; the loss is the token-weighted mean over the
whole global batch. Metrics stay on device; the loop fetches them every `log_every` steps.
Dropout masks do not depend on the mesh, but do on grad_accum (each micro-batch gets its own key).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ftjax.errors import ConfigError
from ftjax.sharding import activation_sharding, batch_sharding, batch_shards
from ftjax.train.loss import chunked_cross_entropy, fused_cross_entropy
from ftjax.train.optimizer import Optimizer
from ftjax.train.state import StateShardings

BATCH_KEYS = ("input_ids", "targets", "loss_weights", "segment_ids", "positions")


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
                 grad_hook: Callable[[Any], Any] | None = None):
        if grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {grad_accum}")
        self.graphdef, self.optimizer, self.mesh, self.rules = graphdef, optimizer, mesh, rules
        self.grad_accum, self.loss_chunk, self.grad_hook = grad_accum, loss_chunk, grad_hook
        self.trainable_sharding = shardings.trainable
        self.traces = 0
        replicated = NamedSharding(mesh, PartitionSpec())
        self.batch_sharding = batch_sharding(mesh, rules)
        self._micro_sharding = NamedSharding(mesh, PartitionSpec(None, *self.batch_sharding.spec))
        self._jitted = jax.jit(
            self._step,
            in_shardings=(shardings.trainable, shardings.opt_state, shardings.frozen, self.batch_sharding,
                          replicated),
            out_shardings=(shardings.trainable, shardings.opt_state, replicated),
            donate_argnums=(0, 1))

    def __call__(self, trainable, opt_state, frozen, batch: dict, rng: jax.Array):
        check_batch(batch, self.grad_accum, batch_shards(self.mesh, self.rules))
        return self._jitted(trainable, opt_state, frozen, {k: batch[k] for k in BATCH_KEYS}, rng)

    def _loss(self, trainable, frozen, micro: dict, rng, total_weight):
        """This micro-batch's share of the global mean loss: sum(w · CE) / total weight."""
        model = nnx.merge(self.graphdef, trainable, frozen)
        h = model.hidden(micro["input_ids"], micro["positions"], micro["segment_ids"], rng=rng)
        if hasattr(model, "head_weight"):  # the head's matmuls fused with the loss: no logits recompute
            w, vocab_major = model.head_weight()
            loss_sum, _ = fused_cross_entropy(h.astype(w.dtype), w, micro["targets"], micro["loss_weights"],
                                              self.loss_chunk, vocab_major=vocab_major)
        else:
            loss_sum, _ = chunked_cross_entropy(model.logits, h, micro["targets"], micro["loss_weights"],
                                                self.loss_chunk)
        return loss_sum / total_weight

    def _step(self, trainable, opt_state, frozen, batch, rng):
        self.traces += 1
        with activation_sharding(self.mesh, self.rules):
            weight_sum = jnp.sum(batch["loss_weights"].astype(jnp.float32))
            # An all-padding batch gives zero loss and zero gradients instead of 0/0.
            total_weight = jnp.where(weight_sum == 0, 1.0, weight_sum)
            micro = jax.lax.with_sharding_constraint(micro_batches(batch, self.grad_accum), self._micro_sharding)
            rngs = jax.random.split(rng, self.grad_accum)
            grad_fn = jax.value_and_grad(self._loss)

            def accumulate(acc, xs):
                mb, r = xs
                loss, grads = grad_fn(trainable, frozen, mb, r, total_weight)
                acc_loss, acc_grads = acc
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                acc_grads = jax.lax.with_sharding_constraint(acc_grads, self.trainable_sharding)
                return (acc_loss + loss, acc_grads), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (loss, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), (micro, rngs))
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
            }
        return trainable, opt_state, metrics


def make_train_step(state, optimizer: Optimizer, mesh: Mesh, *, grad_accum: int = 1, loss_chunk: int = 512,
                    rules: dict | None = None, grad_hook: Callable[[Any], Any] | None = None) -> TrainStep:
    """The step for a `TrainState` (its graphdef and shardings fix what the step compiles for)."""
    return TrainStep(state.graphdef, optimizer, mesh, state.shardings, grad_accum=grad_accum,
                     loss_chunk=loss_chunk, rules=rules, grad_hook=grad_hook)
