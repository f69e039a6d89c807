"""Data: competition-format shards, the tokenizer's byte tables, the training
token stream in the reference's order and validation tokens. Which shards and
tokenizer a config means, the embedded default data, and preparing shards
from text: golf_jax/datasets.py.

Shard format (the official exporter's): a header of 256 little-endian int32
(magic 20240520, version 1, token count, zeros), then the tokens as
little-endian uint16. Documents are written as [bos_id] + tokens, no eos.

Text transformed before tokenizing (data.text_transform "caseops", the 1.0611
record's) is scored on its original bytes: a byte sidecar beside the val
shards, in the same format, holds each val token's original UTF-8 byte count
(0 for BOS and the operators).
"""

from __future__ import annotations

import glob
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from golf_jax import atomic, caseops

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
TEXT_TRANSFORMS = ("", "caseops")
# reference quirk: the byte sidecars match the val glob (fineweb_val_*.bin), so
# files with this in their name are never read as val tokens.
SIDECAR_MARK = "_bytes_"


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


# ----------------------------------------------------------------------------- shards

def read_shard(path: str | Path) -> np.ndarray:
    """Memory-map a shard's tokens after validating its header and size."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: shard not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file, expected a token shard")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    try:
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror or e})") from e
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad shard magic {header[0]} (expected {SHARD_MAGIC}); not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    expected = HEADER_BYTES + count * TOKEN_DTYPE.itemsize
    if count < 0 or size != expected:
        hint = (" (truncated)" if size < expected else
                # A common exporter slip: token ids written as int32 after the right header.
                "; 4 bytes a token: written as int32? shards hold uint16" if size == HEADER_BYTES + 4 * count else "")
        raise DataError(f"{path}: header says {count} tokens ({expected} bytes) but the file has {size} bytes{hint}")
    if count == 0:
        return np.zeros((0,), TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(count,))


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write a shard atomically (temporary name, fsync, rename: golf_jax.atomic)."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    atomic.write_bytes(path, header.tobytes() + tokens.astype(TOKEN_DTYPE).tobytes())


def shard_files(pattern: str) -> list[Path]:
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise DataError(f"{pattern}: no shards match")
    return files


def check_ids(tokens: np.ndarray, vocab_size: int, path: Path, offset: int = 0) -> None:
    """tokens: the shard's from position `offset` on."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[bad])} at position {offset + bad} is >= vocab_size "
                        f"{vocab_size}")


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | Path, vocab_size: int | None = None, text_transform: str | None = None):
    """Load a SentencePiece model; its vocab must equal the model's vocab_size,
    and with `text_transform` given, it must be a CaseOps tokenizer exactly
    when that is "caseops" (`check_text_transform`)."""
    import sentencepiece as spm

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: tokenizer not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file, expected a SentencePiece model")
    if path.stat().st_size == 0:
        # SentencePiece reads an empty file as an empty model and says "unk is not defined".
        raise DataError(f"{path}: empty file, not a SentencePiece model")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{path}: not a SentencePiece model ({e})") from None
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise DataError(f"{path}: tokenizer has {sp.vocab_size()} tokens but the model's vocab_size is {vocab_size}")
    if text_transform is not None:
        check_text_transform(sp, path, text_transform)
    return sp


def check_text_transform(sp, path: str | Path, text_transform: str) -> None:
    """A CaseOps tokenizer (pieces 4-7 the operators U+E001-U+E004) reads
    transformed text only, and the transform needs one: refuse either mismatch."""
    if text_transform not in TEXT_TRANSFORMS:
        raise DataError(f"text transform {text_transform!r}: expected one of {TEXT_TRANSFORMS}")
    reserved = [sp.id_to_piece(i) for i in caseops.OPERATOR_IDS if i < sp.vocab_size()]
    if text_transform == "caseops" and not caseops.is_caseops_tokenizer(sp):
        raise DataError(f"{path}: data.text_transform='caseops' needs a CaseOps tokenizer, whose pieces 4-7 are the "
                        f"operators U+E001-U+E004; this one's are {reserved!r}")
    if text_transform == "" and caseops.is_caseops_tokenizer(sp):
        raise DataError(f"{path}: a CaseOps tokenizer (pieces 4-7 are the operators U+E001-U+E004) reads "
                        f"CaseOps-transformed text only: set data.text_transform='caseops' "
                        f"(prepare: --text-transform caseops)")


@dataclass(frozen=True)
class ByteTables:
    """Per token id: bytes of its piece without the leading-space marker,
    whether it carries a leading space, and whether it is a boundary token."""

    base_bytes: np.ndarray  # int16 [V]
    has_leading_space: np.ndarray  # bool [V]
    is_boundary: np.ndarray  # bool [V]

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes of each target tokens[1:], given the token before it (int64)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        prev, tgt = tokens[:-1], tokens[1:]
        extra = self.has_leading_space[tgt] & ~self.is_boundary[prev]
        return self.base_bytes[tgt].astype(np.int64) + extra


def byte_tables(sp, vocab_size: int) -> ByteTables:
    size = max(int(sp.vocab_size()), vocab_size)
    base = np.zeros(size, np.int16)
    space = np.zeros(size, bool)
    boundary = np.ones(size, bool)  # ids the tokenizer lacks count as boundaries
    for i in range(int(sp.vocab_size())):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            space[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteTables(base, space, boundary)


@dataclass(frozen=True)
class ByteSidecar:
    """The original bytes of each validation token (`load_byte_sidecar`):
    bits per byte divides by these when the text was transformed before
    tokenizing, as the tokenizer's pieces are not the original text."""

    counts: np.ndarray  # int64 [N]: counts[i] belongs to tokens[i]
    pattern: str  # the sidecar files, for messages

    def target_bytes(self, tokens: np.ndarray) -> np.ndarray:
        """Bytes of each target tokens[1:] (int64); `tokens` must be the
        validation tokens the sidecar was loaded for."""
        if len(tokens) != len(self.counts):
            raise DataError(f"{self.pattern}: the byte sidecar covers {len(self.counts)} validation tokens, "
                            f"asked for {len(tokens)}")
        return self.counts[1:]


# What bits per byte divides by: per-token tables of the tokenizer's pieces, or the sidecar.
TargetBytes = ByteTables | ByteSidecar


def bits_per_byte(loss_sum: float, token_count: int, byte_count: int) -> tuple[float, float]:
    """(mean loss in nats, bits per byte) from float64 sums: bits per byte is
    loss_sum / (ln 2 x byte_count), the reference's formula."""
    mean_loss = loss_sum / token_count
    return mean_loss, mean_loss / math.log(2.0) * token_count / byte_count


# ----------------------------------------------------------------------------- the token streams

class TokenStream:
    """The reference's stream: shards in sorted order, one cursor that runs
    across shard boundaries and wraps at the end."""

    def __init__(self, pattern: str, vocab_size: int):
        self.files = shard_files(pattern)
        # Headers and sizes of every shard now (a memory map each, no token
        # read), so a damaged shard stops the run at launch, not when the
        # stream reaches it mid-training. Token ids are checked as they are
        # taken: a process of a multi-process run reads only its own spans.
        for f in self.files:
            read_shard(f)
        self.vocab_size = vocab_size
        self.file_idx, self.pos = 0, 0
        self._tokens = self._load(0)

    def _load(self, idx: int) -> np.ndarray:
        return read_shard(self.files[idx])

    def take(self, n: int) -> np.ndarray:
        out = np.empty(n, dtype=np.int32)
        self._advance(n, out)
        return out

    def skip(self, n: int) -> None:
        """Move the cursor past n tokens without copying them (another
        process's spans), loading and checking only the shards it lands in."""
        self._advance(n, None)

    def _advance(self, n: int, out: np.ndarray | None) -> None:
        filled, empty_files = 0, 0
        while filled < n:
            avail = len(self._tokens) - self.pos
            if avail <= 0:
                empty_files = empty_files + 1 if len(self._tokens) == 0 else 0
                if empty_files > len(self.files):
                    raise DataError(f"{self.files[0].parent}: every shard matching the pattern is empty")
                self.file_idx = (self.file_idx + 1) % len(self.files)
                self.pos = 0
                self._tokens = self._load(self.file_idx)
                continue
            k = min(n - filled, avail)
            if out is not None:
                span = self._tokens[self.pos:self.pos + k]
                check_ids(span, self.vocab_size, self.files[self.file_idx], self.pos)
                out[filled:filled + k] = span
            self.pos += k
            filled += k

    def state(self) -> dict:
        return {"file_idx": self.file_idx, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.file_idx, self.pos = int(state["file_idx"]), int(state["pos"])
        self._tokens = self._load(self.file_idx)


class TrainBatches:
    """Micro-batches in the reference's order.

    Each micro-step takes world_size x (local_tokens + 1) tokens from the
    stream, local_tokens = global_tokens / (world_size x accumulation steps);
    rank r gets the r-th contiguous span, inputs and targets being that span
    shifted by one. With world_size x accumulation steps fixed (8 in the
    record) every device count consumes the same tokens in the same order.

    `ranks`: the ranks whose spans this process loads (a multi-process run:
    its own devices'); the others' spans are skipped, not read. Every process
    moves the cursor by the whole micro-step, so all hold the same cursor.
    """

    def __init__(self, pattern: str, vocab_size: int, global_tokens: int, seq_len: int,
                 world_size: int, accum_steps: int, ranks: Sequence[int] | None = None):
        local = global_tokens // (world_size * accum_steps)
        if local * world_size * accum_steps != global_tokens or local % seq_len:
            raise DataError(f"global batch {global_tokens} is not divisible into {world_size} ranks x "
                            f"{accum_steps} micro-steps of whole {seq_len}-token sequences")
        self.ranks = tuple(range(world_size)) if ranks is None else tuple(sorted(ranks))
        if not self.ranks or not all(0 <= r < world_size for r in self.ranks):
            raise DataError(f"ranks {list(self.ranks)}: expected some of 0 .. {world_size - 1}")
        self.stream = TokenStream(pattern, vocab_size)
        self.world_size, self.local_tokens, self.seq_len = world_size, local, seq_len

    def next_micro_batch(self) -> tuple[np.ndarray, np.ndarray]:
        """x, y int32 [len(ranks) * local_seqs, seq_len]: the spans of `ranks`
        in order (all ranks by default: rank r owns rows r*local_seqs...)."""
        span = self.local_tokens + 1
        if len(self.ranks) == self.world_size:
            chunk = self.stream.take(self.world_size * span).reshape(self.world_size, span)
        else:
            mine = []
            for r in range(self.world_size):
                if r in self.ranks:
                    mine.append(self.stream.take(span))
                else:
                    self.stream.skip(span)
            chunk = np.stack(mine)
        x = chunk[:, :-1].reshape(-1, self.seq_len)
        y = chunk[:, 1:].reshape(-1, self.seq_len)
        return x, y

    def state(self) -> dict:
        return self.stream.state()

    def restore(self, state: dict) -> None:
        self.stream.restore(state)


def validation_files(pattern: str) -> list[Path]:
    """The val shards `pattern` matches, byte sidecars left out."""
    files = [f for f in shard_files(pattern) if SIDECAR_MARK not in f.name]
    if not files:
        raise DataError(f"{pattern}: only byte sidecars (*{SIDECAR_MARK}*) match, no validation shards")
    return files


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int, max_tokens: int = 0) -> np.ndarray:
    """All val shards concatenated, trimmed to a multiple of seq_len, plus one (int32)."""
    files = validation_files(pattern)
    parts = []
    for f in files:
        tokens = read_shard(f)
        check_ids(tokens, vocab_size, f)
        parts.append(np.asarray(tokens, dtype=np.int32))
    tokens = np.concatenate(parts)
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise DataError(f"{pattern}: {len(tokens)} validation tokens, fewer than one {seq_len}-token sequence + 1")
    return tokens[:usable + 1]


def load_byte_sidecar(val_pattern: str, sidecar_pattern: str, tokens: np.ndarray, bos_id: int) -> ByteSidecar:
    """The byte sidecar of the validation tokens `tokens` (load_validation_tokens
    of val_pattern): the files matching sidecar_pattern, in sorted order, one
    per val shard and as long as it, BOS counting 0 bytes (the prepare step's
    layout); anything else is out of step with the tokens and an error."""
    shards = validation_files(val_pattern)
    sidecars = sorted(Path(p) for p in glob.glob(sidecar_pattern))
    if not sidecars:
        raise DataError(f"{sidecar_pattern}: no byte sidecar found (data.val_bytes_pattern); text transformed before "
                        f"tokenizing (data.text_transform) is scored on its original bytes, which the sidecar counts")
    if len(sidecars) != len(shards):
        raise DataError(f"{sidecar_pattern}: {len(sidecars)} byte sidecar files for {len(shards)} validation shards "
                        f"({val_pattern}); expected one each")
    parts = []
    for shard, sidecar in zip(shards, sidecars):
        counts, shard_tokens = read_shard(sidecar), read_shard(shard)
        if len(counts) != len(shard_tokens):
            raise DataError(f"{sidecar}: {len(counts)} byte counts, but its validation shard {shard} has "
                            f"{len(shard_tokens)} tokens")
        bad = np.flatnonzero((shard_tokens == bos_id) & (counts != 0))
        if bad.size:
            raise DataError(f"{sidecar}: {int(counts[bad[0]])} bytes at position {int(bad[0])}, where {shard} has "
                            f"BOS (0 bytes): the sidecar is not this shard's")
        parts.append(counts)
    return ByteSidecar(np.concatenate(parts)[:len(tokens)].astype(np.int64), sidecar_pattern)
