"""Benchmarks of the record-size model on the local accelerator: one command,
fit for one device call. Each section warms up (the first call's time,
compilation included, is reported separately), then reports the median of
repeats, synchronising on the result.

    python -m golf_jax.tools.bench [--config configs/record.py] [--sections eval,grad,...] [--out DIR]

Sections:
  eval       sliding-window evaluation batches (windows of eval_seq_len, stride
             sliding_stride): forward tokens/s and scored tokens/s.
  grad       loss + gradient of one training micro-batch (the reference's 48 x 2048
             per GPU): tokens/s, MFU against the measured bf16 matmul rate, peak memory.
             The optimizer update is not in it: an upper bound on a training step.
  train      the real optimizer step (golf_jax.train: accumulation, Parallel Muon, AdamW,
             EMA) with all micro-batches and with one, and the host time of the data feed.
  attention  causal GQA attention alone: cuDNN, the Pallas Triton and Mosaic GPU kernels, the
             jnp path; forward and forward+backward.
  fusions    the Pallas kernels of model.fusion_impl (q/k norm+RoPE, residual mix+norm, XSA,
             softcap + cross-entropy)
             alone, forward+backward, Pallas vs jnp.
  mlp        the MLP alone at a micro-step's shape (rows x model_dim x mlp_dim): the fused
             Triton kernels vs the jnp path, forward (inference) and forward+backward.
  after      the stages after training, each run twice (the first compiles): AR
             self-generation of calib_num_seqs x calib_seq_len tokens with the KV cache,
             Hessian collection over them, GPTQ of every bank matrix with the
             int8/passthrough of the rest, and the LZMA serialisation of the result.
  ttt        score-first test-time training over --ttt-chunks chunks of train text
             (scoring + ttt.epochs passes per chunk), projected to FineWeb's validation set.
  profile    jax.profiler traces of the loss+grad micro-step and of the whole optimizer
             step, summarised per kernel and per category (matmul, attention, XLA fusion,
             ...), each kernel with the model source lines of the HLO ops it runs; the
             perfetto traces stay under OUT/traces.

With the fused MLP kernels on (the default on GPUs), eval and grad are also
timed with model.mlp_impl="jnp" (the config field), for the comparison; with
the Pallas kernels of model.fusion_impl off (the default), grad is also timed
with them on ("auto").

About 570 lines, over the ~450 the project aims for: one command whose
sections share the setup, the timing helper and the report; tooling, outside
the code counted in the artifact budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import (artifact, attention, cli, data, datasets, evaluate, generate, layers, model, optim, param_tree,
                      quant, runlog, train_step)
from golf_jax.hessians import collect_hessians
from golf_jax.tools import profiling
from golf_jax.config import ModelConfig

# bf16 dense matmul rate measured on the device's H100 (8192^3, JAX 0.11.2);
# see ../shared/notes/reference_numbers.md.
H100_MATMUL_TFLOPS = 781.0


def time_call(fn: Callable, *args, warmup: int = 2, repeats: int = 10) -> dict:
    """First call (compilation included), then the median of `repeats` calls."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(times), "min_s": min(times)}


def matmul_flops_per_token(cfg: ModelConfig, seq_len: int) -> tuple[float, float]:
    """Forward FLOPs per token: (dense matmuls incl. the tied head, causal attention)."""
    d, L, kv, hid = cfg.model_dim, cfg.num_layers, cfg.kv_dim, cfg.mlp_dim
    dense = L * (2 * d * d + 2 * kv * d + 2 * hid * d) + cfg.vocab_size * d
    if cfg.bigram_enabled:
        dense += cfg.bigram_dim * d
    if cfg.ve_layer_indices:
        dense += cfg.ve_dim * kv
    # QK^T and PV, each 2 d T per token, halved by the causal mask.
    attn = L * 2 * d * seq_len
    return 2.0 * dense, float(attn)


def random_tokens(shape, vocab: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def text_tokens(cfg, shape, seed: int = 0) -> jax.Array:
    """Tokens of real text (the config's train shards) when they can be found,
    else uniform random ones. Real text matters: its skewed token frequencies
    make the embedding gradients' scatter-adds collide, uniform ids do not."""
    try:
        ds = datasets.resolve_dataset(cfg.data.data_dir, cfg.data.tokenizer_path, cfg.data.train_pattern,
                                  cfg.data.val_pattern, cfg.model.vocab_size, cfg.data.text_transform)
        stream = data.TokenStream(ds.train_pattern, cfg.model.vocab_size)
    except data.DataError:
        return random_tokens(shape, cfg.model.vocab_size, seed)
    stream.take(seed * 9973)
    return jnp.asarray(stream.take(int(np.prod(shape))).reshape(shape))


def bench_eval(params, cfg, tokens_fn, seq_len: int, stride: int, batch_windows: int, repeats: int) -> dict:
    n_tokens = 4 * seq_len + 1
    tokens = tokens_fn((n_tokens + seq_len,))
    starts = (jnp.arange(batch_windows) * stride) % (n_tokens - seq_len)
    lo = jnp.full((batch_windows,), seq_len - stride, jnp.int32)
    hi = jnp.full((batch_windows,), seq_len, jnp.int32)
    # A steady-state sliding batch: every window scores its last `stride`
    # positions, so the evaluation runs its logits-for-those-only program.
    span = evaluate.span_for(np.asarray(lo), np.asarray(hi), stride)
    r = time_call(evaluate.window_loss_sums, params, cfg.model, tokens, starts, lo, hi, seq_len, span, repeats=repeats)
    dense, attn = matmul_flops_per_token(cfg.model, seq_len)
    fwd_tokens = batch_windows * seq_len
    r.update(forward_tokens_per_s=fwd_tokens / r["median_s"], scored_tokens_per_s=batch_windows * stride / r["median_s"],
             tflops=fwd_tokens * (dense + attn) / r["median_s"] / 1e12, shape=[batch_windows, seq_len])
    return r


def perturbed_params(cfg):
    """The config's initial weights, each perturbed: a freshly initialised model
    has zero out-projections, and timed arithmetic should be on non-trivial values."""
    params = model.init_params(cfg.model, jax.random.key(cfg.run.seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [x + (0.02 * jax.random.normal(k, x.shape)).astype(x.dtype)
                                        for x, k in zip(leaves, keys)])


def with_model(cfg, **fields):
    """cfg with some model fields changed."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **fields))


def bench_mlp(cfg: ModelConfig, rows: int, repeats: int) -> dict:
    """The MLP alone on `rows` x model_dim bf16 activations: forward (inference:
    no pre-activation saved) and loss+gradient of all three inputs, for the
    jnp path and, on GPUs with jax-triton, the fused kernels."""
    from kernels import mlp as mlp_kernels

    K, N, slope = cfg.model_dim, cfg.mlp_dim, cfg.mlp_negative_slope
    keys = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(keys[0], (rows, K), jnp.bfloat16)
    w_up = (jax.random.normal(keys[1], (N, K)) * K ** -0.5).astype(jnp.bfloat16)
    w_down = (jax.random.normal(keys[2], (K, N)) * N ** -0.5).astype(jnp.bfloat16)
    dy = jax.random.normal(keys[3], (rows, K), jnp.bfloat16)
    flops = 2 * 2 * rows * K * N  # two GEMMs forward; the backward is twice that
    out: dict = {"shape": [rows, K, N]}
    impls = ["jnp"] + (["triton"] if mlp_kernels.triton_available() else [])
    outputs = {}
    for impl in impls:
        fwd = jax.jit(lambda x, u, d, impl=impl: mlp_kernels.mlp(x, u, d, slope, impl))
        outputs[impl] = np.asarray(fwd(x, w_up, w_down), np.float32)
        grad = jax.jit(jax.grad(lambda x, u, d, impl=impl: jnp.sum(
            (mlp_kernels.mlp(x, u, d, slope, impl) * dy).astype(jnp.float32)), argnums=(0, 1, 2)))
        r = {"forward": time_call(fwd, x, w_up, w_down, repeats=repeats),
             "forward_backward": time_call(grad, x, w_up, w_down, repeats=repeats)}
        r["forward"]["tflops"] = flops / r["forward"]["median_s"] / 1e12
        r["forward_backward"]["tflops"] = 3 * flops / r["forward_backward"]["median_s"] / 1e12
        out[impl] = r
    if "triton" in outputs:
        a, b = outputs["triton"], outputs["jnp"]
        out["triton_vs_jnp_rel_err"] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    return out


def bench_grad(params, cfg, tokens_fn, batch_seqs: int, seq_len: int, repeats: int) -> dict:
    x = tokens_fn((batch_seqs, seq_len), 1)
    y = tokens_fn((batch_seqs, seq_len), 2)
    step = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)
    r = time_call(step, params, cfg.model, x, y, repeats=repeats)
    dense, attn = matmul_flops_per_token(cfg.model, seq_len)
    tokens = batch_seqs * seq_len
    tflops = 3 * tokens * (dense + attn) / r["median_s"] / 1e12
    r.update(tokens_per_s=tokens / r["median_s"], tflops=tflops, mfu=tflops / H100_MATMUL_TFLOPS,
             peak_memory_bytes=runlog.peak_memory_bytes(), shape=[batch_seqs, seq_len])
    return r


def bench_train_step(params, cfg, tokens_fn, micro_batches: int, repeats: int) -> dict:
    """The real optimizer step (golf_jax.train) on one device: `micro_batches`
    accumulation steps of train_batch_tokens / micro_batches_per_step tokens."""
    per_micro = cfg.data.train_batch_tokens // cfg.data.micro_batches_per_step
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, micro_batches_per_step=micro_batches, train_batch_tokens=per_micro * micro_batches),
        run=dataclasses.replace(cfg.run, num_devices=1))
    mesh = train_step.make_mesh(1)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    state = train_step.init_state(params, tx, mesh, cfg.schedule.swa_enabled)
    step = train_step.make_train_step(cfg, mesh, tx, state)
    seqs = per_micro // cfg.data.train_seq_len
    xs = tokens_fn((micro_batches, seqs, cfg.data.train_seq_len), 4)
    ys = tokens_fn((micro_batches, seqs, cfg.data.train_seq_len), 5)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, train_step.AXIS))
    xs, ys = jax.device_put(xs, batch_sharding), jax.device_put(ys, batch_sharding)
    box = [state]

    def run():
        box[0], loss = step(box[0], xs, ys, 1.0, False, False)
        return loss

    r = time_call(run, repeats=repeats)
    tokens = micro_batches * per_micro
    dense, attn = matmul_flops_per_token(cfg.model, cfg.data.train_seq_len)
    tflops = 3 * tokens * (dense + attn) / r["median_s"] / 1e12  # the model's FLOPs; the optimizer's are ~1%
    r.update(tokens_per_s=tokens / r["median_s"], micro_batches=micro_batches, tflops=tflops,
             mfu=tflops / H100_MATMUL_TFLOPS, peak_memory_bytes=runlog.peak_memory_bytes())
    return r


def bench_data_feed(cfg, repeats: int) -> dict | None:
    """Host time to assemble one optimizer step's batch from the shards (None without data)."""
    try:
        ds = datasets.resolve_dataset(cfg.data.data_dir, cfg.data.tokenizer_path, cfg.data.train_pattern,
                                  cfg.data.val_pattern, cfg.model.vocab_size, cfg.data.text_transform)
        batches = data.TrainBatches(ds.train_pattern, cfg.model.vocab_size, cfg.data.train_batch_tokens,
                                    cfg.data.train_seq_len, 1, cfg.data.micro_batches_per_step)
    except data.DataError:
        return None
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(cfg.data.micro_batches_per_step):
            batches.next_micro_batch()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times)}


def mgpu_attention(q, k, v):
    """JAX's Mosaic GPU (FA3-style, Hopper) flash attention, causal; for the
    attention section's comparison only (its causal backward may be missing)."""
    from jax.experimental.pallas.ops.gpu import attention_mgpu
    blocks = dict(block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
    config = attention_mgpu.TuningConfig(block_q=64, block_kv=64, max_concurrent_steps=2, causal=True, **blocks)
    return attention_mgpu.attention(q, k, v, config)


def bench_attention(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict:
    """Causal GQA attention alone at a micro-batch's shape: cuDNN, JAX's Pallas
    Triton kernel, its Mosaic GPU (Hopper) kernel and the jnp path, forward and
    forward+backward, each checked against the jnp path's forward."""
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (batch, seq_len, H, D), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq_len, K, D), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq_len, K, D), jnp.bfloat16)
    impls = {name: (lambda q, k, v, name=name: attention.causal_attention(q, k, v, name)) for name in ("cudnn", "pallas", "jnp")}
    impls["mgpu"] = mgpu_attention
    on_gpu = jax.default_backend() == "gpu"
    expected = np.asarray(jax.jit(impls["jnp"])(q, k, v), np.float32)
    out = {"shape": [batch, seq_len, H, K, D]}
    for name, fn in impls.items():
        if name != "jnp" and not on_gpu:
            continue
        r = {}
        fwd = jax.jit(fn)
        grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        for kind, call in (("forward", fwd), ("forward_backward", grad)):
            try:
                r[kind] = time_call(call, q, k, v, repeats=repeats)
            except Exception as e:  # a kernel that does not support this case: report, go on
                r[kind] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        if "median_s" in r["forward"]:
            got = np.asarray(fwd(q, k, v), np.float32)
            r["rel_err_vs_jnp"] = float(np.linalg.norm(got - expected) / np.linalg.norm(expected))
        out[name] = r
    return out


FUSIONS = ("q", "k", "mix", "xsa", "ce")  # the cases of `fusion_cases`


def fusion_cases(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
    """The uses of the Pallas kernels of model.fusion_impl in a layer, at
    [batch, seq_len] in the compute dtype: name -> (kernel module, impl -> a
    function of the operands, the operands, the model's own jnp path when it
    is not the module's reference). "q": queries' norm + RoPE + q_gain; "k":
    keys' norm + RoPE; "mix": a residual mix with the norm after it; "xsa";
    "ce": the head's softcap and cross-entropy from its bf16 pre-softcap
    logits [batch * seq_len, vocab] (the targets fixed, inside the function)."""
    from kernels import qk_norm_rope, residual_norm, softcap_ce, xsa

    H, K, D, d, R = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.model_dim, cfg.rotary_dims
    dtype = layers.compute_dtype(cfg)
    keys = iter(jax.random.split(jax.random.key(7), 10))
    def normal(*shape, scale=1.0, mean=0.0):
        return (mean + scale * jax.random.normal(next(keys), shape)).astype(dtype)
    cos, sin = layers.rotary_tables(cfg, jnp.arange(seq_len), layers.rotary_base(cfg, seq_len))

    def model_mix(a, b, scale_a, scale_b):
        mixed = layers.scaled_sum([(scale_a, a), (scale_b, b)], True)
        return mixed, layers.rms_norm(mixed, 0.5)
    V, cap = cfg.vocab_size, cfg.logit_softcap
    targets = jax.random.randint(jax.random.key(8), (batch * seq_len,), 0, V)  # keys: the other operands' as before

    def model_ce(z):  # the model's path: lm_head's softcap on the float32 logits, then nll_from_logits
        return model.nll_from_logits(layers.softcap(z.astype(jnp.float32), cap), targets)
    return {
        "q": (qk_norm_rope, lambda impl: lambda q, g: qk_norm_rope.norm_rope(q, cos, sin, g, R, impl),
              (normal(batch, seq_len, H, D), normal(H, mean=1.5)), None),
        "k": (qk_norm_rope, lambda impl: lambda k: qk_norm_rope.norm_rope(k, cos, sin, None, R, impl),
              (normal(batch, seq_len, K, D),), None),
        "mix": (residual_norm, lambda impl: lambda a, b, sa, sb: residual_norm.add_norm(a, b, sa, sb, 0.5, impl),
                (normal(batch, seq_len, d), normal(batch, seq_len, d), normal(d, scale=0.2, mean=1.0),
                 normal(d, scale=0.5)), model_mix),
        "xsa": (xsa, lambda impl: lambda y, v: xsa.xsa(y, v, impl),
                (normal(batch, seq_len, H, D), normal(batch, seq_len, K, D)), None),
        "ce": (softcap_ce, lambda impl: lambda z: softcap_ce.softcap_nll(z, targets, cap, impl),
               (normal(batch * seq_len, V, scale=8.0),), model_ce),
    }


def bench_fusions(cfg: ModelConfig, batch: int, seq_len: int, repeats: int) -> dict:
    """Each use of the Pallas kernels (`fusion_cases`) alone, forward+backward,
    Pallas vs the module's jnp reference, with the norm-relative difference of
    their outputs."""
    out = {}
    for name, (_, fn, args, _) in fusion_cases(cfg, batch, seq_len).items():
        r = {}
        outputs = {}
        for impl in ("pallas", "jnp"):
            loss = lambda *xs, impl=impl: sum(  # noqa: E731
                jnp.sum(t.astype(jnp.float32)) for t in jax.tree.leaves(fn(impl)(*xs)))
            r[impl] = time_call(jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))), *args,
                                repeats=repeats)
            outputs[impl] = np.concatenate([np.asarray(t, np.float32).ravel()
                                            for t in jax.tree.leaves(jax.jit(fn(impl))(*args))])
        r["rel_err"] = float(np.linalg.norm(outputs["pallas"] - outputs["jnp"]) / np.linalg.norm(outputs["jnp"]))
        out[name] = r
    return out


def bench_after_training(params, cfg) -> dict:
    """Each stage after training twice: (first call incl. compilation, second)."""
    q = cfg.quant
    out: dict = {"calibration_shape": [q.calib_num_seqs, q.calib_seq_len], "calib_batch_size": q.calib_batch_size}

    def twice(name, fn):
        runs = []
        for _ in range(2):
            t0 = time.perf_counter()
            result = jax.block_until_ready(fn())
            runs.append(time.perf_counter() - t0)
        out[name] = {"first_call_s": runs[0], "second_call_s": runs[1]}
        return result

    calib = twice("generate", lambda: generate.calibration_tokens(params, cfg))
    out["generate"]["tokens_per_s"] = calib.size / out["generate"]["second_call_s"]
    hessians = twice("hessians", lambda: collect_hessians(params, cfg.model, calib, q.calib_batch_size))
    qmodel, report = twice("gptq", lambda: quant.quantize_params(params, cfg.model, hessians, q))
    out["gptq"]["bank_matrices"] = sum(int(np.prod(t.data.shape[:-2])) for t in qmodel.values()
                                       if t.kind == quant.INT6)
    out["gptq"]["fallbacks"] = sorted(k for k, v in report.get("matrices", {}).items() if v.get("fallback"))
    t0 = time.perf_counter()
    blob = artifact.serialize(qmodel, {}, q.lzma_preset)
    out["serialize"] = {"s": time.perf_counter() - t0, "bytes": len(blob), "code_bytes": artifact.code_bytes()}
    return out


def bench_profile(params, cfg, tokens_fn, batch_seqs: int, out_dir: Path) -> dict:
    """Where a training micro-step's device time goes: loss + gradient of one
    micro-batch on one device, and the whole optimizer step (accumulation,
    Parallel Muon's collectives, AdamW, EMA) on every local device, or on
    run.num_devices of them."""
    x = tokens_fn((batch_seqs, cfg.data.train_seq_len), 1)
    y = tokens_fn((batch_seqs, cfg.data.train_seq_len), 2)
    grad = jax.jit(jax.value_and_grad(model.loss), static_argnums=1)
    hlo = grad.lower(params, cfg.model, x, y).compile().as_text()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "grad_optimized_hlo.txt").write_text(hlo)
    out = {"grad": profiling.profile_call(lambda: grad(params, cfg.model, x, y), out_dir / "grad", hlo_text=hlo)}
    out["grad"]["fusion_traffic"] = profiling.fusion_traffic(out["grad"]["kernels"], profiling.hlo_fusion_bytes(hlo))
    step, state, xs, ys = optimizer_step(params, cfg, tokens_fn)
    box = [state]

    def run():
        box[0], loss = step(box[0], xs, ys, 1.0, False, False)
        return loss

    out["train_step"] = profiling.profile_call(run, out_dir / "train_step", repeats=1)
    return out


def optimizer_step(params, cfg, tokens_fn):
    """The training step (golf_jax.train) on every local device, or on
    run.num_devices of them, with its state and one step's batch
    [accumulation steps, sequences of one micro-step over all devices, T]:
    (step, state, xs, ys)."""
    mesh = train_step.make_mesh(cfg.run.num_devices)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    state = train_step.init_state(params, tx, mesh, cfg.schedule.swa_enabled)
    step = train_step.make_train_step(cfg, mesh, tx, state)
    d = cfg.data
    shape = (d.micro_batches_per_step // mesh.size,
             d.train_batch_tokens // d.micro_batches_per_step // d.train_seq_len * mesh.size, d.train_seq_len)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, train_step.AXIS))
    xs, ys = (jax.device_put(tokens_fn(shape, s), sharding) for s in (4, 5))
    return step, state, xs, ys


# The competition's validation set (fineweb_val_*.bin of the sp1024 export).
FINEWEB_VAL_TOKENS = 62_021_846


def bench_ttt(params, cfg, chunks: int) -> dict | None:
    """Score-first TTT over `chunks` chunks of the config's train text (the
    validation text of the embedded data is too short for a timing): one
    chunk first (compilation), then `chunks`; the per-chunk time projected
    to the full FineWeb validation set. None without data."""
    from golf_jax import ttt

    try:
        ds = datasets.resolve_dataset(cfg.data.data_dir, cfg.data.tokenizer_path, cfg.data.train_pattern,
                                  cfg.data.val_pattern, cfg.model.vocab_size, cfg.data.text_transform)
        tables = data.byte_tables(data.load_tokenizer(ds.tokenizer, cfg.model.vocab_size), cfg.model.vocab_size)
        stream = data.TokenStream(ds.train_pattern, cfg.model.vocab_size)
    except data.DataError:
        return None
    C = cfg.ttt.chunk_tokens
    tokens = stream.take(chunks * C + 1).astype(np.int32)
    t0 = time.perf_counter()
    ttt.run(params, cfg, tokens, tables, progress=False, max_chunks=1)
    first = time.perf_counter() - t0
    r = ttt.run(params, cfg, tokens, tables, progress=False)
    # The last chunk is scored only; time per trained chunk from the others.
    per_chunk = r.seconds / chunks
    full_chunks = -(-(FINEWEB_VAL_TOKENS - 1) // C)
    return {"chunks": chunks, "chunk_tokens": C, "devices": cfg.run.num_devices or jax.device_count(),
            "first_chunk_s": first, "seconds": r.seconds, "score_s": r.score_s, "train_s": r.train_s,
            "train_steps": r.train_steps, "per_chunk_s": per_chunk, "fineweb_val_chunks": full_chunks,
            "projected_fineweb_val_s": per_chunk * full_chunks, "bpb": r.bpb}


def print_table(results: dict) -> None:
    """The figures of every section run, one line each."""
    print(f"\n{results['device']} ({results['backend']}, jax {results['jax']}), {results['parameters']:,} params, "
          f"compute {results['compute_dtype']}, attention {results['attention_impl']}, MLP {results['mlp_impl']}")
    print(f"{'measure':<44}{'median':>12}{'first call':>12}  rate")
    for key, note in (("eval", ""), ("eval_jnp_mlp", " (jnp MLP)")):
        if key in results:
            r = results[key]
            print(f"{'sliding eval batch ' + 'x'.join(map(str, r['shape'])) + note:<44}{r['median_s'] * 1e3:>10.2f}ms"
                  f"{r['first_call_s']:>11.1f}s  {r['forward_tokens_per_s'] / 1e6:.2f} M fwd tok/s, "
                  f"{r['scored_tokens_per_s'] / 1e6:.3f} M scored tok/s, {r['tflops']:.0f} TFLOP/s")
    for key, note in (("grad", ""), ("grad_jnp_mlp", " (jnp MLP)"), ("grad_fused", " (fusion_impl auto)")):
        if key in results:
            r = results[key]
            mem = r["peak_memory_bytes"]
            print(f"{'loss+grad micro-batch ' + 'x'.join(map(str, r['shape'])) + note:<44}{r['median_s'] * 1e3:>10.2f}ms"
                  f"{r['first_call_s']:>11.1f}s  {r['tokens_per_s'] / 1e6:.3f} M tok/s, {r['tflops']:.0f} TFLOP/s, "
                  f"MFU {r['mfu']:.1%}" + (f", peak {mem / 2**30:.1f} GiB" if mem else ""))
    for key in ("train", "train_one_micro"):
        if key in results:
            r = results[key]
            print(f"{'train step, ' + str(r['micro_batches']) + ' micro-batches':<44}{r['median_s'] * 1e3:>10.2f}ms"
                  f"{r['first_call_s']:>11.1f}s  {r['tokens_per_s'] / 1e6:.3f} M tok/s, MFU {r['mfu']:.1%}, "
                  f"peak {r['peak_memory_bytes'] / 2**30 if r['peak_memory_bytes'] else float('nan'):.1f} GiB")
    if results.get("data_feed"):
        print(f"{'data feed, one step (host)':<44}{results['data_feed']['median_s'] * 1e3:>10.2f}ms")
    if "attention" in results:
        a = results["attention"]
        for impl in ("cudnn", "pallas", "mgpu", "jnp"):
            for kind in ("forward", "forward_backward") if impl in a else ():
                r = a[impl][kind]
                label = f"{'attention ' + impl + ' ' + kind:<44}"
                print(label + (f"{r['median_s'] * 1e3:>10.2f}ms{r['first_call_s']:>11.1f}s" if "median_s" in r
                               else f"  {r['error'][:120]}"))
            if "rel_err_vs_jnp" in a.get(impl, {}):
                print(f"attention {impl} vs jnp relative error: {a[impl]['rel_err_vs_jnp']:.2e}")
    for name, r in (results.get("fusions") or {}).items():
        print(f"{'fwd+bwd ' + name + ' pallas / jnp':<44}{r['pallas']['median_s'] * 1e3:>10.2f}ms"
              f"{r['jnp']['median_s'] * 1e3:>10.2f}ms  rel diff {r['rel_err']:.1e}")
    if "mlp" in results:
        m = results["mlp"]
        for impl in ("triton", "jnp"):
            for kind in ("forward", "forward_backward") if impl in m else ():
                r = m[impl][kind]
                print(f"{'MLP ' + impl + ' ' + kind + ' ' + 'x'.join(map(str, m['shape'])):<44}"
                      f"{r['median_s'] * 1e3:>10.2f}ms{r['first_call_s']:>11.1f}s  {r['tflops']:.0f} TFLOP/s")
        if "triton_vs_jnp_rel_err" in m:
            print(f"MLP triton vs jnp relative error: {m['triton_vs_jnp_rel_err']:.2e}")
    if "after" in results:
        a = results["after"]
        for key, what in (("generate", "AR generation " + "x".join(map(str, a["calibration_shape"]))),
                          ("hessians", "Hessian collection"), ("gptq", f"GPTQ + int8 ({a['gptq']['bank_matrices']} bank matrices)")):
            print(f"{what:<44}{a[key]['second_call_s']:>11.2f}s{a[key]['first_call_s']:>11.1f}s")
        print(f"{'LZMA serialisation':<44}{a['serialize']['s']:>11.2f}s  {a['serialize']['bytes']:,} bytes "
              f"+ {a['serialize']['code_bytes']:,} code")
    if results.get("ttt"):
        r = results["ttt"]
        print(f"{'score-first TTT, ' + str(r['chunks']) + ' chunks of ' + str(r['chunk_tokens']):<44}"
              f"{r['per_chunk_s']:>10.3f}s{r['first_chunk_s']:>11.1f}s  per chunk (scoring {r['score_s']:.1f} s, "
              f"training {r['train_s']:.1f} s in all); FineWeb val ({r['fineweb_val_chunks']} chunks) on "
              f"{r['devices']} device(s): {r['projected_fineweb_val_s']:.0f} s")


def print_profiles(results: dict) -> None:
    """Each profile's categories, collectives, top kernels and fusion traffic."""
    for key, prof in (results.get("profile") or {}).items():
        print(f"\nprofile of {key}: {prof['wall_ms']:.1f} ms wall, {prof['busy_ms']:.1f} ms of kernels on "
              f"{', '.join(prof['tracks'])}")
        print("  by category: " + ", ".join(f"{c} {ms:.1f} ms ({ms / max(prof['busy_ms'], 1e-9):.0%})"
                                             for c, ms in prof["categories_ms"].items()))
        for pid, c in prof["collectives"].items():
            print(f"  collectives on track {pid}: {c['collective_ms']:.2f} ms, {c['overlapped_ms']:.2f} ms of it "
                  f"beside compute kernels")
        for k in prof["top"][:25]:
            print(f"  {k['ms']:>9.2f} ms {k['calls']:>5}x  {k['category']:<11} {k['kernel'][:60]}"
                  + (f"  <- {k['source'][:150]}" if k.get("source") else ""))
        ft = prof.get("fusion_traffic")
        if ft and ft["ms"]:
            print(f"  XLA fusions: {ft['fusions']} kernels, {ft['ms']:.1f} ms moving {ft['gbytes']:.1f} GB "
                  f"({ft['achieved_gbps']:.0f} GB/s; at {ft['hbm_gbps']:.0f} GB/s they would take {ft['floor_ms']:.1f} ms); "
                  f"{ft['unmatched_ms']:.1f} ms of fusion kernels not found in the HLO")
            for k in ft["slowest"]:
                print(f"    {k['ms']:7.3f} ms {k['mbytes']:8.1f} MB {k['gbps'] or 0:6.0f} GB/s  {k['kernel'][:60]}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m golf_jax.tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="eval,grad,train,attention,mlp,after",
                        help="comma-separated; the default is every section but ttt and profile")
    parser.add_argument("--grad-batch-seqs", type=int, default=48, help="the reference's per-GPU micro-batch")
    parser.add_argument("--attention-batch", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--random-tokens", action="store_true", help="uniform ids instead of the config's text")
    parser.add_argument("--ttt-chunks", type=int, default=16, help="chunks timed by the ttt section")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--no-jnp-mlp", action="store_true", help="skip the jnp-MLP comparisons of eval and grad")
    cfg, args = cli.parse(parser, argv, default_config=str(Path(__file__).resolve().parents[2] / "configs" / "record.py"))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    tokens = ((lambda shape, seed=0: random_tokens(shape, cfg.model.vocab_size, seed)) if args.random_tokens
              else (lambda shape, seed=0: text_tokens(cfg, shape, seed)))

    t_start = time.perf_counter()
    dev = jax.devices()[0]
    results: dict = {"device": dev.device_kind, "tokens": "uniform random" if args.random_tokens else "text", "backend": jax.default_backend(), "jax": jax.__version__,
                     "compute_dtype": jnp.dtype(layers.compute_dtype(cfg.model)).name,
                     "attention_impl": layers.attention_impl(cfg.model), "mlp_impl": layers.mlp_impl(cfg.model)}
    params = perturbed_params(cfg)
    results["parameters"] = param_tree.param_count(params)
    e = cfg.eval
    compare_jnp_mlp = layers.mlp_impl(cfg.model) != "jnp" and not args.no_jnp_mlp
    if "eval" in sections:
        results["eval"] = bench_eval(params, cfg, tokens, e.eval_seq_len, e.sliding_stride, e.sliding_batch_windows, args.repeats)
    if "grad" in sections:
        results["grad"] = bench_grad(params, cfg, tokens, args.grad_batch_seqs, cfg.data.train_seq_len, args.repeats)
    if "mlp" in sections:
        results["mlp"] = bench_mlp(cfg.model, args.grad_batch_seqs * cfg.data.train_seq_len, args.repeats)
    if "train" in sections:
        results["train"] = bench_train_step(params, cfg, tokens, cfg.data.micro_batches_per_step,
                                            max(3, args.repeats // 2))
        results["train_one_micro"] = bench_train_step(params, cfg, tokens, 1, args.repeats)
        results["data_feed"] = bench_data_feed(cfg, args.repeats)
    if "fusions" in sections:
        results["fusions"] = bench_fusions(cfg.model, args.grad_batch_seqs, cfg.data.train_seq_len, args.repeats)
    if "attention" in sections:
        results["attention"] = bench_attention(cfg.model, args.attention_batch, cfg.data.train_seq_len, args.repeats)

    if "after" in sections:
        results["after"] = bench_after_training(params, cfg)
    if "ttt" in sections:
        results["ttt"] = bench_ttt(params, cfg, args.ttt_chunks)
    if "profile" in sections:
        results["profile"] = bench_profile(params, cfg, tokens, args.grad_batch_seqs, Path(args.out) / "traces")
    # The jnp-MLP comparisons last: peak memory is a high-water mark for the
    # whole process, so every figure above is the fused kernels' own.
    if compare_jnp_mlp and "eval" in sections:
        results["eval_jnp_mlp"] = bench_eval(params, with_model(cfg, mlp_impl="jnp"), tokens, e.eval_seq_len,
                                             e.sliding_stride, e.sliding_batch_windows, args.repeats)
    if compare_jnp_mlp and "grad" in sections:
        results["grad_jnp_mlp"] = bench_grad(params, with_model(cfg, mlp_impl="jnp"), tokens, args.grad_batch_seqs,
                                             cfg.data.train_seq_len, args.repeats)
    fused = with_model(cfg, fusion_impl="auto")
    if "grad" in sections and cfg.model.fusion_impl == "jnp" and layers.fusion_impl(fused.model, "xsa") != "jnp":
        results["grad_fused"] = bench_grad(params, fused, tokens, args.grad_batch_seqs, cfg.data.train_seq_len,
                                           args.repeats)

    results["bench_wall_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    print_profiles(results)
    print(f"wrote {out / 'bench.json'} ({results['bench_wall_s']:.0f} s in all)")


if __name__ == "__main__":
    main()
