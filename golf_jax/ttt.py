"""Score-first test-time training (TTT), the competition's legal protocol
(PR #461, #549): the validation targets are cut into chunks of
`ttt.chunk_tokens`; each chunk is first scored by the sliding-window
evaluation with the parameters as they are (a pure function of frozen
weights), and only then trained on, `ttt.epochs` passes of SGD with momentum
(or AdamW). The last chunk is scored and never trained on. So the score of
chunk N comes from the model adapted on chunks 0..N-1 only, and the tokens
after chunk N never reach it.

The windows are the sliding evaluation's own (`evaluate.sliding_plan`); a
window whose scored positions cross a chunk boundary is split there (causal
attention makes the split exact), so with a learning rate of 0 the result is
the sliding evaluation's. Chunks are sequential; the work inside one is data
parallel over the device mesh (windows and training sequences sharded along
"data", the parameters replicated).

    python -m golf_jax.ttt --artifact runs/smoke/final_model.int6.golf [--config.ttt.lr=0.004]

With --config.ttt.mode=lora_phased the command runs the 1.0611 record's
phased LoRA TTT instead (golf_jax/ttt_lora.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from golf_jax import data, evaluate, model, ttt_lora
from golf_jax.train_step import AXIS, make_mesh
from golf_jax.config import Config, ModelConfig, TTTConfig
from golf_jax.param_tree import Params, path_name



@dataclass(frozen=True)
class TTTResult:
    loss: float  # mean cross-entropy of every scored target, nats
    bpb: float
    tokens: int
    bytes: int
    seconds: float
    chunks: int
    train_steps: int
    score_s: float  # device time of scoring and of training, summed over chunks
    train_s: float
    chunk_loss_sums: list[float]  # per chunk, float64 sums of the scored targets' loss
    chunk_tokens: list[int]
    chunk_bytes: list[int]


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class ChunkPlan:
    """Windows (as evaluate.WindowPlan) grouped by chunk: chunk c scores the
    targets [c * chunk_tokens, (c + 1) * chunk_tokens) and trains on them."""

    windows: list[evaluate.WindowPlan]
    train_starts: list[np.ndarray]  # token offsets of chunk c's training sequences


def chunk_plan(n_targets: int, cfg: Config) -> ChunkPlan:
    e, t = cfg.eval, cfg.ttt
    C, seq = t.chunk_tokens, t.seq_len or e.eval_seq_len
    plan = evaluate.sliding_plan(n_targets, e.eval_seq_len, e.sliding_stride, e.sliding_score_once)
    starts, lo, hi = plan.starts, plan.lo, plan.hi
    keep = hi > lo
    starts, lo, hi = starts[keep], lo[keep], hi[keep]
    first, last = (starts + lo) // C, (starts + hi - 1) // C
    # Split every window whose scored targets cross a chunk boundary (few:
    # about one per chunk), so each piece belongs to exactly one chunk.
    pieces_s, pieces_lo, pieces_hi = [starts[first == last]], [lo[first == last]], [hi[first == last]]
    for s, a, b, c0, c1 in zip(starts[first != last], lo[first != last], hi[first != last],
                               first[first != last], last[first != last]):
        cuts = [a] + [(c + 1) * C - s for c in range(c0, c1)] + [b]
        pieces_s.append(np.full(len(cuts) - 1, s))
        pieces_lo.append(np.array(cuts[:-1]))
        pieces_hi.append(np.array(cuts[1:]))
    s_all, lo_all, hi_all = (np.concatenate(x).astype(np.int64) for x in (pieces_s, pieces_lo, pieces_hi))
    chunk_of = (s_all + lo_all) // C
    n_chunks = -(-n_targets // C)
    order = np.lexsort((lo_all, s_all, chunk_of))  # by chunk, then in evaluation order
    bounds = np.searchsorted(chunk_of[order], np.arange(n_chunks + 1))
    windows, train_starts = [], []
    for c in range(n_chunks):
        sel = order[bounds[c]:bounds[c + 1]]
        windows.append(evaluate.WindowPlan(s_all[sel], lo_all[sel], hi_all[sel]))
        chunk_len = min((c + 1) * C, n_targets) - c * C
        # Whole sequences of the chunk's targets; a remainder shorter than seq is not trained on.
        train_starts.append(c * C + np.arange(chunk_len // seq, dtype=np.int64) * seq)
    return ChunkPlan(windows, train_starts)


# ----------------------------------------------------------------------------- the optimizer

def build_optimizer(t: TTTConfig) -> optax.GradientTransformation:
    """The update direction at learning rate 1; the step scales it by the
    chunk's rate (so changing the rate never recompiles). SGD: torch's
    momentum buffer (buf = m buf + g, p -= lr buf); AdamW: decoupled decay."""
    if t.optimizer == "sgd":
        inner = optax.sgd(learning_rate=1.0, momentum=t.momentum or None)
    else:
        inner = optax.adamw(learning_rate=1.0, b1=t.momentum, b2=t.beta2, weight_decay=t.weight_decay)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip_norm), inner) if t.grad_clip_norm > 0 else inner


def chunk_lr(t: TTTConfig, chunk: int, n_chunks: int) -> float:
    """Cosine decay across the chunks, from ttt.lr at chunk 0 towards 0 at the
    last one (which is scored only, so every trained chunk has a rate > 0)."""
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def trainable_mask(params: Params, cfg: Config) -> Params:
    """1 where TTT may change a value, 0 in the first `ttt.freeze_blocks` blocks
    (their bank rows and per-block vectors); float32, broadcastable."""
    L, k = cfg.model.num_layers, cfg.ttt.freeze_blocks

    def one(path, x):
        name = path_name(path)
        if k == 0 or not (name.endswith("_bank") or name.startswith("blocks/")):
            return jnp.ones((), jnp.float32)
        layer = np.arange(x.shape[0]) % L  # qo/kv banks stack [L, L] rows: layer i at i and L + i
        return jnp.asarray((layer >= k).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1)))

    return jax.tree_util.tree_map_with_path(one, params)


@functools.lru_cache(maxsize=8)
def train_step_for(mcfg: ModelConfig, t: TTTConfig) -> tuple[optax.GradientTransformation, Callable]:
    """(optimizer, jitted step), one per configuration: a new jit closure per
    run would compile again every run (seconds on a GPU)."""
    tx = build_optimizer(t)
    return tx, make_train_step(mcfg, tx)


def make_train_step(mcfg: ModelConfig, tx: optax.GradientTransformation):

    def loss_fn(params, x_BxT, y_BxT, row_mask_B):
        nll = model.token_nll(params, mcfg, x_BxT, y_BxT, looping=mcfg.looping_after_training)
        per_row = jnp.mean(nll, axis=1)
        return jnp.sum(per_row * row_mask_B) / jnp.maximum(jnp.sum(row_mask_B), 1.0)

    def step(params, opt_state, x_BxT, y_BxT, row_mask_B, lr, mask):
        loss, grads = jax.value_and_grad(loss_fn)(params, x_BxT, y_BxT, row_mask_B)
        grads = jax.tree.map(lambda g, m: g.astype(jnp.float32) * m, grads, mask)
        updates, opt_state = tx.update(grads, opt_state, jax.tree.map(lambda p: p.astype(jnp.float32), params))
        params = jax.tree.map(lambda p, u, m: (p.astype(jnp.float32) + lr * m * u).astype(p.dtype),
                              params, updates, mask)
        return params, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- the protocol

def _score_chunk(params, cfg: Config, tokens_dev: jax.Array, windows: evaluate.WindowPlan, batch_windows: int,
                 sharding) -> float:
    """Sum of the loss of every target the chunk's windows score, float64 on
    the host. Fixed-shape calls of the sliding evaluation's own program;
    padding windows (lo = hi = 0) score nothing."""
    n_w = len(windows.starts)
    n_b = -(-n_w // batch_windows)

    def batches(a):
        out = np.zeros(n_b * batch_windows, np.int32)
        out[:n_w] = a
        return out.reshape(n_b, batch_windows)

    starts, lo, hi = batches(windows.starts), batches(windows.lo), batches(windows.hi)
    outs = []
    for b in range(n_b):
        # The sliding evaluation's programs: logits for the last `stride`
        # positions only where every window of the batch allows it.
        span = evaluate.span_for(lo[b], hi[b], cfg.eval.sliding_stride)
        args = (jax.device_put(a[b], sharding) for a in (starts, lo, hi))
        outs.append(evaluate.window_loss_sums(params, cfg.model, tokens_dev, *args, cfg.eval.eval_seq_len, span,
                                              looping=cfg.model.looping_after_training))
    return float(sum(np.sum(np.asarray(o, np.float64)) for o in outs))


def _train_on_chunk(params, opt_state, train_step, mask, padded: np.ndarray, starts: np.ndarray, seq: int,
                    batch_seqs: int, epochs: int, lr: float, sharding):
    """`epochs` passes over the chunk's sequences (in order) in fixed-shape
    batches, the last one padded with rows that carry no loss. Returns
    (params, opt_state, steps)."""
    n_b = -(-len(starts) // batch_seqs)
    batch = np.zeros((n_b * batch_seqs, seq + 1), np.int32)
    batch[:len(starts)] = padded[starts[:, None] + np.arange(seq + 1)[None, :]]
    row_mask = (np.arange(n_b * batch_seqs) < len(starts)).astype(np.float32)
    steps = 0
    for _ in range(epochs):
        for b in range(n_b):
            rows = slice(b * batch_seqs, (b + 1) * batch_seqs)
            x, y, m = (jax.device_put(a, sharding) for a in (batch[rows, :-1], batch[rows, 1:], row_mask[rows]))
            params, opt_state, _ = train_step(params, opt_state, x, y, m, jnp.float32(lr), mask)
            steps += 1
    return params, opt_state, steps


def run(params: Params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes, progress: bool = True,
        max_chunks: int = 0) -> TTTResult:
    """Score-first TTT over `tokens` (targets tokens[1:]); `params` are not
    modified (a copy is trained). max_chunks > 0 stops after that many chunks
    (a timing slice); the result then covers those chunks only."""
    t_start = time.perf_counter()
    t, e = cfg.ttt, cfg.eval
    mesh = make_mesh(cfg.run.num_devices, local=True)
    n_dev = mesh.size
    seq = t.seq_len or e.eval_seq_len
    plan = chunk_plan(len(tokens) - 1, cfg)
    n_chunks = len(plan.windows) if max_chunks <= 0 else min(max_chunks, len(plan.windows))
    n_trained = len(plan.windows) - 1  # the last chunk is only scored

    # On one device nothing is placed explicitly, so the programs compiled for
    # the sliding evaluation just before are reused. On several: a batch's
    # leading axis is sharded when it divides evenly, everything else replicated.
    replicated = NamedSharding(mesh, P()) if n_dev > 1 else None

    def batch_sharding(size):
        return NamedSharding(mesh, P(AXIS)) if n_dev > 1 and size % n_dev == 0 else replicated

    score_bw = t.score_batch_windows or e.sliding_batch_windows
    seqs_per_chunk = max((len(s) for s in plan.train_starts[:max(n_trained, 1)]), default=0)
    train_bs = max(1, min(t.batch_seqs, seqs_per_chunk))

    padded = evaluate.padded_tokens(tokens, e.eval_seq_len)
    tokens_dev = jax.device_put(padded, replicated)
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    params = jax.device_put(jax.tree.map(lambda x: jnp.array(x, copy=True), params), replicated)
    tx, train_step = train_step_for(cfg.model, t)
    opt_state = jax.device_put(tx.init(jax.tree.map(lambda p: p.astype(jnp.float32), params)), replicated)
    mask = jax.device_put(trainable_mask(params, cfg), replicated)

    sums, counts, nbytes = [], [], []
    score_s = train_s = 0.0
    steps = 0
    for c in tqdm(range(n_chunks), desc="ttt", unit="chunk", disable=not progress):
        # 1. Score: a pure function of the parameters as they are now.
        t0 = time.perf_counter()
        w = plan.windows[c]
        sums.append(_score_chunk(params, cfg, tokens_dev, w, score_bw, batch_sharding(score_bw)))
        counts.append(int(np.sum(w.hi - w.lo)))
        nbytes.append(int(np.sum(cum_bytes[w.starts + w.hi] - cum_bytes[w.starts + w.lo])))
        score_s += time.perf_counter() - t0

        # 2. Train on the chunk just scored, never on the last one.
        if c >= n_trained or t.epochs == 0 or t.lr == 0 or len(plan.train_starts[c]) == 0:
            continue
        t0 = time.perf_counter()
        params, opt_state, n = _train_on_chunk(params, opt_state, train_step, mask, padded, plan.train_starts[c], seq,
                                               train_bs, t.epochs, chunk_lr(t, c, len(plan.windows)),
                                               batch_sharding(train_bs))
        steps += n
        jax.block_until_ready(params)
        train_s += time.perf_counter() - t0

    loss_sum, token_count, byte_count = sum(sums), sum(counts), sum(nbytes)
    mean_loss, bpb = data.bits_per_byte(loss_sum, token_count, byte_count)
    return TTTResult(mean_loss, bpb, token_count, byte_count, time.perf_counter() - t_start, n_chunks, steps,
                     score_s, train_s, sums, counts, nbytes)


def summary(result: TTTResult, pre: evaluate.EvalResult | dict | None) -> dict:
    """The report: post-TTT numbers, with the frozen model's sliding score as pre-TTT."""
    out = {k: v for k, v in dataclasses.asdict(result).items()
           if k not in ("chunk_loss_sums", "chunk_tokens", "chunk_bytes")}
    if pre is not None:
        pre = pre if isinstance(pre, dict) else dataclasses.asdict(pre)
        out.update(pre_bpb=pre["bpb"], pre_loss=pre["loss"], post_bpb=result.bpb, gain_bpb=pre["bpb"] - result.bpb)
    return out


def _compile_beside_the_reload(artifact: str | None, overrides, tokenizer: str | None):
    """The phased LoRA TTT's programs compiling in a thread from a per-group artifact's meta
    alone (its config: `artifact_pergroup.read_meta`) while its groups decompress (lrzip: ~30
    s at the record's size), as in the quantize pipeline: (their future, the config, the
    validation tokens and their byte counts), or None (another artifact or mode)."""
    from golf_jax import artifact_pergroup, cli, config as config_lib, runlog

    if not artifact or not artifact_pergroup.is_pergroup(artifact):
        return None
    meta = artifact_pergroup.read_meta(artifact)
    cfg = cli.config_for_model(config_lib.from_dict(meta["config"]), overrides)
    if cfg.ttt.mode != "lora_phased":
        return None
    tokens, tables, _ = evaluate.load_eval_data(cfg, meta.get("data"), tokenizer, f"artifact {artifact}")
    shapes = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))  # in the dtype rule's dtypes
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=runlog.BACKGROUND_THREADS)
    future = pool.submit(ttt_lora.precompile, shapes, cfg, tokens)
    pool.shutdown(wait=False)
    return future, cfg, tokens, tables


def main(argv: Sequence[str] | None = None) -> None:
    from golf_jax import checkpoint, cli

    parser = argparse.ArgumentParser(prog="python -m golf_jax.ttt",
                                     description="Score-first test-time training on the validation set.")
    checkpoint.add_model_source(parser)
    parser.add_argument("--max-chunks", type=int, default=0, help="stop after N chunks (a timing slice; 0: all)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the frozen model's sliding evaluation")
    parser.add_argument("--out", help="write the report here as JSON")
    parser.add_argument("--no-progress", action="store_true")
    try:
        args, overrides = cli.parse_with_overrides(parser, argv)
        cli.require_at_least(parser, ("--max-chunks", args.max_chunks, 0))
        early = _compile_beside_the_reload(args.artifact, overrides, args.tokenizer)
        reload_t0 = time.perf_counter()
        params, saved_cfg, source, record = checkpoint.load_model(args.artifact, args.checkpoint)
        reload_s = time.perf_counter() - reload_t0
        if early:  # the artifact's config and data, read before its groups
            ahead, cfg, tokens, tables = early
        else:
            ahead, cfg = None, cli.config_for_model(saved_cfg, overrides)
            tokens, tables, _ = evaluate.load_eval_data(cfg, record, args.tokenizer, source)
    except checkpoint.LOAD_ERRORS as e:
        parser.exit(2, f"error: {e}\n")
    t = cfg.ttt
    if t.mode == "lora_phased":  # the 1.0611 record's (golf_jax/ttt_lora.py)
        wait_t0 = time.perf_counter()
        timing = {"reload_s": reload_s, "precompile_s": ahead.result() if ahead else None,
                  "precompile_wait_s": time.perf_counter() - wait_t0 if ahead else None}
        result = ttt_lora.run(params, cfg, tokens, tables, progress=not args.no_progress, ahead=ahead is None)
        print(f"phased LoRA TTT: val_loss {result.loss:.8f} val_bpb {result.bpb:.8f} over {result.documents:,} "
              f"documents, {result.phases} phases; {result.seconds:.1f} s ({result.compile_ahead_seconds:.1f} s compiling, "
              f"{result.phase_seconds:.1f} s in the phases; {result.steps:,} chunk steps); reload {reload_s:.1f} s"
              + (f", its programs compiled beside it in {timing['precompile_s']:.1f} s, "
                 f"{timing['precompile_wait_s']:.1f} s of it waited for" if ahead else ""))
        if args.out:
            checkpoint.write_json(args.out, {**ttt_lora.summary(result), **timing})
        return
    print(f"TTT on {source}: {len(tokens) - 1:,} targets in chunks of {t.chunk_tokens:,}; {t.optimizer} lr {t.lr} "
          f"(cosine), {t.epochs} epochs, batches of {t.batch_seqs} x {t.seq_len or cfg.eval.eval_seq_len}")
    pre = None
    if not args.no_baseline and args.max_chunks <= 0:
        pre = evaluate.run_sliding(params, cfg, tokens, tables, progress=not args.no_progress)
        print(f"pre-TTT (sliding): val_loss {pre.loss:.4f} val_bpb {pre.bpb:.4f}")
    result = run(params, cfg, tokens, tables, progress=not args.no_progress, max_chunks=args.max_chunks)
    report = summary(result, pre)
    print(f"post-TTT: val_loss {result.loss:.4f} val_bpb {result.bpb:.4f} over {result.chunks} chunks, "
          f"{result.train_steps} steps; {result.seconds:.1f} s (scoring {result.score_s:.1f} s, "
          f"training {result.train_s:.1f} s)" + (f"; gain {report['gain_bpb']:+.4f} bpb" if pre else ""))
    if args.out:
        checkpoint.write_json(args.out, report)


if __name__ == "__main__":
    main()
