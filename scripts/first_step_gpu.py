"""The first optimizer step on a GPU, golf_jax against the PyTorch reference,
from the seed-314 init and the first batch of the 60-step comparison (8 x 48 x
2048 tokens of the tinyshakespeare shard): where does the step-2 loss gap come
from, the forward or the update? (docs/fidelity.md, "first-step gap".)

Three phases, each its own process, sharing files in --work:

    python scripts/first_step_gpu.py ref --work /tmp/fs       # the reference: one step as its main() runs it
    python scripts/first_step_gpu.py golf --work /tmp/fs      # golf_jax: the same step; the cross-evaluations
    python scripts/first_step_gpu.py refeval --work /tmp/fs   # the reference's forward at golf_jax's weights

`ref` runs the reference's module eager by default (`--compile`: torch.compile,
as its training does) under bf16 autocast, with its optimizers built as main()
builds them (scripts/first_step_probe.py), and saves its step-1 parameters and
raw gradients. `golf` runs golf_jax's training step (train_step.make_train_step)
on the same batch, then evaluates batch 2 (the step-2 train loss of the
curves) with golf_jax's forward at: its own step-1 weights, the reference's,
and those of golf_jax's optimizer applied to the reference's gradients; and
compares, per parameter group, the gradients and the updates. `refeval`
evaluates batch 2 with the reference's forward at golf_jax's two weight sets.
GOLF_TREE (default: this repository) is the golf_jax tree imported.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import first_step_probe as P  # noqa: E402

def group(name: str) -> str:
    name = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
    return re.sub(r"^ve_layer_scales\.\d+$", "ve_layer_scales.*", name)


def grouped(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for k in sorted(d):
        out.setdefault(group(k), []).append(np.asarray(d[k], np.float64).ravel())
    return {k: np.concatenate(v) for k, v in out.items()}


def compare(a: dict, b: dict) -> dict[str, tuple[float, float, float]]:
    """Per group: ||a - b|| / ||b||, ||a|| / ||b|| - 1, ||b||."""
    ga, gb = grouped(a), grouped(b)
    res = {}
    for k in gb:
        nb = np.linalg.norm(gb[k])
        res[k] = (float(np.linalg.norm(ga[k] - gb[k]) / max(nb, 1e-30)),
                  float(np.linalg.norm(ga[k]) / max(nb, 1e-30) - 1), float(nb))
    return res


def ref_loss(model, torch, xs, ys, device) -> float:
    losses = []
    with torch.no_grad():
        for i in range(xs.shape[0]):
            x, y = torch.from_numpy(xs[i]).to(device), torch.from_numpy(ys[i]).to(device)
            with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
                losses.append(float(model(x, y)))
    return float(np.mean(losses))


def set_backends(torch):
    if torch.cuda.is_available():  # as the reference's main() sets them
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_math_sdp(False)


def cmd_ref(args) -> int:
    t0 = time.perf_counter()
    import torch
    set_backends(torch)
    kw = P.model_kwargs("record")
    state = P.initial_state("record", 0.0)
    xs, ys = P.batch(args.seqs, args.seq_len, 0)
    xs2, ys2 = P.batch(args.seqs, args.seq_len, 1)

    class A:
        unfused = False
    p0, p1, grads, clipped, info, m, model = P.reference_step(state, kw, xs, ys, "bfloat16", A, device=args.device,
                                                               compile=args.compile)
    l2 = ref_loss(model, torch, xs2, ys2, args.device)
    info.pop("dtypes")
    info.update(step1_loss=float(np.mean(info["losses"])), step2_loss=l2, compile=args.compile,
                seconds=time.perf_counter() - t0)
    np.savez(args.work / "ref.npz", **{f"p1/{k}": v for k, v in p1.items()},
             **{f"grad/{k}": v for k, v in grads.items()})
    (args.work / "ref.json").write_text(json.dumps(info))
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"reference ({'compiled' if args.compile else 'eager'}, {where}): step-1 loss {info['step1_loss']:.4f}, "
          f"grad norm {info['grad_norm']:.6f}, batch-2 loss at its step-1 weights {l2:.4f}; "
          f"{info['seconds']:.0f} s", flush=True)
    return 0


def cmd_golf(args) -> int:
    t0 = time.perf_counter()
    sys.path.insert(0, str(Path(os.environ.get("GOLF_TREE", HERE.parent)).resolve()))
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from golf_jax import cli, compat, model, optim, param_tree, train_step

    cfg = cli.load_config_file("configs/record.py")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_seq_len=args.seq_len,
                                                            train_batch_tokens=P.ACCUM * args.seqs * args.seq_len))
    mcfg = cfg.model
    init = P.initial_state("record", 0.0)
    to_params = lambda d: param_tree.cast_params(  # noqa: E731
        compat.params_from_reference({k: np.asarray(v, np.float32) for k, v in d.items()}, mcfg, "probe"), mcfg)
    def to_ref(tree) -> dict[str, np.ndarray]:
        return {k: np.asarray(v, np.float32) for k, v in compat.params_to_reference(tree, mcfg).items()}
    params0 = to_params(init)
    mesh = train_step.make_mesh(1)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    st = train_step.init_state(params0, tx, mesh, False)
    fn = train_step.make_train_step(cfg, mesh, tx, st)
    sh = NamedSharding(mesh, PartitionSpec(None, train_step.AXIS))
    xb, yb = (np.asarray(a, np.int32) for a in P.batch(args.seqs, args.seq_len, 0))
    xs, ys = (jax.device_put(jnp.asarray(a), sh) for a in (xb, yb))
    xs2, ys2 = (jnp.asarray(a, jnp.int32) for a in P.batch(args.seqs, args.seq_len, 1))
    lossfn = jax.jit(lambda p, x, y: model.loss(p, mcfg, x, y))

    def batch2(p) -> float:
        return float(np.mean([float(lossfn(p, xs2[i], ys2[i])) for i in range(xs2.shape[0])]))

    # golf_jax's own gradients on batch 1 (the micro-batch mean, float32), for the comparison
    gradfn = jax.jit(jax.grad(lambda p, x, y: model.loss(p, mcfg, x, y)))
    gsum = None
    for i in range(xs.shape[0]):
        g = jax.tree.map(lambda a: a.astype(jnp.float32), gradfn(params0, jnp.asarray(xb[i]), jnp.asarray(yb[i])))
        gsum = g if gsum is None else jax.tree.map(jnp.add, gsum, g)
    golf_grads = to_ref(jax.tree.map(lambda a: a / xs.shape[0], gsum))

    p0 = to_ref(params0)
    st, loss1 = fn(st, xs, ys, 1.0, False, False)
    golf_p1 = to_ref(st.params)
    golf_params1 = st.params

    with np.load(args.work / "ref.npz") as z:
        ref_p1 = {k[3:]: z[k] for k in z.files if k.startswith("p1/")}
        ref_grads = {k[5:]: z[k] for k in z.files if k.startswith("grad/")}
    info = json.loads((args.work / "ref.json").read_text())
    # golf_jax's optimizer (its clip included) on the reference's raw gradients, applied as the step applies it
    tx1 = optim.build_optimizer(cfg.optimizer, None)
    rg = compat.params_from_reference({k: np.asarray(v, np.float32) for k, v in ref_grads.items()}, mcfg, "grads")
    rg = jax.tree.map(lambda g, p: jnp.asarray(g).astype(p.dtype), rg, params0)

    @jax.jit
    def opt_only(params, grads):
        updates, _ = tx1.update(grads, tx1.init(params), params)
        return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype),
                            params, updates)

    opt_params1 = opt_only(params0, rg)
    opt_p1 = to_ref(opt_params1)

    losses = {"golf_jax forward, golf_jax step": batch2(golf_params1),
              "golf_jax forward, reference step": batch2(to_params(ref_p1)),
              "golf_jax forward, golf_jax optimizer on the reference's gradients": batch2(opt_params1)}
    np.savez(args.work / "golf.npz", **{f"golf/{k}": v for k, v in golf_p1.items()},
             **{f"opt/{k}": v for k, v in opt_p1.items()})
    d = lambda p1: {k: p1[k] - p0[k] for k in p0}  # noqa: E731
    c_grad = compare(golf_grads, ref_grads)
    c_step = compare(d(golf_p1), d(ref_p1))
    c_opt = compare(d(opt_p1), d(ref_p1))
    print(f"\ngolf_jax ({jax.devices()[0].device_kind}, jax {jax.__version__}): step-1 loss {float(loss1):.4f} "
          f"(reference {info['step1_loss']:.4f}); {time.perf_counter() - t0:.0f} s")
    print(f"batch-2 loss (the step-2 train loss): reference forward at its own step-1 weights {info['step2_loss']:.4f}")
    for k, v in losses.items():
        print(f"  {k}: {v:.4f}")
    print("\nper group, a vs b: ||a - b|| / ||b||, ||a|| / ||b|| - 1. grad: golf_jax's batch-1 gradient vs the "
          "reference's; step: golf_jax's update vs the reference's; opt: golf_jax's optimizer on the reference's "
          "gradients vs the reference's update")
    print("| group | grad rel | grad norm | step rel | step norm | opt rel | opt norm | ||d_ref|| |")
    print("|---|---|---|---|---|---|---|---|")
    for k in c_step:
        g = c_grad.get(k, (np.nan, np.nan, np.nan))
        gs = "zero | zero" if g[2] == 0 else f"{g[0]:.2e} | {g[1]:+.2e}"
        print(f"| {k} | {gs} | {c_step[k][0]:.2e} | {c_step[k][1]:+.2e} | {c_opt[k][0]:.2e} | "
              f"{c_opt[k][1]:+.2e} | {c_step[k][2]:.3e} |")
    (args.work / "golf.json").write_text(json.dumps({"step1_loss": float(loss1), "batch2": losses}))
    return 0


def cmd_refeval(args) -> int:
    import torch
    set_backends(torch)
    kw = P.model_kwargs("record")
    xs2, ys2 = P.batch(args.seqs, args.seq_len, 1)
    os.environ.update(BIGRAM_VOCAB_SIZE="3072", BIGRAM_DIM="112")
    sys.path.insert(0, str(P.REFERENCE))
    import train_gpt as R
    m = R.GPT(**kw, mtp_num_heads=0, mtp_loss_weight=0.1, dtg=False, gated_attention=False,
              value_residual=False).to(args.device).bfloat16()
    for name in ("qo_bank", "kv_bank", "mlp_up_bank", "mlp_down_bank"):
        getattr(m, name).data = getattr(m, name).data.float()
    for module in m.modules():
        if isinstance(module, R.CastedLinear):
            module.float()
    R.restore_low_dim_params_to_fp32(m)
    model = torch.compile(m, dynamic=False, fullgraph=True) if args.compile else m
    model.train()
    named = dict(m.named_parameters())
    with np.load(args.work / "golf.npz") as z:
        for which, label in (("golf", "golf_jax step"), ("opt", "golf_jax optimizer on the reference's gradients")):
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(torch.from_numpy(z[f"{which}/{k}"]).to(device=args.device, dtype=p.dtype).reshape(p.shape))
            print(f"  reference forward ({'compiled' if args.compile else 'eager'}), {label}: "
                  f"{ref_loss(model, torch, xs2, ys2, args.device):.4f}", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("ref", "golf", "refeval"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/first_step"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the reference (ref, refeval)")
    ap.add_argument("--seqs", type=int, default=48, help="sequences per micro-batch (the record's 48)")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    return {"ref": cmd_ref, "golf": cmd_golf, "refeval": cmd_refeval}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
