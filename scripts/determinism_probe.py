"""Which parts of the training step XLA can compile under its determinism
flags, whether each is then bit-repeatable, and what it costs, on the local
GPU. Each case runs in a child process (XLA reads XLA_FLAGS once, at start):

    python scripts/determinism_probe.py            # every case, with and without the flag
    python scripts/determinism_probe.py --bisect   # variants of the model under the exclude flag
    python scripts/determinism_probe.py --plan exclude_no_cmdbuf/model none/model:batch=1   # chosen pairs

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
         "deterministic": "--xla_gpu_deterministic_ops=true",
         # the same without CUDA-graph command buffers (a suspect in the compile failure)
         "exclude_no_cmdbuf": "--xla_gpu_exclude_nondeterministic_ops=true --xla_gpu_enable_command_buffer=",
         "deterministic_no_cmdbuf": "--xla_gpu_deterministic_ops=true --xla_gpu_enable_command_buffer="}
CASES = ("attention", "embedding", "model")
# (batch=8 where the jnp attention materialises its scores)
BISECT = ("model:forward=1", "model:batch=1", "model:num_layers=1,xsa_last_n=1,ve_enabled=false",
          "model:attention_impl=jnp,batch=8", "model:mlp_impl=jnp", "model:attention_impl=jnp,mlp_impl=jnp,batch=8",
          "model:xsa_last_n=0", "model:bigram_vocab_size=0,ve_enabled=false", "model:round_logits=false",
          "model:embedding_dtype=float32", "model:compute_dtype=float32,attention_impl=jnp,mlp_impl=jnp,batch=8",
          "model")


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
    else:  # "model" or "model:field=value,...": the record model, its fields overridden
        import dataclasses

        from golf_jax import model
        from golf_jax.config import ModelConfig
        options = dict(kv.split("=") for kv in case.partition(":")[2].split(",") if kv)
        forward_only, batch = options.pop("forward", "0") == "1", int(options.pop("batch", "48"))
        fields = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
        cast = {"int": int, "float": float, "bool": lambda v: v in ("1", "true", "True"), "str": str}
        cfg = ModelConfig(**{k: cast[fields[k]](v) for k, v in options.items()})
        params = model.init_params(cfg, key)
        x = jax.random.randint(jax.random.key(1), (batch, 2048), 0, 1024)
        loss = lambda p, x: model.loss(p, cfg, x, jnp.roll(x, -1, 1))  # noqa: E731
        f = jax.jit(loss if forward_only else jax.grad(loss))
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
    # --bisect: which part of the model the "exclude" flag fails to compile
    # (variants of the "model" case, each switching one part off or to its jnp path).
    if sys.argv[1:2] == ["--bisect"]:
        plan = [("exclude", c) for c in BISECT]
    elif sys.argv[1:2] == ["--plan"]:  # --plan FLAG/CASE ...: chosen pairs, e.g. exclude_no_cmdbuf/model
        plan = [tuple(item.split("/", 1)) for item in sys.argv[2:]]
    else:
        plan = [(flag, case) for flag in ("none", "exclude", "deterministic") for case in CASES]
    for flag, case in plan:
        env = {**os.environ, "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FLAGS[flag]).strip()}
        p = subprocess.run([sys.executable, __file__, "--case", case], env=env, capture_output=True, text=True,
                           timeout=300)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        r = json.loads(lines[-1]) if lines else {"case": case, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
        r["flag"] = flag
        results.append(r)
        print(json.dumps(r), flush=True)

if __name__ == "__main__":
    main()
