"""Time every candidate block configuration of the fused MLP kernels (GPU).

For each kernel use (the forward saving pre for a backward, the inference
forward, the backward) at the record's micro-step rows (98,304) and the
sliding evaluation's (32 x 2048 = 65,536), every config of
kernels.mlp_triton.SWEEP_CONFIGS is compiled, checked against the jnp
reference (norm-relative error) and timed: 50 calls dispatched back to back,
one sync, so the GPU never idles between them. Prints a table per use, best
first, and writes sweep.json; TUNED in mlp_triton.py is chosen from it.

    python scripts/mlp_kernel_sweep.py --out DIR [--rows 98304,65536]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from kernels import mlp, mlp_triton


def timed(fn, *args, calls: int = 50) -> float:
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = [fn(*args) for _ in range(calls)]
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/sweep")
    parser.add_argument("--rows", default="98304,65536")
    parser.add_argument("--K", type=int, default=512)
    parser.add_argument("--N", type=int, default=1536)
    args = parser.parse_args()
    K, N, slope = args.K, args.N, 0.5
    results = []
    rows = [int(r) for r in args.rows.split(",")]
    for M in rows:
        keys = jax.random.split(jax.random.key(M), 4)
        x = jax.random.normal(keys[0], (M, K)).astype(jnp.bfloat16)
        w_up = (jax.random.normal(keys[1], (N, K)) * K ** -0.5).astype(jnp.bfloat16)
        w_down = (jax.random.normal(keys[2], (K, N)) * N ** -0.5).astype(jnp.bfloat16)
        dy = jax.random.normal(keys[3], (M, K)).astype(jnp.bfloat16)
        act_r, pre_r = jax.jit(mlp.up_act_reference, static_argnums=(2, 3))(x, w_up, slope, True)
        dpre_r, _ = jax.jit(mlp.down_grad_reference, static_argnums=3)(dy, w_down, pre_r, slope)
        # The XLA baselines: the GEMM alone (cuBLAS), and the jnp path's GEMM + activation.
        gemm = jax.jit(lambda x, w: jnp.einsum("mk,nk->mn", x, w))
        results.append({"use": "cuBLAS GEMM alone", "rows": M, "ms": timed(gemm, x, w_up) * 1e3})
        jnp_up = jax.jit(lambda x, w: mlp.up_act_reference(x, w, slope, True))
        results.append({"use": "jnp up+act (saving pre)", "rows": M, "ms": timed(jnp_up, x, w_up) * 1e3})
        jnp_down = jax.jit(lambda dy, w, p: mlp.down_grad_reference(dy, w, p, slope))
        results.append({"use": "jnp down_grad", "rows": M, "ms": timed(jnp_down, dy, w_down, pre_r) * 1e3})
        for cfg in mlp_triton.SWEEP_CONFIGS:
            name = (f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}x{cfg.kwargs['BLOCK_K']} s{cfg.num_stages} "
                    f"w{cfg.num_warps}" + (" persistent" if cfg.kwargs["PERSISTENT"] else ""))
            uses = {
                "up_act saving pre": (jax.jit(lambda x, w, c=cfg: mlp_triton.up_act(x, w, slope, True, c)),
                                      (x, w_up), lambda o: rel(o[1], pre_r)),
                "up_act inference": (jax.jit(lambda x, w, c=cfg: mlp_triton.up_act(x, w, slope, False, c)[0]),
                                     (x, w_up), lambda o: rel(o, act_r)),
                "down_grad": (jax.jit(lambda dy, w, p, c=cfg: mlp_triton.down_grad(dy, w, p, slope, c)),
                              (dy, w_down, pre_r), lambda o: rel(o[0], dpre_r)),
            }
            if M != rows[0]:  # the evaluation's rows: only the inference forward runs there
                uses = {k: v for k, v in uses.items() if k == "up_act inference"}
            for use, (fn, fargs, check) in uses.items():
                try:
                    err = check(fn(*fargs))
                    ms = timed(fn, *fargs) * 1e3
                except Exception as e:  # a config the compiler rejects (shared memory): recorded, not fatal
                    results.append({"use": use, "rows": M, "config": name, "error": str(e)[:200]})
                    continue
                results.append({"use": use, "rows": M, "config": name, "ms": ms, "rel_err": err})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(results, indent=1))
    flops = lambda M: 2 * M * K * N
    for key in sorted({(r["use"], r["rows"]) for r in results}, key=lambda k: (k[1], k[0])):
        rows = sorted((r for r in results if (r["use"], r["rows"]) == key and "ms" in r), key=lambda r: r["ms"])
        print(f"\n{key[0]}, {key[1]} x {K} x {N}")
        for r in rows[:6]:
            print(f"  {r['ms']:7.3f} ms {flops(key[1]) / r['ms'] / 1e9:6.0f} TFLOP/s  {r.get('config', '')}"
                  + (f"  rel err {r['rel_err']:.1e}" if "rel_err" in r else ""))
        bad = [r for r in results if (r["use"], r["rows"]) == key and ("error" in r or r.get("rel_err", 0) > 4e-3)]
        for r in bad:
            print(f"  FAILED {r.get('config')}: {r.get('error') or r.get('rel_err')}")


if __name__ == "__main__":
    main()
