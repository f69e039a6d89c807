"""Datasets: which shards and tokenizer a config means, the embedded default
data (../shared/data, else a corpus built once from CPython's pydoc topics),
and preparing competition-format shards from text.

    python -m golf_jax.datasets prepare corpus.txt --tokenizer sp.model --out DIR --val-fraction 0.1
    python -m golf_jax.datasets prepare docs.jsonl --text-transform caseops --tokenizer \
        fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model --out DIR --val-docs 50000
    python -m golf_jax.datasets inspect "DIR/fineweb_*.bin"

The second writes what the 1.0611 record's prepare_caseops_data.py writes into
its DIR/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved/: shards
of 10M tokens and the val byte sidecar fineweb_val_bytes_*.bin.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from golf_jax import atomic, caseops, cli, data
from golf_jax.data import DataError

DEFAULT_SHARD_TOKENS = 100_000_000  # the official exporter's shard size
CASEOPS_SHARD_TOKENS = 10_000_000  # prepare_caseops_data.py's
REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_TOKENIZER = "tokenizers/fineweb_1024_bpe.model"
EMBEDDED_SHARDS = "tinyshakespeare_sp1024"
EMBEDDED_CORPUS = "corpus/tinyshakespeare.txt"
# In the reference folder (../shared/reference): the 1.0611 record's tokenizer.
CASEOPS_TOKENIZER = "frontier_1855/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


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
            encode_batch: int = 1024, text_transform: str = "") -> dict:
    """Tokenize documents into val and train shards as the official exporter does.

    text_transform "caseops": each document is CaseOps-transformed before
    tokenizing, and the val shards get a byte sidecar PREFIX_val_bytes_*.bin,
    as the 1.0611 record's prepare_caseops_data.py writes them (its shard
    size is CASEOPS_SHARD_TOKENS).

    Shards are written into a staging folder inside `out_dir` and moved into
    place only when every input has been read, so bad input (a missing file,
    a malformed line deep in the second input) leaves `out_dir` as it was.
    """
    sp = data.load_tokenizer(tokenizer, text_transform=text_transform)
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
        info = _prepare_into(stage, sp, inputs, val_docs, shard_tokens, prefix, encode_batch, text_transform)
        for name in (name for names in info["shards"].values() for name in names):
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
                  prefix: str, encode_batch: int, text_transform: str) -> dict:
    bos = sp.bos_id()
    # "val_bytes": the byte sidecar, cut at the same places as "val".
    streams = ("val", "train") + (("val_bytes",) if text_transform else ())
    counts = {"val": 0, "train": 0}
    shards: dict[str, list[str]] = {s: [] for s in streams}
    buf: dict[str, list[np.ndarray]] = {s: [] for s in streams}
    buffered = {s: 0 for s in streams}

    # prepare_caseops_data.py writes at most one shard per document, so there
    # a document longer than a shard would make the last shard longer; with
    # documents shorter than a shard (10M tokens) the two cut alike.
    def flush(stream: str, final: bool) -> None:
        while buffered[stream] >= shard_tokens or (final and buffered[stream] > 0):
            joined = np.concatenate(buf[stream])
            take = joined[:shard_tokens]
            path = out_dir / f"{prefix}_{stream}_{len(shards[stream]):06d}.bin"
            data.write_shard(path, take)
            shards[stream].append(path.name)
            rest = joined[shard_tokens:]
            buf[stream] = [rest] if rest.size else []
            buffered[stream] = rest.size

    def add(stream: str, values: list[int]) -> None:
        arr = np.asarray(values, dtype=np.uint16)
        buf[stream].append(arr)
        buffered[stream] += arr.size

    def docs() -> Iterator[str]:
        for p in inputs:
            yield from iter_documents(p)

    def encoded(batch: list[str]) -> Iterable[tuple[list[int], list[int] | None]]:
        if text_transform:
            return caseops.encode_documents(sp, batch)
        return ((ids, None) for ids in sp.encode(batch))

    n_docs = 0
    for batch in _batched(docs(), encode_batch):
        for ids, byte_counts in encoded(batch):
            split = "val" if n_docs < val_docs else "train"
            add(split, [bos] + ids)
            counts[split] += 1 + len(ids)
            if split == "val" and byte_counts is not None:
                add("val_bytes", [0] + byte_counts)  # BOS stands for no original text
            n_docs += 1
        for stream in streams:
            flush(stream, stream != "train" and n_docs >= val_docs)
    for stream in streams:
        flush(stream, True)
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
    name: str = ""  # what the shards are, for the launch line ("embedded" names what it resolved to)

    def record(self) -> dict:
        """The identity stored with every model made from this dataset (the
        artifact, final_model/, the training checkpoints): a later command
        checks its tokenizer against it (`dataset_for_model`)."""
        return {"name": self.name, "train_pattern": self.train_pattern, "val_pattern": self.val_pattern,
                "tokenizer": tokenizer_identity(self.tokenizer)}

    def describe(self, record: dict | None = None) -> str:
        t = (record or self.record())["tokenizer"]
        return (f"data: {self.name}; val {self.val_pattern}; tokenizer {self.tokenizer} "
                f"(sha256 {t['sha256'][:12]}, {t['vocab_size']} pieces)")


def tokenizer_identity(path: str | Path) -> dict:
    """A SentencePiece model's path (as given and absolute), sha256 and vocabulary size."""
    path = Path(path)
    sp = data.load_tokenizer(path)
    return {"path": str(path), "absolute": str(path.absolute()), "sha256": file_sha256(path),
            "vocab_size": sp.vocab_size()}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> Path:
    root = os.environ.get("GOLF_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "golf_jax")
    return Path(root)


def _shared_data_candidates() -> list[Path]:
    env = os.environ.get("GOLF_JAX_SHARED_DATA")
    return [Path(env)] if env else [REPO_ROOT.parent / "shared" / "data", REPO_ROOT / "shared" / "data"]


def shared_data_dir() -> Path | None:
    """The embedded default data: $GOLF_JAX_SHARED_DATA, else ../shared/data
    beside the repository, else shared/data inside it."""
    for c in _shared_data_candidates():
        if (c / EMBEDDED_TOKENIZER).is_file() and (c / EMBEDDED_SHARDS).is_dir():
            return c
    return None


def caseops_tokenizer() -> Path | None:
    """The 1.0611 record's tokenizer (CASEOPS_TOKENIZER) in the reference
    folder: $GOLF_JAX_REFERENCE, else reference/ beside the embedded data
    folder ($GOLF_JAX_SHARED_DATA/../reference, e.g. ../shared/reference)."""
    env = os.environ.get("GOLF_JAX_REFERENCE")
    roots = [Path(env)] if env else [c.parent / "reference" for c in _shared_data_candidates()]
    return next((r / CASEOPS_TOKENIZER for r in roots if (r / CASEOPS_TOKENIZER).is_file()), None)


def _built_once(target: Path, build) -> Path:
    """`target`, made once by build(folder) in a temporary folder beside it and
    renamed into place (concurrent first uses each build; one rename wins)."""
    if (target / "tokenizer.model").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}_build.", dir=target.parent))
    try:
        build(work)
        os.chmod(work, 0o777 & ~atomic.current_umask())
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        os.replace(work, target)
        atomic.fsync_dir(target.parent)
    except OSError:  # another process built it first
        shutil.rmtree(work, ignore_errors=True)
    return target


def pydoc_dataset(vocab_size: int = 1024) -> Path:
    """Build once, and cache, a small corpus from the pydoc topic documents
    that ship with CPython, a SentencePiece BPE tokenizer of `vocab_size`
    trained on it (the competition tokenizer's settings) and its shards."""
    def build(work: Path) -> None:
        import sentencepiece as spm
        try:
            from pydoc_data.topics import topics
        except ImportError:
            raise DataError("this Python lacks pydoc_data, and no embedded shards were found: "
                            "set GOLF_JAX_SHARED_DATA or run `python -m golf_jax.datasets prepare`") from None
        corpus = work / "corpus.txt"
        corpus.write_text("\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n", encoding="utf-8")
        lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(work / "tokenizer"), model_type="bpe",
            vocab_size=vocab_size, character_coverage=0.999, split_digits=True, byte_fallback=False,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, add_dummy_prefix=False, normalization_rule_name="nmt_nfkc",
            hard_vocab_limit=False, num_threads=1, minloglevel=2)
        prepare([corpus], work / "tokenizer.model", work, val_fraction=0.1)

    return _built_once(_cache_dir() / f"pydoc_sp{vocab_size}", build)


def caseops_dataset(tokenizer: str | Path = "") -> Path:
    """The embedded tinyshakespeare corpus, CaseOps-transformed and tokenized
    with `tokenizer` (default the 1.0611 record's, `caseops_tokenizer`) into
    shards and the val byte sidecar; built once into the cache, keyed by the
    corpus's and the tokenizer's sha256. Its documents are those of the sp1024
    embedded shards, the blank-line-separated speeches (the first 10%, 722, are
    val): about 58 tokens each, some 35 to a 2048-token row, so document
    packing sees many boundaries; whole plays would be 7 documents in all."""
    where = "data.text_transform='caseops' with data.data_dir='embedded'"
    corpus = next((c / EMBEDDED_CORPUS for c in _shared_data_candidates() if (c / EMBEDDED_CORPUS).is_file()), None)
    if corpus is None:
        raise DataError(f"{where} needs the embedded corpus {EMBEDDED_CORPUS} (in ../shared/data): "
                        f"set GOLF_JAX_SHARED_DATA")
    if tokenizer and not Path(tokenizer).is_file():
        raise DataError(f"{tokenizer}: tokenizer not found (data.tokenizer_path)")
    tokenizer = Path(tokenizer) if tokenizer else caseops_tokenizer()
    if tokenizer is None:
        raise DataError(f"{where} needs the 1.0611 record's tokenizer {CASEOPS_TOKENIZER} of the reference folder "
                        f"(../shared/reference): set GOLF_JAX_REFERENCE to that folder, or data.tokenizer_path")
    key = hashlib.sha256(f"{file_sha256(corpus)} {file_sha256(tokenizer)}".encode()).hexdigest()[:16]

    def build(work: Path) -> None:
        shutil.copyfile(tokenizer, work / "tokenizer.model")
        prepare([corpus], work / "tokenizer.model", work, val_fraction=0.1, shard_tokens=CASEOPS_SHARD_TOKENS,
                text_transform="caseops")

    return _built_once(_cache_dir() / f"tinyshakespeare_caseops_{key}", build)


def resolve_dataset(data_dir: str, tokenizer_path: str, train_pattern: str, val_pattern: str,
                    vocab_size: int, text_transform: str = "") -> Dataset:
    """Turn a DataConfig's paths into shard patterns and a tokenizer file."""
    default_tokenizer = None
    if data_dir == "embedded" and text_transform == "caseops":
        root = caseops_dataset(tokenizer_path)
        default_tokenizer = root / "tokenizer.model"
        name = f"embedded: tinyshakespeare, CaseOps-transformed, built in {root}"
    elif data_dir == "embedded":
        shared = shared_data_dir()
        if shared is not None:
            root, default_tokenizer = shared / EMBEDDED_SHARDS, shared / EMBEDDED_TOKENIZER
            name = f"embedded: the tinyshakespeare shards of {shared}"
        else:
            root = pydoc_dataset(vocab_size)
            default_tokenizer = root / "tokenizer.model"
            name = f"embedded: no shared data found, the pydoc fallback corpus in {root}"
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"{root}: data directory not found (data.data_dir)")
        name = str(root)
    tokenizer = Path(tokenizer_path) if tokenizer_path else default_tokenizer
    if tokenizer is None:
        raise DataError(f"{root}: set data.tokenizer_path to the SentencePiece model of these shards")
    return Dataset(str(root / train_pattern), str(root / val_pattern), str(tokenizer), name)


def dataset_for_model(data_cfg, vocab_size: int, recorded: dict | None, tokenizer: str | None = None,
                      where: str = "the model", hint: str = "pass --tokenizer PATH to use another file") -> Dataset:
    """The dataset for a model made earlier, whose `Dataset.record()` is `recorded`
    (None for a model saved before records were kept).

    The config's own resolution when its tokenizer is the model's (same
    sha256); else the recorded dataset when its tokenizer is still at hand
    (e.g. a model trained on the pydoc fallback, used where ../shared exists);
    else a one-line error naming both files. `tokenizer` (--tokenizer PATH) is
    the user's explicit choice and overrides the check."""
    def resolve(tokenizer_path: str) -> Dataset:
        return resolve_dataset(data_cfg.data_dir, tokenizer_path, data_cfg.train_pattern, data_cfg.val_pattern,
                               vocab_size, data_cfg.text_transform)

    if tokenizer:
        return resolve(tokenizer)
    try:
        now, failure = resolve(data_cfg.tokenizer_path), None
    except DataError as e:
        now, failure = None, e
    if not recorded:
        if failure is not None:
            raise failure
        return now
    want = recorded.get("tokenizer") if isinstance(recorded, dict) else None
    if not isinstance(want, dict) or not {"sha256", "absolute", "vocab_size"} <= set(want):
        raise DataError(f"{where}: its dataset record is damaged (no tokenizer sha256, path and vocabulary size)")
    if now is not None and Path(now.tokenizer).is_file() and file_sha256(now.tokenizer) == want["sha256"]:
        return now
    kept = Path(want["absolute"])
    if kept.is_file() and file_sha256(kept) == want["sha256"]:
        return Dataset(recorded["train_pattern"], recorded["val_pattern"], str(kept),
                       f"the dataset {where} was trained on ({recorded.get('name', '')})")
    found = (f"{now.tokenizer} (sha256 {file_sha256(now.tokenizer)[:12]})" if now is not None
             and Path(now.tokenizer).is_file() else f"no tokenizer ({failure or 'not found'})")
    raise DataError(f"{where} was trained with the tokenizer {want['absolute']} (sha256 {want['sha256'][:12]}, "
                    f"{want['vocab_size']} pieces), which is not at hand; its config's data gives {found}; {hint}")


# ----------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m golf_jax.datasets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="tokenize .txt/.jsonl documents into competition-format shards")
    p.add_argument("inputs", nargs="+", help=".txt (blank-line-separated documents) or .jsonl ('text' field)")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--val-docs", type=int, help="the first N documents go to val")
    g.add_argument("--val-fraction", type=float, help="the first floor(fraction x documents) go to val")
    p.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {DEFAULT_SHARD_TOKENS:,}, "
                                                     f"{CASEOPS_SHARD_TOKENS:,} with --text-transform caseops)")
    p.add_argument("--prefix", default="fineweb", help="shard names: PREFIX_{train,val}_000000.bin")
    p.add_argument("--text-transform", choices=["caseops"], default="",
                   help="CaseOps-transform each document first (the 1.0611 record's tokenizer needs it) and write "
                        "the val byte sidecar PREFIX_val_bytes_*.bin")
    s = sub.add_parser("inspect", help="validate shards and print their token counts")
    s.add_argument("pattern", help="glob of shard files")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.shard_tokens is None:
            args.shard_tokens = CASEOPS_SHARD_TOKENS if args.text_transform else DEFAULT_SHARD_TOKENS
        cli.require_at_least(parser, ("--val-docs", args.val_docs, 0), ("--val-fraction", args.val_fraction, 0),
                             ("--shard-tokens", args.shard_tokens, 1))
        if args.val_fraction is not None and args.val_fraction >= 1:
            parser.exit(2, f"error: --val-fraction {args.val_fraction}: must be below 1 (the rest is training data)\n")
    try:
        if args.command == "prepare":
            info = prepare(args.inputs, args.tokenizer, args.out, val_docs=args.val_docs,
                           val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, prefix=args.prefix,
                           text_transform=args.text_transform)
            print(json.dumps(info, indent=1))
        else:
            total = 0
            for f in data.shard_files(args.pattern):
                n = len(data.read_shard(f))
                total += n
                print(f"{f}  {n:,} tokens")
            print(f"total {total:,} tokens")
    except DataError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
