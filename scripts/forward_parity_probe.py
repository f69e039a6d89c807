"""golf_jax's bf16 forward against the reference's eager bf16 forward (CPU
autocast) at given weights, on the first sequences of batch 2: do the two
place their bf16 roundings alike? (docs/fidelity.md, "the first-step gap,
part 2".) The weights: an .npz of reference-named arrays (`first_step_gpu.py
golf --save-p1`), or the seed-314 init with the embedding tables of a step-1
set (--tables: tables.npz of `first_step_gpu.py --out`, --which golf_p1,
compiled_p1 or eager_p1), whose large entries (~+-0.035 after Adam's first
step) make logits of up to ~+-15, where bf16's spacing is 0.06. GOLF_TREE
picks the golf_jax tree (default: this repository).

    python scripts/forward_parity_probe.py --tables OUT/tables.npz --seqs 4
    python scripts/first_step_gpu.py golf --refs --no-train-step --seqs 2 --seq-len 2048 \\
        --golf-opt model.compute_dtype=bfloat16 --save-p1 /tmp/p1_cpu.npz       # 9 min on 2 cores
    python scripts/forward_parity_probe.py /tmp/p1_cpu.npz --seqs 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(Path(os.environ.get("GOLF_TREE", HERE.parent)).resolve()))
import first_step_probe as P  # noqa: E402
from reference_setup import cast_as_main  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, nargs="?")
    ap.add_argument("--tables", type=Path, help="instead: the init with these step-1 embedding tables")
    ap.add_argument("--which", default="golf_p1")
    ap.add_argument("--seqs", type=int, default=2)
    args = ap.parse_args()
    if args.tables:
        state = P.initial_state("record", 0.0)
        with np.load(args.tables) as z:
            for k in ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"):
                state[k] = (z[f"{args.which}/{k}"].astype(np.uint32) << 16).view(np.float32)
        args.weights = Path(f"init + {args.which} tables of {args.tables}")
    else:
        with np.load(args.weights) as z:
            state = {k: np.asarray(z[k], np.float32) for k in z.files}
    xs, ys = P.batch(48, 2048, 1)
    x, y = xs[0, :args.seqs], ys[0, :args.seqs]
    kw = P.model_kwargs("record")

    import jax
    import jax.numpy as jnp

    from golf_jax import compat, model, param_tree
    from golf_jax.config import ModelConfig
    res = {}
    for rl in (True, False):
        cfg = ModelConfig(**kw, compute_dtype="bfloat16", embedding_dtype="bfloat16", attention_impl="jnp",
                          mlp_impl="jnp", round_logits=rl)
        params = param_tree.cast_params(compat.params_from_reference(state, cfg, "probe"), cfg)
        res[f"golf_jax bf16, round_logits={rl}"] = float(jax.jit(lambda p, a, b: model.loss(p, cfg, a, b))(
            params, jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32)))

    import torch
    torch.set_num_threads(2)
    os.environ.update(BIGRAM_VOCAB_SIZE="3072", BIGRAM_DIM="112")
    sys.path.insert(0, str(P.REFERENCE))
    import train_gpt as R
    m = cast_as_main(R, R.GPT(**kw, mtp_num_heads=0, mtp_loss_weight=0.1, dtg=False, gated_attention=False,
                              value_residual=False))
    with torch.no_grad():
        for k, p in m.named_parameters():
            p.copy_(torch.from_numpy(state[k]).to(p.dtype).reshape(p.shape))
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            res["reference eager, CPU bf16 autocast"] = float(m(torch.from_numpy(x), torch.from_numpy(y)))
    base = res["reference eager, CPU bf16 autocast"]
    print(f"{args.weights}: {args.seqs} x 2048 tokens of batch 2; golf_jax tree {os.environ.get('GOLF_TREE', '.')}; "
          f"{os.environ.get('XLA_FLAGS', 'no XLA_FLAGS')}")
    for k, v in res.items():
        print(f"  {k}: {v:.6f} ({v - base:+.6f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
