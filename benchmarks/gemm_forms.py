"""Backward GEMM forms on XLA CPU, alone: dx = dy @ W^T as the NT dot XLA emits vs an explicit transpose + NN
dot, and dW = x^T @ dy as TN vs transpose + NN, for the SmolLM2-135M projection shapes (30 layers in a scan).

    .venv/bin/python benchmarks/gemm_forms.py

Measured 2026-11-28 (load 1.3-2.0): the NT/TN forms ran as fast as NN (e.g. 122 vs 122, 135 vs 127 GFLOP/s);
the narrow k/v shape (N=192) is the slow one (its dx 80 GFLOP/s vs 120-135 for wide ones), which merged
q/k/v GEMMs avoid.
"""
import jax, time, statistics, os
L=30
def bench(f, *a, reps=7):
    f = jax.jit(f).lower(*a).compile()
    jax.block_until_ready(f(*a))
    ts=[]
    for _ in range(reps):
        t0=time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter()-t0)
    return statistics.median(ts)
k=jax.random.key(0)
for (m,n_in,n_out) in [(1024,1536,576),(1024,576,1536),(1024,576,576),(1024,576,192),(1024,576,960),(1024,576,3072)]:
    # dx = dy[m,out] @ W[in,out]^T
    dy = jax.random.normal(k,(L,m,n_out)); W = jax.random.normal(k,(L,n_in,n_out))
    def nt(dy,W):
        return jax.lax.scan(lambda c,xs: (c, jax.lax.dot_general(xs[0], xs[1], (((1,),(1,)),((),())))), 0., (dy,W))[1]
    def tnn(dy,W):
        return jax.lax.scan(lambda c,xs: (c, xs[0] @ jax.lax.optimization_barrier(xs[1].T)), 0., (dy,W))[1]
    x = jax.random.normal(k,(L,m,n_in))
    def nn(x,W):
        return jax.lax.scan(lambda c,xs: (c, xs[0] @ xs[1]), 0., (x,W))[1]
    def tn(x,dy):  # dW = x^T dy
        return jax.lax.scan(lambda c,xs: (c, jax.lax.dot_general(xs[0], xs[1], (((0,),(0,)),((),())))), 0., (x,dy))[1]
    def ttn(x,dy):
        return jax.lax.scan(lambda c,xs: (c, jax.lax.optimization_barrier(xs[0].T) @ xs[1]), 0., (x,dy))[1]
    fl = 2*m*n_in*n_out*L/1e9
    cases = [("fwdNN", nn, (x, W)), ("dxNT", nt, (dy, W)), ("dxT+NN", tnn, (dy, W)), ("dwTN", tn, (x, dy)),
             ("dwT+NN", ttn, (x, dy))]
    r = {name: fl / bench(f, *a) for name, f, a in cases}
    print((m,n_in,n_out), {k_: round(v) for k_,v in r.items()}, "GFLOP/s load", os.getloadavg()[0], flush=True)
