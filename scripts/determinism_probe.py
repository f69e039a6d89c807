"""Which parts of the training step XLA can compile under its determinism
flags, whether each is then bit-repeatable, and what it costs, on the local
GPU. Each case runs in a child process (XLA reads XLA_FLAGS once, at start):

    python scripts/determinism_probe.py            # every case, with and without the flag

Cases: the cuDNN attention's gradient, the embedding gradient (a scatter-add
through the float32 view of a bf16 table), and the record model's whole
loss+grad on one 48 x 2048 micro-batch (fused MLP kernels as configured).
Findings are in docs/fidelity.md (its first run timed the host-side
comparisons too, so its times were not used).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

FLAGS = {"none": "", "exclude": "--xla_gpu_exclude_nondeterministic_ops=true",
         "deterministic": "--xla_gpu_deterministic_ops=true"}
CASES = ("attention", "embedding", "model")


def run_case(case: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.key(0)
    if case == "attention":
        q = jax.random.normal(key, (48, 2048, 8, 64), jnp.bfloat16)
        k = jax.random.normal(jax.random.key(1), (48, 2048, 4, 64), jnp.bfloat16)
        v = jax.random.normal(jax.random.key(2), (48, 2048, 4, 64), jnp.bfloat16)
        f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn").astype(jnp.float32) ** 2), argnums=(0, 1, 2)))
        args = (q, k, v)
    elif case == "embedding":
        table = (0.01 * jax.random.normal(key, (1024, 512))).astype(jnp.bfloat16)
        ids = jax.random.randint(jax.random.key(1), (48, 2048), 0, 64)  # frequent tokens collide, as in text
        dy = jax.random.normal(jax.random.key(2), (48, 2048, 512), jnp.bfloat16)
        f = jax.jit(jax.grad(lambda t: jnp.sum(t.astype(jnp.float32)[ids].astype(jnp.bfloat16) * dy)))
        args = (table,)
    else:
        from golf_jax import model
        from golf_jax.config import ModelConfig
        cfg = ModelConfig()
        params = model.init_params(cfg, key)
        x = jax.random.randint(jax.random.key(1), (48, 2048), 0, 1024)
        f = jax.jit(jax.grad(lambda p, x: model.loss(p, cfg, x, jnp.roll(x, -1, 1))))
        args = (params, x)
    out = {"case": case}
    try:
        first = jax.block_until_ready(f(*args))
    except Exception as e:  # the compile failure is the finding
        return {**out, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    t = time.perf_counter()
    again = [jax.block_until_ready(f(*args)) for _ in range(5)]  # timed alone, compared after
    ms = 1000 * (time.perf_counter() - t) / 5
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for run in again
               for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(run)))
    return {**out, "ms": ms, "bit_repeatable_5x": bool(same)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2])))
        return
    results = []
    for flag, value in FLAGS.items():
        for case in CASES:
            env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + value).strip()}
            p = subprocess.run([sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True,
                               timeout=300)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            r = json.loads(lines[-1]) if lines else {"case": case, "error": p.stderr.strip().splitlines()[-1][:200]}
            r["flag"] = flag
            results.append(r)
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
