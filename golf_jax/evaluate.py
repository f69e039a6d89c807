"""Evaluation in bits per byte: standard (non-overlapping windows) and
sliding-window, as the reference scores the record; with
eval.document_masked, the 1.0611 record's standard evaluation over packed
rows of documents (`document_eval`).

Each runs one jitted function over fixed-shape batches of windows (the last
batch padded and masked), so each compiles once per process. Per-window loss
sums come back in float32 and are accumulated in float64 on the host; token
and byte counts are exact integers computed on the host.

    python -m golf_jax.evaluate --config configs/smoke.py [--init-from final_model.pt]
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from golf_jax import data, datasets, layers, model, packing, param_tree
from golf_jax.config import Config, ConfigError, ModelConfig


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy, nats per token
    bpb: float  # bits per byte
    tokens: int  # scored tokens (the reference's sliding tail counts some twice)
    bytes: int
    seconds: float


@dataclass(frozen=True)
class WindowPlan:
    """Window w feeds tokens[start : start + seq_len] (zero past `hi`) and
    scores its positions lo <= p < hi, i.e. targets start + 1 + p."""

    starts: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def standard_plan(n_targets: int, seq_len: int) -> WindowPlan:
    """Non-overlapping full windows over the first n_targets // seq_len * seq_len targets."""
    n = n_targets // seq_len
    starts = np.arange(n, dtype=np.int64) * seq_len
    return WindowPlan(starts, np.zeros(n, np.int64), np.full(n, seq_len, np.int64))


def sliding_plan(n_targets: int, seq_len: int, stride: int, score_once: bool = False) -> WindowPlan:
    """A window at every multiple of `stride` below n_targets, as the reference.

    Window w covers wlen = min(start + seq_len, N) - start positions and scores
    from 0 (first window) or max(wlen - stride, 0). reference quirk: the
    trailing windows that reach N all score the same last `stride` targets, so
    the tail is counted several times; `score_once` scores each target once.
    """
    starts = np.arange(0, n_targets, stride, dtype=np.int64)
    hi = np.minimum(starts + seq_len, n_targets) - starts
    lo = np.where(starts == 0, 0, np.maximum(hi - stride, 0))
    if score_once:
        # Start each window where the previous ones stopped scoring.
        scored_to = np.maximum.accumulate(starts + hi)
        prev_end = np.concatenate([[0], scored_to[:-1]])
        lo = np.clip(prev_end - starts, lo, hi)
    return WindowPlan(starts, lo, hi)


@functools.partial(jax.jit, static_argnames=("cfg", "seq_len", "score_span", "looping"))
def window_loss_sums(params, cfg: ModelConfig, tokens_N: jax.Array, starts_W: jax.Array,
                     lo_W: jax.Array, hi_W: jax.Array, seq_len: int, score_span: int = 0,
                     looping: bool = False) -> jax.Array:
    """Sum of the scored positions' cross-entropy for each window, float32 [W].

    score_span > 0: every window scores only positions in [hi - score_span,
    hi) (a sliding window past the first scores its last `stride`), so the
    tied head, the softcap and the cross-entropy run on those positions only
    (the hidden states of the others are still needed: they are the context).
    `span_for` says when a batch allows it. looping: the model's depth recurrence.
    """
    pos_T = jnp.arange(seq_len + 1)
    chunk_WxT1 = tokens_N[starts_W[:, None] + pos_T[None, :]]
    x = jnp.where(pos_T[None, :-1] < hi_W[:, None], chunk_WxT1[:, :-1], 0)  # zero padding, as the reference
    targets_WxT = chunk_WxT1[:, 1:]
    if not score_span:
        nll_WxT = model.token_nll(params, cfg, x, targets_WxT, looping=looping)
        scored = (pos_T[None, :-1] >= lo_W[:, None]) & (pos_T[None, :-1] < hi_W[:, None])
        return jnp.sum(jnp.where(scored, nll_WxT, 0.0), axis=1)
    raw_WxS = hi_W[:, None] - score_span + jnp.arange(score_span)[None, :]
    pos_WxS = jnp.clip(raw_WxS, 0, seq_len - 1)  # below 0 only when hi < span: masked below
    h_WxSxd = jnp.take_along_axis(model.hidden(params, cfg, x, looping=looping), pos_WxS[..., None], axis=1)
    z = model.logits_from_hidden(params, cfg, h_WxSxd)
    nll_WxS = model.nll_from_logits(z, jnp.take_along_axis(targets_WxT, pos_WxS, axis=1))
    scored = (raw_WxS >= lo_W[:, None]) & (raw_WxS < hi_W[:, None])
    return jnp.sum(jnp.where(scored, nll_WxS, 0.0), axis=1)


def span_for(lo: np.ndarray, hi: np.ndarray, span: int) -> int:
    """`span` when every window of a batch scores at most its last `span`
    positions (window_loss_sums's score_span), else 0 (all positions)."""
    return span if span and int(np.max(hi - lo, initial=0)) <= span else 0


def padded_tokens(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """tokens with seq_len zeros after them, so every window's slice is in
    range (padded positions are masked). One length for every caller, so the
    scoring program compiled for one evaluation serves the next (TTT's too)."""
    padded = np.zeros(len(tokens) + seq_len, np.int32)
    padded[:len(tokens)] = tokens
    return padded


def evaluate_plan(params, cfg: ModelConfig, tokens: np.ndarray, tables: data.TargetBytes, plan: WindowPlan,
                  seq_len: int, batch_windows: int, desc: str = "eval", progress: bool = True,
                  score_span: int = 0, looping: bool = False) -> EvalResult:
    """Score every window of `plan` over `tokens` (targets are tokens[1:]).
    score_span: batches whose windows all score at most their last score_span
    positions run the program that computes logits only there."""
    t0 = time.perf_counter()
    tokens_dev = jnp.asarray(padded_tokens(tokens, seq_len))
    n = len(plan.starts)
    n_batches = -(-n // batch_windows)
    total = n_batches * batch_windows

    def pad(a):
        out = np.zeros(total, np.int32)
        out[:n] = a
        return out.reshape(n_batches, batch_windows)

    starts, lo, hi = pad(plan.starts), pad(plan.lo), pad(plan.hi)
    loss_sum = 0.0
    in_flight: collections.deque = collections.deque()
    for b in tqdm(range(n_batches), desc=desc, unit="batch", disable=not progress, leave=False):
        span = span_for(lo[b], hi[b], score_span)
        in_flight.append(window_loss_sums(params, cfg, tokens_dev, starts[b], lo[b], hi[b], seq_len, span,
                                          looping=looping))
        # Read back two batches behind: the device stays busy while the
        # progress bar tracks finished work.
        while len(in_flight) > 2 or (b == n_batches - 1 and in_flight):
            loss_sum += float(np.sum(np.asarray(in_flight.popleft(), dtype=np.float64)))

    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    token_count = int(np.sum(plan.hi - plan.lo))
    byte_count = int(np.sum(cum_bytes[plan.starts + plan.hi] - cum_bytes[plan.starts + plan.lo]))
    mean_loss, bpb = data.bits_per_byte(loss_sum, token_count, byte_count)
    return EvalResult(mean_loss, bpb, token_count, byte_count, time.perf_counter() - t0)


def standard_eval(params, cfg: ModelConfig, tokens: np.ndarray, tables: data.TargetBytes, seq_len: int,
                  batch_windows: int, progress: bool = True, looping: bool = False) -> EvalResult:
    """The reference's standard evaluation: consecutive windows of seq_len."""
    plan = standard_plan(len(tokens) - 1, seq_len)
    return evaluate_plan(params, cfg, tokens, tables, plan, seq_len, batch_windows, "standard eval", progress,
                         looping=looping)


def sliding_eval(params, cfg: ModelConfig, tokens: np.ndarray, tables: data.TargetBytes, seq_len: int,
                 stride: int, batch_windows: int, score_once: bool = False, progress: bool = True,
                 looping: bool = False) -> EvalResult:
    """The reference's sliding-window evaluation (stride 64 in the record)."""
    plan = sliding_plan(len(tokens) - 1, seq_len, stride, score_once)
    return evaluate_plan(params, cfg, tokens, tables, plan, seq_len, batch_windows, "sliding eval", progress,
                         score_span=stride, looping=looping)


def document_rows(n_targets: int, seq_len: int, batch_seqs: int, ranks: int) -> np.ndarray:
    """The first token of each packed row (batch_seqs x seq_len tokens) of the
    1.0611 record's eval_val over `ranks` ranks: rank r takes sequences
    [total r / ranks, total (r + 1) / ranks) of the total = n_targets // seq_len,
    in batches of batch_seqs. reference quirk: its last partial batch is dropped."""
    total = n_targets // seq_len
    starts = []
    for r in range(ranks):
        lo, hi = total * r // ranks, total * (r + 1) // ranks
        starts += range(lo, lo + (hi - lo) // batch_seqs * batch_seqs, batch_seqs)
    return np.asarray(starts, np.int64) * seq_len


def configured_document_rows(cfg: Config, n_tokens: int) -> tuple[np.ndarray, int]:
    """`document_rows` of n_tokens validation tokens as configured, and the rows'
    length; a ConfigError when there are none."""
    e = cfg.eval
    batch_seqs = e.standard_batch_windows(cfg.data.micro_batches_per_step)
    starts = document_rows(n_tokens - 1, e.eval_seq_len, batch_seqs, e.document_eval_ranks)
    if not len(starts):
        raise ConfigError(f"eval.document_masked: {n_tokens - 1} validation targets give none of the "
                          f"{e.document_eval_ranks} ranks (eval.document_eval_ranks) a whole batch of {batch_seqs} "
                          f"x {e.eval_seq_len} tokens: more validation tokens, or a smaller eval.val_batch_tokens")
    return starts, batch_seqs * e.eval_seq_len


@functools.partial(jax.jit, static_argnames=("cfg", "looping"))
def packed_row_loss_sum(params, cfg: ModelConfig, row_1xL1: jax.Array, segments: packing.Segments,
                        looping: bool = False) -> jax.Array:
    """Sum of a packed row's cross-entropy (L + 1 tokens: inputs, then targets one on;
    attention within its segments), float32."""
    return jnp.sum(model.token_nll(params, cfg, row_1xL1[:, :-1], row_1xL1[:, 1:], looping=looping,
                                   segments=segments))


def document_eval(params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes, progress: bool = True,
                  looping: bool = False) -> EvalResult:
    """The 1.0611 record's eval_val (eval.document_masked): every row of
    `document_rows` scored whole, its documents (BOS to BOS, split at
    eval_seq_len, as training's packed rows: `packing.document_segments`)
    attending only within themselves. One program: the rows' segment slots
    per fold are the most any row needs (at least data.segments_per_fold)."""
    t0 = time.perf_counter()
    seq, tokens = cfg.eval.eval_seq_len, np.asarray(tokens, np.int32)
    starts, row_len, cu, slots = _document_plan(cfg, tokens)
    sums = []
    for s, c in tqdm(zip(starts, cu), total=len(starts), desc="document eval", unit="row", disable=not progress,
                     leave=False):
        segments = packing.make_segments(c, row_len, seq, slots)
        sums.append(packed_row_loss_sum(params, cfg.model, tokens[None, s:s + row_len + 1], segments,
                                        looping=looping))
    loss_sum = float(np.sum(np.asarray(jax.device_get(sums), np.float64)))
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    token_count = len(starts) * row_len
    byte_count = int(np.sum(cum_bytes[starts + row_len] - cum_bytes[starts]))
    mean_loss, bpb = data.bits_per_byte(loss_sum, token_count, byte_count)
    return EvalResult(mean_loss, bpb, token_count, byte_count, time.perf_counter() - t0)


def _document_plan(cfg: Config, tokens: np.ndarray) -> tuple[np.ndarray, int, list, int]:
    """`document_eval`'s rows: their first tokens, their length, each row's document
    boundaries (`packing.document_segments`) and the segment slots per fold of its program."""
    seq = cfg.eval.eval_seq_len
    starts, row_len = configured_document_rows(cfg, len(tokens))
    cu = [packing.document_segments(np.flatnonzero(tokens[s:s + row_len] == cfg.model.bos_id), row_len, seq)[0]
          for s in starts]
    slots = max([cfg.data.segments_per_fold] + [packing.segments_per_fold_needed(c, row_len, seq) for c in cu])
    return starts, row_len, cu, slots


def compile_standard(params_like, cfg: Config, tokens: np.ndarray, looping: bool | None = None) -> None:
    """Compiles the program `run_standard` calls on these tokens for weights of params_like's
    shapes, dtypes and placement (their values unused), so that its calls find it compiled:
    the quantize pipeline compiles the int6 round trip's beside the artifact's reload."""
    looping = cfg.model.looping_after_training if looping is None else looping
    seq, tokens = cfg.eval.eval_seq_len, np.asarray(tokens, np.int32)
    if cfg.eval.document_masked:
        starts, row_len, cu, slots = _document_plan(cfg, tokens)
        segments = packing.make_segments(cu[0], row_len, seq, slots)
        packed_row_loss_sum.lower(params_like, cfg.model, tokens[None, :row_len + 1], segments,
                                  looping=looping).compile()
        return
    windows = np.zeros(cfg.eval.standard_batch_windows(cfg.data.micro_batches_per_step), np.int32)
    window_loss_sums.lower(params_like, cfg.model, jnp.asarray(padded_tokens(tokens, seq)), windows, windows, windows,
                           seq, 0, looping=looping).compile()


def load_validation(cfg: Config, ds: datasets.Dataset) -> tuple[np.ndarray, data.TargetBytes]:
    """The validation tokens of `ds` and what their bits per byte divide by:
    the tokenizer's byte tables, or with data.text_transform the byte sidecar
    beside the val shards (data.val_bytes_pattern), the original text's bytes."""
    d = cfg.data
    sp = data.load_tokenizer(ds.tokenizer, cfg.model.vocab_size, d.text_transform)
    tokens = data.load_validation_tokens(ds.val_pattern, cfg.eval.eval_seq_len, cfg.model.vocab_size,
                                         cfg.eval.max_val_tokens)
    if cfg.eval.document_masked:
        configured_document_rows(cfg, len(tokens))  # refused before anything is compiled
    if not d.text_transform:
        return tokens, data.byte_tables(sp, cfg.model.vocab_size)
    sidecar = os.path.join(os.path.dirname(ds.val_pattern), d.val_bytes_pattern)
    return tokens, data.load_byte_sidecar(ds.val_pattern, sidecar, tokens, sp.bos_id())


def load_eval_data(cfg: Config, dataset: dict | None = None, tokenizer: str | None = None,
                   where: str = "the model") -> tuple[np.ndarray, data.TargetBytes, datasets.Dataset]:
    """Validation tokens and their byte counts (`load_validation`), every
    input checked before any compilation. `dataset`: the identity recorded
    with the model, whose tokenizer must be the one used
    (`datasets.dataset_for_model`); `tokenizer`: the user's --tokenizer,
    which overrides that check."""
    ds = datasets.dataset_for_model(cfg.data, cfg.model.vocab_size, dataset, tokenizer, where)
    return *load_validation(cfg, ds), ds


def run_standard(params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes,
                 progress: bool = True, looping: bool | None = None) -> EvalResult:
    """The standard evaluation as configured (the reference's per-rank batch;
    eval.document_masked: `document_eval`). looping: None, as after training
    (`ModelConfig.looping_after_training`)."""
    looping = cfg.model.looping_after_training if looping is None else looping
    if cfg.eval.document_masked:
        return document_eval(params, cfg, tokens, tables, progress, looping)
    return standard_eval(params, cfg.model, tokens, tables, cfg.eval.eval_seq_len,
                         cfg.eval.standard_batch_windows(cfg.data.micro_batches_per_step), progress, looping)


def run_sliding(params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes,
                progress: bool = True) -> EvalResult:
    """The sliding-window evaluation as configured (after training: looped with a loop)."""
    e = cfg.eval
    return sliding_eval(params, cfg.model, tokens, tables, e.eval_seq_len, e.sliding_stride,
                        e.sliding_batch_windows, e.sliding_score_once, progress, cfg.model.looping_after_training)


def run_evaluations(params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes,
                    progress: bool = True) -> dict[str, EvalResult]:
    return {"standard": run_standard(params, cfg, tokens, tables, progress),
            "sliding": run_sliding(params, cfg, tokens, tables, progress)}


def main(argv: Sequence[str] | None = None) -> None:
    from golf_jax import checkpoint, cli, compat

    parser = argparse.ArgumentParser(
        prog="python -m golf_jax.evaluate",
        description="Bits per byte of a trained model (--checkpoint or --artifact), of reference weights "
                    "(--config and --init-from) or of a fresh init (--config).")
    checkpoint.add_model_source(parser, required=False)
    parser.add_argument("--config", help="config file, for a fresh or reference model (a trained model "
                                         "brings its own config)")
    parser.add_argument("--init-from", default="", help="reference weights (.npz or final_model.pt), with --config")
    parser.add_argument("--out", help="write the results here as JSON (without it nothing is written)")
    parser.add_argument("--no-progress", action="store_true")
    try:
        args, overrides = cli.parse_with_overrides(parser, argv)
        if args.artifact or args.checkpoint:
            if args.config or args.init_from:
                raise ConfigError("--config and --init-from are for a fresh or reference model; a trained model "
                                  "(--checkpoint, --artifact) brings its own config")
            loaded = checkpoint.load_model(args.artifact, args.checkpoint)
            params, source, record = loaded.params, loaded.source, loaded.dataset
            cfg = cli.config_for_model(loaded.cfg, overrides)
        elif args.config:
            cfg, record = cli.apply_overrides(cli.load_config_file(args.config), overrides).validate(), None
            init_from = args.init_from or cfg.run.init_from
            params = compat.initial_params(cfg.model, init_from, cfg.run.seed)
            source = init_from or f"fresh init, seed {cfg.run.seed}"
        else:
            raise ConfigError("nothing to evaluate: give --checkpoint DIR, --artifact FILE or --config FILE")
        tokens, tables, ds = load_eval_data(cfg, record, args.tokenizer, source)
    except checkpoint.LOAD_ERRORS as e:
        cli.exit_on_error(parser, e)

    print(f"model: {param_tree.param_count(params):,} parameters ({source}); backend {jax.default_backend()}, "
          f"compute {jnp.dtype(layers.compute_dtype(cfg.model)).name}")
    print(f"val: {len(tokens) - 1:,} target tokens from {ds.val_pattern}")
    results = run_evaluations(params, cfg, tokens, tables, progress=not args.no_progress)
    for name, r in results.items():
        print(f"{name:>8}: loss {r.loss:.4f}  bpb {r.bpb:.4f}  ({r.tokens:,} tokens, {r.bytes:,} bytes, {r.seconds:.1f} s)")
    if args.out:
        checkpoint.write_json(args.out, {"model": source, "val": ds.val_pattern,
                                         **{k: asdict(v) for k, v in results.items()}})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
