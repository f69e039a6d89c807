"""Document-packed training batches: the 1.0611 record's loader (issue 19,
"Tokenizer and data").

The 1.0611 record does not cut its training stream into fixed 2048-token rows
with attention across document boundaries, as the 1.1147 record does: each
rank gets one long packed row per micro-step, and attention is masked per
document. A document is a run of tokens from one BOS (id 1) to the next;
documents longer than train_seq_len are split into train_seq_len chunks, each
its own segment. Segments are described as FlashAttention's varlen
`cu_seqlens` (segment boundaries, padded to a bucket multiple so the kernel
sees few distinct shapes), and as per-token segment ids for a dense mask
(`layers.attention(..., segment_ids_T=...)`).

- `document_segments`: BOS positions in a row -> (cu_seqlens, max_seqlen).
- `segment_ids`: cu_seqlens -> each token's segment index.
- `RowSegments`, `row_segments`, `model_inputs`: a packed row's documents as the
  training step feeds them to the model.
- `PackedBatches`: the record's batch order over competition-format shards
  (read and validated by golf_jax.data), synchronous and deterministic.

numpy only: the arrays go to the devices from here.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from golf_jax import data

DEFAULT_BOS_ID = 1
DEFAULT_BUCKET_SIZE = 64


# ----------------------------------------------------------------------------- segments

def document_segments(bos_positions: Sequence[int] | np.ndarray, total_len: int, max_doc_len: int,
                      bucket_size: int = DEFAULT_BUCKET_SIZE) -> tuple[np.ndarray, int]:
    """The segments of a packed row of `total_len` tokens whose documents start at
    `bos_positions` (strictly increasing, in [0, total_len)).

    Returns cu_seqlens (int32, [k * bucket_size]): the segment starts, then total_len,
    then total_len repeated up to a multiple of bucket_size (empty segments, which
    attention skips); and max_seqlen, the longest real segment. A document longer
    than max_doc_len (> 0) is split into max_doc_len chunks from its start; 0 leaves
    documents whole.
    """
    starts = np.asarray(bos_positions, dtype=np.int64).reshape(-1)
    if total_len < 1:
        raise ValueError(f"total_len {total_len}: a packed row holds at least one token")
    if bucket_size < 1 or max_doc_len < 0:
        raise ValueError(f"bucket_size {bucket_size} must be >= 1 and max_doc_len {max_doc_len} >= 0")
    if starts.size and (starts[0] < 0 or starts[-1] >= total_len or np.any(np.diff(starts) <= 0)):
        raise ValueError(f"BOS positions must be strictly increasing in [0, {total_len}); got {starts.tolist()}")
    # reference quirk: a row that does not start at a BOS still starts a segment at 0,
    # so the tail of a document cut by the window attends only within the window.
    if not starts.size or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    doc_lens = np.diff(np.append(starts, total_len))
    if max_doc_len > 0:
        chunks_per_doc = -(-doc_lens // max_doc_len)
        first_chunk = np.repeat(np.cumsum(chunks_per_doc) - chunks_per_doc, chunks_per_doc)
        chunk_index = np.arange(first_chunk.size) - first_chunk
        seg_starts = np.repeat(starts, chunks_per_doc) + chunk_index * max_doc_len
    else:
        seg_starts = starts
    boundaries = np.append(seg_starts, total_len)
    padded_len = -(-boundaries.size // bucket_size) * bucket_size
    cu_seqlens = np.full(padded_len, total_len, dtype=np.int32)
    cu_seqlens[:boundaries.size] = boundaries
    # Over the real segments only: the padding's empty segments have length 0 anyway.
    return cu_seqlens, int(np.diff(boundaries).max())


def segment_ids(cu_seqlens: np.ndarray, total_len: int) -> np.ndarray:
    """Each token's segment index (int32, [total_len]) under `cu_seqlens`: tokens attend
    to each other only where their ids are equal (with the causal mask)."""
    cu_seqlens = np.asarray(cu_seqlens)
    if cu_seqlens.ndim != 1 or cu_seqlens.size < 2 or cu_seqlens[0] != 0 or np.any(np.diff(cu_seqlens) < 0):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0; got {cu_seqlens.tolist()}")
    if cu_seqlens[-1] != total_len:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, not at the row's length {total_len}")
    # The padding (total_len, repeated) lies past every token, so it never counts.
    ids = np.searchsorted(cu_seqlens, np.arange(total_len), side="right") - 1
    return ids.astype(np.int32)


# ----------------------------------------------------------------------------- what the model gets

class RowSegments(NamedTuple):
    """The documents of packed rows as device inputs of static shapes, so no
    program recompiles as documents vary: `segment_ids` [..., L] (each token's
    segment) and `cu_seqlens` [..., cu_seqlens_capacity(L)] (`document_segments`'
    boundaries, padded with L to the most a row of L tokens can have: L + 1,
    rounded up to the bucket size). Leading axes: the training step's micro-steps
    and rows."""

    segment_ids: Any
    cu_seqlens: Any


def cu_seqlens_capacity(total_len: int, bucket_size: int = DEFAULT_BUCKET_SIZE) -> int:
    return -(-(total_len + 1) // bucket_size) * bucket_size


def row_segments(cu_seqlens: np.ndarray, total_len: int) -> RowSegments:
    """One row's RowSegments (host arrays) from its cu_seqlens (`document_segments`)."""
    padded = np.full(cu_seqlens_capacity(total_len), total_len, np.int32)
    padded[:len(cu_seqlens)] = cu_seqlens
    return RowSegments(segment_ids(cu_seqlens, total_len), padded)


def model_inputs(row: RowSegments | None) -> dict:
    """The model's keyword arguments for one packed row (leaves [L], [C]); {} for
    unpacked batches. The one place that says how the model sees the documents:
    per-token segment ids ("jnp" attention); a per-document attention kernel
    would take offsets derived from row.cu_seqlens here instead."""
    return {} if row is None else {"segment_ids": row.segment_ids}


# ----------------------------------------------------------------------------- the packed stream

class PackedBatches:
    """The 1.0611 record's packed micro-batches for one rank.

    Each micro-step takes a global span of world_size x (tokens_local + 1) tokens
    from the current shard at the cursor; rank r gets the r-th span, inputs and
    targets being that span shifted by one, and the segments of its inputs (one
    document per BOS, split into train_seq_len chunks). The cursor then moves by
    the global span. A shard is read from its first BOS; when the global span no
    longer fits, the next shard (cycling through the sorted files) is opened and
    the rest of the current one is dropped.

    reference quirk: the record prepares batches two ahead on a thread; with a
    fixed tokens_local (as it trains) its order is this synchronous one.
    """

    def __init__(self, pattern: str, rank: int, world_size: int, train_seq_len: int,
                 bos_id: int = DEFAULT_BOS_ID, bucket_size: int = DEFAULT_BUCKET_SIZE,
                 vocab_size: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank}: expected 0 .. {world_size - 1}")
        if train_seq_len < 1:
            raise ValueError(f"train_seq_len {train_seq_len}: expected >= 1")
        self.files = data.shard_files(pattern)
        # Headers and sizes of every shard now, so a damaged shard stops the run at
        # launch; the BOS scan reads a shard's tokens, so it waits until it is opened.
        for path in self.files:
            data.read_shard(path)
        self.rank, self.world_size, self.train_seq_len = rank, world_size, train_seq_len
        self.bos_id, self.bucket_size, self.vocab_size = bos_id, bucket_size, vocab_size
        self._open(0)

    def _open(self, file_idx: int, cursor: int | None = None) -> None:
        path = self.files[file_idx]
        tokens = data.read_shard(path)
        bos_positions = np.flatnonzero(tokens == self.bos_id)
        if not bos_positions.size:
            # reference quirk: the record fails here with an IndexError.
            raise data.DataError(f"{path}: no BOS token (id {self.bos_id}) in the shard's {tokens.size} tokens; "
                                 "packed batches start each shard at its first document")
        self.file_idx, self.tokens, self.bos_positions = file_idx, tokens, bos_positions
        self.cursor = int(bos_positions[0]) if cursor is None else cursor

    def next(self, tokens_local: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """inputs, targets (int32 [1, tokens_local]: one packed row), cu_seqlens (int32,
        see document_segments) and max_seqlen for this rank's next micro-batch."""
        return self.next_rows(tokens_local, (self.rank,))[0]

    def next_rows(self, tokens_local: int,
                  ranks: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, int]]:
        """The next micro-batch of each of `ranks` (as `next` gives its own rank's):
        one global span, read once for several ranks (training's data feed)."""
        if tokens_local < 1:
            raise ValueError(f"tokens_local {tokens_local}: expected >= 1")
        if not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"ranks {list(ranks)}: expected some of 0 .. {self.world_size - 1}")
        rank_span = tokens_local + 1
        global_span = rank_span * self.world_size
        opened = 0
        while self.cursor + global_span > self.tokens.size:
            # reference quirk: the record loops forever when no shard is long enough.
            if opened == len(self.files):
                raise data.DataError(f"{self.files[0].parent}: no shard matching the pattern holds a global span of "
                                     f"{global_span} tokens from its first BOS")
            self._open((self.file_idx + 1) % len(self.files))
            opened += 1
        rows = [self._row(self.cursor + r * rank_span, tokens_local) for r in ranks]
        self.cursor += global_span
        return rows

    def _row(self, start: int, tokens_local: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        window = np.asarray(self.tokens[start:start + tokens_local + 1], dtype=np.int32)
        if self.vocab_size is not None:
            data.check_ids(window, self.vocab_size, self.files[self.file_idx], start)
        lo, hi = np.searchsorted(self.bos_positions, [start, start + tokens_local], side="left")
        cu_seqlens, max_seqlen = document_segments(self.bos_positions[lo:hi] - start, tokens_local,
                                                   self.train_seq_len, self.bucket_size)
        return window[None, :-1], window[None, 1:], cu_seqlens, max_seqlen

    def state(self) -> dict:
        return {"file_idx": self.file_idx, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        file_idx = int(state["file_idx"])
        if not 0 <= file_idx < len(self.files):
            raise data.DataError(f"saved loader state names shard {file_idx}, but {len(self.files)} shards match")
        self._open(file_idx, int(state["cursor"]))
