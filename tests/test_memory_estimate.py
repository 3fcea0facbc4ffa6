"""The per-device memory estimate against hand counts, and the stop when a run cannot fit."""

import pytest

from ftjax.interop.sources import tiny_config
from ftjax.errors import ConfigError
from ftjax.sharding import make_mesh
from ftjax.train.compose import compose
from ftjax.train.memory import check_fits, estimate
from loop_helpers import load_config


def _params(cfg):
    d, h, layers = cfg.hidden_size, cfg.head_dim, cfg.num_layers
    per_layer = 2 * d + d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    return layers * per_layer + cfg.vocab_size * d + d  # tied embedding + final norm


def test_full_params_and_adam_state_split_over_fsdp():
    c = load_config()
    c.method = "full"
    cfg = tiny_config()
    one = estimate(compose(c), cfg, make_mesh(data=1, fsdp=1, tensor=1, devices=__import__("jax").devices()[:1]))
    assert one["trainable"] == 4 * _params(cfg)
    assert one["frozen"] == 0
    assert 2 * one["trainable"] <= one["opt_state"] <= 2 * one["trainable"] + 64  # Adam mu, nu (+ counters)
    eight = estimate(compose(c), cfg, make_mesh(data=1, fsdp=8, tensor=1))
    assert eight["trainable"] < one["trainable"] / 4  # embed dims are split 8 ways (norm scales are not)


def test_lora_trains_only_adapters():
    c = load_config()
    cfg = tiny_config()
    parts = estimate(compose(c), cfg, make_mesh(data=8, fsdp=1, tensor=1))
    r, d, layers = c.lora.rank, cfg.hidden_size, cfg.num_layers
    kv, i, q = cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size, cfg.num_heads * cfg.head_dim
    adapters = layers * r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + i) + (i + d))
    assert parts["trainable"] == 4 * adapters
    assert parts["frozen"] == 4 * _params(cfg)


def test_a_run_that_cannot_fit_stops_with_one_line():
    c = load_config()
    c.train.batch_size = 8 * 4096
    c.data.seq_len = 8192
    with pytest.raises(ConfigError, match="does not fit"):
        check_fits(compose(c), tiny_config(), make_mesh(data=8, fsdp=1, tensor=1))


def test_remat_policies_keep_what_they_save():
    """Activations per policy against the hand count: none keeps every layer's intermediates; full,
    minimal and dots keep their saved values per layer plus one layer's intermediates."""
    import jax

    c = load_config()
    cfg = tiny_config()
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    acts = {}
    for policy in ("none", "full", "minimal", "dots"):
        c.model.remat = policy
        acts[policy] = estimate(compose(c), cfg, mesh)["activations"]
    d, t, rows = cfg.hidden_size, c.data.seq_len, c.train.batch_size // c.train.grad_accum
    q, kv, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    layer = t * rows * d * (34 + 5 * cfg.num_heads * t / d) * 2  # fp32: twice the 16-bit count
    logits = rows * min(c.train.loss_chunk, t) * cfg.vocab_size * 4 * 3
    minimal = 3 * d + q + 2 * kv + 2 * i + c.lora.rank * 7
    assert acts["none"] == int(cfg.num_layers * layer + logits)
    assert acts["full"] == int(cfg.num_layers * t * rows * d * 4 + layer + logits)
    assert acts["minimal"] == int(cfg.num_layers * t * rows * minimal * 4 + layer + logits)
    assert acts["full"] < acts["minimal"] < acts["dots"] < acts["none"]


def _tiny_moe(implementation: str):
    """tiny_config's attention (d 64, q 4 x 16, kv 2 x 16, 2 layers, tied 49152 vocab) with Qwen3-MoE layers:
    8 experts of 32, top-2, q/k norms."""
    from ftjax.models.moe import MoEConfig

    return tiny_config().replace(model_type="qwen3_moe", qk_norm=True,
                                 moe=MoEConfig(8, 2, 32, implementation=implementation))


@pytest.mark.parametrize("implementation, grouped_rows, tiled_extra", [
    ("ragged", 1024 * 2, 0),  # 8 x 128 tokens, each to its top-2 experts
    # tiles of 2048 / 8 = 256 rows: 8 tiles + 8 - 1 group boundaries = 15 (tile, expert) pairs; each pair's row
    # masks (1 byte a value, input and output) and its copy of the expert's gate, up and down (fp32)
    ("tiled", 15 * 256, 15 * 256 * 2 * 64 + 15 * 3 * 64 * 32 * 4),
])
def test_moe_counts_every_expert_and_the_routed_activations(implementation, grouped_rows, tiled_extra):
    """All experts' weights and the router are frozen, the attention adapters train; the MLP activations are
    the routed copies through the grouped matmul (the tiled path's padded rows), plus every layer's router
    logits; remat keeps the experts' gate and up at their routed width."""
    import jax

    c = load_config()
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj"
    cfg = _tiny_moe(implementation)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    # by hand, per layer: norms 2*64 + q/k norms 2*16 + attention 64*64*2 + 64*32*2 + router 64*8 + experts 3*8*64*32
    per_layer = 128 + 32 + 12288 + 512 + 49152
    weights = 2 * per_layer + 49152 * 64 + 64  # + tied embedding + final norm = 3270016
    parts = estimate(compose(c), cfg, mesh)
    assert parts["frozen"] == 4 * weights == 4 * 3270016
    assert parts["trainable"] == 4 * 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))  # r=4 on q, k, v, o
    tokens, t, d = 1024, 128, 64  # rows 8 x seq_len 128 on one device, fp32 (4 bytes)
    attention = tokens * d * (15 + 5 * 4 * t / d) * 2  # Korthikanti's 34 less the dense MLP's 19, 16-bit x 2
    # per token the input and the top-2 outputs; per grouped row the sorted input and output, gate and up (fp32);
    # fp32 router probabilities and logits over 8 experts, int32 indices of the top-2
    routed = tokens * 4 * (d + 2 * d) + grouped_rows * 4 * (2 * d + 2 * 32) + tokens * (8 * 8 + 12 * 2) + tiled_extra
    logits = 8 * min(c.train.loss_chunk, t) * 49152 * 4 * 3
    router_logits = 2 * tokens * 8 * 4
    backward = routed  # one layer's backward: the gradients of its routed buffers
    c.model.remat = "none"
    assert estimate(compose(c), cfg, mesh)["activations"] == int(2 * (attention + routed) + logits + router_logits
                                                                 + backward)
    c.model.remat = "minimal"
    gate_up = 2 * 32 * grouped_rows / tokens  # per token
    minimal = 3 * d + 64 + 2 * 32 + gate_up + 4 * 4
    assert estimate(compose(c), cfg, mesh)["activations"] == int(2 * tokens * minimal * 4 + attention + routed + logits
                                                         + router_logits + backward)


def test_recipe_estimate_counts_the_grouped_matmul_of_the_target_backend(tmp_path):
    """A recipe's quoted figure for GPU counts ragged_dot's rows even when computed on a CPU host (whose own
    `auto` is the tiled path), and equals `estimate` with the GPU's `auto` values spelled out."""
    import dataclasses

    import jax

    from ftjax.backend_defaults import resolve_auto
    from ftjax.models.registry import config_from_hf
    from ftjax.train.memory import GIB, recipe_estimate
    from loop_helpers import ROOT

    hf = dict(model_type="qwen3_moe", vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=32)
    recipe = tmp_path / "moe_recipe.py"
    recipe.write_text(f"from ftjax.config import load_recipe\nHF_CONFIG = {hf!r}\n\n\ndef get_config():\n"
                      f"    c = load_recipe({str(ROOT / 'configs' / 'tiny_test.py')!r})\n"
                      "    c.mesh.data, c.data.seq_len, c.lora.targets = -1, 4096, 'q_proj,v_proj'\n    return c\n")
    got = recipe_estimate(recipe, 1, backend="gpu")
    c = resolve_auto(load_config(), "gpu")
    c.data.seq_len, c.lora.targets = 4096, "q_proj,v_proj"  # 8 x 4096 tokens: the paths differ by > 0.01 GiB
    cfg = config_from_hf(hf)
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    for implementation, same in (("ragged", True), ("tiled", False)):
        parts = estimate(compose(c), cfg.replace(moe=dataclasses.replace(cfg.moe, implementation=implementation)), mesh)
        assert (got["activations"] == round(parts["activations"] / GIB, 2)) == same


TOY_BYTES = 123_456_789  # what the toy objective below says it holds per device (a teacher's weights, say)


def test_the_estimate_adds_exactly_what_the_objective_says_it_holds(monkeypatch):
    """A toy objective (SFT's data and terms) whose memory() adds N bytes: the estimate grows by exactly N, under
    its own label, and the objective is asked with the estimate's own per-device figures."""
    from ftjax import config as config_lib
    from ftjax import objectives
    from ftjax.objectives import Reference
    from ftjax.objectives.sft import Sft

    asked = []

    class HoldsBytes(Sft):
        name = "sft_holding_bytes"

        def memory(self, shapes, reference):
            asked.append((shapes, reference))
            return {"toy_teacher": TOY_BYTES}

    for table, key in ((objectives.OBJECTIVES, HoldsBytes.name), (objectives.SETTINGS, HoldsBytes.name),
                       (config_lib._CHOICES, "objective")):  # the registration is undone after the test
        monkeypatch.setitem(table, key, table.get(key))
    objectives.register_objective(HoldsBytes.name, HoldsBytes)
    cfg = tiny_config()
    mesh = make_mesh(data=8, fsdp=1, tensor=1)
    c = load_config()
    sft = estimate(compose(c), cfg, mesh)
    c.objective = HoldsBytes.name
    toy = estimate(compose(c), cfg, mesh)
    assert sum(toy.values()) - sum(sft.values()) == TOY_BYTES
    assert toy == {**sft, "toy_teacher": TOY_BYTES}
    (shapes, reference), = asked
    assert reference is Reference.NONE
    assert (shapes.trainable, shapes.frozen, shapes.activations) == (sft["trainable"], sft["frozen"],
                                                                    sft["activations"])
    assert (shapes.rows, shapes.seq_len, shapes.itemsize) == (c.train.batch_size // 8, c.data.seq_len, 4)
    assert shapes.model.hidden_size == cfg.hidden_size


def test_preference_under_full_fine_tuning_reads_a_cache_and_holds_no_reference_copy():
    """DPO's reference under full fine-tuning: log-probs cached before training, so no frozen copy of the weights
    is counted (SFT's figures exactly); a forgetting term's step-0 copy is still counted."""
    cfg = tiny_config()
    mesh = make_mesh(data=8, fsdp=1, tensor=1)
    c = load_config()
    c.method = "full"
    sft = estimate(compose(c), cfg, mesh)
    c.objective = "dpo"
    dpo = estimate(compose(c), cfg, mesh)
    assert dpo == sft and "reference_copy" not in dpo
    c.forget.kl_weight = 1.0
    assert estimate(compose(c), cfg, mesh)["start_copy"] == sft["trainable"]


def test_a_distillation_teachers_forward_pass_is_counted_at_its_row_length():
    """Context distillation: the teacher's pass over its rows, forward only (one layer's intermediates, its last
    hidden states, one fp32 logits chunk), counted at the teacher's row length: data.seq_len until the data is read,
    then its longest example's, which a 2-shot prefix lengthens beyond a 1-shot one by the closed-form amount."""
    import jax

    from distill_helpers import distill_config
    from ftjax.api import load_tokenizer

    cfg = tiny_config()
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    d, a, vocab = cfg.hidden_size, cfg.num_heads, cfg.vocab_size

    def forward(c, t):  # fp32: twice Korthikanti's 16-bit layer count; the hidden states in 4 bytes a value
        rows = c.train.batch_size // c.train.grad_accum
        return int(t * rows * d * (34 + 5 * a * t / d) * 2 + rows * t * d * 4 + rows * min(c.train.loss_chunk, t)
                   * vocab * 4)

    parts, teacher_len = {}, {}
    for shots in (1, 2):
        c = distill_config(eval__few_shot=shots, train__loss_chunk=64)  # the recipe's chunk: shorter than a row
        run = compose(c)
        if shots == 1:
            assert estimate(run, cfg, mesh)["teacher_activations"] == forward(c, c.data.seq_len)
        teacher_len[shots] = run.objective.read_data(run, load_tokenizer(c.model.path), vocab).train.teacher_len
        parts[shots] = estimate(run, cfg, mesh)
        assert parts[shots]["teacher_activations"] == forward(c, teacher_len[shots])
    assert c.train.loss_chunk < teacher_len[1] < teacher_len[2]  # the logits chunk is the same on both
    moved = forward(c, teacher_len[2]) - forward(c, teacher_len[1])
    assert sum(parts[2].values()) - sum(parts[1].values()) == moved > 0
    assert {k: v for k, v in parts[2].items() if k != "teacher_activations"} == {
        k: v for k, v in parts[1].items() if k != "teacher_activations"}


def test_rollouts_on_cpu_count_the_layer_weights_generation_folds():
    """GRPO on CPU: generation's unrolled token loop folds every layer's linears dense once per call
    (`Llama.layer_slices`); the estimate counts that copy, in the compute dtype, as many elements as the folded
    layers' kernels hold."""
    import jax
    import numpy as np

    from ftjax.models.llama import Llama
    from flax import nnx

    cfg = tiny_config()
    mesh = make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    c = load_config()
    sft = estimate(compose(c), cfg, mesh)
    c.objective = "grpo"
    c.rl.rewards = "grpo_rewards:chars"
    grpo = estimate(compose(c), cfg, mesh)
    _, layers = jax.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)).layer_slices())
    kernels = sum(int(np.prod(leaf.shape)) for layer in layers for path, leaf in nnx.to_flat_state(layer)
                  if "kernel" in path)
    assert kernels > 0 and grpo["rollout_weights"] == 4 * kernels  # fp32: the tiny run's compute dtype
    assert {k: v for k, v in grpo.items() if k not in ("rollout_weights", "rollout_kv_cache")} == sft
