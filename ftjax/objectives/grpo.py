"""objective=grpo: RL from the model's own samples with verifiable rewards (GRPO and its variants, `rl.*`).

Each rollout samples rl.num_generations completions for each of rl.prompts_per_step train prompts with the current
weights (ftjax/objectives/rollout_source.py), scores them with `rl.rewards` on the host, and trains
rl.num_iterations optimizer steps on them with the loss `rl.loss_type` (ftjax/objectives/grpo_term.py). With
rl.beta > 0 the loss adds the k3 KL to the reference: the model with its adapters off under LoRA (no copy), a
frozen copy of the step-0 weights for full fine-tuning. The report adds the held-out mean reward of greedy replies,
base vs tuned, beside the task scores and the forgetting table.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import numpy as np
from flax import nnx

from ftjax.api import model_config
from ftjax.data.prompts import Prompt, PromptData, prompt_datasets
from ftjax.errors import ConfigError
from ftjax.generate import generate_tokens, pad_id, stop_ids
from ftjax.objectives.grpo_loss import GrpoLoss
from ftjax.objectives.grpo_term import grpo_term
from ftjax.objectives.objective import MemoryShapes, Objective, Reference, ReportRows, TermSpec
from ftjax.objectives.rewards import parse_rewards, score_batch
from ftjax.objectives.rollout_source import RolloutBatches, Sampling
from ftjax.objectives.rollouts import cut_at_eos
from ftjax.objectives.sources import BatchSource
from ftjax.objectives.terms import Term


def held_out_rewards(model: nnx.Module, prompts: list[Prompt], rewards, tokenizer, eos: list[int], pad: int,
                     max_new_tokens: int) -> dict:
    """The mean reward (and each function's) of greedy replies to the held-out prompts."""
    rows = generate_tokens(model, [list(p.tokens) for p in prompts], max_new_tokens=max_new_tokens, eos_ids=eos,
                           pad_id=pad)
    texts = [tokenizer.decode([t for t in cut_at_eos(r, eos)[0] if t not in eos], skip_special_tokens=True)
             for r in rows]
    scores = score_batch(rewards, [p.text for p in prompts], texts, [p.example for p in prompts])
    return {"prompts": len(prompts), "reward": float(np.nanmean(scores.total)),
            **{f"reward/{name}": float(np.nanmean(scores.per_function[:, i])) for i, name in enumerate(scores.names)}}


def reward_table(section: dict) -> list[list[str]]:
    """The report's rows: the held-out mean reward (and per function), base and fine-tuned."""
    from ftjax.evaluation.report import fmt

    base, tuned = section.get("base") or {}, section.get("finetuned") or {}
    n = (tuned or base).get("prompts")
    keys = [k for k in (tuned or base) if k.startswith("reward")]
    return [[f"mean {k} ({n} held-out prompts, greedy)", fmt(base.get(k)), fmt(tuned.get(k))] for k in keys]


class Grpo(Objective):
    """GRPO-family training with the run's `rl.*`."""

    name = "grpo"
    replay_mixes_in = False
    compiles_from_shapes = False  # its batches carry advantages (and old log-probs) beside the rows

    def __init__(self, rl: Any):
        self.loss = GrpoLoss(str(rl.loss_type), float(rl.epsilon),
                             None if rl.epsilon_high is None else float(rl.epsilon_high), float(rl.beta),
                             int(rl.max_new_tokens))
        if rl.baseline == "rloo" and self.loss.beta != 0.0:
            raise ConfigError("rl.baseline=rloo with rl.beta > 0 (RLOO's KL in the reward) is not supported yet; "
                              "use rl.baseline=group or rl.beta=0")
        self.rewards = parse_rewards(str(rl.rewards))  # an unknown name stops here, before any work
        self.rl = rl
        self.needs_reference = self.loss.beta != 0.0 and self.loss.loss_type != "rloo"
        self.policy: tuple[Any, Any] | None = None
        self.data: PromptData | None = None

    def read_data(self, run: Any, tokenizer: Any, vocab_size: int | None, replay: tuple | None = None) -> Any:
        d = run.data
        self.data = prompt_datasets(d.train, d.eval, d.fields, tokenizer, int(d.seq_len),
                                    int(self.rl.max_new_tokens), d.on_bad_record)
        self.tokenizer = tokenizer
        self.eos = stop_ids(types.SimpleNamespace(config=model_config(run.model.path)), tokenizer)
        self.pad = pad_id(tokenizer, self.eos)
        self.seq_len, self.chunk = int(d.seq_len), int(run.schedule.loss_chunk)
        self.max_examples = int(run.eval_settings.eval.max_examples)  # held-out prompts the report's reward rows read
        # the loop's held-out loss reads packed eval rows; GRPO's held-out measure is the report's reward rows
        return dataclasses.replace(self.data, eval=None)

    def bind_policy(self, graphdef: nnx.GraphDef, frozen: Any) -> None:
        self.policy = (graphdef, frozen)

    def sampling(self) -> Sampling:
        rl = self.rl
        return Sampling(int(rl.num_generations), int(rl.prompts_per_step), int(rl.max_new_tokens),
                        float(rl.temperature), float(rl.top_p), int(rl.num_iterations), str(rl.baseline),
                        str(rl.scale_rewards), bool(rl.dynamic_sampling), int(rl.max_draws), tuple(self.eos),
                        int(self.pad), self.chunk)

    def batches(self, train: Any, batch_size: int, seed: int, sharding: Any, prefetch: int) -> BatchSource:
        if self.policy is None:
            raise RuntimeError("objective=grpo samples from the policy: bind_policy(graphdef, frozen) first")
        graphdef, frozen = self.policy
        return RolloutBatches(train, self.rewards, self.sampling(), graphdef, frozen, self.tokenizer, batch_size,
                              self.seq_len, seed, sharding)

    def terms(self, spec: TermSpec) -> list[Term]:
        return [grpo_term(self.loss, float(self.rl.temperature), spec.loss_chunk, int(self.rl.num_iterations) > 1)]

    def memory(self, shapes: MemoryShapes, reference: Reference) -> dict[str, int]:
        """The rollouts' KV cache (every completion of a step at once: an upper bound per device) and, where
        generation folds the layer weights once per call (CPU), that copy; beside the
        reference copy of full fine-tuning."""
        m = shapes.model
        rows = int(self.rl.prompts_per_step) * int(self.rl.num_generations)
        head_dim = getattr(m, "head_dim", None) or m.hidden_size // m.num_heads
        kv_heads = getattr(m, "num_kv_heads", None) or m.num_heads
        cache = 2 * m.num_layers * kv_heads * head_dim * shapes.seq_len * rows * shapes.itemsize
        out = {**super().memory(shapes, reference), "rollout_kv_cache": int(cache)}
        if shapes.generation_weights:
            out["rollout_weights"] = shapes.generation_weights
        return out

    def report_rows(self, eval_rows: Any, batch_size: int, loss_chunk: int) -> ReportRows | None:
        held_out = self.data.eval[:self.max_examples] if self.data is not None and self.data.eval else None
        if not held_out:
            return None
        args = (self.rewards, self.tokenizer, self.eos, self.pad, int(self.rl.max_new_tokens))
        return ReportRows("rl_reward", lambda model: held_out_rewards(model, held_out, *args), reward_table,
                          "mean reward of greedy replies to the held-out prompts",
                          lambda measured: {"heldout_reward": measured["reward"]})
