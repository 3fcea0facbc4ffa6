"""Llama-family decoder (Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2; Gemma 2/3, Phi-3/4 and the
mixtures of experts by their config blocks: ftjax.models.gemma, .phi, .moe) in Flax NNX.

Layers are stacked (params [L, ...]) and run with `lax.scan`, so compile time does not grow
with depth. Attention honors `segment_ids` (packed rows) and explicit `positions`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ftjax.models import gemma, phi
from ftjax.models.adapter import ADAPTER_HIDDEN
from ftjax.models.attention import Rows, kernel_names
from ftjax.models.gemma import GemmaConfig
from ftjax.models.layers import MLP, Attention, AttentionConfig, Linear, RMSNorm, RopeConfig, rope_tables
from ftjax.models.moe import MoEConfig, SparseMoE
from ftjax.models.phi import PhiConfig
from ftjax.sharding import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Saves the projections' outputs and the residual stream only (names set in layers.py and adapter.py);
    # recomputes norms, rope, attention scores/softmax and the SwiGLU product in the backward pass:
    # a fraction of the activation memory of "none" for ~3% more FLOPs, and faster on CPU.
    "minimal": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attn_context", "resid_mid", "mlp_gate", "mlp_up", ADAPTER_HIDDEN),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture and numerics of a Llama-family decoder (hashable: it is static under jit): the fields every
    family shares, and one block per family feature (None: the Llama behaviour). A new family adds a block
    (its own module, read only there), not switches here."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple = ()  # per-layer bools; empty = every layer slides when sliding_window is set
    model_type: str = "llama"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: str = "none"  # none | minimal | full | dots
    attention: str = "xla"  # xla | cudnn | pallas_gpu | splash (ftjax.models.attention)
    fuse_qkv: bool = True  # q/k/v as one GEMM; the loaders turn it off when the tensor axis splits heads
    extra: tuple = ()  # HF config items kept for export (hashable pairs)
    moe: MoEConfig | None = None  # mixture-of-experts MLP in every layer (Mixtral, Qwen3-MoE); None = dense
    gemma: GemmaConfig | None = None  # Gemma 2/3's soft-caps, norms, GeGLU, scaled embeddings, local rope
    phi: PhiConfig | None = None  # Phi-3/4's fused projections and partial rotary
    # the most segments (examples) a training row holds, from data.packing / data.max_segments: 1 = one a row
    # (cuDNN then needs no segment ids), n > 1 = cuDNN's packed layout with n slots, 0 = no bound
    max_segments: int = 0

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def layer_windows(self) -> tuple:
        """Each layer's sliding window (None: full causal attention)."""
        flags = self.sliding_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if f else None for f in flags)

    def windows(self) -> tuple:
        """The distinct windows, in a fixed order (None first): the branches of the per-layer switch."""
        distinct = set(self.layer_windows())
        return tuple(sorted(distinct, key=lambda w: -1 if w is None else w))

    def attention_config(self) -> AttentionConfig:
        softcap, scale = gemma.attention_logits(self.gemma)
        return AttentionConfig(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.qkv_bias,
                               self.o_bias, self.qk_norm, self.rms_norm_eps, self.attention, self.windows(),
                               softcap, self.fuse_qkv, scale, phi.packed_projections(self.phi),
                               gemma.offset_norms(self.gemma), max_segments=self.max_segments)

    def attention_kernels(self, seq_len: int) -> str:
        """What attention kernel its training rows of `seq_len` run (for log lines and benchmark records)."""
        return kernel_names(self.attention, dtype=self.dtype, seq_len=seq_len, heads=self.num_heads,
                            kv_heads=self.num_kv_heads, head_dim=self.head_dim, windows=self.windows(),
                            softcap=gemma.attention_logits(self.gemma)[0], max_segments=self.max_segments)

    def ropes(self) -> tuple:
        """The distinct rotary settings: (global,) or (global, local) when sliding layers have their own."""
        local = gemma.sliding_rope(self.gemma)
        return (self.rope,) if local is None else (self.rope, local)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer keys/values [L, B, K, S, H] and the segment id of each slot (0 = empty). Heads before slots: a
    layer's slice is already the batched [B, K] x [S, H] operand attention's dots take, where [B, S, K, H] made
    XLA on CPU copy it transposed, keys and values, every layer of every decode step."""

    k: jax.Array | tuple  # or (`per_layer`) a tuple of L arrays [B, K, S, H]
    v: jax.Array | tuple
    segment_ids: jax.Array  # [B, S]
    index: jax.Array  # next free slot, scalar int32

    def per_layer(self) -> "KVCache":
        """The same cache as one array a layer (what `decode(layers=)` updates in place: no slice copy a layer)."""
        split = lambda a: tuple(a[i] for i in range(a.shape[0]))
        return KVCache(split(self.k), split(self.v), self.segment_ids, self.index)

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int) -> "KVCache":
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        dt = jnp.dtype(cfg.dtype)
        return cls(jnp.zeros(shape, dt), jnp.zeros(shape, dt), jnp.zeros((batch, max_len), jnp.int32),
                   jnp.zeros((), jnp.int32))


class DecoderLayer(nnx.Module):
    """Pre-norm attention + gated-MLP block (with `sandwich_norms`, Gemma's post-norms as well: then
    `post_attention_layernorm` normalizes the attention output and `pre_feedforward_layernorm` the MLP
    input, as transformers names them); built stacked, called on one layer's slice."""

    def __init__(self, cfg: ModelConfig, *, stack: tuple, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack, param_dtype=pdt,
                               offset=gemma.offset_norms(cfg.gemma))
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg.attention_config(), stack=stack, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.post_attention_layernorm = norm()
        sandwich = gemma.has_sandwich_norms(cfg.gemma)
        self.pre_feedforward_layernorm = norm() if sandwich else None
        self.post_feedforward_layernorm = norm() if sandwich else None
        if cfg.moe is not None:
            self.mlp = SparseMoE(cfg.hidden_size, cfg.moe, stack=stack, dtype=dt, param_dtype=pdt, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, use_bias=cfg.mlp_bias, stack=stack, dtype=dt,
                           param_dtype=pdt, activation=gemma.activation(cfg.gemma),
                           packed=phi.packed_projections(cfg.phi), rngs=rngs)

    def __call__(self, x_btd, sin, cos, rows: Rows, kv=None, index=None, rng=None, window_index=None):
        """Returns the new residual stream, the (k, v) caches (None without a cache) and the router
        logits [B, T, E] of a mixture-of-experts layer (None for a dense MLP).

        `kv` = (k, v, layer): every layer's cache [L, B, K, S, H] and this layer's index. The new keys and
        values are written into the stack in place (a scan carry), then this layer's slice is read: no
        per-layer cache copy in and out of the scan (the decode step's main memory traffic on CPU). With layer
        None, k and v are this layer's own cache [B, K, S, H] (the unrolled decode's), read without a slice.
        """
        rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        h = self.input_layernorm(x_btd)
        q, k, v = self.self_attn.project_qkv(h, sin, cos, rngs[0:3])
        if kv is not None:
            k_all, v_all, layer = kv  # [L, B, K, S, H]: heads before slots (see KVCache); layer None: this layer's own
            new_k, new_v = jnp.swapaxes(k, 1, 2).astype(k_all.dtype), jnp.swapaxes(v, 1, 2).astype(v_all.dtype)
            if layer is None:
                write, read = (0, 0, index, 0), lambda a: a
            else:
                new_k, new_v = new_k[None], new_v[None]
                write, read = (layer, 0, 0, index, 0), lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)
            k_all = jax.lax.dynamic_update_slice(k_all, new_k, write)
            v_all = jax.lax.dynamic_update_slice(v_all, new_v, write)
            k, v = jnp.swapaxes(read(k_all), 1, 2), jnp.swapaxes(read(v_all), 1, 2)
            kv = (k_all, v_all)
        attn = self.self_attn.attend(q, k, v, rows, window_index, rngs[3])
        sandwich = self.pre_feedforward_layernorm is not None
        if sandwich:
            attn = self.post_attention_layernorm(attn)
        x_btd = checkpoint_name(x_btd + attn, "resid_mid")
        h = (self.pre_feedforward_layernorm if sandwich else self.post_attention_layernorm)(x_btd)
        mlp_out, router_logits = self.mlp(h, rngs[4:7]) if isinstance(self.mlp, SparseMoE) else (
            self.mlp(h, rngs[4:7]), None)
        if sandwich:
            mlp_out = self.post_feedforward_layernorm(mlp_out)
        x_btd = x_btd + mlp_out
        return constrain(x_btd, ("batch", "length", "act_embed")), kv, router_logits


def bound_segments(model: nnx.Module, max_segments: int) -> None:
    """Tell a built model's attention, in place, the most segments a training row of its data holds
    (ModelConfig.max_segments): a run sets it from its data settings whatever the model was built or loaded with."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Llama):
            node.config = node.config.replace(max_segments=max_segments)
        elif isinstance(node, Attention):
            node.cfg = dataclasses.replace(node.cfg, max_segments=max_segments)


class Llama(nnx.Module):
    """Decoder-only LM: `model(input_ids) -> logits [batch, length, vocab]` (fp32 logits)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed_tokens = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))).astype(pdt),
            logical_axes=("vocab", "embed"))
        self.layers = DecoderLayer(cfg, stack=(cfg.num_layers,), rngs=rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=pdt,
                            offset=gemma.offset_norms(cfg.gemma))
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, dtype=jnp.dtype(cfg.dtype),
            param_dtype=pdt, rngs=rngs)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, rng=None) -> jax.Array:
        return self.logits(self.hidden(input_ids, positions, segment_ids, rng=rng))

    def hidden(self, input_ids, positions=None, segment_ids=None, *, rng=None) -> jax.Array:
        """Final-norm hidden states [B, T, D]; the loss turns them into logits chunk by chunk."""
        return self.hidden_and_router_logits(input_ids, positions, segment_ids, rng=rng)[0]

    def hidden_and_router_logits(self, input_ids, positions=None, segment_ids=None, *, rng=None
                                 ) -> tuple[jax.Array, jax.Array | None]:
        """`hidden` and, for a mixture-of-experts model, every layer's router logits [L, B, T, E] of the
        same pass (what the router balance loss reads); None for a dense model."""
        b, t = input_ids.shape
        slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = slots if positions is None else positions
        segment_ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        rows = Rows(segment_ids, segment_ids)  # training rows: query i and key i are slot i
        h, _, router_logits = self._run_layers(self.embed(input_ids), positions, rows, None, None, rng)
        return self.norm(h), router_logits

    def layer_slices(self) -> tuple[nnx.GraphDef, list]:
        """Each layer's parameters as its own arrays, sliced out of the [L, ...] stack with every linear folded
        (`Linear.fold`: dense, adapter added): what `decode(layers=)` takes, as (graphdef, one state a layer).
        Built once per generation call, before its token loop, they cost one copy of the layer weights instead
        of the layer scan's slice copy of every weight (and a quantized base's dequantization) on every token."""
        graphdef, state = nnx.split(self.layers)
        folded = []
        for i in range(self.config.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
            for linear in [node for _, node in nnx.iter_graph(layer) if isinstance(node, Linear)]:
                linear.fold()
            folded.append(nnx.split(layer))
        return folded[0][0], [s for _, s in folded]

    def decode(self, input_ids, positions, segment_ids, cache: KVCache, *, last_only: bool = False,
               layers: tuple | None = None) -> tuple[jax.Array, KVCache]:
        """Run new tokens [B, t] against the cache; returns logits [B, t, V] (or [B, 1, V] of the last token
        with `last_only`: a prefill needs no more) and the updated cache. `layers` (`layer_slices()`): run the
        layers one after the other on those arrays instead of the layer scan."""
        b, t = input_ids.shape
        s = cache.segment_ids.shape[1]
        q_slots = cache.index + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))
        kv_slots = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        seen = jnp.where(kv_segments != 0, kv_segments, -1)  # empty slots (0) match no query, padding included
        rows = Rows(segment_ids.astype(jnp.int32), seen, q_slots, kv_slots)
        h, (k, v), _ = self._run_layers(self.embed(input_ids), positions, rows, (cache.k, cache.v), cache.index, None,
                                        layers)
        if last_only:
            h = h[:, -1:]
        return self.logits(self.norm(h)), KVCache(k, v, kv_segments, cache.index + t)

    def embed(self, input_ids) -> jax.Array:
        # the table's embed axis gathered first (as FSDP does for every weight): a lookup straight from the
        # fsdp-sharded table leaves its rows split by feature, which XLA can only reshard to split-by-batch
        # through a full rematerialization (it warns so on data x fsdp x tensor meshes)
        table = constrain(self.embed_tokens[...], ("vocab", None))
        x = gemma.scale_embeddings(self.config.gemma, jnp.take(table, input_ids, axis=0), self.config.hidden_size)
        x = x.astype(jnp.dtype(self.config.dtype))
        return constrain(x, ("batch", "length", "act_embed"))

    def logits(self, h_btd) -> jax.Array:
        """Vocabulary projection with fp32 accumulation (tied to the embedding when configured)."""
        dt = jnp.dtype(self.config.dtype)
        if self.lm_head is None:
            w = self.embed_tokens[...].astype(dt)
            out = jnp.einsum("btd,vd->btv", h_btd.astype(dt), w, preferred_element_type=jnp.float32)
        else:
            w = self.lm_head.kernel[...].astype(dt)
            out = jnp.einsum("btd,dv->btv", h_btd.astype(dt), w, preferred_element_type=jnp.float32)
        return constrain(gemma.cap_logits(self.config.gemma, out), ("batch", "length", "act_vocab"))

    def head_is_linear(self) -> bool:
        """Whether the logits are exactly h @ `head_weight()` (no output soft-cap): what fused losses need."""
        return gemma.output_softcap(self.config.gemma) is None

    def head_weight(self) -> tuple[jax.Array, bool]:
        """The output head's weight in the compute dtype, and whether it is [V, D] (tied) or [D, V]:
        what a fused loss needs to do the head's matmuls itself (not with a final soft-cap: see `logits`)."""
        dt = jnp.dtype(self.config.dtype)
        if self.lm_head is None:
            return self.embed_tokens[...].astype(dt), True
        return self.lm_head.kernel[...].astype(dt), False

    def _run_layers(self, x, positions, rows: Rows, kv, index, rng, layers: tuple | None = None):
        cfg = self.config
        rotary = phi.rotated_dims(cfg.phi, cfg.head_dim)
        tables = [rope_tables(positions, rotary, r) for r in cfg.ropes()]
        graphdef, state = nnx.split(self.layers) if layers is None else (layers[0], None)
        layer_rngs = None if rng is None else jax.random.split(rng, cfg.num_layers)
        windows = cfg.windows()
        window_index = None  # one window for every layer: static; else each layer's branch of the switch
        if len(windows) > 1:
            window_index = jnp.asarray([windows.index(w) for w in cfg.layer_windows()], jnp.int32)
        rope_index = None  # sliding layers with their own rope (Gemma 3) pick table 1
        if len(tables) > 1:
            rope_index = jnp.asarray([int(w is not None) for w in cfg.layer_windows()], jnp.int32)
            sin_all, cos_all = jnp.stack([s for s, _ in tables]), jnp.stack([c for _, c in tables])

        def body(carry, xs):
            x, caches = carry
            layer_state, layer, layer_rng, layer_window, layer_rope = xs
            layer_kv = None if caches is None else (*caches, layer)
            if layer_rope is None:
                sin, cos = tables[0]
            else:
                sin, cos = sin_all[layer_rope], cos_all[layer_rope]
            layer_fn = nnx.merge(graphdef, layer_state)
            x, caches, router_logits = layer_fn(x, sin, cos, rows, layer_kv, index, layer_rng, layer_window)
            return (x, caches), router_logits

        carry = (x, None if kv is None else (kv[0], kv[1]))
        if layers is not None:  # unrolled on per-layer arrays (decode); no rng: decode draws no dropout
            return self._unrolled(body, x, kv, layers[1], window_index, rope_index)
        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        indices = None if kv is None else jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x, caches), router_logits = jax.lax.scan(body, carry, (state, indices, layer_rngs, window_index, rope_index))
        return x, caches, router_logits

    def _unrolled(self, body, x, kv, layers: list, window_index, rope_index):
        """`_run_layers`' scan body called layer by layer on `layers` (per-layer weights); a per-layer cache
        (KVCache.per_layer) is handed to each layer as its own, a stacked one with the layer's index."""
        own = kv is not None and isinstance(kv[0], (tuple, list))
        pick = lambda a, i: None if a is None else a[i]
        ks, vs, outs = [], [], []
        caches = None if kv is None else (kv[0], kv[1])
        for i, layer_state in enumerate(layers):
            layer_caches = (kv[0][i], kv[1][i]) if own else caches
            (x, layer_caches), router_logits = body(
                (x, layer_caches), (layer_state, None if own else jnp.int32(i), None, pick(window_index, i),
                                    pick(rope_index, i)))
            if own:
                ks.append(layer_caches[0])
                vs.append(layer_caches[1])
            else:
                caches = layer_caches
            outs.append(router_logits)
        caches = (tuple(ks), tuple(vs)) if own else caches
        return x, caches, None if outs[0] is None else jnp.stack(outs)
