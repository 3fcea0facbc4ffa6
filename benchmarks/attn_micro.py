"""Attention core alone (fwd + recompute + bwd, as under the `minimal` remat policy): formulations timed
side by side in one process, alternating, SmolLM2-135M shapes (B=4, T=256, 9 heads / 3 kv heads, H=64).

    .venv/bin/python benchmarks/attn_micro.py [--reps 5] [--layers 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp


def jax_blocks(blocks):
    def f(q, k, v, mask):
        t = q.shape[1]
        size = t // blocks
        return jnp.concatenate([
            jax.nn.dot_product_attention(q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                                         mask=mask[:, :, i * size:(i + 1) * size, :(i + 1) * size])
            for i in range(blocks)], axis=1)
    return f


def ours(blocks):
    from ftjax.models.attention import grouped_attention
    return lambda q, k, v, mask: grouped_attention(q, k, v, mask, blocks=blocks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--variants", default="jax2,ours1,ours2,ours4")
    args = ap.parse_args()
    b, t, n, kh, h = 4, 256, 9, 3, 64
    key = jax.random.key(0)
    kq, kk, kv_, kd = jax.random.split(key, 4)
    q = jax.random.normal(kq, (args.layers, b, t, n, h))
    k = jax.random.normal(kk, (args.layers, b, t, kh, h))
    v = jax.random.normal(kv_, (args.layers, b, t, kh, h))
    do = jax.random.normal(kd, (args.layers, b, t, n, h))
    slots = jnp.arange(t)
    mask = jnp.broadcast_to((slots[None, :] <= slots[:, None])[None, None], (b, 1, t, t))

    table = {"jax1": jax_blocks(1), "jax2": jax_blocks(2), "jax4": jax_blocks(4)}
    for i in (1, 2, 4, 8):
        table[f"ours{i}"] = ours(i)
    fns = {}
    for name in args.variants.split(","):
        attn = table[name]

        def loss(q, k, v, attn=attn):
            def body(c, xs):
                qi, ki, vi, doi = xs
                f = jax.checkpoint(lambda a, b_, c_: jnp.sum(attn(a, b_, c_, mask) * doi),
                                   policy=jax.checkpoint_policies.nothing_saveable)
                return c + f(qi, ki, vi), None
            return jax.lax.scan(body, 0.0, (q, k, v, do))[0]

        fns[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    ref = None
    for name, f in fns.items():
        g = f(q, k, v)
        if ref is None:
            ref = g
        err = max(float(jnp.max(jnp.abs(a - r))) for a, r in zip(g, ref))
        print(f"{name}: max |grad - {list(fns)[0]}| = {err:.2e}")
    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, k, v))
            times[name].append(time.perf_counter() - t0)
    print(f"load {os.getloadavg()[0]:.2f}; median s per {args.layers} layers (fwd + recompute + bwd):")
    for name, ts in times.items():
        print(f"  {name:8s} {statistics.median(ts):.3f}  (min {min(ts):.3f})")


if __name__ == "__main__":
    main()
