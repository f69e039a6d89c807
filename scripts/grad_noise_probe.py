"""How much does one loss+grad vary from call to call, and from process to
process, in golf_jax and in the PyTorch reference, on the same weights and the
same micro-batch? (docs/fidelity.md, issue 16: whose GPU runs repeat less well.)

Both sides take the reference's seed-314 weights plus the same fixed N(0, 0.02)
noise (rounded to bf16, so that the zero-initialised out-projections let every
gradient through), and the first 48 x 2048 micro-batch of the tinyshakespeare
train shard (the reference loader's first micro-batch). Each `snap` computes the
loss and every gradient REPEAT times in one process, as its training does:
golf_jax jit-compiled (model.loss), the reference torch.compile'd under bf16
autocast with loss/8 backward (its grad_scale; the gradients are scaled back by
8, exactly). It saves the first call's gradients in the reference's names
(float32) and the in-process differences.

    python scripts/grad_noise_probe.py snap golf --out /tmp/golf1.npz
    python scripts/grad_noise_probe.py snap ref --out /tmp/ref1.npz --reference .shared/reference/record_1019
    python scripts/grad_noise_probe.py compare --golf /tmp/golf1.npz /tmp/golf2.npz --ref /tmp/ref1.npz /tmp/ref2.npz

`compare` prints, for each group of gradients, ||a - b|| / ||a||: within a
process (max over the repeats), between two processes of each implementation,
and golf_jax against the reference.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from reference_setup import cast_as_main, set_backends

SHARED = Path(os.environ.get("GOLF_JAX_SHARED", ".shared"))
INIT = SHARED / "fixtures/reference/record_init_seed314_bf16bits.npz"
SHARD = SHARED / "data/tinyshakespeare_sp1024/fineweb_train_000000.bin"
SEQS, SEQ_LEN, GRAD_SCALE = 48, 2048, 1.0 / 8


def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 (ties to even), as float32."""
    bits = x.astype(np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.view(np.float32)


def perturbed_state() -> dict[str, np.ndarray]:
    """Reference name -> float32 weights: the init plus fixed noise, bf16-representable."""
    rng = np.random.default_rng(1)
    out = {}
    with np.load(INIT) as z:
        for k in sorted(z.files):
            w = (z[k].astype(np.uint32) << 16).view(np.float32)
            noisy = bf16_round(w + 0.02 * rng.standard_normal(w.shape).astype(np.float32))
            out[k.removeprefix("param/")] = np.asarray(noisy, np.float32).reshape(w.shape)
    return out


def batch(seqs: int = SEQS) -> tuple[np.ndarray, np.ndarray]:
    n = seqs * SEQ_LEN + 1
    tokens = np.fromfile(SHARD, dtype="<u2", count=n, offset=256 * 4).astype(np.int64)
    return tokens[:-1].reshape(seqs, SEQ_LEN), tokens[1:].reshape(seqs, SEQ_LEN)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))


def snap_golf(repeat: int, seqs: int) -> tuple[list[float], list[dict[str, np.ndarray]], str]:
    import jax
    import jax.numpy as jnp

    from golf_jax import cli, compat, model, param_tree

    mcfg = cli.load_config_file("configs/record.py").model
    state = {k: v.astype(jnp.bfloat16) for k, v in perturbed_state().items()}
    params = param_tree.cast_params(compat.params_from_reference(state, mcfg, "perturbed init"), mcfg)
    x, y = (jnp.asarray(a, jnp.int32) for a in batch(seqs))
    fn = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)
    losses, grads = [], []
    for _ in range(repeat):
        loss, g = fn(params, mcfg, x, y)
        losses.append(float(loss))
        grads.append({k: np.asarray(v, np.float32) for k, v in compat.params_to_reference(g, mcfg).items()})
    return losses, grads, f"jax {jax.__version__}, {jax.devices()[0].device_kind}"


def snap_ref(repeat: int, reference: str, eager: bool, seqs: int, device: str) -> tuple[list[float], list[dict[str, np.ndarray]], str]:
    # The settings of run_tinyshakespeare.sh that change the model.
    os.environ.update(BIGRAM_VOCAB_SIZE="3072", BIGRAM_DIM="112", SEED="314")
    sys.path.insert(0, reference)
    import torch

    import train_gpt as R  # the reference, unchanged

    args = R.Hyperparameters()
    set_backends(torch)
    device = torch.device(device)
    R.CastedLinear._qat_enabled = args.qat_enabled
    # As the reference's main() builds it: bf16, banks and CastedLinear float32, low-dim params float32.
    m = R.GPT(vocab_size=args.vocab_size, num_layers=args.num_layers, model_dim=args.model_dim,
              num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, mlp_mult=args.mlp_mult,
              tie_embeddings=args.tie_embeddings, tied_embed_init_std=args.tied_embed_init_std,
              logit_softcap=args.logit_softcap, rope_base=args.rope_base, qk_gain_init=args.qk_gain_init,
              mtp_num_heads=args.mtp_num_heads, mtp_loss_weight=args.mtp_loss_weight,
              bigram_vocab_size=args.bigram_vocab_size, bigram_dim=args.bigram_dim, xsa_last_n=args.xsa_last_n,
              rope_dims=args.rope_dims, ln_scale=args.ln_scale, dtg=args.dtg_enabled, ve_enabled=args.ve_enabled,
              ve_dim=args.ve_dim, ve_layers=args.ve_layers, gated_attention=args.gated_attention,
              value_residual=args.value_residual).to(device)
    m = cast_as_main(R, m)
    state = perturbed_state()
    params = dict(m.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise SystemExit(f"reference parameters not in the init: {missing}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(torch.from_numpy(state[k]).to(device=device, dtype=p.dtype).reshape(p.shape))
    model = m if eager else torch.compile(m, dynamic=False, fullgraph=True)
    model.train()
    x, y = (torch.from_numpy(a).to(device) for a in batch(seqs))
    losses, grads = [], []
    for _ in range(repeat):
        for p in m.parameters():
            p.grad = None
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=True):
            loss = model(x, y)
        (loss * GRAD_SCALE).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        grads.append({k: (p.grad.float() / GRAD_SCALE).cpu().numpy() for k, p in params.items() if p.grad is not None})
    return losses, grads, (f"torch {torch.__version__}, "
                           f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else device.type}, "
                           f"{'eager' if eager else 'torch.compile'}")


def cmd_snap(args) -> int:
    t0 = time.perf_counter()
    if args.impl == "golf":
        losses, grads, what = snap_golf(args.repeat, args.seqs)
    else:
        losses, grads, what = snap_ref(args.repeat, args.reference, args.eager, args.seqs, args.device)
    first = grads[0]
    inproc = {k: max([rel(first[k], g[k]) for g in grads[1:]], default=0.0) for k in first}
    np.savez(args.out, **{f"grad/{k}": v for k, v in first.items()},
             **{f"inproc/{k}": np.float64(v) for k, v in inproc.items()}, losses=np.asarray(losses))
    same = all(all(np.array_equal(first[k], g[k]) for k in first) for g in grads[1:])
    print(f"{args.out}: {what}; losses {losses}; {args.repeat} calls "
          f"{'bit-identical' if same else 'DIFFER'} in-process; {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def group(name: str) -> str:
    """Reference name -> the group it is reported in (per-layer tensors together)."""
    name = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
    return re.sub(r"^ve_layer_scales\.\d+$", "ve_layer_scales.*", name)


def grouped(npz: Path) -> tuple[dict[str, np.ndarray], dict[str, float], np.ndarray]:
    with np.load(npz) as z:
        names = sorted((k[5:] for k in z.files if k.startswith("grad/")),
                       key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
        groups: dict[str, list[np.ndarray]] = {}
        inproc: dict[str, float] = {}
        for k in names:
            groups.setdefault(group(k), []).append(z[f"grad/{k}"].ravel())
            inproc[group(k)] = max(inproc.get(group(k), 0.0), float(z[f"inproc/{k}"]))
        losses = z["losses"]
    flat = {g: np.concatenate(v) for g, v in groups.items()}
    flat["(all)"] = np.concatenate(list(flat.values()))
    inproc["(all)"] = max(inproc.values())
    return flat, inproc, losses


def cmd_compare(args) -> int:
    ga, gi, gl = grouped(args.golf[0])
    gb = grouped(args.golf[1])[0] if len(args.golf) > 1 else None
    ra, ri, rl = grouped(args.ref[0])
    rb = grouped(args.ref[1])[0] if len(args.ref) > 1 else None
    print(f"loss: golf_jax {gl[0]:.6f}, reference {rl[0]:.6f}")
    print("||a-b||/||a|| per gradient group (in-process: the largest over the repeats of one process)\n")
    print("| gradient | golf_jax in-process | golf_jax process vs process | reference in-process "
          "| reference process vs process | golf_jax vs reference |")
    print("|---|---|---|---|---|---|")
    for k in [*sorted(set(ga) - {"(all)"}), "(all)"]:
        if k not in ra:
            continue
        cells = [gi[k], rel(ga[k], gb[k]) if gb else float("nan"), ri[k],
                 rel(ra[k], rb[k]) if rb else float("nan"), rel(ra[k], ga[k])]
        print(f"| {k} | " + " | ".join(f"{c:.2e}" for c in cells) + " |")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("snap", help="loss and gradients, REPEAT calls in this process (GPU)")
    s.add_argument("impl", choices=("golf", "ref"))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--reference", default=str(SHARED / "reference/record_1019"))
    s.add_argument("--eager", action="store_true", help="the reference without torch.compile")
    s.add_argument("--seqs", type=int, default=SEQS, help="sequences of the micro-batch (fewer: a CPU check)")
    s.add_argument("--device", default="cuda", help="the reference's torch device (cpu: a check of this script)")
    c = sub.add_parser("compare", help="the table of relative differences")
    c.add_argument("--golf", nargs="+", type=Path, required=True)
    c.add_argument("--ref", nargs="+", type=Path, required=True)
    args = parser.parse_args()
    return cmd_snap(args) if args.cmd == "snap" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
