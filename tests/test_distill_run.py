"""objective=distill through the train step and the loop: context distillation under LoRA takes no second copy of
the weights (a teacher of its own takes exactly its own), the same losses on 1 and 8 devices, on-policy batches
hold the student's samples, a killed run resumes to the same losses, bad settings fail in one line."""

import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from ftjax.errors import ConfigError, LoadError
from ftjax.generate import generate_tokens, stop_ids
from ftjax.objectives.distill_data import TEACHER
from ftjax.objectives.distill_source import OnPolicyBatches, on_policy, prompt_of
from ftjax.objectives.rollouts import cut_at_eos
from ftjax.train.compose import compose, loss_terms
from ftjax.train.step import Frozen, make_train_step
from ftjax.objectives.terms import cross_entropy
from distill_helpers import distill_config, step_inputs, tiny_hf_teacher
from loop_helpers import ROOT, metrics, script_env

LOSS_TOL = 1e-5


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.mark.slow  # three compiles of the step (~1 min here)
def test_lora_context_distillation_takes_no_second_copy_and_an_own_teacher_takes_exactly_its_weights(tmp_path):
    one = jax.devices()[:1]
    c = distill_config(train__batch_size=1)
    run, setup, data, batch = step_inputs(c, one)
    mesh, s = setup.mesh, setup.state
    student_batch = {k: v for k, v in batch.items() if k != TEACHER}
    args = (s.trainable, s.opt_state)
    sft = make_train_step(s, setup.optimizer, mesh, terms=[cross_entropy(c.train.loss_chunk)], rules=setup.rules)
    sft_mem = sft.lower(*args, s.frozen, student_batch, jax.random.key(0)).compile().memory_analysis()
    cd = make_train_step(s, setup.optimizer, mesh, terms=loss_terms(run), rules=setup.rules)
    cd_mem = cd.lower(*args, s.frozen, batch, jax.random.key(0)).compile().memory_analysis()
    # the same weights and optimizer state, no weight copied: the batch adds the teacher's rows, and neither side's
    # `targets` is read (the teacher's distribution is the target), so XLA takes neither
    targets = batch["targets"].nbytes + batch[TEACHER]["targets"].nbytes
    assert cd_mem.argument_size_in_bytes == sft_mem.argument_size_in_bytes + _bytes(batch[TEACHER]) - targets

    c = distill_config(train__batch_size=1, distill__teacher=str(tiny_hf_teacher(tmp_path / "teacher")),
                       distill__teacher_prefix="")
    run, setup, data, batch = step_inputs(c, one)
    teacher = run.objective.prepare_teacher(run, setup.mesh, setup.rules, None)
    own = make_train_step(s, setup.optimizer, mesh, terms=loss_terms(run), rules=setup.rules, teacher=teacher)
    own_mem = own.lower(*args, Frozen(s.frozen, None, teacher.params), batch,
                        jax.random.key(0)).compile().memory_analysis()
    targets = batch["targets"].nbytes + batch[TEACHER]["targets"].nbytes  # its teacher rows: no prefix, shorter
    assert own_mem.argument_size_in_bytes == (sft_mem.argument_size_in_bytes + _bytes(batch[TEACHER]) - targets
                                              + _bytes(teacher.params))


def _losses(c, devices, steps: int = 2):
    run, setup, data, batch = step_inputs(c, devices)
    step = make_train_step(setup.state, setup.optimizer, setup.mesh, terms=loss_terms(run),
                           grad_accum=c.train.grad_accum, rules=setup.rules)
    trainable, opt_state, out = setup.state.trainable, setup.state.opt_state, []
    frozen = jax.tree.map(lambda x: 4 * x, setup.state.frozen)  # peaked logits: a divergence of order 1, not 1e-4
    for i in range(steps):
        rows = data.train.batch(np.arange(i * 8, i * 8 + 8))
        trainable, opt_state, m = step(trainable, opt_state, frozen, rows, jax.random.key(i))
        out.append(float(m["loss"]))
    return out


@pytest.mark.slow  # six compiles of the step
@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_same_losses_on_one_and_eight_devices(loss):
    # SGD: an update linear in the gradient (Adam's first steps are ~lr·sign(g): rounding could flip an entry)
    settings = dict(distill__loss=loss, optim__name="sgd", optim__lr=0.5, optim__warmup_steps=0)
    one = _losses(distill_config(**settings), jax.devices()[:1])
    eight = _losses(distill_config(mesh__data=2, mesh__fsdp=2, mesh__tensor=2, train__grad_accum=2, **settings), None)
    assert one[0] > 0.1 and one[1] != one[0]  # a divergence to learn, and the first step changed it
    np.testing.assert_allclose(eight, one, rtol=LOSS_TOL)


@pytest.mark.slow  # generation and two compiles
def test_on_policy_batches_hold_the_students_own_samples_on_both_sides():
    c = distill_config(distill__lambda_=1.0, distill__max_new_tokens=12)
    run, setup, data, _ = step_inputs(c, jax.devices()[:1])
    objective, state = run.objective, setup.state
    model = state.model()
    objective.bind_policy(state.graphdef, state.frozen)
    source = objective.batches(data.train, 8, c.seed, None, 0)
    assert isinstance(source, OnPolicyBatches)
    batch = jax.tree.map(np.asarray, source.next(state.trainable))
    seed = int(np.random.default_rng([c.seed, 0x73616D, 0]).integers(2**31))
    first = source.iterator  # the same first batch the source drew (its rows), sampled as it samples
    first.set_state({**first.get_state(), "batches": 0})
    drawn = next(first)
    prompts = [prompt_of({k: v[r] for k, v in drawn.items() if k != TEACHER}) for r in range(8)]
    eos = stop_ids(model, objective.tokenizer)
    tokens = generate_tokens(model, prompts, max_new_tokens=12, eos_ids=eos, pad_id=objective.tokenizer.pad_token_id,
                             temperature=c.distill.temperature, seed=seed)
    for r in range(8):
        reply = cut_at_eos(tokens[r], eos)[0]
        for side in (batch, batch[TEACHER]):
            w = side["loss_weights"][r] > 0
            np.testing.assert_array_equal(side["targets"][r][w], reply)  # the sample, trained, on both sides
        teacher_prompt = prompt_of({k: v[r] for k, v in drawn[TEACHER].items()})
        assert len(teacher_prompt) > len(prompts[r])  # the teacher still sees its 1-shot prefix
    assert on_policy(0, 0, 1.0) and not on_policy(0, 0, 0.0)
    assert 0.2 < np.mean([on_policy(0, i, 0.3) for i in range(2000)]) < 0.4


def _train(workdir, fault: str, *flags: str) -> subprocess.CompletedProcess:
    env = script_env(1, fault)
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
           f"--workdir={workdir}", "--config.objective=distill", "--config.data.packing=false",
           "--config.eval.final=false", *flags]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow  # three training runs in subprocesses
def test_sigkill_then_resume_ends_at_the_same_losses_with_on_policy_batches(tmp_path):
    flags = ("--config.distill.lambda_=0.5", "--config.distill.max_new_tokens=8", "--config.checkpoint.every=2")
    straight = _train(tmp_path / "straight", "", *flags)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _train(tmp_path / "killed", "kill@5", *flags)
    assert killed.returncode == -signal.SIGKILL
    resumed = _train(tmp_path / "killed", "", *flags)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    want = {r["step"]: r["loss"] for r in metrics(tmp_path / "straight") if "loss" in r}
    got = {r["step"]: r["loss"] for r in metrics(tmp_path / "killed") if "loss" in r}
    assert got == want and len(want) == 8  # every step's loss exactly, before and after the kill


@pytest.mark.parametrize("settings, error, message", [
    (dict(distill__teacher="/no/such/teacher"), LoadError, "/no/such/teacher: not a model folder"),
    (dict(distill__loss="kl"), ConfigError, "config.distill.loss='kl' is not one of forward_kl, reverse_kl, jsd"),
    (dict(distill__beta=1.5), ConfigError, "config.distill.beta must be in [0, 1], got 1.5"),
    (dict(distill__teacher_prefix="fewshot"), ConfigError, "config.distill.teacher_prefix='fewshot' is not one of"),
    (dict(distill__teacher_prefix=""), ConfigError, "distill.teacher=self needs a distill.teacher_prefix"),
    (dict(distill__lambda_=0.5, data__packing=True), ConfigError, "it needs one example a row (data.packing=false)"),
    (dict(eval__few_shot=0), ConfigError, "set eval.few_shot >= 1"),
])
def test_bad_distill_settings_fail_in_one_line(settings, error, message):
    with pytest.raises(error) as e:
        compose(distill_config(**settings))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow  # two script subprocesses
@pytest.mark.parametrize("flag, message", [("--config.distill.teacher=/no/such/teacher", "not a model folder"),
                                           ("--config.distill.temperature=0", "distill.temperature must be > 0")])
def test_bad_teacher_or_value_exits_2_in_one_line(tmp_path, flag, message):
    proc = _train(tmp_path / "run", "", flag)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines[:5]
