"""Data: competition-format shards, the tokenizer's byte tables, the training
token stream in the reference's order, validation tokens, and the embedded
default dataset.

Shard format (the official exporter's): a header of 256 little-endian int32
(magic 20240520, version 1, token count, zeros), then the tokens as
little-endian uint16. Documents are written as [bos_id] + tokens, no eos.

    python -m golf_jax.data prepare corpus.txt --tokenizer sp.model --out DIR --val-fraction 0.1
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from golf_jax import atomic

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
DEFAULT_SHARD_TOKENS = 100_000_000  # the official exporter's shard size

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_TOKENIZER = "tokenizers/fineweb_1024_bpe.model"
EMBEDDED_SHARDS = "tinyshakespeare_sp1024"


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


def _check_ids(tokens: np.ndarray, vocab_size: int, path: Path, offset: int = 0) -> None:
    """tokens: the shard's from position `offset` on."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise DataError(f"{path}: token id {int(tokens[bad])} at position {offset + bad} is >= vocab_size "
                        f"{vocab_size}")


# ----------------------------------------------------------------------------- tokenizer

def load_tokenizer(path: str | Path, vocab_size: int | None = None):
    """Load a SentencePiece model; its vocab must equal the model's vocab_size."""
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
    return sp


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


def bits_per_byte(loss_sum: float, token_count: int, byte_count: int) -> tuple[float, float]:
    """(mean loss in nats, bits per byte) from float64 sums."""
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
                _check_ids(span, self.vocab_size, self.files[self.file_idx], self.pos)
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


def load_validation_tokens(pattern: str, seq_len: int, vocab_size: int, max_tokens: int = 0) -> np.ndarray:
    """All val shards concatenated, trimmed to a multiple of seq_len, plus one (int32)."""
    files = shard_files(pattern)
    parts = []
    for f in files:
        tokens = read_shard(f)
        _check_ids(tokens, vocab_size, f)
        parts.append(np.asarray(tokens, dtype=np.int32))
    tokens = np.concatenate(parts)
    if max_tokens:
        tokens = tokens[:max_tokens + 1]
    usable = (len(tokens) - 1) // seq_len * seq_len
    if usable <= 0:
        raise DataError(f"{pattern}: {len(tokens)} validation tokens, fewer than one {seq_len}-token sequence + 1")
    return tokens[:usable + 1]


# ----------------------------------------------------------------------------- preparing shards

def iter_documents(path: str | Path) -> Iterator[str]:
    """Documents of a .txt (blank-line-separated blocks) or .jsonl ("text" field) file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: input not found")
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    text = None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{n}: expected a JSON object with a string \"text\" field")
                yield text
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        for block in re.split(r"\n\s*\n", text):
            if block.strip():
                yield block.strip()


def prepare(inputs: Sequence[str | Path], tokenizer: str | Path, out_dir: str | Path, *,
            val_docs: int | None = None, val_fraction: float | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, prefix: str = "fineweb",
            encode_batch: int = 1024) -> dict:
    """Tokenize documents into val and train shards as the official exporter does.

    Shards are written into a staging folder inside `out_dir` and moved into
    place only when every input has been read, so bad input (a missing file,
    a malformed line deep in the second input) leaves `out_dir` as it was.
    """
    sp = load_tokenizer(tokenizer)
    if (val_docs is None) == (val_fraction is None):
        raise ValueError("give exactly one of val_docs and val_fraction")
    if val_docs is None:
        total = sum(1 for p in inputs for _ in iter_documents(p))
        val_docs = int(total * val_fraction)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: output path exists and is not a directory")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".prepare.", dir=out_dir))
    try:
        info = _prepare_into(stage, sp, inputs, val_docs, shard_tokens, prefix, encode_batch)
        for name in info["shards"]["val"] + info["shards"]["train"]:
            os.replace(stage / name, out_dir / name)
        atomic.fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            try:
                out_dir.rmdir()  # only if still empty: never take anything else with it
            except OSError:
                pass
        raise
    stage.rmdir()
    return info


def _prepare_into(out_dir: Path, sp, inputs: Sequence[str | Path], val_docs: int, shard_tokens: int,
                  prefix: str, encode_batch: int) -> dict:
    bos = sp.bos_id()
    counts = {"val": 0, "train": 0}
    shards = {"val": [], "train": []}
    buf: dict[str, list[np.ndarray]] = {"val": [], "train": []}
    buffered = {"val": 0, "train": 0}

    def flush(split: str, final: bool) -> None:
        while buffered[split] >= shard_tokens or (final and buffered[split] > 0):
            joined = np.concatenate(buf[split])
            take = joined[:shard_tokens]
            path = out_dir / f"{prefix}_{split}_{len(shards[split]):06d}.bin"
            write_shard(path, take)
            shards[split].append(path.name)
            rest = joined[shard_tokens:]
            buf[split] = [rest] if rest.size else []
            buffered[split] = rest.size

    def docs() -> Iterator[str]:
        for p in inputs:
            yield from iter_documents(p)

    n_docs = 0
    for batch in _batched(docs(), encode_batch):
        for ids in sp.encode(batch):
            split = "val" if n_docs < val_docs else "train"
            arr = np.asarray([bos] + ids, dtype=np.uint16)
            buf[split].append(arr)
            buffered[split] += arr.size
            counts[split] += arr.size
            n_docs += 1
        flush("val", n_docs >= val_docs)
        flush("train", False)
    flush("val", True)
    flush("train", True)
    return {"documents": n_docs, "val_documents": min(val_docs, n_docs), "tokens": counts, "shards": shards}


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- datasets

@dataclass(frozen=True)
class Dataset:
    train_pattern: str
    val_pattern: str
    tokenizer: str


def _cache_dir() -> Path:
    root = os.environ.get("GOLF_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "golf_jax")
    return Path(root)


def shared_data_dir() -> Path | None:
    """The embedded default data: $GOLF_JAX_SHARED_DATA, else ../shared/data
    beside the repository, else shared/data inside it."""
    env = os.environ.get("GOLF_JAX_SHARED_DATA")
    candidates = [Path(env)] if env else [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]
    for c in candidates:
        if (c / EMBEDDED_TOKENIZER).is_file() and (c / EMBEDDED_SHARDS).is_dir():
            return c
    return None


def pydoc_dataset(vocab_size: int = 1024) -> Path:
    """Build once, and cache, a small corpus from the pydoc topic documents
    that ship with CPython, a SentencePiece BPE tokenizer of `vocab_size`
    trained on it (the competition tokenizer's settings) and its shards."""
    target = _cache_dir() / f"pydoc_sp{vocab_size}"
    if (target / "tokenizer.model").is_file():
        return target
    import sentencepiece as spm
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise DataError("this Python lacks pydoc_data, and no embedded shards were found: "
                        "set GOLF_JAX_SHARED_DATA or run `python -m golf_jax.data prepare`") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".pydoc_build.", dir=target.parent))
    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n", encoding="utf-8")
    lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(work / "tokenizer"), model_type="bpe",
        vocab_size=vocab_size, character_coverage=0.999, split_digits=True, byte_fallback=False,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False, normalization_rule_name="nmt_nfkc",
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    prepare([corpus], work / "tokenizer.model", work, val_fraction=0.1)
    os.chmod(work, 0o777 & ~atomic.current_umask())
    try:
        os.replace(work, target)
        atomic.fsync_dir(target.parent)
    except OSError:  # another process built it first
        pass
    return target


def resolve_dataset(data_dir: str, tokenizer_path: str, train_pattern: str, val_pattern: str,
                    vocab_size: int) -> Dataset:
    """Turn a DataConfig's paths into shard patterns and a tokenizer file."""
    default_tokenizer = None
    if data_dir == "embedded":
        shared = shared_data_dir()
        if shared is not None:
            root, default_tokenizer = shared / EMBEDDED_SHARDS, shared / EMBEDDED_TOKENIZER
        else:
            root = pydoc_dataset(vocab_size)
            default_tokenizer = root / "tokenizer.model"
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: data directory not found (data.data_dir)")
    tokenizer = Path(tokenizer_path) if tokenizer_path else default_tokenizer
    if tokenizer is None:
        raise DataError(f"{root}: set data.tokenizer_path to the SentencePiece model of these shards")
    return Dataset(str(root / train_pattern), str(root / val_pattern), str(tokenizer))


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m golf_jax.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl documents into competition-format shards")
    p.add_argument("inputs", nargs="+", help=".txt (blank-line-separated documents) or .jsonl ('text' field)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--val-docs", type=int, help="the first N documents go to val")
    g.add_argument("--val-fraction", type=float, help="the first floor(fraction x documents) go to val")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    p.add_argument("--prefix", default="fineweb", help="shard names: PREFIX_{train,val}_000000.bin")
    s = sub.add_parser("inspect", help="validate shards and print their token counts")
    s.add_argument("pattern", help="glob of shard files")
    args = parser.parse_args(argv)
    try:
        if args.command == "prepare":
            info = prepare(args.inputs, args.tokenizer, args.out, val_docs=args.val_docs,
                           val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, prefix=args.prefix)
            print(json.dumps(info, indent=1))
        else:
            total = 0
            for f in shard_files(args.pattern):
                n = len(read_shard(f))
                total += n
                print(f"{f}  {n:,} tokens")
            print(f"total {total:,} tokens")
    except DataError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
