"""Train-step throughput with honest MFU: what `scripts/benchmark.py` and `benchmarks/compare_hf.py` time.

The batch is random (exactly batch × seq_len tokens, loss on every position) and placed on the
devices once, so only the jitted step is timed. The step is compiled ahead of time (compile time
measured apart), then each timed step is dispatched and blocked on; nothing else syncs with the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from ftjax.config import DEFAULT_MODEL, LORA_TARGETS, default_config
from ftjax.data.packing import BATCH_KEYS
from ftjax.logs import progress, still
from ftjax.metrics.flops import matmul_params
from ftjax.metrics.peaks import peak_flops, possible_mfu
from ftjax.platform import device_kind, platform_of
from ftjax.methods import method_for
from ftjax.train.compose import compose
from ftjax.train.memory import frozen_bytes
from ftjax.train.setup import build_state
from ftjax.train.state import state_size
from ftjax.train.step import make_train_step

def random_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full batch with one segment per row and a random target at every position (weight 1)."""
    rng = np.random.default_rng(seed)
    return dict(input_ids=rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
                targets=rng.integers(0, vocab, (batch, seq_len), dtype=np.int32),
                loss_weights=np.ones((batch, seq_len), np.float32),
                segment_ids=np.ones((batch, seq_len), np.int32),
                positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)))


def peak_memory_bytes() -> tuple[int, str]:
    """(peak bytes, source): the device allocator's peak where the backend reports it, else peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS (ru_maxrss)"


def machine() -> dict[str, Any]:
    """Where a figure was measured; the load average says how busy the machine was."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


@dataclasses.dataclass
class Bench:
    """A compiled step with its state and batch on the devices; `run(n)` times n more steps."""

    config: Any
    model_cfg: Any
    compiled: Any
    trainable: Any
    opt_state: Any
    frozen: Any
    batch: dict
    rng: jax.Array
    n_trainable: int
    devices: int
    compile_s: float
    build_s: float
    mesh: Any = None  # the step's mesh: its devices say the platform (None: this process's devices)

    def run(self, n: int) -> list[float]:
        """Seconds per step for n steps, each dispatched then blocked on (the only host sync)."""
        times, cpu = [], []
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            self.trainable, self.opt_state, metrics = self.compiled(self.trainable, self.opt_state, self.frozen,
                                                                     self.batch, self.rng)
            jax.block_until_ready((self.trainable, self.opt_state, metrics))
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        self.last_loss = float(metrics["loss"])
        self.cpu_times = getattr(self, "cpu_times", []) + cpu  # CPU seconds of all threads: steadier under load
        return times

    @property
    def tokens_per_step(self) -> int:
        return self.config.train.batch_size * self.config.data.seq_len

    def flops_per_token(self) -> float:
        method = method_for(self.config.method, self.config.lora)
        return method.flops_per_token(self.model_cfg, self.config.data.seq_len, self.trainable)


def prepare(config, devices: Sequence[Any] | None = None) -> Bench:
    """Compose `config` on `devices` (default: all), build the state (model, adapters, optimizer), place a random
    batch, compile the step."""
    t0 = time.perf_counter()
    run = compose(config, devices)
    mesh = run.mesh
    setup = build_state(run)
    state = setup.state
    step = make_train_step(state, setup.optimizer, mesh, grad_accum=config.train.grad_accum,
                           loss_chunk=config.train.loss_chunk, rules=setup.rules)
    cfg = setup.model_config
    host = random_batch(config.train.batch_size, config.data.seq_len, cfg.vocab_size, config.seed)
    batch = {k: jax.device_put(host[k], step.batch_sharding) for k in BATCH_KEYS}
    rng = jax.random.key(config.seed)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = step.lower(state.trainable, state.opt_state, state.frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    frozen, streams = step.arguments(state.trainable, state.frozen, batch)  # what the compiled step takes
    return Bench(config, cfg, compiled, state.trainable, state.opt_state, frozen, streams, rng,
                 state_size(state.trainable)[1], mesh.size, compile_s, build_s, mesh)


def summarize(bench: Bench, times: list[float], peak: float, peak_source: str) -> dict[str, Any]:
    """The JSON record: throughput, MFU against `peak` per device (None with `mfu_note` where it would exceed
    1: see possible_mfu), memory, and what was run where."""
    c, cfg = bench.config, bench.model_cfg
    step_s = statistics.median(times)
    tokens_per_s = bench.tokens_per_step / step_s
    fpt = bench.flops_per_token()
    mfu, mfu_note = possible_mfu(tokens_per_s * fpt / bench.devices, peak)
    mem, mem_source = peak_memory_bytes()
    held, unquantized = frozen_bytes(bench.frozen.model, c.train.frozen_dtype)
    return {
        "tokens_per_s": tokens_per_s,
        "trained_tokens_per_s": tokens_per_s,  # every position carries loss in the benchmark batch
        "step_time_s": step_s,
        "step_times_s": times,
        "compile_s": bench.compile_s,
        "build_s": bench.build_s,
        "mfu": mfu,
        "mfu_note": mfu_note,
        "step_flops_per_s": tokens_per_s * fpt / bench.devices,
        "peak_flops": peak,
        "peak_source": peak_source,
        "flops_per_token": fpt,
        "flops_formula": method_for(c.method, c.lora).flop_formula,
        "matmul_params": matmul_params(cfg),
        "trainable_params": bench.n_trainable,
        "peak_memory_bytes": mem,
        "peak_memory_source": mem_source,
        # the frozen state (all devices): as held, as it would be unquantized in train.frozen_dtype, the difference
        "frozen_bytes": held,
        "frozen_bytes_unquantized": unquantized,
        "frozen_bytes_saved": unquantized - held,
        "final_loss": getattr(bench, "last_loss", None),
        "method": c.method,
        "model": {"path": c.model.path, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "intermediate": cfg.intermediate_size, "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "vocab": cfg.vocab_size, "dtype": c.model.dtype,
                  "frozen_dtype": c.train.frozen_dtype, "frozen_quant": c.train.frozen_quant, "remat": c.model.remat, "attention": c.model.attention},
        "lora": method_for(c.method, c.lora).describe(),
        "attention_kernel": cfg.attention_kernels(c.data.seq_len),
        "optimizer": c.optim.name,
        "batch": c.train.batch_size,
        "seq_len": c.data.seq_len,
        "grad_accum": c.train.grad_accum,
        "loss_chunk": c.train.loss_chunk,
        "devices": bench.devices,
        "device_kind": device_kind(bench.mesh),
        "backend": platform_of(bench.mesh),
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }


def run_benchmark(config, steps: int = 5, warmup: int = 2, devices: Sequence[Any] | None = None,
                  say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Prepare, warm up, time `steps` steps and measure the peak in the same process; the JSON record. With
    `say` (scripts/benchmark.py), each phase announces itself and shows its clock: compiling takes minutes."""
    with still("loading the model and compiling the step", say) if say else contextlib.nullcontext():
        if say:
            say("benchmark: loading the model and compiling the step ...")
        bench = prepare(config, devices)
    if say:
        say(f"benchmark: built in {bench.build_s:.1f} s, compiled in {bench.compile_s:.1f} s; "
            f"{warmup} warm-up and {steps} timed steps ...")
    with progress(warmup + steps, "step", "benchmark steps") if say else contextlib.nullcontext() as bar:
        times = []
        for i in range(warmup + steps):
            if i == warmup:
                peak_flops(config.model.dtype)  # timed beside the steps, before and after them: see summarize
            step_s = bench.run(1)  # dispatched, then blocked on
            if i >= warmup:
                times += step_s
            if bar is not None:
                bar.update(1)
    peak, source = peak_flops(config.model.dtype, again=True)
    return summarize(bench, times, peak, source)


def smollm2_config(method: str = "lora", batch: int = 4, seq_len: int = 256):
    """The comparison's setting: SmolLM2-135M from the GGUF, fp32, LoRA r=16/alpha=32 on all 7 projections."""
    c = default_config()
    c.model.path = DEFAULT_MODEL
    c.method = method
    c.lora.rank, c.lora.alpha, c.lora.targets = 16, 32.0, LORA_TARGETS
    c.data.seq_len = seq_len
    c.train.batch_size = batch
    c.mesh.data = 1
    return c

