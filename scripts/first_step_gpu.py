"""The first optimizer step on a GPU, golf_jax against the PyTorch reference,
from the seed-314 init and the first batch of the 60-step comparison (8 x 48 x
2048 tokens of the tinyshakespeare shard): where does the step-2 loss gap come
from, the forward, the gradients of which tensors, or the optimizer of which
group? (docs/fidelity.md, "first-step gap".)

Phases, each its own process, sharing files in their work folders:

    python scripts/first_step_gpu.py ref --work /tmp/fe --eval-golf &            # the reference, eager
    python scripts/first_step_gpu.py ref --work /tmp/fc --compile --eval-golf &  # the reference, torch.compile
    python scripts/first_step_gpu.py golf --refs /tmp/fe /tmp/fc                 # golf_jax, against each
    python scripts/first_step_gpu.py refeval --work /tmp/fc [--compile]          # (or afterwards, alone)

`ref` runs the reference's module eager (`--compile`: torch.compile, as its
training does) under bf16 autocast, with its optimizers built as main() builds
them (scripts/first_step_probe.py). It saves its step-1 parameters and raw
gradients, and prints the batch-2 loss at its step-1 weights: the step-2 train
loss of the curves, computed as the training computes it (grad mode on, so a
compiled model runs its training graph). With --eval-golf it then waits for
golf.npz in its folder and evaluates its own forward at golf_jax's weights and
at hybrids: its own step-1 weights with one group taken from golf_jax's step
(or from golf_jax's optimizer applied to the reference's gradients).

`golf` computes golf_jax's raw gradients (the training step's accumulation, in
each parameter's dtype) and its real training step (train_step.make_train_step)
on the same batch, then for each reference folder, in order: the batch-2 loss
of golf_jax's forward at its own weights, at the reference's, at golf_jax's
optimizer on the reference's gradients, and at the hybrids; per group, the
gradients and the updates against the reference's; for the AdamW tensors (whose
first step is lr * sign(g) wherever |g| >> eps) the share of elements whose
gradient is zero on one side only or of the other sign, and of updates that
differ by more than half the learning rate. It writes golf.npz (its weights)
into each folder, and, with --out, the numbers (first_step.json) and the
tables' gradients (bf16 bits, tables.npz) for a look on the CPU.

GOLF_TREE (default: this repository) is the golf_jax tree imported. --seqs and
--seq-len shrink the batch (a CPU check: --device cpu for ref, JAX's own).
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
from reference_setup import BANKS, cast_as_main, set_backends  # noqa: E402

TABLES = ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight")
# The groups swapped one at a time between the two sides' step-1 weights.
SWAP_GROUPS = TABLES + BANKS + ("scalars",)


def group(name: str) -> str:
    name = re.sub(r"^blocks\.\d+\.", "blocks.*.", name)
    return re.sub(r"^ve_layer_scales\.\d+$", "ve_layer_scales.*", name)


def swap_group(name: str) -> str:
    return name if name in TABLES + BANKS else "scalars"


def hybrid(base: dict, other: dict, g: str) -> dict:
    """`base` with the tensors of swap group `g` taken from `other`."""
    return {k: (other[k] if swap_group(k) == g else v) for k, v in base.items()}


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


def wait_for(path: Path, seconds: float) -> bool:
    t = time.time()
    while not path.exists():
        if time.time() - t > seconds:
            return False
        time.sleep(0.5)
    return True


def save_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the reference

def ref_loss(model, torch, xs, ys, device) -> tuple[float, list[float]]:
    """The batch-2 loss as the training loop computes it: grad mode on (a compiled
    model runs its training graph, not a no_grad one), bf16 autocast, the
    micro-batch mean."""
    losses = []
    for i in range(xs.shape[0]):
        x, y = torch.from_numpy(xs[i]).to(device), torch.from_numpy(ys[i]).to(device)
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            losses.append(float(model(x, y).detach()))
    return float(np.mean(losses)), losses


def label(args) -> str:
    return "compiled" if args.compile else "eager"


def eval_golf(args, torch, m, model, ref_p1: dict, xs2, ys2) -> dict:
    """The reference's forward at golf_jax's weights (golf.npz in --work) and at hybrids."""
    path = args.work / "golf.npz"
    if not wait_for(path, args.wait):
        print(f"reference ({label(args)}): no {path} after {args.wait:.0f} s", flush=True)
        return {}
    named = dict(m.named_parameters())
    with np.load(path) as z:
        golf = {k[5:]: z[k] for k in z.files if k.startswith("golf/")}
        opt = {k[4:]: z[k] for k in z.files if k.startswith("opt/")}

    def at(weights: dict) -> float:
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(torch.from_numpy(weights[k]).to(device=args.device, dtype=p.dtype).reshape(p.shape))
        return ref_loss(model, torch, xs2, ys2, args.device)[0]

    res = {"own": at(ref_p1), "golf_jax step": at(golf),
           "golf_jax optimizer on the reference's gradients": at(opt)}
    for g in SWAP_GROUPS:
        res[f"own, {g} from golf_jax's step"] = at(hybrid(ref_p1, golf, g))
        res[f"own, {g} from golf_jax's optimizer"] = at(hybrid(ref_p1, opt, g))
    base = res["own"]
    print(f"\nreference forward ({label(args)}) on batch 2, at: (loss, minus at its own step-1 weights)", flush=True)
    for k, v in res.items():
        print(f"  {k}: {v:.5f} ({v - base:+.5f})", flush=True)
    return res


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
    l2, l2s = ref_loss(model, torch, xs2, ys2, args.device)
    info.pop("dtypes")
    info.update(step1_loss=float(np.mean(info["losses"])), step2_loss=l2, step2_losses=l2s, compile=args.compile,
                seconds=time.perf_counter() - t0,
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                torch=torch.__version__)
    (args.work / "ref.json").write_text(json.dumps(info))  # before ref.npz, which `golf` waits for
    save_atomic(args.work / "ref.npz", **{f"p1/{k}": v for k, v in p1.items()},
                **{f"grad/{k}": v for k, v in grads.items()})
    print(f"reference ({label(args)}, {info['device']}, torch {torch.__version__}): step-1 loss "
          f"{info['step1_loss']:.5f}, grad norm {info['grad_norm']:.6f}, batch-2 loss at its step-1 weights "
          f"{l2:.5f}; {info['seconds']:.0f} s", flush=True)
    if args.eval_golf:
        info["refeval"] = eval_golf(args, torch, m, model, p1, xs2, ys2)
        (args.work / "ref.json").write_text(json.dumps(info))
    return 0


def cmd_refeval(args) -> int:
    """The reference's forward at golf.npz in --work (after `ref` and `golf`)."""
    import torch
    set_backends(torch)
    kw = P.model_kwargs("record")
    xs2, ys2 = P.batch(args.seqs, args.seq_len, 1)
    os.environ.update(BIGRAM_VOCAB_SIZE="3072", BIGRAM_DIM="112")
    sys.path.insert(0, str(P.REFERENCE))
    import train_gpt as R
    m = cast_as_main(R, R.GPT(**kw, mtp_num_heads=0, mtp_loss_weight=0.1, dtg=False, gated_attention=False,
                              value_residual=False).to(args.device))
    model = torch.compile(m, dynamic=False, fullgraph=True) if args.compile else m
    model.train()
    with np.load(args.work / "ref.npz") as z:
        ref_p1 = {k[3:]: z[k] for k in z.files if k.startswith("p1/")}
    eval_golf(args, torch, m, model, ref_p1, xs2, ys2)
    return 0


# ----------------------------------------------------------------------------- golf_jax

def adam_stats(g_golf: np.ndarray, g_ref: np.ndarray, d_golf: np.ndarray, d_ref: np.ndarray, lr: float) -> dict:
    """For an AdamW tensor: where do the two gradients disagree in what Adam's
    first step sees (zero or not, the sign), and how many updates differ by
    more than lr / 2."""
    a, b = np.asarray(g_golf, np.float64).ravel(), np.asarray(g_ref, np.float64).ravel()
    za, zb = a == 0, b == 0
    both = ~za & ~zb
    n = a.size
    flips = both & (np.sign(a) != np.sign(b))
    big = np.abs(np.asarray(d_golf, np.float64) - np.asarray(d_ref, np.float64)).ravel() > lr / 2
    return {"n": n, "ref_zero": float(zb.mean()), "golf_zero": float(za.mean()),
            "zero_golf_only": int((za & ~zb).sum()), "zero_ref_only": int((zb & ~za).sum()),
            "sign_flips": int(flips.sum()),
            "flip_median_abs_g_over_rms": float(np.median(np.abs(b[flips])) / max(np.sqrt(np.mean(b * b)), 1e-30))
            if flips.any() else 0.0,
            "updates_off_by_lr_half": int(big.sum())}


def cmd_golf(args) -> int:
    t0 = time.perf_counter()
    sys.path.insert(0, str(Path(os.environ.get("GOLF_TREE", HERE.parent)).resolve()))
    import dataclasses

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from golf_jax import cli, compat, model, optim, param_tree, train_step

    cfg = cli.load_config_file("configs/record.py")
    for o in args.golf_opt:  # optimizer or model overrides, section.key=value
        sec, kv = o.split(".", 1)
        k, v = kv.split("=", 1)
        sub = getattr(cfg, sec)
        cur = getattr(sub, k)
        val = (v.lower() in ("1", "true", "yes")) if isinstance(cur, bool) else type(cur)(v)
        cfg = dataclasses.replace(cfg, **{sec: dataclasses.replace(sub, **{k: val})})
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_seq_len=args.seq_len,
                                                            train_batch_tokens=P.ACCUM * args.seqs * args.seq_len))
    mcfg, ocfg = cfg.model, cfg.optimizer
    init = P.initial_state("record", 0.0)
    to_params = lambda d: param_tree.cast_params(  # noqa: E731
        compat.params_from_reference({k: np.asarray(v, np.float32) for k, v in d.items()}, mcfg, "probe"), mcfg)

    def to_ref(tree) -> dict[str, np.ndarray]:
        return {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in compat.params_to_reference(tree, mcfg).items()}
    params0 = to_params(init)
    p0 = to_ref(params0)
    mesh = train_step.make_mesh(1)
    tx = optim.build_optimizer(ocfg, train_step.AXIS)
    st = train_step.init_state(params0, tx, mesh, False)
    fn = None if args.no_train_step else train_step.make_train_step(cfg, mesh, tx, st)
    sh = NamedSharding(mesh, PartitionSpec(None, train_step.AXIS))
    xb, yb = (np.asarray(a, np.int32) for a in P.batch(args.seqs, args.seq_len, 0))
    xs, ys = (jax.device_put(jnp.asarray(a), sh) for a in (xb, yb))
    xs2, ys2 = (jnp.asarray(a, jnp.int32) for a in P.batch(args.seqs, args.seq_len, 1))
    lossfn = jax.jit(lambda p, x, y: model.loss(p, mcfg, x, y))

    def batch2(p) -> float:
        return float(np.mean([float(lossfn(p, xs2[i], ys2[i])) for i in range(xs2.shape[0])]))

    # golf_jax's raw gradients on batch 1, as its training step accumulates them (train_step.device_step:
    # the micro-batch sum in each parameter's dtype with grad_accum_dtype "param", then / 8)
    in_param = ocfg.grad_accum_dtype == "param"

    @jax.jit
    def raw_grads(params, xs_, ys_):
        def micro(gsum, xy):
            g = jax.grad(lambda p: model.loss(p, mcfg, xy[0], xy[1]))(params)
            return jax.tree.map(lambda a, b: a + b.astype(a.dtype), gsum, g), None
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype if in_param else jnp.float32), params)
        gsum, _ = jax.lax.scan(micro, zeros, (xs_, ys_))
        return jax.tree.map(lambda g, p: (g / xs_.shape[0]).astype(p.dtype), gsum, params)

    golf_g_tree = raw_grads(params0, jnp.asarray(xb), jnp.asarray(yb))
    golf_grads = to_ref(golf_g_tree)

    tx1 = optim.build_optimizer(ocfg, None)

    @jax.jit
    def opt_only(params, grads):
        updates, _ = tx1.update(grads, tx1.init(params), params)
        return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype),
                            params, updates)

    d = lambda p1: {k: p1[k] - p0[k] for k in p0}  # noqa: E731
    dev = f"{jax.devices()[0].device_kind}, jax {jax.__version__}"
    if args.no_train_step:  # the step as golf_jax's optimizer on its raw gradients (equal to the training step's)
        golf_params1 = opt_only(params0, golf_g_tree)
        loss1 = np.mean([float(lossfn(params0, jnp.asarray(xb[i]), jnp.asarray(yb[i]))) for i in range(len(xb))])
        golf_p1 = to_ref(golf_params1)
    else:
        st, loss1 = fn(st, xs, ys, 1.0, False, False)
        golf_params1 = st.params
        golf_p1 = to_ref(golf_params1)
        # golf_jax's optimizer on its own raw gradients: the step from raw_grads (checks that they are the step's)
        own_opt_p1 = to_ref(opt_only(params0, golf_g_tree))
        c_own = compare(d(own_opt_p1), d(golf_p1))
        print("golf_jax's optimizer on its raw gradients vs its training step, worst group: "
              f"{max(v[0] for v in c_own.values()):.2e}", flush=True)
    golf_l2 = batch2(golf_params1)
    print(f"\ngolf_jax ({dev}{', overrides ' + ' '.join(args.golf_opt) if args.golf_opt else ''}, tree "
          f"{os.environ.get('GOLF_TREE', '.')}): step-1 loss {float(loss1):.5f}; batch-2 loss at its own step-1 "
          f"weights {golf_l2:.5f}; {time.perf_counter() - t0:.0f} s", flush=True)
    if args.save_p1:
        save_atomic(args.save_p1, **golf_p1)
    if args.eval_p1:
        if wait_for(args.eval_p1, args.wait):
            with np.load(args.eval_p1) as z:
                other = {k: z[k] for k in z.files}
            print(f"batch-2 loss of this forward at the step-1 weights in {args.eval_p1}: "
                  f"{batch2(to_params(other)):.5f}", flush=True)
        else:
            print(f"no {args.eval_p1} after {args.wait:.0f} s", flush=True)

    lrs = {k: (ocfg.tied_embed_lr if k in TABLES else ocfg.scalar_lr) for k in p0 if k not in BANKS}
    report = {"device": dev, "step1_loss": float(loss1), "golf_batch2": golf_l2, "overrides": args.golf_opt,
              "golf_grad_norm": float(np.sqrt(sum(float(np.sum(np.square(g.astype(np.float64))))
                                                   for g in golf_grads.values()))), "refs": {}}
    tables_out = {f"p0/{k}": P.bf16_round(p0[k]).view(np.uint32) >> 16 for k in TABLES}
    tables_out.update({f"golf_grad/{k}": (golf_grads[k].view(np.uint32) >> 16).astype(np.uint16) for k in TABLES})
    tables_out.update({f"golf_p1/{k}": (golf_p1[k].view(np.uint32) >> 16).astype(np.uint16) for k in TABLES})
    refs_p1 = {}
    for wdir in args.refs:
        if not wait_for(wdir / "ref.npz", args.wait):
            print(f"no {wdir / 'ref.npz'} after {args.wait:.0f} s", flush=True)
            continue
        with np.load(wdir / "ref.npz") as z:
            ref_p1 = {k[3:]: z[k] for k in z.files if k.startswith("p1/")}
            ref_grads = {k[5:]: z[k] for k in z.files if k.startswith("grad/")}
        info = json.loads((wdir / "ref.json").read_text())
        name = "compiled" if info["compile"] else "eager"
        refs_p1[name] = ref_p1
        rg = compat.params_from_reference({k: np.asarray(v, np.float32) for k, v in ref_grads.items()}, mcfg, "grads")
        rg = jax.tree.map(lambda g, p: jnp.asarray(g).astype(p.dtype), rg, params0)
        opt_p1 = to_ref(opt_only(params0, rg))
        if not args.no_share:
            save_atomic(wdir / "golf.npz", **{f"golf/{k}": v for k, v in golf_p1.items()},
                        **{f"opt/{k}": v for k, v in opt_p1.items()})
        r2 = info["step2_loss"]
        losses = {"golf_jax forward, golf_jax step": golf_l2,
                  "golf_jax forward, reference step": batch2(to_params(ref_p1)),
                  "golf_jax forward, golf_jax optimizer on the reference's gradients": batch2(to_params(opt_p1))}
        swaps = {}
        for g in SWAP_GROUPS:
            swaps[g] = {"golf step into ref": batch2(to_params(hybrid(ref_p1, golf_p1, g))),
                        "golf opt into ref": batch2(to_params(hybrid(ref_p1, opt_p1, g))),
                        "ref step into golf": batch2(to_params(hybrid(golf_p1, ref_p1, g)))}
        base_ref, base_golf = losses["golf_jax forward, reference step"], golf_l2
        c_grad, c_step, c_opt = compare(golf_grads, ref_grads), compare(d(golf_p1), d(ref_p1)), compare(d(opt_p1),
                                                                                                           d(ref_p1))
        stats = {k: adam_stats(golf_grads[k], ref_grads[k], d(golf_p1)[k], d(ref_p1)[k], lrs[k])
                 for k in p0 if k not in BANKS and k in ref_grads}
        print(f"\n===== against the reference, {name} ({info.get('device', '?')}, torch {info.get('torch', '?')}): "
              f"step-1 loss {info['step1_loss']:.5f}, grad norm {info['grad_norm']:.6f} (golf_jax's raw "
              f"{report['golf_grad_norm']:.6f})", flush=True)
        print(f"batch-2 loss: reference forward at its own step-1 weights {r2:.5f}")
        for k, v in losses.items():
            print(f"  {k}: {v:.5f} ({v - r2:+.5f})")
        print("\nswaps (golf_jax forward): the reference's step-1 weights with one group from golf_jax's step "
              "(or from golf_jax's optimizer on the reference's gradients), minus the reference's; and golf_jax's "
              "with that group from the reference, minus golf_jax's")
        print("| group | golf step into ref | golf opt into ref | ref step into golf |")
        print("|---|---|---|---|")
        for g, v in swaps.items():
            print(f"| {g} | {v['golf step into ref'] - base_ref:+.5f} | {v['golf opt into ref'] - base_ref:+.5f} | "
                  f"{v['ref step into golf'] - base_golf:+.5f} |")
        print("\nper group: ||a - b|| / ||b||, ||a|| / ||b|| - 1. grad: golf_jax's raw batch-1 gradient vs the "
              "reference's; step: golf_jax's update vs the reference's; opt: golf_jax's optimizer on the "
              "reference's gradients vs the reference's update")
        print("| group | grad rel | grad norm | step rel | step norm | opt rel | opt norm | ||d_ref|| |")
        print("|---|---|---|---|---|---|---|---|")
        for k in c_step:
            gg = c_grad.get(k, (np.nan, np.nan, 0.0))
            gs = "zero | zero" if gg[2] == 0 else f"{gg[0]:.2e} | {gg[1]:+.2e}"
            print(f"| {k} | {gs} | {c_step[k][0]:.2e} | {c_step[k][1]:+.2e} | {c_opt[k][0]:.2e} | "
                  f"{c_opt[k][1]:+.2e} | {c_step[k][2]:.3e} |")
        print("\nAdamW tensors (first step ~ lr sign(g)): elements with a zero gradient on one side only, "
              "sign flips (and their median |g_ref| / rms(g_ref)), updates off by more than lr/2")
        print("| tensor | n | ref zero | golf zero | zero golf only | zero ref only | flips | flip |g|/rms | "
              "off by lr/2 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for k, s in stats.items():
            if s["zero_golf_only"] or s["zero_ref_only"] or s["sign_flips"] or s["updates_off_by_lr_half"] \
                    or k in TABLES:
                print(f"| {k} | {s['n']} | {s['ref_zero']:.4f} | {s['golf_zero']:.4f} | {s['zero_golf_only']} | "
                      f"{s['zero_ref_only']} | {s['sign_flips']} | {s['flip_median_abs_g_over_rms']:.2e} | "
                      f"{s['updates_off_by_lr_half']} |")
        sys.stdout.flush()
        report["refs"][name] = {"step2": r2, "step2_losses": info.get("step2_losses"), "grad_norm": info["grad_norm"],
                                "losses": losses, "swaps": swaps, "grad": c_grad, "step": c_step, "opt": c_opt,
                                "adam": stats}
        tables_out.update({f"{name}_grad/{k}": (P.bf16_round(ref_grads[k]).view(np.uint32) >> 16).astype(np.uint16)
                           for k in TABLES})
        tables_out.update({f"{name}_p1/{k}": (P.bf16_round(ref_p1[k]).view(np.uint32) >> 16).astype(np.uint16)
                           for k in TABLES})
    if len(refs_p1) == 2:
        e, c = refs_p1["eager"], refs_p1["compiled"]
        c_ec = compare(d(e), d(c))
        report["eager_vs_compiled_step"] = c_ec
        print("\nthe reference eager vs compiled, step rel per group: "
              + ", ".join(f"{k} {v[0]:.2e}" for k, v in c_ec.items() if v[2] > 0), flush=True)
        report["golf_forward_at_eager_vs_compiled"] = {g: batch2(to_params(hybrid(c, e, g))) - batch2(to_params(c))
                                                       for g in SWAP_GROUPS}
        print("golf_jax forward: compiled reference's weights with one group from the eager reference's, minus: "
              + ", ".join(f"{g} {v:+.5f}" for g, v in report["golf_forward_at_eager_vs_compiled"].items()),
              flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "first_step.json").write_text(json.dumps(report, indent=1))
        np.savez_compressed(args.out / "tables.npz", **{k: np.asarray(v, np.uint16) for k, v in tables_out.items()})
    print(f"golf done, {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("ref", "golf", "refeval"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/first_step"), help="ref, refeval: its folder")
    ap.add_argument("--refs", type=Path, nargs="*", default=None,
                    help="golf: the reference folders, in order (default --work; none: `--refs` alone)")
    ap.add_argument("--no-train-step", action="store_true",
                    help="golf: the step as its optimizer on its raw gradients, without compiling the training step")
    ap.add_argument("--save-p1", type=Path, default=None, help="golf: save its step-1 weights (reference names)")
    ap.add_argument("--eval-p1", type=Path, default=None,
                    help="golf: wait for such a file and evaluate this forward at those weights")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile", action="store_true", help="torch.compile the reference (ref, refeval)")
    ap.add_argument("--eval-golf", action="store_true", help="ref: then wait for golf.npz and evaluate it")
    ap.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the other side's file")
    ap.add_argument("--golf-opt", action="append", default=[],
                    help="golf: a config override section.key=value (optimizer.adam_eps=1e-8, ...)")
    ap.add_argument("--no-share", action="store_true", help="golf: write no golf.npz into the reference folders")
    ap.add_argument("--out", type=Path, default=None, help="golf: where first_step.json and tables.npz go")
    ap.add_argument("--seqs", type=int, default=48, help="sequences per micro-batch (the record's 48)")
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    if args.phase != "golf":
        args.work.mkdir(parents=True, exist_ok=True)
    if args.phase == "golf" and args.refs is None:
        args.refs = [args.work]
    return {"ref": cmd_ref, "golf": cmd_golf, "refeval": cmd_refeval}[args.phase](args)


if __name__ == "__main__":
    raise SystemExit(main())
