"""The 1.0611 record's phased score-first LoRA TTT (SPEC.md section 5; the
reference's eval_val_ttt_phased), with ttt.mode = "lora_phased".

- Documents: each BOS up to and including the next BOS (the last one to the
  end), so a document's last target is the next one's BOS. Tokens before the
  first BOS belong to none and are never scored.
- Batches of ttt.lora_batch_docs documents: sorted by length (ascending, stable),
  cut into batches, processed longest batch first (so a partial batch, the
  longest documents, comes first).
- Each row (document) of a batch has its own LoRA (`model.LoRA`) on every layer
  application of the looped model and on the head. A full batch reuses the
  last full batch's A factors ("warm") with B zeroed and a fresh optimizer; a
  partial batch gets new random A. AdamW, decoupled decay on every factor.
- Score first: chunk ci of a document is its targets [ci C, (ci + 1) C) (C =
  ttt.lora_chunk_tokens; the last chunk to the end), scored in a window of the
  lora_context_len tokens before the chunk's end, by the LoRA as trained on
  chunks 0..ci-1 only. Then, unless it is the document's last chunk, one AdamW
  step on the chunk's mean loss. A chunk's score and the gradient come from
  one forward.
- Phases: after the batch at which the count of scored documents reaches
  prefix_docs (k + 1) / num_phases, all weights take SGD steps
  (`_global_phase`) on the first that many scored documents (in ascending
  batch order), then the LoRA is rebuilt with new random A.

Shapes: a batch is always lora_batch_docs rows (padding rows score and train
nothing); a chunk's window is padded to the next power of two, at least
lora_min_window and at most lora_context_len. Programs: one chunk step per
window width (6 for the record's 48-token chunks in 2048: 64 to 2048) and one
global SGD step per batch length (one when global_batch_seqs covers a chunk's
sequences, as in the record; two otherwise).

Devices (run.num_devices, this process's): a batch's rows are split over
them, each device holding its rows' inputs, LoRA factors and optimizer
state; the model's weights are replicated. Rows are independent (each its own
adapter and loss), so XLA's partitioner runs a chunk step with no collective
at all, and the scores are the one-device scores (the same
batches in the same order). The global phases run replicated: every device
takes the same SGD steps (a few seconds at the record's size; the chunk
steps are the time). The reference's ranks instead claim whole batches
through a file counter and pause for a phase when any rank's count crosses
its boundary, so which documents a phase trains on depends on the ranks'
timing; here it is the order of one GPU's run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from golf_jax import data, model, packing
from golf_jax.config import Config, ModelConfig, TTTConfig
from golf_jax.param_tree import Params
from golf_jax.train_step import AXIS, make_mesh

# init_a(construction, rows) -> A factors of the construction-th LoRA (every target, `rows` rows).
InitA = Callable[[int, int], dict]


@dataclass(frozen=True)
class LoRATTTResult:
    loss: float  # mean cross-entropy of every scored target, nats
    bpb: float
    tokens: int
    bytes: int
    seconds: float
    documents: int
    phases: int  # global SGD phases run
    chunk_row_sums: list[np.ndarray]  # per chunk step (in order): each row's scored loss sum, float64
    chunk_tokens: list[int]
    chunk_bytes: list[int]


def summary(result: LoRATTTResult) -> dict:
    """The report, without the per-chunk lists."""
    return {k: v for k, v in dataclasses.asdict(result).items() if not k.startswith("chunk_")}


# ----------------------------------------------------------------------------- documents and batches

def find_documents(tokens: np.ndarray, bos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths): each BOS up to and including the next BOS, the last to the end."""
    starts = np.flatnonzero(np.asarray(tokens) == bos_id).astype(np.int64)
    # reference quirk: a document holds the next one's BOS, its last target
    ends = np.append(starts[1:] + 1, len(tokens))
    if np.any(ends - starts < 2):
        raise ValueError("a document needs a target: the stream ends with a BOS")
    return starts, ends - starts


def batch_order(lengths: np.ndarray, batch_docs: int) -> list[tuple[int, np.ndarray]]:
    """(batch index in ascending order, document indices) in processing order:
    documents sorted by length (stable), cut into batches, the batch with the
    longest document first (ties: the earlier batch)."""
    order = np.argsort(lengths, kind="stable")
    batches = [order[i:i + batch_docs] for i in range(0, len(order), batch_docs)]
    ranked = sorted(range(len(batches)), key=lambda b: -int(lengths[batches[b]].max()))
    return [(b, batches[b]) for b in ranked]


def window_width(context: int, t: TTTConfig) -> int:
    """A chunk's padded window: the next power of two (at least lora_min_window),
    at most lora_context_len. Causal attention: the padding changes no score."""
    return min(max(1 << max(context - 1, 0).bit_length(), t.lora_min_window), t.lora_context_len)


# ----------------------------------------------------------------------------- the LoRA

def lora_shapes(cfg: ModelConfig, rows: int, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(A shape, B shape) of each target (model.LoRA)."""
    slots = len(sum(cfg.layer_order(cfg.looping_after_training), ()))
    d = cfg.model_dim
    out = {"q": d, "k": cfg.kv_dim, "v": cfg.kv_dim, "o": d, "mlp": d}
    shapes = {t: ((slots, rows, rank, d), (slots, rows, o, rank)) for t, o in out.items()}
    shapes["head"] = ((rows, rank, d), (rows, cfg.vocab_size, rank))
    return shapes


def random_init_a(cfg: ModelConfig, rank: int, seed: int) -> InitA:
    """A uniform in +-1/sqrt(in) (the reference's init), a new key per construction."""
    def init(construction: int, rows: int) -> dict:
        key = jax.random.fold_in(jax.random.key(seed), construction)
        shapes = lora_shapes(cfg, rows, rank)
        keys = jax.random.split(key, len(shapes))
        bound = 1.0 / math.sqrt(cfg.model_dim)
        return {t: jax.random.uniform(k, a, jnp.float32, -bound, bound) for k, (t, (a, _)) in zip(keys, shapes.items())}
    return init


def fresh_lora(a_factors: dict, cfg: ModelConfig, t: TTTConfig) -> model.LoRA:
    """A LoRA of lora_batch_docs rows: A from a_factors (rows past theirs zero), B zero."""
    shapes = lora_shapes(cfg, t.lora_batch_docs, t.lora_rank)
    factors = {}
    for name, (a_shape, b_shape) in shapes.items():
        a = jnp.asarray(a_factors[name], jnp.float32)
        row_axis = a.ndim - 3
        pad = [(0, 0)] * a.ndim
        pad[row_axis] = (0, a_shape[row_axis] - a.shape[row_axis])
        factors[name] = (jnp.pad(a, pad), jnp.zeros(b_shape, jnp.float32))
    return model.LoRA(factors, t.lora_alpha / t.lora_rank)


class RowPlacement:
    """Where a batch's arrays live: on several devices, rows split over the mesh
    (inputs along their leading axis, LoRA factors and their moments along
    their row axis, which is third from last), weights and scalars replicated;
    on one device, nothing placed. Every array a program takes is placed so,
    before its first call too: a placement that changed after one call would
    compile the program again."""

    def __init__(self, mesh: jax.sharding.Mesh, rows: int):
        self.mesh = mesh if mesh.size > 1 else None
        if self.mesh is not None and rows % mesh.size:
            raise ValueError(f"ttt.lora_batch_docs={rows} rows cannot be split over {mesh.size} devices "
                             "(run.num_devices): use a multiple")

    def _put(self, x, spec: P):
        return x if self.mesh is None else jax.device_put(x, NamedSharding(self.mesh, spec))

    def replicated(self, tree):
        return jax.tree.map(lambda x: self._put(x, P()), tree)

    def rows(self, x):
        return self._put(x, P(AXIS))

    def factors(self, tree):
        """A LoRA, or its optimizer state: factors by rows, the step count replicated."""
        return jax.tree.map(lambda x: self._put(x, P(*([None] * (x.ndim - 3)), AXIS) if x.ndim >= 3 else P()), tree)


def lora_optimizer(t: TTTConfig) -> optax.GradientTransformation:
    """torch's AdamW: decoupled decay on every factor (A and B)."""
    return optax.adamw(t.lora_lr, b1=t.lora_beta1, b2=t.lora_beta2, eps=t.lora_eps, weight_decay=t.lora_weight_decay)


# ----------------------------------------------------------------------------- the programs

@functools.lru_cache(maxsize=8)
def chunk_step_for(cfg: ModelConfig, t: TTTConfig) -> Callable:
    """The jitted chunk step (one program per window width), one per configuration."""
    tx = lora_optimizer(t)
    looping = cfg.looping_after_training

    def lora_chunk_step(params, lora, opt_state, x_BxW, y_BxW, score_lo_B, score_hi_B, train_lo, train_rows_B, do_step):
        pos_W = jnp.arange(x_BxW.shape[1])

        def loss_fn(lora):
            nll = model.lora_token_nll(params, cfg, x_BxW, y_BxW, lora, looping=looping)
            in_chunk = (pos_W >= train_lo) & (pos_W < train_lo + t.lora_chunk_tokens)
            per_doc = jnp.sum(jnp.where(in_chunk[None, :], nll, 0.0), axis=1) / t.lora_chunk_tokens
            return jnp.sum(per_doc * train_rows_B), nll

        (_, nll), grads = jax.value_and_grad(loss_fn, has_aux=True)(lora)
        scored = (pos_W[None, :] >= score_lo_B[:, None]) & (pos_W[None, :] < score_hi_B[:, None])
        row_sums = jnp.sum(jnp.where(scored, nll, 0.0), axis=1)
        updates, stepped_state = tx.update(grads, opt_state, lora)
        stepped = optax.apply_updates(lora, updates)
        # reference quirk: no step (and so no weight decay) when no document of the batch trains
        keep = lambda new, old: jnp.where(do_step, new, old)  # noqa: E731
        return jax.tree.map(keep, stepped, lora), jax.tree.map(keep, stepped_state, opt_state), row_sums

    return jax.jit(lora_chunk_step, donate_argnums=(1, 2))


@functools.lru_cache(maxsize=8)
def global_step_for(cfg: ModelConfig, t: TTTConfig) -> Callable:
    """One SGD step of every weight: torch's clip_grad_norm_ (coefficient
    clip / (norm + 1e-6), at most 1) and momentum (buf = m buf + g, p -= lr buf)."""
    looping = cfg.looping_after_training

    def global_sgd_step(params, momentum, x_1xT, y_1xT, segments, lr):
        grads = jax.grad(model.loss)(params, cfg, x_1xT, y_1xT, looping=looping, segments=segments)
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        if t.global_grad_clip > 0:
            norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
            coef = jnp.minimum(t.global_grad_clip / (norm + 1e-6), 1.0)
            grads = jax.tree.map(lambda g: g * coef, grads)
        momentum = jax.tree.map(lambda b, g: t.global_momentum * b + g, momentum, grads)
        params = jax.tree.map(lambda p, b: (p.astype(jnp.float32) - lr * b).astype(p.dtype), params, momentum)
        return params, momentum

    return jax.jit(global_sgd_step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------- one batch, one phase

def _chunk_inputs(tokens: np.ndarray, starts: np.ndarray, pred_lens: np.ndarray, ci: int, t: TTTConfig):
    """The padded inputs of chunk ci for a batch's documents (rows past them
    inactive), and each row's scored (tokens, first target index)."""
    C, ctx, rows = t.lora_chunk_tokens, t.lora_context_len, t.lora_batch_docs
    n = len(starts)
    n_chunks = -(-pred_lens // C)
    active = ci < n_chunks
    chunk_end = np.where(ci == n_chunks - 1, pred_lens, (ci + 1) * C)
    win_start = np.maximum(chunk_end - ctx, 0)
    win_len = np.where(active, chunk_end - win_start, 0)
    context = min((ci + 1) * C, ctx)
    width = window_width(context, t)
    col = np.arange(width)
    idx = np.minimum((starts + win_start)[:, None] + col[None, :], len(tokens) - 2)
    valid = col[None, :] < win_len[:, None]
    x, y = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    x[:n] = np.where(valid, tokens[idx], 0)
    y[:n] = np.where(valid, tokens[idx + 1], 0)
    lo, hi = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
    lo[:n] = np.where(active, ci * C - win_start, 0)
    hi[:n] = np.where(active, chunk_end - win_start, 0)
    train = np.zeros(rows, np.float32)
    train[:n] = n_chunks - 1 > ci
    train_lo = ci * C - max(0, (ci + 1) * C - ctx)  # the rows that train have whole windows
    first_target = np.where(active, starts + ci * C, 0)
    return (x, y, lo, hi, np.int32(train_lo), train, np.bool_(train.any())), hi[:n] - lo[:n], first_target


def _score_batch(params, lora, tokens, cum_bytes, docs, t: TTTConfig, step, log: dict, place: RowPlacement):
    """Every chunk of one batch: score, then step. Returns the trained LoRA."""
    starts, lengths = docs
    pred_lens = lengths - 1
    opt_state = place.factors(lora_optimizer(t).init(lora))
    outs = []
    for ci in range(int(-(-pred_lens.max() // t.lora_chunk_tokens))):
        (x, y, lo, hi, train_lo, train, do_step), scored, first = _chunk_inputs(tokens, starts, pred_lens, ci, t)
        x, y, lo, hi, train = map(place.rows, (x, y, lo, hi, train))
        lora, opt_state, row_sums = step(params, lora, opt_state, x, y, lo, hi, train_lo, train, do_step)
        outs.append(row_sums)
        log["chunk_tokens"].append(int(scored.sum()))
        log["chunk_bytes"].append(int(np.sum(cum_bytes[first + scored] - cum_bytes[first])))
    log["chunk_row_sums"] += [np.asarray(o, np.float64) for o in outs]
    return lora


def _global_phase(params, cfg: Config, segments: list[np.ndarray], place: RowPlacement) -> Params:
    """SGD of every weight over the scored documents, concatenated: chunks of
    global_chunk_tokens (the last never trained on), each whole sequences of
    eval.eval_seq_len in batches of global_batch_seqs, cosine rate over the chunks;
    attention within documents (split at the sequence length), as training's."""
    t, seq = cfg.ttt, cfg.eval.eval_seq_len
    # reference quirk: each document ends with the next one's BOS and the next begins
    # with its own: the stream holds BOS pairs (one-token documents)
    stream = np.concatenate(segments).astype(np.int32)
    total = len(stream) - 1
    n_chunks = -(-total // t.global_chunk_tokens)
    step = global_step_for(cfg.model, t)
    momentum = place.replicated(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    for ci in range(n_chunks - 1):
        start = ci * t.global_chunk_tokens
        n_seqs = (min(start + t.global_chunk_tokens, total) - start) // seq
        lr = t.global_lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(n_chunks - 1, 1)))
        for b in range(0, n_seqs, t.global_batch_seqs):
            lo, hi = start + b * seq, start + min(b + t.global_batch_seqs, n_seqs) * seq
            x = stream[lo:hi]
            bos = np.flatnonzero(x == cfg.model.bos_id)
            cu_seqlens, _ = packing.document_segments(bos, len(x), seq)
            segments = packing.make_segments(cu_seqlens, len(x), seq, cfg.data.segments_per_fold)
            params, momentum = step(params, momentum, x[None], stream[lo + 1:hi + 1][None], segments,
                                    jnp.float32(lr))
    return params


# ----------------------------------------------------------------------------- the evaluation

def run(params: Params, cfg: Config, tokens: np.ndarray, tables: data.TargetBytes, init_a: InitA | None = None,
        progress: bool = True) -> LoRATTTResult:
    """The phased score-first LoRA TTT over `tokens` (the validation stream);
    `params` are not modified. init_a: the A factors of each LoRA built, in
    order (default: `random_init_a` with run.seed)."""
    t0 = time.perf_counter()
    t, mcfg = cfg.ttt, cfg.model
    tokens = np.asarray(tokens, np.int32)
    init_a = init_a or random_init_a(mcfg, t.lora_rank, cfg.run.seed)
    starts, lengths = find_documents(tokens, mcfg.bos_id)
    cum_bytes = np.concatenate([[0], np.cumsum(tables.target_bytes(tokens))])
    batches = batch_order(lengths, t.lora_batch_docs)
    prefix = min(len(starts), t.phased_prefix_docs)
    boundaries = [prefix * (k + 1) // t.phased_num_phases for k in range(t.phased_num_phases)]
    place = RowPlacement(make_mesh(cfg.run.num_devices, local=True), t.lora_batch_docs)
    params = place.replicated(jax.tree.map(lambda x: jnp.array(x, copy=True), params))
    step = chunk_step_for(mcfg, t)
    constructions = 0

    def build(rows):
        nonlocal constructions
        constructions += 1
        return place.factors(fresh_lora(init_a(constructions - 1, rows), mcfg, t))

    warm = build(t.lora_batch_docs)
    log = {"chunk_row_sums": [], "chunk_tokens": [], "chunk_bytes": []}
    scored, phase = [], 0  # scored: (ascending batch index, row, document) of the prefix's batches
    for b_index, docs in tqdm(batches, desc="ttt lora", unit="batch", disable=not progress):
        full = len(docs) == t.lora_batch_docs
        if full:  # the warm A, B zeroed
            zeroed = {k: (a, jnp.zeros_like(b)) for k, (a, b) in warm.factors.items()}
            lora = place.factors(warm.replace(factors=zeroed))
        else:  # reference quirk: a partial batch gets a LoRA of its own, the warm one waits
            lora = build(len(docs))
        lora = _score_batch(params, lora, tokens, cum_bytes, (starts[docs], lengths[docs]), t, step, log, place)
        if full:
            warm = lora
        if phase < t.phased_num_phases and prefix > 0:
            scored += [(b_index, row, doc) for row, doc in enumerate(docs)]
            if len(scored) >= boundaries[phase]:
                # reference quirk: in ascending batch order, so the longest (first scored)
                # documents are the ones cut when the batches overshoot the boundary
                chosen = [doc for _, _, doc in sorted(scored)[:boundaries[phase]]]
                params = _global_phase(params, cfg, [tokens[starts[d]:starts[d] + lengths[d]] for d in chosen], place)
                warm = build(t.lora_batch_docs)
                phase += 1
    n_tokens, n_bytes = sum(log["chunk_tokens"]), sum(log["chunk_bytes"])
    loss_sum = float(sum(np.sum(r) for r in log["chunk_row_sums"]))
    mean_loss, bpb = data.bits_per_byte(loss_sum, n_tokens, n_bytes)
    return LoRATTTResult(mean_loss, bpb, n_tokens, n_bytes, time.perf_counter() - t0, len(starts), phase,
                         log["chunk_row_sums"], log["chunk_tokens"], log["chunk_bytes"])
