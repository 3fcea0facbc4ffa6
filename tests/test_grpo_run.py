"""objective=grpo through the training job on the tiny model, against hand computations: the logged rollout and
step metrics, one step's gradient as the policy-gradient estimate (μ = 1, β = 0), the importance ratio of the
first step, the arrays generation and the step take (LoRA), and the one-line errors.

The hand side re-draws a rollout with the sampler's seed (`sampler_seed`, a pure function of the run's seed and
the rollout) from the weights it was drawn with (captured after each step by an action), then recomputes every
figure in numpy from an unpacked full-logits forward pass of the model.
"""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from ftjax.api import load_tokenizer, model_config
from ftjax.objectives.rollout_source import prompt_order, sampler_seed
from ftjax.objectives.rollouts import sample
from ftjax.train.compose import compose
from ftjax.train.loop import run
from ftjax.train.setup import build_state
from grpo_rewards import chars, parity, vowels
from loop_helpers import ROOT, load_config, metrics, said, script_env

TOL = 1e-4  # fp32, a whole model
G, P, NEW, T = 4, 2, 8, 0.9
REWARDS = "grpo_rewards:chars,grpo_rewards:vowels=0.5"


def _config(steps: int = 2, **rl):
    c = load_config()
    c.objective = "grpo"
    c.rl.num_generations, c.rl.prompts_per_step, c.rl.max_new_tokens, c.rl.temperature = G, P, NEW, T
    c.rl.rewards = REWARDS
    for k, v in rl.items():
        c.rl[k] = v
    c.train.steps, c.checkpoint.every, c.eval.final = steps, steps, False
    return c


def _train(c, workdir) -> dict[int, dict]:
    """Run `c`; the trainable weights after each step (host copies)."""
    captured = {}

    def capture(tick):
        captured[tick.step] = jax.device_get(tick.trainable)

    run(c, workdir, actions=[capture])
    return captured


class Hand:
    """The run's start as the hand computation sees it: initial weights, prompts, the objective's EOS and pad."""

    def __init__(self, c):
        parts = compose(c)
        self.c, self.tokenizer = c, load_tokenizer(c.model.path)
        self.objective = parts.objective
        data = self.objective.read_data(parts, self.tokenizer, model_config(c.model.path).vocab_size)
        self.prompts = data.train
        state = build_state(parts).state
        self.graphdef, self.start, self.frozen = state.graphdef, jax.device_get(state.trainable), state.frozen

    def rollout(self, trainable, rollout: int = 0, draw: int = 0, first: int = 0, groups: int = G,
                rewards=(chars, vowels)):
        """The completions drawn from prompts [first, first + P) of the run's order, and their rewards [N, F]."""
        order = prompt_order(len(self.prompts), self.c.seed, 0)
        chosen = [self.prompts[int(i)] for i in order[first:first + P]]
        s = sample(self.graphdef, trainable, self.frozen, [p.tokens for p in chosen for _ in range(groups)],
                   seed=sampler_seed(self.c.seed, rollout, draw), max_new_tokens=NEW, eos_ids=self.objective.eos,
                   pad_id=self.objective.pad, temperature=T)
        texts = [self.tokenizer.decode([t for t in c if t not in self.objective.eos], skip_special_tokens=True)
                 for c in s.completions]
        return s, np.array([[r("", t, {}) for r in rewards] for t in texts])

    def logps(self, trainable, s, temperature=T, as_jax=False):
        """Per completion, log p of its tokens from full logits of prompt + completion alone (numpy, or jax)."""
        model = nnx.merge(self.graphdef, trainable, self.frozen)
        out = []
        for p, c in zip(s.prompts, s.completions):
            ids = np.array([p + c], np.int32)[:, :-1]
            logits = model(ids)[0, len(p) - 1:] / temperature
            logp = jax.nn.log_softmax(logits.astype(np.float32), axis=-1)[np.arange(len(c)), np.array(c)]
            out.append(logp if as_jax else np.asarray(logp, np.float64))
        return out

    def entropies(self, trainable, s):
        model = nnx.merge(self.graphdef, trainable, self.frozen)
        out = []
        for p, c in zip(s.prompts, s.completions):
            logits = np.asarray(model(np.array([p + c], np.int32)[:, :-1])[0, len(p) - 1:], np.float64) / T
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            out.append(-(np.exp(logp) * logp).sum(-1))
        return out


def _advantages(total: np.ndarray) -> np.ndarray:
    """GRPO's group advantage, as TRL: (r - group mean) / (group std (ddof 1) + 1e-4)."""
    groups = total.reshape(-1, G)
    return ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """μ = 2, β = 0.1, a narrow clip: step 2 trains the step-1 rollout again, from moved weights."""
    c = _config(num_iterations=2, beta=0.1, epsilon=0.005)
    workdir = tmp_path_factory.mktemp("grpo")
    weights = _train(c, workdir)
    return c, Hand(c), weights, {r["step"]: r for r in metrics(workdir)}


@pytest.mark.slow  # a training run and the hand computation (~1 min here)
def test_logged_metrics_equal_the_hand_computation(two_iterations):
    c, hand, weights, rows = two_iterations
    s, scores = hand.rollout(hand.start)
    total = scores[:, 0] + 0.5 * scores[:, 1]
    first, second = rows[1], rows[2]
    close = dict(rtol=TOL, atol=1e-6)
    np.testing.assert_allclose(first["reward"], total.mean(), **close)
    np.testing.assert_allclose(first["reward_std"], total.std(ddof=1), **close)
    np.testing.assert_allclose(first["reward/grpo_rewards:chars"], scores[:, 0].mean(), **close)
    np.testing.assert_allclose(first["reward/grpo_rewards:vowels"], scores[:, 1].mean(), **close)
    np.testing.assert_allclose(first["completion_length"], np.mean([len(x) for x in s.completions]), **close)
    np.testing.assert_allclose(first["entropy"], np.concatenate(hand.entropies(hand.start, s)).mean(), **close)
    zero_std = np.repeat(total.reshape(-1, G).std(1) == 0, G)
    assert first["frac_reward_zero_std"] == zero_std.mean()
    assert first["kl"] == 0.0  # LoRA's fresh adapter (B = 0): the policy is its reference
    # the seconds: generation and training each timed, their rates from them
    tokens = sum(len(x) for x in s.completions)
    np.testing.assert_allclose(first["generation_tokens_per_s"], tokens / first["generation_s"], rtol=1e-9)
    assert first["generation_s"] > 0 and first["scoring_s"] >= 0
    positions = sum(len(p) + len(x) - 1 for p, x in zip(s.prompts, s.completions))  # the rows' tokens
    for r in (first, second):
        np.testing.assert_allclose(r["train_tokens_per_s"] * r["train_s"], positions, rtol=1e-9)
    assert "reward" not in second  # step 2 trains the same rollout: nothing new was sampled

    # step 2: the step-1 batch, its sampling-time log-probs as π_old, from the weights after step 1
    adv = np.concatenate([np.full(len(x), a) for x, a in zip(s.completions, _advantages(total))])
    logp = np.concatenate(hand.logps(weights[1], s))
    old = np.concatenate(s.logps)
    ref = np.concatenate(hand.logps(hand.start, s))  # B = 0 at the start: the adapters-off model
    ratio = np.exp(logp - old)
    eps = c.rl.epsilon
    low, high = (ratio < 1 - eps) & (adv < 0), (ratio > 1 + eps) & (adv > 0)
    assert 0 < (low | high).mean() < 1  # the narrow clip bites on some tokens, not all
    np.testing.assert_allclose(second["clip_ratio"], (low | high).mean(), **close)
    np.testing.assert_allclose(second["clip_ratio/low_mean"], low.mean(), **close)
    np.testing.assert_allclose(second["clip_ratio/high_mean"], high.mean(), **close)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    assert kl.mean() > 0
    np.testing.assert_allclose(second["kl"], kl.mean(), rtol=TOL, atol=1e-8)
    loss = -np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv) + c.rl.beta * kl  # DAPO: token mean
    np.testing.assert_allclose(second["loss"], loss.mean(), rtol=TOL, atol=1e-6)


@pytest.mark.slow  # a training step and the hand gradient (~40 s here)
def test_one_step_is_the_policy_gradient_estimate_and_its_ratio_is_one(tmp_path):
    c = _config(steps=1, num_iterations=1, beta=0.0)
    c.optim.name, c.optim.lr, c.optim.momentum, c.optim.clip_norm = "sgd", 1.0, 0.0, 0.0
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    weights = _train(c, tmp_path)
    hand = Hand(c)
    s, scores = hand.rollout(hand.start)
    adv = _advantages(scores[:, 0] + 0.5 * scores[:, 1])
    n = sum(len(x) for x in s.completions)

    def surrogate(trainable):  # -(1/N) Σ_i A_i Σ_t log π(token_t): its gradient is the estimate
        return -sum(a * jax.numpy.sum(lp) for a, lp in zip(adv, hand.logps(trainable, s, as_jax=True))) / n

    want = jax.grad(surrogate)(hand.start)
    got = jax.tree.map(lambda before, after: before - after, hand.start, weights[1])  # SGD, lr 1: θ0 - θ1 = ∇
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    assert scale > 0
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * scale)
    row = metrics(tmp_path)[0]
    # ratio exactly 1: the loss is -Σ A·(completion tokens) / N and nothing is clipped
    lengths = np.array([len(x) for x in s.completions])
    np.testing.assert_allclose(row["loss"], -(adv * lengths).sum() / n, rtol=1e-6, atol=1e-7)
    assert row["clip_ratio"] == 0.0


def _train_script(workdir, *flags, devices: int = 1, **env):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "configs" / "tiny_test.py"),
           f"--workdir={workdir}", "--config.objective=grpo", f"--config.rl.num_generations={G}",
           f"--config.rl.prompts_per_step={P}", f"--config.rl.max_new_tokens={NEW}", "--config.eval.final=False",
           *flags]
    return subprocess.run(cmd, env=script_env(devices, PYTHONPATH=f"{ROOT / 'tests'}:{ROOT}", **env),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # three scripts/train.py processes
@pytest.mark.parametrize("case", ["unknown reward", "reward raises", "no prompts"])
def test_errors_are_one_line_and_exit_2(case, tmp_path):
    flags = {"unknown reward": ["--config.rl.rewards=json_feilds"],
             "reward raises": ["--config.rl.rewards=grpo_rewards:boom"]}.get(case, [])
    if case == "no prompts":
        data = tmp_path / "texts.jsonl"
        data.write_text(json.dumps({"text": "a document, no prompt"}) + "\n")
        flags = [f"--config.data.train={data}"]
    proc = _train_script(tmp_path / "run", *flags)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in said(proc.stderr) if not ln.startswith("WARNING:absl:")]  # orbax's read-only notes
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), lines
    expect = {"unknown reward": "unknown reward 'json_feilds'; did you mean 'json_fields'?",
              "reward raises": "reward grpo_rewards:boom raised ZeroDivisionError: the reward's own bug on example 0",
              "no prompts": f"{data if case == 'no prompts' else ''}:1: record has no prompt"}[case]
    assert expect in lines[0], lines


@pytest.mark.slow  # compiles two train steps (~30 s here)
def test_under_lora_generation_and_the_step_take_the_same_arrays_and_no_reference_copy(monkeypatch):
    from ftjax.objectives import rollouts
    from ftjax.objectives.terms import cross_entropy
    from ftjax.train.compose import loss_terms
    from ftjax.train.step import make_train_step

    c = _config(beta=0.1)  # the KL reads the reference: LoRA's adapters off, no copy
    hand = Hand(c)
    seen = []
    real = rollouts.generate_tokens
    monkeypatch.setattr(rollouts, "generate_tokens", lambda model, *a, **k: seen.append(nnx.state(model)) or
                        real(model, *a, **k))
    parts = compose(c, devices=jax.devices()[:1])  # one device: the argument bytes are the whole step's
    setup = build_state(parts)
    state = setup.state
    s = sample(state.graphdef, state.trainable, state.frozen, [list(hand.prompts[0].tokens)] * G, seed=0,
               max_new_tokens=NEW, eos_ids=hand.objective.eos, pad_id=hand.objective.pad, temperature=T)
    # generation reads the very arrays the step takes: every leaf of its model is one of theirs, none is new
    ours = {id(x) for x in jax.tree.leaves((state.trainable, state.frozen))}
    assert [id(x) for x in jax.tree.leaves(seen[0])] and all(id(x) in ours for x in jax.tree.leaves(seen[0]))
    assert len(jax.tree.leaves(seen[0])) == len(ours)

    from ftjax.objectives.rollout_rows import pack_rollouts

    rows = pack_rollouts(s.prompts, s.completions, np.ones(G), c.data.seq_len, rows=c.train.batch_size)
    args = (state.trainable, state.opt_state, state.frozen, rows, jax.random.key(0))
    sft = make_train_step(state, setup.optimizer, parts.mesh, terms=[cross_entropy(c.train.loss_chunk)],
                          rules=setup.rules)
    grpo = make_train_step(state, setup.optimizer, parts.mesh, terms=loss_terms(parts), rules=setup.rules)
    sft_args = sft.lower(*args).compile().memory_analysis().argument_size_in_bytes
    grpo_args = grpo.lower(*args).compile().memory_analysis().argument_size_in_bytes
    # the same weights, optimizer state and rows; the rollout batch adds its advantages only (no weight copy)
    assert grpo_args - sft_args == rows["advantages"].nbytes


@pytest.mark.slow  # a training step and the re-drawn rollouts (~1 min here)
def test_dynamic_sampling_keeps_informative_groups_and_rloo_is_leave_one_out(tmp_path):
    c = _config(steps=1, num_generations=2, dynamic_sampling=True, max_draws=3, baseline="rloo",
                loss_type="grpo", rewards="grpo_rewards:parity")
    c.optim.name, c.optim.lr, c.optim.momentum, c.optim.clip_norm = "sgd", 1.0, 0.0, 0.0
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    c.seed = 1  # its first draw has an all-alike group (with the inverse-CDF sampler), so a re-draw is exercised
    weights = _train(c, tmp_path)
    row = metrics(tmp_path)[0]
    hand = Hand(c)
    kept, drawn = [], 0
    while len(kept) < P and drawn < c.rl.max_draws:  # numpy's dynamic sampling over the re-drawn draws
        s, scores = hand.rollout(hand.start, draw=drawn, first=drawn * P, groups=2, rewards=(parity,))
        for i in range(P):
            group = slice(2 * i, 2 * i + 2)
            if scores[group, 0].max() > scores[group, 0].min():
                kept.append((s.prompts[group], s.completions[group], scores[group, 0]))
        drawn += 1
    assert row["draws"] == drawn > 1  # this seed draws an all-alike group first
    kept = kept[:P]
    assert len(kept) == P
    rewards = np.concatenate([r for _, _, r in kept])
    assert row["reward"] == pytest.approx(rewards.mean(), rel=1e-6) and row["frac_reward_zero_std"] == 0.0
    # RLOO: r_i minus the mean of the other completions of its prompt (G = 2: the other one)
    adv = np.concatenate([r - r[::-1] for _, _, r in kept])
    completions = [x for _, cs, _ in kept for x in cs]
    prompts = [x for ps, _, _ in kept for x in ps]

    class Kept:  # the kept rollouts as `Hand.logps` reads them
        pass

    k = Kept()
    k.prompts, k.completions = prompts, completions

    def surrogate(trainable):  # grpo: each completion's token mean, averaged over completions; ratio 1
        logps = hand.logps(trainable, k, as_jax=True)
        return -sum(a * jax.numpy.mean(lp) for a, lp in zip(adv, logps)) / len(completions)

    want = jax.grad(surrogate)(hand.start)
    got = jax.tree.map(lambda before, after: before - after, hand.start, weights[1])
    scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=TOL, atol=TOL * scale)
