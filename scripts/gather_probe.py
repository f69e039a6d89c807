"""Probe: the cost of an embedding gather's gradient (a scatter-add), bf16 vs
float32 tables, text vs uniform token ids. The numbers are in docs/performance.md.

    PYTHONPATH=. python scripts/gather_probe.py path/to/fineweb_train_000000.bin
"""
import time, statistics, sys
import jax, jax.numpy as jnp, numpy as np
from golf_jax import data
toks = np.asarray(data.read_shard(sys.argv[1])[:98304], np.int32).reshape(48, 2048)
uni = np.random.default_rng(0).integers(0, 1024, toks.shape).astype(np.int32)
def bench(f, *a):
    jax.block_until_ready(f(*a)); ts = []
    for _ in range(10):
        t = time.perf_counter(); jax.block_until_ready(f(*a)); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3
for name, dt in (("bf16", jnp.bfloat16), ("f32", jnp.float32)):
    for tname, t in (("real", toks), ("uniform", uni)):
        table = (jax.random.normal(jax.random.key(0), (1024, 512)) * 0.01).astype(dt)
        dx = jax.random.normal(jax.random.key(1), (48, 2048, 512), jnp.bfloat16)
        g1 = jax.jit(jax.grad(lambda w, t, dx: jnp.sum(w[t].astype(jnp.bfloat16) * dx)))
        g2 = jax.jit(jax.grad(lambda w, t, dx: jnp.sum(w.astype(jnp.float32)[t].astype(jnp.bfloat16) * dx)))
        print(f"table {name} tokens {tname}: grad of gather {bench(g1, table, jnp.asarray(t), dx):.2f} ms; "
              f"via f32 copy {bench(g2, table, jnp.asarray(t), dx):.2f} ms", flush=True)
