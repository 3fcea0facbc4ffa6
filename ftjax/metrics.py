"""Honest throughput numbers and the run's records: FLOP counts, MFU, metrics.jsonl, TensorBoard, loss.png.

FLOPs per trained token (P = matmul weights a token passes through, incl. the output head; T = sequence length):
  full fine-tuning: 6·P + attention
  LoRA:             4·P_frozen + 6·P_lora + attention   (no weight gradients for frozen weights)
    P_lora: the adapter params a token runs through: every Linear's adapter, and of a mixture of experts'
    per-expert adapters the top-k of E (k/E of them)
  attention (forward + backward): 12 · heads · head_dim · Σ_layers keys, keys per query as the area under
    the mask: causal T/2 (so 6 · layers · heads · head_dim · T), a sliding window W < T: W − W²/2T
  mixture of experts: a layer's MLP weights in P are its router (D·E) and its top-k experts (k · 3·D·F), not all E
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ftjax.models.llama import ModelConfig

# Dense bf16 peak FLOP/s per chip, from vendor data sheets (no sparsity).
ACCELERATOR_PEAKS = {
    "A100": 312e12, "H100": 989e12, "H200": 989e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in matmuls per token: attention, MLP (an MoE layer: router + the top-k experts
    a token is routed to) and the output head."""
    d, h = cfg.hidden_size, cfg.head_dim
    attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2
    moe = cfg.moe
    if moe is None:
        mlp = 3 * d * cfg.intermediate_size
    else:
        mlp = d * moe.num_experts + moe.top_k * 3 * d * moe.intermediate_size
    return cfg.num_layers * (attn + mlp) + d * cfg.vocab_size


def attended_keys(seq_len: int, window: int | None) -> float:
    """Keys per query, as the area under the causal mask over T²: T/2, or W − W²/2T for a window W < T."""
    if window is None or window >= seq_len:
        return seq_len / 2
    return window - window * window / (2 * seq_len)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """QK^T and AV over each layer's attended keys (sliding-window layers: their window only), fwd + bwd."""
    keys = sum(attended_keys(seq_len, w) for w in cfg.layer_windows())
    return 12.0 * cfg.num_heads * cfg.head_dim * keys


def flops_per_token(cfg: ModelConfig, seq_len: int, method: str, lora_params: int = 0) -> float:
    """Training FLOPs per token for `method` (see the module docstring for the formula)."""
    p = matmul_params(cfg)
    attn = attention_flops_per_token(cfg, seq_len)
    if method == "full":
        return 6.0 * p + attn
    return 4.0 * p + 6.0 * lora_params + attn


def active_lora_params(cfg: ModelConfig, lora: nnx.State) -> int:
    """Adapter params a token runs through (P_lora): all of each Linear's adapter; of the experts' per-expert
    adapters (params with an `expert` axis, [L, E, ...]) only the top-k of E experts the token is routed to."""
    total = 0
    for _, var in nnx.to_flat_state(lora):
        n = math.prod(var.get_value().shape)
        if "expert" in (var.get_metadata().get("logical_axes") or ()):
            n = n // cfg.moe.num_experts * cfg.moe.top_k
        total += n
    return total


def training_flops_per_token(cfg: ModelConfig, seq_len: int, method: str, trainable: nnx.State) -> float:
    """`flops_per_token` of a run, P_lora counted from its trainable state (the adapters, for LoRA)."""
    return flops_per_token(cfg, seq_len, method, active_lora_params(cfg, trainable) if method == "lora" else 0)


@functools.cache
def measured_cpu_peak(dtype: str = "float32", n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a large matmul in `dtype` on the default device (the CPU's practical peak); measured once per
    process (~1 s: a run asks at its start and its end)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2.0 * n**3 / float(np.median(times))


def peak_flops(dtype: str = "float32") -> tuple[float, str]:
    """(peak FLOP/s per device, where it came from): the table for known accelerators, else measured."""
    import jax

    kind = jax.devices()[0].device_kind
    for name, peak in ACCELERATOR_PEAKS.items():
        if name.lower() in kind.lower():
            return peak, f"{kind}: data-sheet dense bf16 peak"
    return measured_cpu_peak(dtype), f"{kind}: measured {dtype} matmul 2048^3"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: its writer imports torch when installed only to
    accept torch tensors (ftjax logs floats), 1.8 s of every run's start here. Torch stays importable after."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:  # nothing left to keep out
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError; tensorboardX treats torch as absent
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self._tb = _summary_writer_class()(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None:
                self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "item"):
        return np.asarray(v).item()
    return v


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """metrics.jsonl as a list; a resumed run's repeated steps keep their latest record."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            by_step[rec["step"]] = {**by_step.get(rec["step"], {}), **rec}
    return [by_step[s] for s in sorted(by_step)]


def loss_curve(records: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train points, eval points) behind loss.png: a train loss for every step, from each logged line's
    `step_losses` (the losses of the steps since the previous logged line), else its `loss`."""
    train: dict[int, float] = {}
    for r in records:
        losses = r.get("step_losses")
        if losses:
            first = r["step"] - len(losses) + 1
            train.update({first + i: float(v) for i, v in enumerate(losses)})
        elif r.get("loss") is not None:
            train[r["step"]] = float(r["loss"])
    evals = [(r["step"], float(r["eval_loss"])) for r in records if r.get("eval_loss") is not None]
    return sorted(train.items()), evals


def plot_losses(workdir: str | os.PathLike) -> Path:
    """loss.png: train loss at every step, eval loss where measured; log scale when they span decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = loss_curve(read_metrics(workdir))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), ".-" if len(train) < 50 else "-", label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    values = [v for _, v in train + evals if v > 0 and math.isfinite(v)]
    if values and max(values) / min(values) >= 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(workdir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(workdir) / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
