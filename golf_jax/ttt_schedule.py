"""The 1.0611 record's phased score-first LoRA TTT's schedule (SPEC.md section 5;
the reference's eval_val_ttt_phased): what each chunk step sees and when the phases
run, in numpy; golf_jax/ttt_lora.py runs it, scripts/ttt_projection.py times it.

- Documents: each BOS up to and including the next BOS (the last one to the
  end), so a document's last target is the next one's BOS. Tokens before the
  first BOS belong to none and are never scored.
- Batches of ttt.lora_batch_docs documents: sorted by length (ascending, stable),
  cut into batches, processed longest batch first (so a partial batch, the
  longest documents, comes first).
- Score first: chunk ci of a document is its targets [ci C, (ci + 1) C) (C =
  ttt.lora_chunk_tokens; the last chunk to the end), scored in a window of the
  lora_context_len tokens before the chunk's end (`chunk_inputs`). Shapes: a
  batch is always lora_batch_docs rows (padding rows score and train nothing);
  a chunk's window is padded to the next power of two, at least
  lora_min_window and at most lora_context_len, or to the narrowest of
  lora_window_widths that holds it (`window_width`): one chunk program per
  width (6 for the record's 48-token chunks in 2048: 64 to 2048; 4 with
  configs/frontier.py's widths).
- Phases: after the batch at which the count of scored documents reaches
  prefix_docs (k + 1) / num_phases, all weights train on the first that many
  scored documents (in ascending batch order), in batches of whole sequences
  (`global_batch_rows`).
- Compaction (ttt.lora_compact_rows): once a batch's chunk windows are the whole
  context and its rows still scoring fit in that many consecutive rows (its shortest
  documents done, or a partial batch's padding), its steps run on those rows only
  (`compact_from`): the partial batch of the longest documents no longer runs
  lora_batch_docs rows of padding to its end.
- Ranks (ttt.lora_ranks): the reference's GPUs each run a rank that claims the
  queue's next batch when it has scored one; when the scored documents reach a
  phase's boundary, each rank pauses after the batch it holds. `rank_schedule`
  computes who scores what from the batches' costs instead of the clock (the
  same in every run). One rank (the default) is the queue in order.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from golf_jax import packing
from golf_jax.config import Config, TTTConfig


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


def phase_boundaries(n_docs: int, t: TTTConfig) -> list[int]:
    """The scored-document counts after which the global phases run (all 0: none)."""
    prefix = min(n_docs, t.phased_prefix_docs)
    return [prefix * (k + 1) // t.phased_num_phases for k in range(t.phased_num_phases)]


def phase_documents(scored: list[tuple[int, int, int]], boundary: int) -> list[int]:
    """A phase's documents from the (batch index, row, document) scored so far.
    reference quirk: in ascending batch order, so the longest (first scored)
    documents are the ones cut when the batches overshoot the boundary."""
    return [doc for _, _, doc in sorted(scored)[:boundary]]


def chunk_count(pred_lens: np.ndarray, t: TTTConfig) -> int:
    """The chunk steps of a batch whose documents have these target counts."""
    return int(-(-int(np.max(pred_lens)) // t.lora_chunk_tokens))


def chunk_window(ci: int, t: TTTConfig) -> int:
    """Chunk ci's padded window width, the same for every row of its batch (its program)."""
    return window_width((ci + 1) * t.lora_chunk_tokens, t)


def window_width(context: int, t: TTTConfig) -> int:
    """A chunk's padded window: the narrowest of ttt.lora_window_widths that holds the
    context, or else the next power of two (at least lora_min_window), at most
    lora_context_len. Causal attention: the padding changes no score."""
    context = min(context, t.lora_context_len)
    if t.window_widths:
        return next(w for w in t.window_widths if w >= context)
    return min(max(1 << max(context - 1, 0).bit_length(), t.lora_min_window), t.lora_context_len)


# A chunk step's cost in the ranks' schedule: its window width plus this many positions
# (64-row steps on an H200 took 48.5 / 85.8 / 173.2 ms at 512 / 1,024 / 2,048: docs/performance.md)
STEP_COST_OFFSET = 128


@dataclass(frozen=True)
class RankSchedule:
    """What each rank scores: eras[e][r] the (batch index, documents) rank r scores, in
    order, before phase e (the last era after the last phase); phases[e] the documents
    phase e trains on."""
    eras: list[list[list[tuple[int, np.ndarray]]]]
    phases: list[list[int]]


def batch_cost(pred_lens: np.ndarray, t: TTTConfig) -> int:
    """A batch's chunk steps' cost (`STEP_COST_OFFSET`)."""
    return sum(chunk_window(ci, t) + STEP_COST_OFFSET for ci in range(chunk_count(pred_lens, t)))


def rank_schedule(lengths: np.ndarray, t: TTTConfig, ranks: int) -> RankSchedule:
    """reference quirk: its ranks claim the queue's next batch when they finish one (a file
    counter) and add its documents to a shared count; once the count reaches a phase's
    boundary, each pauses after the batch it holds, the phase trains on the first
    `boundary` scored documents (`phase_documents`), then all claim on. Here a claim
    follows the batches' costs (`batch_cost`), not the clock, so that every process and
    every run computes the same schedule. One rank: the queue in order, each phase after
    the batch that reaches its boundary."""
    queue, boundaries = batch_order(lengths, t.lora_batch_docs), phase_boundaries(len(lengths), t)
    eras, phases, scored = [[[] for _ in range(ranks)]], [], []
    clock, running, claimed, pausing = [0] * ranks, [], 0, False  # running: a heap of (finish, rank, queue index)

    def claim(rank: int) -> None:
        nonlocal claimed
        if claimed < len(queue):
            eras[-1][rank].append(queue[claimed])
            heapq.heappush(running, (clock[rank] + batch_cost(lengths[queue[claimed][1]] - 1, t), rank, claimed))
            claimed += 1

    for rank in range(ranks):
        claim(rank)
    while running:
        finish, rank, i = heapq.heappop(running)
        clock[rank] = finish
        if boundaries[-1] > 0 and len(phases) < t.phased_num_phases:
            scored += [(queue[i][0], row, doc) for row, doc in enumerate(queue[i][1])]
            pausing = pausing or len(scored) >= boundaries[len(phases)]
        if not pausing:
            claim(rank)
        elif not running:  # every rank has paused after its batch: the phase, then all claim on
            phases.append(phase_documents(scored, boundaries[len(phases)]))
            clock, pausing = [max(clock)] * ranks, False
            eras.append([[] for _ in range(ranks)])
            for each in range(ranks):
                claim(each)
    return RankSchedule(eras, phases)


def global_batch_rows(stream: np.ndarray, lo: int, n_seqs: int, seq: int, rows: int, cfg: Config):
    """Sequences [lo, lo + n_seqs seq) of the stream (targets one token on) split as the
    reference's `rows` ranks split a batch: row r the sequences [n_seqs r // rows,
    n_seqs (r + 1) // rows), a packed row of its own (documents split at every seq tokens
    from their BOS, its first token a segment start), padded to ceil(n_seqs / rows)
    sequences with weight 0 (a row with none, when n_seqs < rows, counts in no mean).
    Returns (x, y, segments, token weights), each [rows, ...]."""
    width = -(-n_seqs // rows) * seq
    x, y = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
    w = np.zeros((rows, width), np.float32)
    cus = []
    for r in range(rows):
        a, b = n_seqs * r // rows * seq, n_seqs * (r + 1) // rows * seq
        x[r, :b - a], y[r, :b - a], w[r, :b - a] = stream[lo + a:lo + b], stream[lo + a + 1:lo + b + 1], 1.0
        starts = np.flatnonzero(x[r, :b - a] == cfg.model.bos_id)
        if b - a < width:  # the padding starts a segment (split at seq like any other)
            starts = np.append(starts, b - a)
        cus.append(packing.document_segments(starts, width, seq)[0])
    # Rows of many short documents may need more segment slots than data.segments_per_fold:
    # then a power of two that holds them (a program of its own, compiled when first needed)
    slots = max(packing.segments_per_fold_needed(cu, width, seq) for cu in cus)
    slots = cfg.data.segments_per_fold if slots <= cfg.data.segments_per_fold else 1 << (slots - 1).bit_length()
    parts = [packing.make_segments(cu, width, seq, slots) for cu in cus]
    return x, y, packing.Segments(*(np.concatenate(leaf) for leaf in zip(*parts))), w


def chunk_inputs(tokens: np.ndarray, starts: np.ndarray, pred_lens: np.ndarray, ci: int, t: TTTConfig):
    """The padded inputs of chunk ci for a batch's documents (rows past them
    inactive), and each row's scored (tokens, first target index)."""
    C, ctx, rows = t.lora_chunk_tokens, t.lora_context_len, t.lora_batch_docs
    n = len(starts)
    n_chunks = -(-pred_lens // C)
    active = ci < n_chunks
    chunk_end = np.where(ci == n_chunks - 1, pred_lens, (ci + 1) * C)
    win_start = np.maximum(chunk_end - ctx, 0)
    win_len = np.where(active, chunk_end - win_start, 0)
    width = chunk_window(ci, t)
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


def compact_from(pred_lens: np.ndarray, t: TTTConfig) -> tuple[int, int] | None:
    """(chunk, first row) from which a batch whose documents have these target counts
    runs on rows [first row, first row + ttt.lora_compact_rows) only: the first chunk
    whose window is the whole context (a chunk program of its own at that width alone)
    with every row still scoring in that many consecutive rows (the rows past the
    documents are padding, never scoring). None: never (or lora_compact_rows 0)."""
    rows, n_chunks = t.lora_compact_rows, -(-np.asarray(pred_lens) // t.lora_chunk_tokens)
    if not rows or not len(n_chunks):
        return None
    for ci in range(chunk_count(pred_lens, t)):
        if chunk_window(ci, t) < t.lora_context_len:
            continue
        scoring = np.flatnonzero(n_chunks > ci)  # never empty: ci < the most chunks
        if scoring[-1] - scoring[0] < rows:
            return ci, int(min(scoring[0], t.lora_batch_docs - rows))
    return None


def chunk_steps(lengths: np.ndarray, t: TTTConfig):
    """The (rows, window width) of every chunk step of the batches of documents of these
    lengths (BOS to BOS included), in processing order: lora_batch_docs rows, or
    lora_compact_rows once a batch compacts (`compact_from`)."""
    lengths = np.asarray(lengths)
    for _, docs in batch_order(lengths, t.lora_batch_docs):
        pred_lens = lengths[docs] - 1
        compact = compact_from(pred_lens, t)
        for ci in range(chunk_count(pred_lens, t)):
            yield (t.lora_batch_docs if compact is None or ci < compact[0] else t.lora_compact_rows,
                   chunk_window(ci, t))


def chunk_programs(lengths: np.ndarray, t: TTTConfig) -> list[tuple[int, int]]:
    """The (rows, window width) of every chunk program those steps meet (`chunk_steps`)."""
    return sorted(set(chunk_steps(lengths, t)), reverse=True)


def phase_stream(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, docs) -> np.ndarray:
    """A global phase's documents, concatenated. reference quirk: each document ends with the
    next one's BOS and the next begins with its own: the stream holds BOS pairs (one-token
    documents)."""
    return np.concatenate([tokens[starts[d]:starts[d] + lengths[d]] for d in docs]).astype(np.int32)


def phase_steps(n_targets: int, t: TTTConfig, seq: int):
    """(first token, sequences, learning rate) of each SGD step of a phase over a stream of
    n_targets targets: chunks of global_chunk_tokens (the last never trained on), each whole
    sequences of seq tokens in batches of global_batch_seqs, cosine rate over the chunks."""
    n_chunks = -(-n_targets // t.global_chunk_tokens)
    for ci in range(n_chunks - 1):
        start = ci * t.global_chunk_tokens
        n_seqs = (min(start + t.global_chunk_tokens, n_targets) - start) // seq
        lr = t.global_lr * 0.5 * (1.0 + math.cos(math.pi * ci / max(n_chunks - 1, 1)))
        for b in range(0, n_seqs, t.global_batch_seqs):
            yield start + b * seq, min(t.global_batch_seqs, n_seqs - b), lr
