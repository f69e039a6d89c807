"""Where the residual-mix kernel's whole-model gradient parts from XLA's (issue 17).

In isolation kernels/residual_norm.py rounds as XLA's compiled jnp path does
(tests/kernels_residual_norm_test.py, GPU), yet 60-step runs with it leave the
fidelity curve from step 2. This takes the first step's gradient of the record
model at its initial weights (the reference's seed-314 weights with --init, real text, 8 x 2048 tokens) for:
float32 ("truth"), bf16 jnp, bf16 with kernel sets and with other rounding choices
(`SEMANTICS`) of the mix kernel, each half of that kernel alone
(scripts/residual_norm_halves.py); and prints
per parameter each bf16 variant's relative error against float32 and, for the
scalar parameters (AdamW: the first step moves each by lr times its sign), the
count of elements whose sign differs from float32's.

    python scripts/residual_grad_probe.py --config configs/record.py [overrides]
    python scripts/residual_grad_probe.py --config configs/record.py --variants "bf16 jnp" "residual, rounded stream"

(All the variants take more than 120 s on an H200, mostly compiling: --variants picks some.)

Tooling, outside the code counted in the artifact.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import residual_norm_halves  # noqa: E402
from golf_jax import blocks, cli, compat, model  # noqa: E402
from golf_jax.tools import bench  # noqa: E402
from kernels import residual_norm  # noqa: E402

RESIDUAL = dict(fusion_impl="auto", fusion_kernels="residual_norm")
# label -> (model fields, kernels/residual_norm.SEMANTICS changes while tracing it, or the half
# of the kernel Block.mix_norm runs)
VARIANTS = {"bf16 jnp": (dict(fusion_impl="jnp"), {}),
            "bf16 norm_rope,xsa": (dict(fusion_impl="auto", fusion_kernels="norm_rope,xsa"), {}),
            "bf16 norm_rope,xsa,softcap_ce": (dict(fusion_impl="auto", fusion_kernels="norm_rope,xsa,softcap_ce"), {}),
            "bf16 residual_norm": (RESIDUAL, {}),
            "residual, float32 inside": (RESIDUAL, dict(round_dnorm=False, round_ds=False)),
            "residual, ds float32": (RESIDUAL, dict(round_ds=False)),
            "residual, dnorm float32": (RESIDUAL, dict(round_dnorm=False)),
            # one half of the kernel only (scripts/residual_norm_halves.py)
            "residual, forward half": (RESIDUAL, "forward"),
            "residual, backward half": (RESIDUAL, "backward"),
            # no kernel: the jnp path with the stream rounded where the kernel rounds it, then
            # each block's output too, then its cotangent too
            "residual, rounded stream": (RESIDUAL, "stream"),
            "rounded stream and block outputs": (RESIDUAL, "stream_blocks"),
            "rounded stream, block outputs and their cotangents": (RESIDUAL, "stream_both")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default="", help="reference-named initial weights (e.g. the fixtures' seed 314)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="LABEL",
                        help=f"the bf16 variants to compare with float32 (default: all): {', '.join(VARIANTS)}")
    cfg, args = cli.parse(parser)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    variants = {label: VARIANTS[label] for label in args.variants}
    tokens = bench.text_tokens(cfg, (8, cfg.data.train_seq_len + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    params = compat.initial_params(cfg.model, args.init, 314)
    grad = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)
    # float32 off the cuDNN path (cuDNN takes bf16 only)
    f32_loss, truth = grad(params, bench.with_model(cfg, compute_dtype="float32", attention_impl="jnp").model, x, y)
    names = ["/".join(str(getattr(k, "key", k)) for k in path)
             for path, _ in jax.tree_util.tree_flatten_with_path(truth)[0]]
    truth = [np.asarray(g, np.float64) for g in jax.tree.leaves(truth)]
    print(f"float32 loss {float(f32_loss):.6f}")
    rows = {}
    for label, (fields, semantics) in variants.items():
        saved, add_norm, block_call = dict(residual_norm.SEMANTICS), blocks.add_norm, blocks.Block.__call__
        if isinstance(semantics, str):
            residual_norm_halves.patch(semantics)
        else:
            residual_norm.SEMANTICS.update(semantics)  # part of the kernels' cache key
        try:
            # A fresh trace: jit's cache would otherwise return the program of an earlier
            # variant with the same model fields, whatever SEMANTICS says now.
            jax.clear_caches()
            loss, g = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)(
                params, bench.with_model(cfg, **fields).model, x, y)
        finally:
            residual_norm.SEMANTICS.clear()
            residual_norm.SEMANTICS.update(saved)
            blocks.add_norm, blocks.Block.__call__ = add_norm, block_call
        g = [np.asarray(a, np.float64) for a in jax.tree.leaves(g)]
        rows[label] = g
        print(f"{label}: loss {float(loss):.6f}")
    print("param | " + " | ".join(f"{k}: rel err, sign flips" for k in variants))
    for i, name in enumerate(names):
        t = truth[i]
        cells = []
        for label in variants:
            g = rows[label][i]
            rel = np.linalg.norm(g - t) / max(np.linalg.norm(t), 1e-30)
            flips = int(np.sum(np.sign(g) != np.sign(t))) if t.size <= 65536 else -1
            cells.append(f"{rel:.2e}, {flips}" if flips >= 0 else f"{rel:.2e}")
        print(f"{name} [{t.size}] | " + " | ".join(cells))


if __name__ == "__main__":
    main()
