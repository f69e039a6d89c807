"""One full optimizer step of the record's training, golf_jax against the
PyTorch reference, from the same weights and the same batch: which parameter
tensors move differently? (docs/fidelity.md, "first-step gap".)

The reference side is the reference's own classes (train_gpt.py imported as a
module) with its optimizers built as its main() builds them: AdamW (fused)
for the three tables at TIED_EMBED_LR, AdamW (fused) for the scalars and small
matrices at SCALAR_LR, Muon for the banks; loss * (1/8) backward per
micro-batch, the Muon momentum of step 0 (the warm-up's start), lr = base *
lr_mul, clip_grad_norm_(0.3), then tok, scalar, Muon. The golf_jax side is its
real step: train_step.make_train_step with optim.build_optimizer.

    python scripts/first_step_probe.py --dtype float32 --size tiny
    python scripts/first_step_probe.py --dtype bfloat16 --size tiny
    python scripts/first_step_probe.py --dtype bfloat16 --size record --seqs 2 --seq-len 256

--dtype float32: everything float32 on both sides (the reference's Muon too:
its bf16 casts become float32 inside Muon.step; golf_jax muon dtypes float32).
--dtype bfloat16: as the record trains (bf16 tables, bf16 autocast on the CPU,
golf_jax compute_dtype=bfloat16). Prints, per tensor, ||d_golf - d_ref|| /
||d_ref|| of the update d = p1 - p0, and the relative gap of their norms.
`--save FILE` keeps both sides' p0, p1 (reference names, float32).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
from reference_setup import cast_as_main

SHARED = Path(os.environ.get("GOLF_JAX_SHARED", ".shared"))
# The full fixture set is in ../shared (the checkout's .shared carries only what the device needs).
FIX = next((d for d in (Path(os.environ.get("GOLF_JAX_FIXTURES", "")), SHARED / "fixtures/reference",
                        Path("../shared/fixtures/reference")) if (d / "model_tiny_config.json").exists()),
           SHARED / "fixtures/reference")
SHARD = SHARED / "data/tinyshakespeare_sp1024/fineweb_train_000000.bin"
REFERENCE = SHARED / "reference/record_1019"
ACCUM = 8


def bf16_round(x: np.ndarray) -> np.ndarray:
    bits = np.asarray(x, np.float32).view(np.uint32)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return np.asarray(bits, np.uint32).view(np.float32).reshape(np.shape(x))


def model_kwargs(size: str) -> dict:
    if size == "tiny":
        return json.loads((FIX / "model_tiny_config.json").read_text())
    return dict(vocab_size=1024, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
                tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
                qk_gain_init=1.5, bigram_vocab_size=3072, bigram_dim=112, xsa_last_n=11, rope_dims=16,
                ln_scale=True, ve_enabled=True, ve_dim=128, ve_layers="9,10")


def initial_state(size: str, noise: float) -> dict[str, np.ndarray]:
    """Reference name -> float32 weights, bf16-representable (so both dtypes start equal).
    tiny: the fixture's random weights; record: the seed-314 init (+ optional noise)."""
    out = {}
    if size == "tiny":
        with np.load(FIX / "model_tiny.npz") as z:
            for k in z.files:
                if k.startswith("param/"):
                    out[k[6:]] = bf16_round(z[k].astype(np.float32))
    else:
        rng = np.random.default_rng(1)
        with np.load(FIX / "record_init_seed314_bf16bits.npz") as z:
            for k in sorted(z.files):
                w = (z[k].astype(np.uint32) << 16).view(np.float32)
                if noise:
                    w = w + noise * rng.standard_normal(w.shape).astype(np.float32)
                out[k.removeprefix("param/")] = bf16_round(w)
    return out


def batch(seqs: int, seq_len: int, step: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Step `step`'s ACCUM micro-batches of `seqs` sequences, in the reference loader's
    order (one contiguous span of seqs * seq_len + 1 tokens per micro-batch), [ACCUM, seqs, seq_len]."""
    n = ACCUM * seqs * seq_len
    shard = np.fromfile(SHARD, dtype="<u2", offset=256 * 4).astype(np.int64)
    # The reference's TokenStream wraps around to the shard's start (tinyshakespeare's one shard
    # holds 434,375 tokens, less than one 786,432-token step).
    tokens = shard[(step * (n + ACCUM) + np.arange(n + ACCUM)) % shard.size]
    xs, ys = [], []
    for m in range(ACCUM):
        local = tokens[m * (seqs * seq_len + 1): (m + 1) * (seqs * seq_len + 1)]
        xs.append(local[:-1].reshape(seqs, seq_len))
        ys.append(local[1:].reshape(seqs, seq_len))
    return np.stack(xs), np.stack(ys)


# ----------------------------------------------------------------------------- the reference

@contextlib.contextmanager
def bf16_casts_as_float32(torch):
    """Inside Muon.step: Tensor.bfloat16() returns float32 (the fixture's after*_fp32 did the same)."""
    orig = torch.Tensor.bfloat16
    torch.Tensor.bfloat16 = lambda self, *a, **k: self.float()
    try:
        yield
    finally:
        torch.Tensor.bfloat16 = orig


def reference_step(state, kw, xs, ys, dtype: str, args, device: str = "cpu", compile: bool = False):
    """One step of the reference from `state` on ACCUM micro-batches: (p0, p1, raw gradients,
    clipped gradients, info, the module, the model it trains: compiled or the module)."""
    os.environ.update(BIGRAM_VOCAB_SIZE=str(kw["bigram_vocab_size"]), BIGRAM_DIM=str(kw["bigram_dim"]))
    sys.path.insert(0, str(REFERENCE))
    import torch

    import train_gpt as R

    torch.manual_seed(0)
    H = R.Hyperparameters()
    R.CastedLinear._qat_enabled = False
    m = R.GPT(**kw, mtp_num_heads=0, mtp_loss_weight=0.1, dtg=False, gated_attention=False, value_residual=False)
    m = m.to(device)
    if dtype == "bfloat16":  # as main() builds it
        m = cast_as_main(R, m)
    named = dict(m.named_parameters())
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(torch.from_numpy(state[k]).to(device=device, dtype=p.dtype).reshape(p.shape))
    dtypes = {k: str(p.dtype).removeprefix("torch.") for k, p in named.items()}
    p0 = {k: p.detach().float().cpu().numpy().copy() for k, p in named.items()}

    # ---- the optimizers, as main() builds them
    matrix_params = [m.qo_bank, m.kv_bank, m.mlp_up_bank, m.mlp_down_bank]
    scalar_params = [p for name, p in m.blocks.named_parameters()
                     if p.ndim < 2 or any(pat in name for pat in R.CONTROL_TENSOR_NAME_PATTERNS)]
    if m.skip_weights.numel() > 0:
        scalar_params.append(m.skip_weights)
    scalar_params.append(m.smear.gate)
    if m.bigram is not None:
        scalar_params.append(m.bigram.scale)
    token_lr = H.tied_embed_lr
    tok_params = [{"params": [m.tok_emb.weight], "lr": token_lr, "base_lr": token_lr}]
    if m.bigram is not None:
        tok_params.append({"params": [m.bigram.embed.weight], "lr": token_lr, "base_lr": token_lr})
        if m.bigram.proj is not None:
            scalar_params.append(m.bigram.proj.weight)
    if m.ve_shared is not None:
        tok_params.append({"params": [m.ve_shared.embed.weight], "lr": token_lr, "base_lr": token_lr})
        if m.ve_shared.proj is not None:
            scalar_params.append(m.ve_shared.proj.weight)
        scalar_params.append(m.ve_shared.scale)
        for s in m.ve_layer_scales:
            scalar_params.append(s)
    fused = not args.unfused
    opt_tok = torch.optim.AdamW(tok_params, betas=(H.beta1, H.beta2), eps=H.adam_eps, weight_decay=H.adam_wd,
                                fused=fused)
    opt_muon = R.Muon(matrix_params, lr=H.matrix_lr, momentum=H.muon_momentum, backend_steps=H.muon_backend_steps,
                      weight_decay=H.muon_wd)
    for g in opt_muon.param_groups:
        g["base_lr"] = H.matrix_lr
    opt_scalar = torch.optim.AdamW([{"params": scalar_params, "lr": H.scalar_lr, "base_lr": H.scalar_lr}],
                                   betas=(H.beta1, H.beta2), eps=H.adam_eps, weight_decay=H.adam_wd, fused=fused)
    optimizers = [opt_tok, opt_muon, opt_scalar]
    in_opt = {id(p) for o in optimizers for g in o.param_groups for p in g["params"]}
    orphans = [k for k, p in named.items() if id(p) not in in_opt]

    # ---- one step, as the training loop does it (step 0, lr_mul 1)
    model = torch.compile(m, dynamic=False, fullgraph=True) if compile else m
    model.train()
    losses = []
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    for i in range(ACCUM):
        x, y = torch.from_numpy(xs[i]).to(device), torch.from_numpy(ys[i]).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(x, y)
        losses.append(float(loss.detach()))
        (loss * (1.0 / ACCUM)).backward()
    step, scale = 0, 1.0
    frac = min(step / H.muon_momentum_warmup_steps, 1.0)
    for g in opt_muon.param_groups:
        g["momentum"] = (1 - frac) * H.muon_momentum_warmup_start + frac * H.muon_momentum
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * scale
    grads = {k: p.grad.float().cpu().numpy().copy() for k, p in named.items() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(m.parameters(), H.grad_clip_norm)
    clipped = {k: p.grad.float().cpu().numpy().copy() for k, p in named.items() if p.grad is not None}
    opt_muon.launch_reduce_scatters()
    opt_tok.step()
    opt_scalar.step()
    with bf16_casts_as_float32(torch) if dtype == "float32" else contextlib.nullcontext():
        opt_muon.step()
    p1 = {k: p.detach().float().cpu().numpy().copy() for k, p in named.items()}
    info = {"losses": losses, "grad_norm": float(norm), "orphans": orphans, "dtypes": dtypes}
    return p0, p1, grads, clipped, info, m, model


# ----------------------------------------------------------------------------- golf_jax

def golf_step(state, kw, xs, ys, dtype: str, args) -> tuple[dict, dict, dict]:
    import dataclasses

    import jax
    import jax.numpy as jnp

    if dtype == "float32":
        jax.config.update("jax_default_matmul_precision", "highest")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from golf_jax import cli, compat, optim, param_tree, train_step
    from golf_jax.config import ModelConfig

    cfg = cli.load_config_file("configs/record.py")
    mcfg = ModelConfig(**kw, compute_dtype=dtype, embedding_dtype=dtype, attention_impl="jnp", mlp_impl="jnp",
                       round_logits=dtype == "bfloat16")
    ocfg = cfg.optimizer
    if dtype == "float32":
        ocfg = dataclasses.replace(ocfg, muon_momentum_dtype="float32", muon_ns_dtype="float32")
    for o in args.golf_opt:
        k, v = o.split("=", 1)
        ocfg = dataclasses.replace(ocfg, **{k: type(getattr(ocfg, k))(v)})
    seq_len = xs.shape[-1]
    cfg = dataclasses.replace(
        cfg, model=mcfg, optimizer=ocfg,
        data=dataclasses.replace(cfg.data, train_seq_len=seq_len, train_batch_tokens=xs.size,
                                 micro_batches_per_step=ACCUM))
    params = param_tree.cast_params(compat.params_from_reference(state, mcfg, "probe"), mcfg)
    mesh = train_step.make_mesh(1)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    st = train_step.init_state(params, tx, mesh, False)
    fn = train_step.make_train_step(cfg, mesh, tx, st)
    p0 = {k: np.asarray(v, np.float32) for k, v in compat.params_to_reference(st.params, mcfg).items()}
    dtypes = {k: str(v.dtype) for k, v in compat.params_to_reference(st.params, mcfg).items()}
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, train_step.AXIS))
    x, y = (jax.device_put(jnp.asarray(a, jnp.int32), sh) for a in (xs, ys))
    params0 = st.params
    # The optimizer alone, on the reference's own gradients (as accumulated, each in its
    # parameter's dtype), applied as train_step applies it: isolates the update from the gradients.
    # --opt-from-clipped: the reference's gradients after its clip, golf_jax's clip off.
    chosen = args.ref_clipped if args.opt_from_clipped else args.ref_grads
    ref_grads = compat.params_from_reference({k: np.asarray(v, np.float32) for k, v in chosen.items()}, mcfg,
                                             "reference grads")
    ref_grads = jax.tree.map(lambda g, p: g.astype(p.dtype), ref_grads, params0)
    tx1 = optim.build_optimizer(dataclasses.replace(cfg.optimizer, grad_clip_norm=1e30) if args.opt_from_clipped
                                else cfg.optimizer, None)

    @jax.jit
    def opt_only(params, grads):
        updates, _ = tx1.update(grads, tx1.init(params), params)
        return jax.tree.map(lambda p, u: (p.astype(jnp.float32) + u.astype(jnp.float32)).astype(p.dtype),
                            params, updates)

    q1 = {k: np.asarray(v, np.float32) for k, v in compat.params_to_reference(opt_only(params0, ref_grads),
                                                                                mcfg).items()}
    st, loss = fn(st, x, y, 1.0, False, False)
    p1 = {k: np.asarray(v, np.float32) for k, v in compat.params_to_reference(st.params, mcfg).items()}
    return p0, p1, {"loss": float(loss), "dtypes": dtypes, "opt_only": q1}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--size", choices=("tiny", "record"), default="tiny")
    ap.add_argument("--seqs", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--noise", type=float, default=0.0, help="record size: N(0, noise) added to the init")
    ap.add_argument("--unfused", action="store_true", help="reference AdamW fused=False (foreach)")
    ap.add_argument("--golf-opt", action="append", default=[], help="optimizer override key=value")
    ap.add_argument("--opt-from-clipped", action="store_true",
                    help="'opt' column: golf_jax's optimizer on the reference's clipped gradients, its own clip off")
    ap.add_argument("--save", default="")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    kw = model_kwargs(args.size)
    state = initial_state(args.size, args.noise)
    xs, ys = batch(args.seqs, args.seq_len)
    r0, r1, rgrad, rclip, rinfo, _, _ = reference_step(state, kw, xs, ys, args.dtype, args)
    args.ref_grads, args.ref_clipped = rgrad, rclip
    g0, g1, ginfo = golf_step(state, kw, xs, ys, args.dtype, args)
    q1 = ginfo["opt_only"]
    print(f"reference: loss {np.mean(rinfo['losses']):.6f}, grad norm {rinfo['grad_norm']:.6f}, "
          f"clip coef {min(1.0, 0.3 / (rinfo['grad_norm'] + 1e-6)):.6f}, params in no optimizer: {rinfo['orphans']}")
    print(f"golf_jax:  loss {ginfo['loss']:.6f}")
    print("\nd = p1 - p0. 'step': golf_jax's whole step; 'opt': golf_jax's optimizer on the reference's gradients.")
    print("\n| tensor | dtype ref/golf | p0 equal | step: ||d_golf - d_ref||/||d_ref|| "
          "| step: ||d_golf||/||d_ref|| - 1 | opt: ||d_golf - d_ref||/||d_ref|| | opt: ||d_golf||/||d_ref|| - 1 "
          "| ||d_ref|| |")
    print("|---|---|---|---|---|---|---|---|")
    key = lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)]  # noqa: E731
    for k in sorted(r0, key=key):
        dr, dg = r1[k] - r0[k], g1[k] - g0[k]
        nr = np.linalg.norm(dr.astype(np.float64))
        ratio = np.linalg.norm(dg.astype(np.float64)) / max(nr, 1e-30) - 1
        dq = q1[k] - g0[k]
        qratio = np.linalg.norm(dq.astype(np.float64)) / max(nr, 1e-30) - 1
        print(f"| {k} | {rinfo['dtypes'][k]}/{ginfo['dtypes'][k]} | {np.array_equal(r0[k], g0[k])} | "
              f"{rel(dg, dr):.3e} | {ratio:+.3e} | {rel(dq, dr):.3e} | {qratio:+.3e} | {nr:.4e} |")
    if args.save:
        np.savez(args.save, **{f"ref0/{k}": v for k, v in r0.items()}, **{f"ref1/{k}": v for k, v in r1.items()},
                 **{f"golf0/{k}": v for k, v in g0.items()}, **{f"golf1/{k}": v for k, v in g1.items()},
                 **{f"golfopt1/{k}": v for k, v in q1.items()},
                 **{f"refgrad/{k}": v for k, v in rgrad.items()}, **{f"refclip/{k}": v for k, v in rclip.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
