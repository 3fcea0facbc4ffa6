"""On-policy distillation batches (GKD, Agarwal et al. 2023): a fraction λ of the batches (distill.lambda_) has its
replies sampled by the student, from the weights the step starts from, at distill.temperature; the teacher scores
them in the step as it scores the data's replies.

Which batches, and each sample's key, follow from the seed and the batch's index alone, so a resumed run samples
the same replies from the same weights. A sampled reply ends with its end-of-turn token (trained, as the data's
replies are) or at distill.max_new_tokens, and is cut to fit a row on both sides. One example a row. The sampler is
the rollouts' (`ftjax.objectives.rollouts.sample`): from the step's own arrays, no copy of the weights.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from ftjax.data.loader import TrainIterator, to_global
from ftjax.generate import pad_id, stop_ids
from ftjax.objectives.distill_data import TEACHER
from ftjax.objectives.rollouts import sample
from ftjax.objectives.sources import DatasetBatches


def on_policy(seed: int, index: int, fraction: float) -> bool:
    """Whether batch `index` is sampled by the student (a seeded draw with probability `fraction`)."""
    return fraction > 0 and np.random.default_rng([seed, 0x676B64, index]).random() < fraction


def prompt_of(row: dict[str, np.ndarray]) -> list[int]:
    """One row's prompt: its tokens up to the first trained target's input (one example a row)."""
    first = int(np.argmax(row["loss_weights"] > 0))
    return [int(t) for t in row["input_ids"][:first + 1]]


def with_reply(prompt: list[int], reply: list[int], seq_len: int) -> dict[str, np.ndarray]:
    """A row of `prompt` + `reply`, the reply's tokens trained, padded to `seq_len` positions."""
    seq = np.asarray(prompt + reply, np.int32)
    n = len(seq) - 1
    out = {k: np.zeros(seq_len, np.float32 if k == "loss_weights" else np.int32)
           for k in ("input_ids", "targets", "loss_weights", "segment_ids", "positions")}
    out["input_ids"][:n], out["targets"][:n] = seq[:-1], seq[1:]
    out["loss_weights"][len(prompt) - 1:n] = 1.0
    out["segment_ids"][:n] = 1
    out["positions"][:n] = np.arange(n)
    return out


class OnPolicyBatches(DatasetBatches):
    """The train rows' batches (`iterator`, host rows), each on-policy one rebuilt around the student's replies,
    sampled from `nnx.merge(graphdef, trainable, frozen)`: the step's own arrays."""

    def __init__(self, iterator: TrainIterator, graphdef: nnx.GraphDef, frozen: Any, tokenizer: Any, sharding: Any,
                 *, seed: int, fraction: float, temperature: float, max_new_tokens: int):
        super().__init__(iterator)
        self.graphdef, self.frozen, self.tokenizer, self.sharding = graphdef, frozen, tokenizer, sharding
        self.seed, self.fraction, self.temperature, self.max_new_tokens = seed, fraction, temperature, max_new_tokens

    def next(self, trainable: Any) -> dict:
        index = int(self.iterator.get_state()["batches"])
        batch = next(self.iterator)
        if on_policy(self.seed, index, self.fraction):
            batch = self.sampled(batch, trainable, index)
        return batch if self.sharding is None else to_global(batch, self.sharding, self.iterator.batch_size)

    def sampled(self, batch: dict, trainable: Any, index: int) -> dict:
        """The batch's prompts with the student's sampled replies, on the student's and the teacher's side."""
        student, teacher = batch, batch[TEACHER]
        rows = range(len(student["input_ids"]))
        live = [r for r in rows if student["loss_weights"][r].any()]  # padding rows stay padding
        if not live:
            return batch
        prompts = [prompt_of({k: v[r] for k, v in student.items() if k != TEACHER}) for r in live]
        teacher_prompts = [prompt_of({k: v[r] for k, v in teacher.items()}) for r in live]
        eos = stop_ids(nnx.merge(self.graphdef, trainable, self.frozen), self.tokenizer)
        pad = pad_id(self.tokenizer, eos)
        seed = int(np.random.default_rng([self.seed, 0x73616D, index]).integers(2**31))
        replies = sample(self.graphdef, trainable, self.frozen, prompts, seed=seed, max_new_tokens=self.max_new_tokens,
                         eos_ids=eos, pad_id=pad, temperature=self.temperature).completions
        seq_len, teacher_len = student["input_ids"].shape[1], teacher["input_ids"].shape[1]
        out_s = {k: v.copy() for k, v in student.items() if k != TEACHER}
        out_t = {k: v.copy() for k, v in teacher.items()}
        for r, p, tp, reply in zip(live, prompts, teacher_prompts, replies):
            room = min(seq_len + 1 - len(p), teacher_len + 1 - len(tp))  # the reply fits a row on both sides
            reply = reply[:max(room, 0)]
            for out, prompt, length in ((out_s, p, seq_len), (out_t, tp, teacher_len)):
                for k, v in with_reply(prompt, reply, length).items():
                    out[k][r] = v
        return {**out_s, TEACHER: out_t}
