"""Preference losses against TRL 1.16's own code on the same inputs.

DPO, robust DPO and IPO: `DPOTrainer.compute_loss` on a tiny transformers Llama + PEFT LoRA with the same weights
as the ftjax model (TRL's reference: a frozen copy of the starting adapter, whose B = 0 makes it the base, as
ftjax's all-zero adapters), loss, TRL's metrics and the LoRA gradients (torch autograd) within 1e-4. ORPO and
SimPO: TRL's `odds_ratio_loss` and `cpo_loss` (`loss_type="simpo"`) on random log-probs.
"""

from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ftjax
from ftjax.interop.peft import export_peft
from ftjax.lora import apply_lora
from ftjax.objectives.pair_losses import PreferenceConfig, ReplyLogps, metric_means, orpo_losses, simpo_losses
from ftjax.objectives.preference_term import global_pairs, preference_sums, reference_pair_logps
from ftjax.objectives.reply_logps import model_pair_logps
from hf_helpers import MODEL_TOL, tiny_hf, tiny_tokenizer
from preference_helpers import pair_rows

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
PAIRS = [([5, 6, 7], [8, 9], [10]), ([11, 12], [13], [14, 15, 16]), ([20, 21, 22, 23], [24, 25, 26], [27, 28])]
MAX_PAIRS, SEQ_LEN, CHUNK = 3, 32, 5
TRL_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(ftjax model with a fresh LoRA adapter, DPOTrainer over the PEFT model with the same weights)."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tmp = tmp_path_factory.mktemp("pref")
    tiny_hf("llama").save_pretrained(tmp / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp / "base")
    model = ftjax.load_model(tmp / "base")
    apply_lora(model, 4, 8.0, targets=TARGETS, rngs=nnx.Rngs(1))
    export_peft(model, tmp / "fresh", base_model_name_or_path=str(tmp / "base"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp / "base"), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp / "fresh"), is_trainable=True)
    args = DPOConfig(output_dir=str(tmp / "out"), report_to="none", use_cpu=True, bf16=False)
    dataset = Dataset.from_dict({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]})  # unused: batches below
    trainer = DPOTrainer(model=peft_model, args=args, train_dataset=dataset, processing_class=tokenizer)
    assert "ref" in peft_model.peft_config  # TRL's reference: a frozen copy of the (fresh) starting adapter
    return types.SimpleNamespace(model=model, trainer=trainer, tmp=tmp, base=tmp / "base")


def _trl_batch(trainer):
    return trainer.data_collator([dict(prompt_ids=p, chosen_ids=c, rejected_ids=r) for p, c, r in PAIRS])


def _trl_loss(trainer, loss_type, beta, label_smoothing):
    """TRL's loss, metrics of this call, and the default adapter's gradients (PEFT file names)."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    trainer._metrics["train"].clear()
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, _trl_batch(trainer))
    loss.backward()
    grads = {n.replace(".default", ""): p.grad.numpy().copy() for n, p in model.named_parameters()
             if ".default." in n and p.grad is not None}
    metrics = {k: trainer._metrics["train"][k][-1] for k in TRL_METRICS}
    return loss.item(), metrics, grads


def _ours(model, cfg: PreferenceConfig):
    """(loss, TRL metrics, LoRA gradients) of ftjax on the packed pairs; the reference is all-zero adapters."""
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    batch = pair_rows(PAIRS, SEQ_LEN, packed=True)

    def loss_fn(trainable):
        policy = nnx.merge(graphdef, trainable, frozen)
        ref = reference_pair_logps(graphdef, jax.tree.map(jnp.zeros_like, trainable), frozen, batch, MAX_PAIRS,
                                   CHUNK)
        sums = preference_sums(cfg, policy, batch, MAX_PAIRS, CHUNK, reference=ref)
        return sums["loss"] / global_pairs(batch), sums

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return float(loss), {k: float(v) for k, v in metric_means(sums).items()}, grads


def _as_peft(model, grads, folder) -> dict[str, np.ndarray]:
    """ftjax LoRA gradients laid out as PEFT's tensors (through the adapter exporter)."""
    from safetensors.numpy import load_file

    graphdef, _, frozen = nnx.split(model, nnx.LoRAParam, ...)
    export_peft(nnx.merge(graphdef, grads, frozen), folder)
    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.slow  # > 10 s here: the full suite runs it, the fast tier (README) stays under 4 min
def test_fresh_adapter_dpo_loss_is_ln2_and_reference_is_the_base(setup):
    cfg = PreferenceConfig("dpo", beta=0.1)
    loss, metrics, _ = _ours(setup.model, cfg)
    assert loss == np.float32(math.log(2))
    trl_loss, _, _ = _trl_loss(setup.trainer, "sigmoid", 0.1, 0.0)
    assert abs(trl_loss - math.log(2)) <= 1e-6
    batch = pair_rows(PAIRS, SEQ_LEN, packed=True)
    graphdef, trainable, frozen = nnx.split(setup.model, nnx.LoRAParam, ...)
    ref = reference_pair_logps(graphdef, jax.tree.map(jnp.zeros_like, trainable), frozen, batch, MAX_PAIRS, CHUNK)
    policy, _ = model_pair_logps(setup.model, batch, MAX_PAIRS, CHUNK)
    base, _ = model_pair_logps(ftjax.load_model(setup.base), batch, MAX_PAIRS, CHUNK)  # adapters removed
    for r, p, b in zip(ref, policy, base):
        np.testing.assert_array_equal(r, p)
        np.testing.assert_array_equal(r, b)
    assert metrics["rewards/margins"] == 0.0


@pytest.fixture(scope="module")
def tuned(setup):
    """Adapter B set non-zero in both models (policy != reference); TRL's "ref" adapter stays the fresh one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    rng = np.random.default_rng(7)
    for path, p in nnx.iter_graph(setup.model):
        if isinstance(p, nnx.LoRAParam) and path[-1] == "lora_b":
            p[...] = jnp.asarray(rng.normal(0.0, 0.3, p[...].shape), p[...].dtype)
    export_peft(setup.model, setup.tmp / "tuned")
    set_peft_model_state_dict(setup.trainer.model, load_file(str(setup.tmp / "tuned" / "adapter_model.safetensors")),
                              adapter_name="default")
    return setup


@pytest.mark.parametrize("objective,loss_type,beta,eps", [("dpo", "sigmoid", 0.1, 0.0), ("dpo", "robust", 0.3, 0.2),
                                                          ("ipo", "ipo", 0.5, 0.0)])
def test_dpo_family_loss_metrics_and_lora_gradients_equal_trl(tuned, objective, loss_type, beta, eps, tmp_path):
    loss, metrics, grads = _ours(tuned.model, PreferenceConfig(objective, beta=beta, label_smoothing=eps))
    trl_loss, trl_metrics, trl_grads = _trl_loss(tuned.trainer, loss_type, beta, eps)
    assert abs(loss - trl_loss) <= MODEL_TOL
    assert abs(loss - math.log(2)) > 1e-2 or objective == "ipo"  # the adapters moved the policy off the reference
    for k in TRL_METRICS:
        assert abs(metrics[k] - trl_metrics[k]) <= MODEL_TOL, k
    ours = _as_peft(tuned.model, grads, tmp_path / "grads")
    assert set(ours) == set(trl_grads)
    for name, g in ours.items():
        np.testing.assert_allclose(g, trl_grads[name], rtol=0, atol=MODEL_TOL, err_msg=name)
    assert max(float(np.abs(g).max()) for g in ours.values()) > 10 * MODEL_TOL  # gradients are not trivially 0


def _random_logps(seed: int, n: int = 6) -> ReplyLogps:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, 20, (2, n)).astype(np.float32)
    sums = -rng.uniform(0.05, 3.0, (2, n)).astype(np.float32) * tokens  # average log-probs from -3 to -0.05
    return ReplyLogps(jnp.asarray(sums[0]), jnp.asarray(sums[1]), jnp.asarray(tokens[0]), jnp.asarray(tokens[1]))


def _trainer_stub(cls, **attrs):
    """An instance of a TRL trainer class with only the attributes its loss method reads (no model, no data)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(accelerator=types.SimpleNamespace(device="cpu"), **attrs)
    return obj


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl_odds_ratio_loss(beta):
    from trl.experimental.orpo import ORPOTrainer

    policy = _random_logps(0)
    ours = orpo_losses(policy, beta)
    chosen, rejected = (torch.tensor(np.asarray(x)) for x in policy.averaged())
    losses, chosen_r, rejected_r, _, _ = _trainer_stub(ORPOTrainer, beta=beta).odds_ratio_loss(chosen, rejected)
    np.testing.assert_allclose(ours.losses, -losses.numpy(), rtol=1e-6, atol=1e-7)  # TRL: loss = nll - mean(...)
    np.testing.assert_allclose(ours.chosen_rewards, chosen_r.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.rejected_rewards, rejected_r.numpy(), rtol=1e-6)


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (0.5, 1.2, 0.1)])
def test_simpo_equals_trl_cpo_simpo_loss(beta, gamma, eps):
    from trl.experimental.cpo import CPOTrainer

    policy = _random_logps(1)
    ours = simpo_losses(policy, beta, gamma, eps)
    stub = _trainer_stub(CPOTrainer, beta=beta, simpo_gamma=gamma, label_smoothing=eps, loss_type="simpo", alpha=0.0)
    chosen, rejected = (torch.tensor(np.asarray(x)) for x in policy.averaged())
    losses, chosen_r, rejected_r = stub.cpo_loss(chosen, rejected)
    np.testing.assert_allclose(ours.losses, losses.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours.chosen_rewards, chosen_r.numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.rejected_rewards, rejected_r.numpy(), rtol=1e-6)


def test_orpo_log_odds_near_probability_one_are_finite():
    """Average log-probs at 0 (a reply the model is certain of) keep log(1 - e^p) finite, as TRL's does not."""
    policy = ReplyLogps(jnp.zeros(2), jnp.array([-1e-8, -5.0]), jnp.ones(2), jnp.ones(2))
    assert bool(jnp.all(jnp.isfinite(orpo_losses(policy, 0.1).losses)))
