"""Do the Triton MLP kernels run on several GPUs of one host? Each case runs
in its own process with a timeout (a hang is reported, not waited out):

  shard_map   the training step's way: jit(shard_map) over the devices
  gspmd       TTT's way: jit with a row-sharded batch (custom_partitioning)

forward and backward compared with the jnp MLP on the same devices.

    python scripts/multi_gpu_kernels_check.py [--timeout 120]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from pathlib import Path

CASE = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import mlp, mlp_triton
    way = sys.argv[2]
    n = jax.device_count()
    mesh = jax.make_mesh((n,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 4)
    M, K, N = 4096 * n, 512, 1536
    x = jax.random.normal(k[0], (M, K)).astype(jnp.bfloat16)
    wu = (jax.random.normal(k[1], (N, K)) * K ** -0.5).astype(jnp.bfloat16)
    wd = (jax.random.normal(k[2], (K, N)) * N ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(k[3], (M, K)).astype(jnp.bfloat16)
    loss = lambda x, wu, wd, dy, impl: jnp.sum((mlp.mlp(x, wu, wd, 0.5, impl) * dy).astype(jnp.float32))
    rows = NamedSharding(mesh, P("d", None))
    xs, dys = jax.device_put(x, rows), jax.device_put(dy, rows)
    if way == "shard_map":
        def run(impl):
            g = lambda x, wu, wd, dy: jax.grad(loss, argnums=(0, 1))(x, wu, wd, dy, impl)
            f = jax.shard_map(g, mesh=mesh, in_specs=(P("d", None), P(), P(), P("d", None)),
                              out_specs=(P("d", None), P("d")), check_vma=False)
            return jax.jit(f)(xs, wu, wd, dys)
    else:
        def run(impl):
            return jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=4)(xs, wu, wd, dys, impl)
    ref = jax.block_until_ready(run("jnp"))
    out = jax.block_until_ready(run("triton"))
    errs = [float(jnp.linalg.norm((a - b).astype(jnp.float32)) / jnp.linalg.norm(b.astype(jnp.float32)))
            for a, b in zip(out, ref)]
    print(f"ok: {n} devices, rel err dx {errs[0]:.2e}, dw_up {errs[1]:.2e}")
""")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args()
    repo = str(Path(__file__).resolve().parents[1])
    for way in ("shard_map", "gspmd"):
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, "-c", CASE, repo, way], capture_output=True, text=True,
                                 timeout=args.timeout)
            result = (run.stdout.strip().splitlines() or ["no output"])[-1] if run.returncode == 0 \
                else "FAILED: " + run.stderr.strip()[-600:]
        except subprocess.TimeoutExpired:
            result = f"HUNG (killed after {args.timeout} s)"
        print(f"{way:>9}: {result} [{time.perf_counter() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
