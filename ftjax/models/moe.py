"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE): top-k routing and dropless grouped SwiGLU experts.

Every token goes to its top-k experts (none dropped, no capacity): the routed copies are sorted by
expert and each expert's rows run through its own weights as one grouped matmul. Two grouped-matmul
paths give the same numbers: `jax.lax.ragged_dot` (XLA's grouped GEMM on TPU and GPU; on CPU jax lowers
it to a dense all-experts product, E times the work) and a sorted-token tiled matmul (work proportional
to the routed rows, so to top-k), the CPU default.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.errors import LoadError
from ftjax.models.adapter import ADAPTER_HIDDEN, Adapter
from ftjax.models.layers import _param, swiglu
from ftjax.sharding import active_platform, constrain

IMPLEMENTATIONS = ("auto", "ragged", "tiled")
# A dense MLP's projection names -> the expert weights that stand for them (LoRA's default targets mean these).
EXPERT_NAMES = {"gate_proj": "experts.gate_up_proj", "up_proj": "experts.gate_up_proj",
                "down_proj": "experts.down_proj"}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Expert count and size, top-k, and routing normalization (hashable: static under jit).

    `norm_topk_prob`: renormalize the top-k probabilities of the softmax over all experts to sum to 1
    (Mixtral always, which equals a softmax over the top-k logits; Qwen3-MoE when its config says so).
    """

    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001  # the HF config's weight of the balance loss (ftjax: moe.router_aux_weight)
    implementation: str = "auto"  # auto (tiled on CPU, ragged elsewhere) | ragged | tiled


def moe_from_hf(hf: dict, model_type: str, source: str) -> MoEConfig | None:
    """The experts of Mixtral / Qwen3-MoE; a scanned stack needs every layer sparse, so dense layers refuse."""
    if model_type == "mixtral":
        return MoEConfig(int(hf.get("num_local_experts", 8)), int(hf.get("num_experts_per_tok", 2)),
                         int(hf["intermediate_size"]), norm_topk_prob=True,
                         router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    if model_type != "qwen3_moe":
        return None
    experts = int(hf.get("num_experts", hf.get("num_local_experts", 128)))  # saved as num_local_experts
    if experts == 0:
        return None
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
        raise LoadError(f"{source}: dense layers among the experts (mlp_only_layers={hf.get('mlp_only_layers')}, "
                        f"decoder_sparse_step={hf.get('decoder_sparse_step')}) are not supported: ftjax needs "
                        "every layer sparse")
    return MoEConfig(experts, int(hf.get("num_experts_per_tok", 8)), int(hf.get("moe_intermediate_size", 768)),
                     norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                     router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))


def moe_to_hf(cfg) -> dict:
    """The config.json keys of a Mixtral / Qwen3-MoE `ModelConfig` that `moe_from_hf` reads; every layer sparse
    (ftjax has no dense layers among the experts); the balance-loss coefficient is transformers' default (it only
    matters when transformers trains with output_router_logits)."""
    moe = cfg.moe
    if moe is None:
        return {}
    d: dict = {"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": 0.001, "output_router_logits": False}
    if cfg.model_type == "mixtral":
        return {**d, "num_local_experts": moe.num_experts, "intermediate_size": moe.intermediate_size,
                "sliding_window": cfg.sliding_window}
    return {**d, "num_experts": moe.num_experts, "moe_intermediate_size": moe.intermediate_size,
            "norm_topk_prob": moe.norm_topk_prob, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "attention_bias": cfg.qkv_bias, "use_sliding_window": cfg.sliding_window is not None,
            "sliding_window": cfg.sliding_window}


def balance_loss_weight(cfg: MoEConfig, weight: float | None) -> float:
    """The router balance loss's weight: `weight` when set, else the model's own `router_aux_loss_coef`."""
    return cfg.router_aux_loss_coef if weight is None else float(weight)


def route(logits_ne: jax.Array, top_k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """(weights [N, k] fp32, experts [N, k] int32): softmax over all experts in fp32, then top-k."""
    probs = jax.nn.softmax(logits_ne.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_swiglu(gmm, x, gate_edf, up_edf, down_efd, adapters=None) -> jax.Array:
    """SwiGLU of rows grouped by expert, `gmm(rows, w_e..)` multiplying each row by its expert's matrix; with
    `adapters` = (gate_up, down), each None or (A [E, in, r], B [E, r, out], scale), a row x of expert e also gets
    (x @ A_e) @ B_e · scale: one adapter over the fused gate|up output and one over down (PEFT's
    `target_parameters` on transformers' `experts.gate_up_proj` / `experts.down_proj`)."""
    gate_up, down = adapters or (None, None)
    gate, up = gmm(x, gate_edf), gmm(x, up_edf)
    if gate_up is not None:
        a, b, scale = gate_up
        delta = gmm(checkpoint_name(gmm(x, a), ADAPTER_HIDDEN), b) * jnp.asarray(scale, x.dtype)
        f = gate_edf.shape[-1]
        gate, up = gate + delta[..., :f], up + delta[..., f:]
    h = swiglu(checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up"))
    y = gmm(h, down_efd)
    if down is not None:
        a, b, scale = down
        y = y + gmm(gmm(h, a), b) * jnp.asarray(scale, h.dtype)
    return y


def ragged_expert_mlp(x_md, gate_edf, up_edf, down_efd, group_sizes, adapters=None) -> jax.Array:
    """SwiGLU of rows sorted by expert (group_sizes [E] rows each) through `jax.lax.ragged_dot`."""
    return expert_swiglu(lambda x, w: jax.lax.ragged_dot(x, w, group_sizes), x_md, gate_edf, up_edf, down_efd,
                         adapters)


def tile_rows(rows: int, num_experts: int) -> int:
    """Rows per tile of the tiled path: about rows / E (a multiple of 8), so the tiles of all groups
    number at most ~2E and the padded work stays within ~2x the routed rows whatever E is."""
    per_expert = -(-rows // num_experts)
    return max(8, -(-per_expert // 8) * 8)


def tiled_expert_mlp(x_md, gate_edf, up_edf, down_efd, group_sizes, adapters=None, tile: int | None = None
                     ) -> jax.Array:
    """The same grouped SwiGLU as `ragged_expert_mlp`, as one batched matmul over (tile, expert) pairs.

    The sorted rows are cut into tiles of `tile` rows; each expert's rows span a run of tiles, and a
    tile on a group boundary is visited once per expert it holds (rows of other experts masked). At
    most tiles + E - 1 pairs (a static bound), so the work is (rows + E·tile)·(3 matmuls) rather than
    rows·E: it grows with top-k, not with the number of experts.
    """
    m, d = x_md.shape
    e = group_sizes.shape[0]
    tile = tile or tile_rows(m, e)
    n_tiles = -(-m // tile)
    n_pairs = n_tiles + e - 1
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    first = starts // tile
    spans = jnp.where(group_sizes > 0, (ends - 1) // tile - first + 1, 0)
    pair_ends = jnp.cumsum(spans)
    pair = jnp.arange(n_pairs, dtype=jnp.int32)
    valid = pair < pair_ends[-1]
    expert = jnp.minimum(jnp.searchsorted(pair_ends, pair, side="right"), e - 1).astype(jnp.int32)
    tile_of = jnp.where(valid, first[expert] + pair - (pair_ends - spans)[expert], 0)
    row = tile_of[:, None] * tile + jnp.arange(tile, dtype=jnp.int32)[None, :]  # [P, tile]
    mask = (valid[:, None] & (row >= starts[expert][:, None]) & (row < ends[expert][:, None]))[..., None]
    x_tiles = jnp.pad(x_md, ((0, n_tiles * tile - m), (0, 0))).reshape(n_tiles, tile, d)
    x_ptd = jnp.where(mask, x_tiles[tile_of], jnp.zeros((), x_md.dtype))
    y_ptd = expert_swiglu(lambda x, w: jnp.einsum("pti,pio->pto", x, w[expert]), x_ptd, gate_edf, up_edf, down_efd,
                          adapters)
    y_ptd = jnp.where(mask, y_ptd, jnp.zeros((), y_ptd.dtype))
    out = jnp.zeros((n_tiles, tile, d), y_ptd.dtype).at[tile_of].add(y_ptd)
    return out.reshape(n_tiles * tile, d)[:m]


def resolved_implementation(implementation: str, backend: str | None = None) -> str:
    """'tiled' or 'ragged' for an implementation name ('auto' picks by `backend`, default the platform of the mesh
    being traced (ftjax.sharding.active_platform): tiled on CPU)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"moe implementation {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    if implementation == "auto":
        return "tiled" if (backend or active_platform()) == "cpu" else "ragged"
    return implementation


def grouped_rows(cfg: MoEConfig, tokens: int) -> int:
    """Rows the grouped matmuls run over for `tokens` tokens: tokens·k for ragged_dot; the tiled path's
    (tiles + E − 1) tiles of `tile_rows` rows (at most ~2× that)."""
    m = tokens * cfg.top_k
    if resolved_implementation(cfg.implementation) == "ragged":
        return m
    tile = tile_rows(m, cfg.num_experts)
    return (-(-m // tile) + cfg.num_experts - 1) * tile


def grouped_expert_mlp(implementation: str):
    """The grouped-matmul function for an implementation name ('auto' picks by platform)."""
    return tiled_expert_mlp if resolved_implementation(implementation) == "tiled" else ragged_expert_mlp


class SparseMoE(nnx.Module):
    """Router + E SwiGLU experts stacked [E, D, F]; returns the output and the router logits [B, T, E].

    The router is a plain `nnx.Param` (not a `Linear`), so no adapter attaches to it and an adapters-only
    filter leaves it frozen; the experts are plain params too, with optional per-expert adapters (`Experts`).
    """

    def __init__(self, hidden: int, cfg: MoEConfig, *, stack: tuple = (), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        lead = ("layers",) * len(stack)
        e, f = cfg.num_experts, cfg.intermediate_size
        self.cfg, self.dtype = cfg, dtype
        self.router = _param(rngs, (*stack, hidden, e), lead + ("embed", None), param_dtype)
        self.experts = Experts(hidden, e, f, lead=lead, stack=stack, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_btd: jax.Array, rngs=None) -> tuple[jax.Array, jax.Array]:
        del rngs  # no dropout inside the experts
        b, t, d = x_btd.shape
        cfg = self.cfg
        x = x_btd.reshape(b * t, d)
        logits = x.astype(jnp.float32) @ self.router[...].astype(jnp.float32)  # [N, E]
        weights, experts = route(logits, cfg.top_k, cfg.norm_topk_prob)
        flat = experts.reshape(-1)
        order = jnp.argsort(flat, stable=True)  # routed copies sorted by expert
        group_sizes = jnp.bincount(flat, length=cfg.num_experts).astype(jnp.int32)
        w = self.experts
        y_sorted = grouped_expert_mlp(cfg.implementation)(
            x[order // cfg.top_k], w.gate_proj[...].astype(self.dtype), w.up_proj[...].astype(self.dtype),
            w.down_proj[...].astype(self.dtype), group_sizes, w.adapters(self.dtype))
        y_nkd = y_sorted[jnp.argsort(order)].reshape(b * t, cfg.top_k, d)
        y = jnp.einsum("nkd,nk->nd", y_nkd, weights.astype(y_nkd.dtype))
        y = constrain(y.reshape(b, t, d), ("batch", "length", "act_embed"))
        return y, logits.reshape(b, t, cfg.num_experts)


class Experts(nnx.Module):
    """The experts' SwiGLU weights, [*stack, E, D, F] (gate, up) and [*stack, E, F, D] (down). `ADAPTED` names the
    attach points: an adapter over the fused gate|up output and one over down, per expert (PEFT's
    `target_parameters` names), each an `Adapter` attached from outside (ftjax.lora) under the attribute named."""

    ADAPTED = {"gate_up_proj": "gate_up_lora", "down_proj": "down_lora"}  # adapted weight -> its attach point

    def __init__(self, hidden: int, num_experts: int, intermediate: int, *, lead: tuple, stack: tuple,
                 param_dtype, rngs: nnx.Rngs):
        shape_in, shape_out = (*stack, num_experts, hidden, intermediate), (*stack, num_experts, intermediate, hidden)
        self.gate_proj = _param(rngs, shape_in, lead + ("expert", "embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, shape_in, lead + ("expert", "embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, shape_out, lead + ("expert", "mlp", "embed"), param_dtype)
        self.gate_up_lora: Adapter | None = None
        self.down_lora: Adapter | None = None

    def adapted_weight(self, name: str) -> tuple[tuple, int, int, tuple]:
        """(leading shape [*stack, E], in, out, logical axes) of the weight `name` of `ADAPTED` that an adapter
        updates: gate|up is one [D, 2F] weight to its adapter (its output split between gate and up)."""
        w = self.down_proj if name == "down_proj" else self.gate_proj
        *lead, in_f, out_f = w.get_value().shape
        return tuple(lead), in_f, out_f * (2 if name == "gate_up_proj" else 1), tuple(w.get_metadata()["logical_axes"])

    def adapters(self, dtype) -> tuple | None:
        """(gate_up, down) for `expert_swiglu`, each (A, B, scale) in `dtype` or None; None without adapters."""
        if self.gate_up_lora is None and self.down_lora is None:
            return None
        one = lambda m: None if m is None else m.low_rank(dtype)
        return one(self.gate_up_lora), one(self.down_lora)


def load_balancing_loss(router_logits: jax.Array, top_k: int, mask: jax.Array | None = None) -> jax.Array:
    """Switch-Transformer balance loss over all layers' router logits [L, B, T, E] (or [L, N, E]),
    as transformers' `load_balancing_loss_func`: E · Σ_e (routed fraction_e · mean probability_e),
    both averaged over every layer's tokens together; `mask` [B, T] (or [N]) leaves out padding."""
    e = router_logits.shape[-1]
    logits = router_logits.reshape(router_logits.shape[0], -1, e).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    _, selected = jax.lax.top_k(probs, top_k)
    counts = jnp.sum(jax.nn.one_hot(selected, e, dtype=jnp.float32), axis=-2)  # [L, N, E]
    w = jnp.ones(logits.shape[1], jnp.float32) if mask is None else mask.reshape(-1).astype(jnp.float32)
    rows = logits.shape[0] * jnp.maximum(jnp.sum(w), 1.0)  # an all-padding batch: 0, not 0/0
    routed = jnp.einsum("lne,n->e", counts, w) / rows
    prob = jnp.einsum("lne,n->e", probs, w) / rows
    return e * jnp.sum(routed * prob)
