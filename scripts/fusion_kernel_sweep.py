"""The Pallas kernels of model.fusion_impl on the GPU (issue 17), in one call:

1. where they round against XLA's compiled jnp path: the fraction of values
   that differ, for each rounding choice of kernels/residual_norm.py
   (`SEMANTICS`) and for the q/k and XSA kernels as they are;
2. launch-parameter sweeps (`TUNED` of each kernel module) at a micro-batch's
   shape (48 x 2048 tokens): forward alone and forward+backward, each config
   checked equal to the default config's values.

    python scripts/fusion_kernel_sweep.py [--out DIR]

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from golf_jax import cli  # noqa: E402
from golf_jax.tools import bench  # noqa: E402
from kernels import residual_norm  # noqa: E402


def median_ms(fn, *args, repeats=20):
    return bench.time_call(fn, *args, repeats=repeats)["median_s"] * 1e3


def grads_fn(fn, args):
    """A function of no arguments: (outputs, gradients) of sum(outputs * cotangents)
    over fn's args, jitted with the args and bf16 cotangents as its inputs. The
    cotangents come in from memory, as the model's do: made inside the
    program, their bf16 round trip is one XLA drops under its excess precision."""
    outs = jax.eval_shape(fn, *args)
    cots = [jnp.cos(jnp.arange(o.size, dtype=jnp.float32).reshape(o.shape)).astype(o.dtype)
            for o in jax.tree.leaves(outs)]

    def loss(args, cots):
        leaves = jax.tree.leaves(fn(*args))
        return sum(jnp.sum(o.astype(jnp.float32) * c.astype(jnp.float32)) for o, c in zip(leaves, cots)), leaves
    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    return lambda: run(list(args), cots)


def differing(a_tree, b_tree) -> list[float]:
    pairs = zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree))
    return [float(jnp.mean((a != b).astype(jnp.float32))) for a, b in pairs]


def rounding(cases: dict) -> dict:
    """Fraction of differing values (outputs, then gradients) against XLA's jnp path."""
    out, default = {}, dict(residual_norm.SEMANTICS)
    for name, (module, fn, args, model_path) in cases.items():
        ref = grads_fn(model_path or fn("jnp"), args)()
        choices = itertools.product((True, False), repeat=len(residual_norm.SEMANTICS))
        semantics = ([dict(zip(residual_norm.SEMANTICS, flags)) for flags in choices]
                     if module is residual_norm else [None])
        for sem in semantics:
            if sem is not None:
                residual_norm.SEMANTICS.update(sem)
            got = grads_fn(fn("pallas"), args)()
            label = name + ("" if sem is None else " " + ",".join(k for k, v in sem.items() if v))
            out[label] = {"outputs": differing(got[0][1], ref[0][1]), "grads": differing(got[1], ref[1])}
            print(f"rounding {label:<60} outputs {out[label]['outputs']}  grads {out[label]['grads']}", flush=True)
    residual_norm.SEMANTICS.update(default)
    return out


SWEEPS = {
    "q": [dict(block_rows=r, heads_per_program=h, num_warps=w, num_stages=1)
          for r, h, w in [(128, 1, 4), (64, 1, 2), (128, 1, 2), (256, 1, 4), (128, 2, 4), (128, 4, 4), (128, 8, 8),
                          (64, 2, 4), (64, 4, 4), (64, 8, 4), (32, 8, 4), (256, 2, 8)]],
    "mix": [dict(program_rows=p, step_rows=s, num_warps=w, num_stages=st)
            for p, s, w, st in [(128, 16, 8, 2), (128, 8, 4, 2), (128, 32, 8, 2), (256, 16, 8, 2), (64, 16, 8, 2),
                                (128, 16, 4, 2), (128, 16, 16, 2), (256, 32, 16, 2), (512, 16, 8, 2),
                                (128, 16, 8, 1), (128, 16, 8, 3), (64, 8, 4, 2), (32, 8, 4, 2), (128, 64, 16, 2)]],
    "xsa": [dict(block_rows=r, num_warps=w, num_stages=1)
            for r, w in [(64, 8), (32, 4), (64, 4), (128, 8), (128, 16), (256, 16), (32, 2), (64, 16)]],
}
SWEEPS["k"] = SWEEPS["q"]
SWEEPS["ce"] = [dict(block_rows=r, block_cols=c, num_warps=w, num_stages=st)
                for r, c, w, st in [(16, 512, 8, 2), (8, 512, 4, 2), (16, 256, 4, 2), (32, 256, 8, 2), (4, 1024, 4, 2),
                                    (1, 1024, 4, 1), (8, 1024, 8, 2), (16, 1024, 8, 2), (32, 512, 8, 2),
                                    (16, 512, 8, 3), (16, 512, 4, 1), (64, 128, 8, 2)]]


def sweep(cases: dict) -> dict:
    out = {}
    for name, (module, fn, args, _) in cases.items():
        default = copy.deepcopy(module.TUNED)
        base = None
        rows = []
        for config in SWEEPS[name]:
            module.TUNED = {kind: dict(default[kind], **config) for kind in ("forward", "backward")}
            try:
                fwd = jax.jit(fn("pallas"))
                both = grads_fn(fn("pallas"), args)
                values = both()
                base = values if base is None else base
                row = dict(config, forward_ms=median_ms(fwd, *args), forward_backward_ms=median_ms(both),
                           same_as_first=max(differing(values, base)) == 0)
            except Exception as e:  # a config that does not compile or run: report it, go on
                row = dict(config, error=f"{type(e).__name__}: {str(e)[:160]}")
            rows.append(row)
            print(f"sweep {name:<4} {json.dumps(row)}", flush=True)
        module.TUNED = default
        out[name] = rows
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/fusion_sweep")
    parser.add_argument("--parts", default="rounding,sweep")
    parser.add_argument("--batch", type=int, default=48, help="sequences of 2048 (1 for a CPU smoke run)")
    parser.add_argument("--kernels", default=",".join(bench.FUSIONS))
    args = parser.parse_args()
    model = dataclasses.replace(cli.load_config_file(REPO / "configs" / "record.py").model, compute_dtype="bfloat16")
    cases = bench.fusion_cases(model, args.batch, 2048)
    cases = {name: cases[name] for name in args.kernels.split(",")}
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if "rounding" in args.parts:
        results["rounding"] = rounding(cases)
    if "sweep" in args.parts:
        results["sweep"] = sweep(cases)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "fusion_sweep.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
