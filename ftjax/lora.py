"""LoRA from outside the model: adapters attached to the linears whose path matches a pattern.

The adapter params are `nnx.LoRAParam`, so `nnx.split(model, nnx.LoRAParam, ...)` partitions
the model into what trains and what stays frozen. Adapters on stacked linears hold stacked
params ([L, in, r] / [L, r, out]) and are sliced per layer by the model's `lax.scan`; a mixture-of-experts
model's experts take per-expert adapters ([L, E, in, r] / [L, E, r, out]) that its grouped matmuls apply.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.config import LORA_TARGETS
from ftjax.errors import ConfigError
from ftjax.models.adapter import ADAPTER_HIDDEN
from ftjax.models.layers import Linear, dense_kernel
from ftjax.models.moe import EXPERT_NAMES, Experts
from ftjax.models.phi import FUSED_NAMES
from ftjax.quant.weight import QuantizedParam

UNSUPPORTED = ("lm_head",)  # the loss reads lm_head's kernel directly, so an adapter there would be ignored
# The experts' adapters, by the names PEFT's `target_parameters` gives transformers 5's fused expert weights: one
# over gate|up (ftjax keeps gate and up apart; the adapter's output is split between them) and one over down.
EXPERT_TARGETS = tuple(Experts.ADAPTED)


class LoRA(nnx.Module):
    """Low-rank update scale · dropout(x) @ A @ B (PEFT semantics); A [*stack, in, r], B [*stack, r, out].
    The model's `ftjax.models.adapter.Adapter`: what a projection holds at its attach point."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, in_axis: str | None,
                 out_axis: str | None, stack: tuple = (), dropout: float = 0.0, rslora: bool = False,
                 param_dtype=jnp.float32, lead_axes: tuple | None = None, rngs: nnx.Rngs):
        lead = ("layers",) * len(stack) if lead_axes is None else lead_axes  # an expert adapter: (layers, expert)
        # PEFT's default: kaiming_uniform_(a=sqrt(5)) on A [r, in] is U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1.0 / math.sqrt(in_features)
        a = jax.random.uniform(rngs.params(), (*stack, in_features, rank), jnp.float32, -bound, bound)
        self.lora_a = nnx.LoRAParam(a.astype(param_dtype), logical_axes=lead + (in_axis, "lora_rank"))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*stack, rank, out_features), param_dtype),
                                    logical_axes=lead + ("lora_rank", out_axis))
        self.rank, self.alpha, self.dropout, self.rslora = rank, float(alpha), float(dropout), bool(rslora)

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rank-stabilized LoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Dropout applies to the adapter's input only, and only when an rng is given (training)."""
        if self.dropout > 0.0 and rng is not None:
            keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
        a, b = self.lora_a[...].astype(x.dtype), self.lora_b[...].astype(x.dtype)
        return checkpoint_name(x @ a, ADAPTER_HIDDEN) @ b * jnp.asarray(self.scale, x.dtype)

    def low_rank(self, dtype, rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, float] | None:
        """(A, B, scale) in `dtype` for the model's fused projections; None when this call draws dropout."""
        if self.dropout > 0.0 and rng is not None:
            return None
        return self.lora_a[...].astype(dtype), self.lora_b[...].astype(dtype), self.scale

    def delta(self) -> jax.Array:
        """scale · A @ B in fp32, the kernel-shaped update that merging adds."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scale * jnp.einsum("...ir,...ro->...io", a, b)


def parse_targets(targets: str | Sequence[str]) -> tuple[str, ...]:
    """`"q_proj,v_proj"` or a sequence of patterns -> tuple of patterns."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    out = tuple(t.strip() for t in items if t.strip())
    if not out:
        raise ConfigError("lora.targets is empty; name at least one module, e.g. 'q_proj,v_proj'")
    return out


def matches(path: str, patterns: Sequence[str]) -> bool:
    """A dotted module path matches a pattern by name suffix ('q_proj') or fnmatch ('layers.mlp.*')."""
    return any(path == p or path.endswith("." + p) or fnmatch.fnmatchcase(path, p) for p in patterns)


def default_targets(patterns: tuple[str, ...], names: set[str]) -> tuple[str, ...]:
    """The default targets name Llama's projections; on a model that stores them fused (Phi-3: qkv_proj,
    gate_up_proj) they mean the fused ones, one adapter over each fused output; on a mixture-of-experts model
    (`names` holds "experts", no gate_proj linear) the MLP's mean the experts' gate|up and down. Explicit targets
    stay as given."""
    if patterns != parse_targets(LORA_TARGETS):
        return patterns
    if FUSED_NAMES["q_proj"] in names:
        renames = FUSED_NAMES
    elif "experts" in names and "gate_proj" not in names:
        renames = EXPERT_NAMES
    else:
        return patterns
    return tuple(dict.fromkeys(renames.get(p, p) for p in patterns))


def linears(model: nnx.Module) -> Iterator[tuple[str, Linear]]:
    """Every `Linear` of the model with its dotted path."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield ".".join(str(p) for p in path), node


def apply_lora(model: nnx.Module, rank: int, alpha: float, *, targets: str | Sequence[str] = LORA_TARGETS,
               dropout: float = 0.0, rslora: bool = False, rngs: nnx.Rngs) -> nnx.Module:
    """Attach a fresh adapter (A random, B zero) to every matching linear, and to the experts' gate|up and down
    weights that a pattern naming the experts matches (`expert_match`), in place; returns the model.

    A pattern that matches nothing is an error, so a misspelled target cannot silently train nothing.
    """
    if rank < 1:
        raise ConfigError(f"lora.rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}")
    candidates = list(linears(model))
    experts = expert_params(model)
    names = {path.split(".")[-1] for path, _ in candidates} | ({"experts"} if experts else set())
    patterns = default_targets(parse_targets(targets), names)
    hit = {p: False for p in patterns}
    for path, linear in candidates:
        if not matches(path, patterns):
            continue
        for p in patterns:
            hit[p] |= matches(path, (p,))
        if path.split(".")[-1] in UNSUPPORTED:
            raise ConfigError(f"lora.targets matches '{path}': LoRA on the output head is not supported")
        if linear.lora is not None:
            raise ConfigError(f"'{path}' already has a LoRA adapter")
        kernel = linear.kernel
        shape = kernel.get_value().shape  # also a quantized kernel's (ftjax.quant.weight.QuantizedWeight.shape)
        axes = kernel.get_metadata().get("logical_axes") or (None,) * len(shape)
        stack = tuple(shape[:-2])
        linear.lora = nnx.data(LoRA(linear.in_features, linear.out_features, rank=rank, alpha=alpha,
                                    in_axis=axes[-2], out_axis=axes[-1], stack=stack, dropout=dropout,
                                    rslora=rslora, rngs=rngs))
    for path, module, name in experts:
        hits = [p for p in patterns if expert_match(path, p)]
        if not hits:
            continue
        hit.update({p: True for p in hits})
        if dropout:
            raise ConfigError(f"lora.targets matches '{path}': expert adapters take no lora.dropout (PEFT's "
                              f"target_parameters neither); set lora.dropout=0")
        attach_expert_lora(module, name, rank, alpha, rslora, rngs)
    missing = [p for p, ok in hit.items() if not ok]
    if missing:
        names = sorted({path.split(".")[-1] for path, _ in candidates})
        also = " or the experts (experts.gate_up_proj, experts.down_proj)" if experts else ""
        raise ConfigError(f"lora.targets pattern(s) {', '.join(missing)} match no linear layer{also} "
                          f"(linear layers: {', '.join(names)})")
    return model


def expert_params(model: nnx.Module) -> list[tuple[str, Experts, str]]:
    """(dotted path, experts module, name) of each mixture-of-experts weight an adapter may target
    (`layers.mlp.experts.gate_up_proj`, `layers.mlp.experts.down_proj`)."""
    return [(".".join(str(p) for p in (*path, name)), node, name) for path, node in nnx.iter_graph(model)
            if isinstance(node, Experts) for name in EXPERT_TARGETS]


def expert_match(path: str, pattern: str) -> bool:
    """An expert weight matches a pattern that names the experts: 'experts' (both), 'experts.down_proj',
    'mlp.experts.gate_up_proj' (PEFT's target_parameters), or an fnmatch pattern such as '*experts*'. A bare
    'down_proj' means the dense MLP's linear, not the experts."""
    return "experts" in pattern and (matches(path, (pattern,)) or matches(path.rsplit(".", 1)[0], (pattern,)))


def expert_lora_attr(name: str) -> str:
    """The Experts attach point of the adapter over `name`, as the model names it (`Experts.ADAPTED`)."""
    return Experts.ADAPTED[name]


def attach_expert_lora(experts: Experts, name: str, rank: int, alpha: float, rslora: bool, rngs: nnx.Rngs) -> None:
    """A per-expert adapter (A [*stack, E, in, r] random, B zero) over gate|up or down, in place."""
    attr = expert_lora_attr(name)
    if getattr(experts, attr) is not None:
        raise ConfigError(f"the experts' {name} already has a LoRA adapter")
    stack, in_f, out_f, axes = experts.adapted_weight(name)
    setattr(experts, attr, nnx.data(LoRA(in_f, out_f, rank=rank, alpha=alpha, in_axis=axes[-2], out_axis=axes[-1],
                                         stack=stack, rslora=rslora, lead_axes=axes[:-2], rngs=rngs)))


def kernel_dtype(kernel: nnx.Variable):
    """The dtype a kernel computes in (a quantized one: what it dequantizes to)."""
    return jnp.dtype(kernel.get_value().dtype)


def frozen_quant_kernels(model: nnx.Module, targets: str | Sequence[str] | None) -> list[tuple[str, Linear]]:
    """The linears whose kernels a quantized base holds quantized: those matching `targets` (the LoRA
    targets), or every linear for None; never the output head (the loss reads it whole, as QLoRA keeps it)."""
    candidates = list(linears(model))
    names = {path.split(".")[-1] for path, _ in candidates}
    patterns = None if targets is None else default_targets(parse_targets(targets), names)
    return [(path, lin) for path, lin in candidates if path.split(".")[-1] not in UNSUPPORTED
            and (patterns is None or matches(path, patterns))]


def adapters_only(trainable) -> bool:
    """True when every trainable leaf is an adapter factor (`nnx.LoRAParam`, by type, not by path): all-zero
    trainables then give the base model exactly."""
    leaves = jax.tree.leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return bool(leaves) and all(isinstance(v, nnx.LoRAParam) for v in leaves)


def merge_lora(model: nnx.Module) -> dict[str, LoRA]:
    """Fold each adapter into its kernel (W + scale·A·B, computed in fp32) and detach it, in place; the experts'
    adapters too (gate|up's update split between gate_proj and up_proj).

    Returns the detached adapters by path, which `unmerge_lora` takes to undo the merge.
    """
    adapters = {}
    for path, linear in linears(model):
        if linear.lora is None:
            continue
        kernel = dense_kernel(linear.kernel, jnp.float32)
        merged_kernel = (kernel + linear.lora.delta()).astype(kernel_dtype(linear.kernel))
        if isinstance(linear.kernel, QuantizedParam):  # a quantized base merges into a plain kernel
            linear.kernel = nnx.Param(merged_kernel, **linear.kernel.get_metadata())
        else:
            linear.kernel[...] = merged_kernel
        adapters[path] = linear.lora
        linear.lora = None
    for path, experts, name in expert_params(model):
        attr = expert_lora_attr(name)
        lora = getattr(experts, attr)
        if lora is not None:
            _add_expert_delta(experts, name, lora.delta())
            adapters[path] = lora
            setattr(experts, attr, None)
    return adapters


def _add_expert_delta(experts: Experts, name: str, delta: jax.Array) -> None:
    """W += delta over the experts' weights (gate|up's split in two), computed in fp32."""
    weights = (experts.down_proj,) if name == "down_proj" else (experts.gate_proj, experts.up_proj)
    parts = jnp.split(delta, len(weights), axis=-1)
    for w, d in zip(weights, parts):
        w[...] = (w[...].astype(jnp.float32) + d).astype(w[...].dtype)


def unmerge_lora(model: nnx.Module, adapters: dict[str, LoRA]) -> nnx.Module:
    """Subtract merged adapters from their kernels and re-attach them (inverse of `merge_lora`)."""
    by_path = dict(linears(model))
    experts_by_path = {path: (experts, name) for path, experts, name in expert_params(model)}
    for path, lora in adapters.items():
        if path in experts_by_path:
            experts, name = experts_by_path[path]
            _add_expert_delta(experts, name, -lora.delta())
            setattr(experts, expert_lora_attr(name), lora)
            continue
        linear = by_path[path]
        kernel = linear.kernel[...]
        linear.kernel[...] = (kernel.astype(jnp.float32) - lora.delta()).astype(kernel.dtype)
        linear.lora = lora
    return model


def merged(model: nnx.Module) -> nnx.Module:
    """A merged copy (plain linears, for export and fast inference); `model` keeps its adapters."""
    copy = nnx.clone(model)
    merge_lora(copy)
    return copy
