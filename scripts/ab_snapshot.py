"""Do two golf_jax trees compute the same numbers on this machine? Each run
writes, for the record config from the reference's seed-314 weights plus fixed
N(0, 0.02) noise: the loss
and every gradient of one 48 x 2048 micro-batch, 32 greedy KV-cached tokens
from 4 prompts, and the Hessians of 4 x 512 calibration tokens. `compare`
prints the largest difference of each and exits 1 on any difference.

    PYTHONPATH=<tree> python scripts/ab_snapshot.py snap --out a.npz [--init record_init_seed314_bf16bits.npz]
    python scripts/ab_snapshot.py compare a.npz b.npz
    PYTHONPATH=<tree> python scripts/ab_snapshot.py compile   # trace/lower/compile seconds

Run from the repository root; PYTHONPATH picks the tree under test (the other
tree's copy of this script is not needed). Uses only APIs that both sides of
a refactor keep: model.loss, generate.generate, collect_hessians (golf_jax.hessians, earlier
golf_jax.generate).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def snap(args) -> int:
    import jax
    import jax.numpy as jnp

    from golf_jax import cli, compat, generate, model, param_tree

    cfg = cli.load_config_file("configs/record.py")
    mcfg = cfg.model
    params = param_tree.cast_params(compat.params_from_reference(compat.load_reference_state(args.init), mcfg), mcfg)
    # The init's zero out-projections would leave most gradients zero: perturb
    # every weight (the same noise on both sides) so that each one is exercised.
    leaves, treedef = jax.tree.flatten(params)
    noise = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(treedef, [x + (0.02 * jax.random.normal(k, x.shape)).astype(x.dtype)
                                          for x, k in zip(leaves, noise)])
    key = jax.random.key(0)
    tokens = jax.random.randint(key, (48, 2049), 0, mcfg.vocab_size, jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)(params, mcfg, tokens[:, :-1],
                                                                            tokens[:, 1:])
    out = {"loss": np.asarray(loss)}
    out.update({f"grad/{param_tree.path_name(p)}": np.asarray(g, np.float32)
                for p, g in jax.tree_util.tree_leaves_with_path(grads)})
    prompts = tokens[:4, :16]
    out["generated"] = np.asarray(generate.generate(params, mcfg, prompts, key, num_new=32, temperature=0.0,
                                                    rope_len=cfg.data.train_seq_len))
    try:  # golf_jax/hessians.py since 2026-11-30; generate.py before
        from golf_jax.hessians import collect_hessians
    except ImportError:
        collect_hessians = generate.collect_hessians
    hessians = collect_hessians(params, mcfg, np.asarray(tokens[:4, :513]), batch_size=2)
    out.update({f"hessian/{k}": np.asarray(v) for k, v in hessians.items()})
    np.savez(args.out, **out)
    print(f"{args.out}: loss {float(loss):.6f}, {len(out)} arrays")
    return 0


def compile_times(args) -> int:
    """Seconds to trace, lower and compile the loss+grad of one 48 x 2048
    micro-batch (record config), in this fresh process: what a launch pays."""
    import time

    import jax
    import jax.numpy as jnp

    from golf_jax import cli, model

    mcfg = cli.load_config_file("configs/record.py").model
    params = jax.eval_shape(lambda k: model.init_params(mcfg, k), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((48, 2048), jnp.int32)
    t0 = time.perf_counter()
    traced = jax.jit(jax.value_and_grad(model.loss), static_argnums=1).trace(params, mcfg, tokens, tokens)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    lowered.compile()
    t3 = time.perf_counter()
    print(f"compile: trace {t1 - t0:.2f} s, lower {t2 - t1:.2f} s, compile {t3 - t2:.2f} s, total {t3 - t0:.2f} s")
    return 0


def compare(args) -> int:
    a, b = np.load(args.a), np.load(args.b)
    differ = 0
    for name in sorted(set(a.files) | set(b.files)):
        if name not in a.files or name not in b.files:
            print(f"{name}: only in {'b' if name not in a.files else 'a'}")
            differ += 1
            continue
        x, y = a[name].astype(np.float64), b[name].astype(np.float64)
        if x.shape != y.shape:
            print(f"{name}: shapes {x.shape} vs {y.shape}")
            differ += 1
            continue
        diff = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        if diff:
            differ += 1
        print(f"{name:32s} max |a-b| {diff:.3e}  (max |b| {scale:.3e}){'' if diff == 0 else '  DIFFERS'}")
    print(f"{differ} of {len(set(a.files) | set(b.files))} arrays differ")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snap")
    s.add_argument("--out", required=True)
    s.add_argument("--init", default=str(Path(".shared/fixtures/reference/record_init_seed314_bf16bits.npz")))
    sub.add_parser("compile")
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = parser.parse_args()
    return {"snap": snap, "compile": compile_times, "compare": compare}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
