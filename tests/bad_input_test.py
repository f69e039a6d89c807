"""Bad input, table-driven: every reader fed missing, empty, truncated,
wrong-magic, wrong-version, wrong-dtype, wrong-shape and random-byte files
fails with its module's own error, one line that starts with the file's name,
raised by golf_jax itself, and leaves nothing behind. Then the CLI's view of
the same errors, and property-based fuzzing of the shard parser (the artifact
parser's fuzzing lives in artifact_test.py)."""

from __future__ import annotations

import functools
import importlib.util
import io
import itertools
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import golf_jax
from golf_jax import artifact, cli, compat, data, datasets
from golf_jax.artifact import ArtifactError
from golf_jax.compat import CompatError
from golf_jax.config import Config, ConfigError, ModelConfig
from golf_jax.data import DataError
from golf_jax.quant import FP32, INT6, QTensor

VOCAB = 64  # the tiny tokenizer's vocabulary, and the shards' id bound
# A model small enough that its reference state is a few KB of zeros; no JAX runs
# in this file's table, because every bad case must fail before it gets there.
REF_CFG = ModelConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1,
                      bigram_vocab_size=0, ve_enabled=False, xsa_last_n=2)
RANDOM = np.random.default_rng(0).bytes(3000)
PACKAGE_DIR = Path(golf_jax.__file__).resolve().parent


# ----------------------------------------------------------------------------- good inputs, to spoil

@functools.lru_cache(maxsize=None)
def tokenizer_bytes() -> bytes:
    """A real SentencePiece model of VOCAB pieces (30 ms to train), so the
    test needs neither the embedded data nor the network."""
    import sentencepiece as spm

    lines = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}" for i in range(200)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, model_type="bpe",
                                   vocab_size=VOCAB, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def shard_bytes(tokens, count: int | None = None, magic: int = data.SHARD_MAGIC,
                version: int = data.SHARD_VERSION, dtype: str = "<u2") -> bytes:
    tokens = np.asarray(tokens)
    header = np.zeros(data.HEADER_INTS, "<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    return header.tobytes() + tokens.astype(dtype).tobytes()


GOOD_TOKENS = np.arange(100) % VOCAB


def ref_state(**changes) -> dict[str, np.ndarray]:
    state = {k: np.zeros(s, np.float32) for k, s in compat.expected_shapes(REF_CFG).items()}
    state.update(changes)
    return {k: v for k, v in state.items() if v is not None}


def npz_bytes(state: dict, compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **state)
    return buf.getvalue()


def artifact_bytes() -> bytes:
    qmodel = {"w": QTensor(INT6, np.ones((4, 8), np.int8), np.ones(4, np.float16), "float32"),
              "g": QTensor(FP32, np.ones(8, np.float32), None, "float32")}
    return artifact.serialize(qmodel, {"note": "bad input test"})


def config_text(body: str) -> str:
    return "from golf_jax.config import *\n\ndef get_config():\n" + body


# ----------------------------------------------------------------------------- the readers

def prepare_reader(path: Path):
    """`prepare` of a good text, then `path`, into tmp/out (not there before),
    a few tokens a shard so that shards are written before `path` is reached."""
    return datasets.prepare([path.parent / "good.txt", path], path.parent / "tok.model", path.parent / "out",
                        val_docs=1, shard_tokens=8, encode_batch=4)


def prepare_inputs(tmp: Path) -> None:
    (tmp / "tok.model").write_bytes(tokenizer_bytes())
    (tmp / "good.txt").write_text("\n\n".join(f"the lazy dog number {i}" for i in range(20)) + "\n")


READERS: dict[str, Callable[[Path], object]] = {
    "shard": data.read_shard,
    # The stream reads every shard of a folder, as in training; the error names the bad one.
    "stream": lambda p: data.TrainBatches(str(p.parent / "*.bin"), VOCAB, 64, 16, 1, 1).next_micro_batch(),
    "val": lambda p: data.load_validation_tokens(str(p), 16, VOCAB),
    "tokenizer": lambda p: data.load_tokenizer(p, VOCAB),
    "prepare": prepare_reader,
    "config": cli.load_config_file,
    # The "file" of an override is its flag: make() returns the flag as a Path.
    "override": lambda p: cli.apply_overrides(Config(), cli.split_overrides([str(p)])[0]),
    "reference": lambda p: compat.params_from_reference(compat.load_reference_state(p), REF_CFG),
    "artifact": artifact.read_artifact,
}


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Case:
    reader: str
    kind: str
    make: Callable[[Path], Path]  # writes the bad input under tmp, returns what the error must name
    error: type[ValueError]
    words: tuple[str, ...]  # in the message, after the name
    read: Callable[[Path], object] | None = None  # instead of READERS[reader]

    @property
    def id(self) -> str:
        return f"{self.reader}-{self.kind}"


def file(name: str, content: bytes | str | None = None, setup: Callable[[Path], None] | None = None):
    """A make() writing `content` to tmp/name (nothing for None: a missing file)."""
    def make(tmp: Path) -> Path:
        if setup:
            setup(tmp)
        path = tmp / name
        if isinstance(content, str):
            path.write_text(content)
        elif content is not None:
            path.write_bytes(content)
        return path
    return make


def directory(name: str):
    def make(tmp: Path) -> Path:
        (tmp / name).mkdir()
        return tmp / name
    return make


def two_shards(second: bytes):
    """A good first train shard and a bad second one: the stream must refuse
    at construction, not when it reaches the second mid-training."""
    def make(tmp: Path) -> Path:
        (tmp / "train_000000.bin").write_bytes(shard_bytes(GOOD_TOKENS))
        (tmp / "train_000001.bin").write_bytes(second)
        return tmp / "train_000001.bin"
    return make


def override(flag: str):
    return lambda tmp: Path(flag)


GOOD_SHARD = shard_bytes(GOOD_TOKENS)
GOOD_NPZ = npz_bytes(ref_state())
GOOD_ARTIFACT = artifact_bytes()
NO_TORCH = importlib.util.find_spec("torch") is None

CASES = [
    # shards
    Case("shard", "missing", file("s.bin"), DataError, ("shard not found",)),
    Case("shard", "directory", directory("s.bin"), DataError, ("not a file",)),
    Case("shard", "empty", file("s.bin", b""), DataError, ("truncated shard", "0 bytes")),
    Case("shard", "truncated-header", file("s.bin", GOOD_SHARD[:500]), DataError,
         ("truncated shard", "1024-byte header")),
    Case("shard", "wrong-magic", file("s.bin", shard_bytes(GOOD_TOKENS, magic=7)), DataError,
         ("bad shard magic 7", "not a token shard")),
    Case("shard", "wrong-version", file("s.bin", shard_bytes(GOOD_TOKENS, version=2)), DataError,
         ("unsupported shard version 2",)),
    Case("shard", "truncated-tokens", file("s.bin", GOOD_SHARD[:-80]), DataError,
         ("header says 100 tokens", "(truncated)")),
    Case("shard", "trailing-bytes", file("s.bin", GOOD_SHARD + b"\0\0"), DataError, ("header says 100 tokens",)),
    Case("shard", "negative-count", file("s.bin", shard_bytes([], count=-5)), DataError, ("header says -5 tokens",)),
    Case("shard", "wrong-dtype", file("s.bin", shard_bytes(GOOD_TOKENS, dtype="<i4")), DataError,
         ("header says 100 tokens", "written as int32", "uint16")),
    Case("shard", "random-bytes", file("s.bin", RANDOM), DataError, ("bad shard magic",)),
    Case("stream", "token-id-over-vocab", file("s.bin", shard_bytes([1, 2, VOCAB + 5])), DataError,
         (f"token id {VOCAB + 5} at position 2", f">= vocab_size {VOCAB}")),
    Case("stream", "second-shard-truncated", two_shards(GOOD_SHARD[:-10]), DataError, ("(truncated)",)),
    Case("stream", "second-shard-random-bytes", two_shards(RANDOM), DataError, ("bad shard magic",)),
    Case("val", "token-id-over-vocab", file("v.bin", shard_bytes([3] * 40 + [VOCAB])), DataError,
         (f"token id {VOCAB} at position 40",)),
    Case("val", "too-short", file("v.bin", shard_bytes([3] * 10)), DataError,
         ("10 validation tokens", "fewer than one 16-token sequence")),
    Case("val", "no-match", lambda tmp: tmp / "val_*.bin", DataError, ("no shards match",)),
    # tokenizer
    Case("tokenizer", "missing", file("t.model"), DataError, ("tokenizer not found",)),
    Case("tokenizer", "empty", file("t.model", b""), DataError, ("empty file", "not a SentencePiece model")),
    Case("tokenizer", "truncated", file("t.model", tokenizer_bytes()[:1000]), DataError,
         ("not a SentencePiece model",)),
    Case("tokenizer", "random-bytes", file("t.model", RANDOM), DataError, ("not a SentencePiece model",)),
    Case("tokenizer", "a-shard", file("t.model", GOOD_SHARD), DataError, ("not a SentencePiece model",)),
    Case("tokenizer", "vocab-mismatch", lambda tmp: file("t.model", tokenizer_bytes())(tmp),
         DataError, (f"tokenizer has {VOCAB} tokens", "vocab_size is 2048"),
         read=lambda p: data.load_tokenizer(p, 2048)),
    # prepare: the output directory must not exist afterwards (checked for every case below)
    Case("prepare", "missing-input", file("second.txt", setup=prepare_inputs), DataError, ("input not found",)),
    Case("prepare", "not-utf8", file("second.txt", b"caf\xe9\n", setup=prepare_inputs), DataError,
         ("not UTF-8 text",)),
    Case("prepare", "jsonl-bad-line", file("second.jsonl", '{"text": "a"}\n{oops\n', setup=prepare_inputs),
         DataError, (":2:", 'string "text" field')),
    Case("prepare", "jsonl-text-not-string", file("second.jsonl", '{"text": 5}\n', setup=prepare_inputs),
         DataError, (":1:", 'string "text" field')),
    # config files
    Case("config", "missing", file("c.py"), ConfigError, ("config file not found",)),
    Case("config", "empty", file("c.py", ""), ConfigError, ("defines no get_config()",)),
    Case("config", "syntax-error", file("c.py", "def get_config(:\n"), ConfigError, ("line 1: syntax error",)),
    Case("config", "raises", file("c.py", "x = 1\nraise RuntimeError('boom')\n"), ConfigError,
         ("line 2", "error running the config file", "RuntimeError: boom")),
    Case("config", "get-config-raises", file("c.py", config_text("    return 1 / 0\n")), ConfigError,
         ("line 4", "error calling get_config()", "ZeroDivisionError")),
    Case("config", "unknown-field", file("c.py", config_text("    return Config(model=ModelConfig(num_layerz=3))\n")),
         ConfigError, ("line 4", "unexpected keyword argument 'num_layerz'")),
    Case("config", "wrong-return-type", file("c.py", config_text("    return {'model': {}}\n")), ConfigError,
         ("get_config() returned dict",)),
    Case("config", "wrong-field-type", file("c.py", config_text("    return Config(model=ModelConfig(num_layers='4'))\n")),
         ConfigError, ("model.num_layers = '4' is a str, expected int",)),
    Case("config", "not-python", file("c.json", '{"model": {}}'), ConfigError, ("not a Python file",)),
    Case("config", "random-bytes", file("c.py", RANDOM), ConfigError, ("syntax error",)),
    # overrides: the flag is what the error names
    Case("override", "unknown-key", override("--config.nonsense=1"), ConfigError, ("unknown config field",)),
    Case("override", "unknown-field-in-section", override("--config.model.num_layerz=1"), ConfigError,
         ("section 'model' has no field 'num_layerz'",)),
    Case("override", "wrong-type-int", override("--config.model.num_layers=four"), ConfigError,
         ("'four' is not a valid int",)),
    Case("override", "wrong-type-bool", override("--config.model.ln_scale=maybe"), ConfigError,
         ("'maybe' is not a valid bool",)),
    Case("override", "empty-value", override("--config.model.num_layers="), ConfigError, ("'' is not a valid int",)),
    Case("override", "missing-value", override("--config.num_layers"), ConfigError, ("missing value",)),
    # reference import (.npz; .pt needs torch)
    Case("reference", "missing", file("w.npz"), CompatError, ("reference weights not found",)),
    Case("reference", "empty", file("w.npz", b""), CompatError, ("empty file",)),
    Case("reference", "truncated", file("w.npz", GOOD_NPZ[:len(GOOD_NPZ) // 2]), CompatError,
         ("not a readable .npz", "BadZipFile")),
    Case("reference", "random-bytes", file("w.npz", RANDOM), CompatError, ("not a readable .npz",)),
    Case("reference", "damaged-member", file("w.npz", (lambda b: b[:len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF])
                                                      + b[len(b) // 2 + 1:])(npz_bytes(ref_state(), True))),
         CompatError, ("not a readable .npz", "cannot read array")),
    Case("reference", "a-single-npy", file("w.npz", (lambda b: (np.save(b, np.zeros(3)), b.getvalue())[1])(io.BytesIO())),
         CompatError, ("holds one .npy array",)),
    Case("reference", "wrong-shape", file("w.npz", npz_bytes(ref_state(**{"qo_bank": np.zeros((4, 3, 32), np.float32)}))),
         CompatError, ("qo_bank: shape (4, 3, 32), the config needs (4, 32, 32)",)),
    Case("reference", "unknown-names", file("w.npz", npz_bytes(ref_state(**{"extra.weight": np.zeros(3, np.float32)}))),
         CompatError, ("does not match the config", "unexpected extra.weight")),
    Case("reference", "missing-names", file("w.npz", npz_bytes(ref_state(**{"smear.gate": None}))),
         CompatError, ("does not match the config", "missing smear.gate")),
    Case("reference", "another-model", file("w.npz", npz_bytes({"fc.weight": np.zeros((2, 2), np.float32)})),
         CompatError, ("missing qo_bank", "and 7 more", "unexpected fc.weight")),
    Case("reference", "wrong-dtype-int", file("w.npz", npz_bytes(ref_state(**{"qo_bank": np.zeros((4, 32, 32), np.int32)}))),
         CompatError, ("qo_bank: dtype int32, expected floating point",)),
    Case("reference", "wrong-dtype-object", file("w.npz", npz_bytes(ref_state(**{"smear.gate": np.array([None] * 32)}))),
         CompatError, ("cannot read array 'smear.gate'", "allow_pickle")),
    *([Case("reference", "pt-without-torch", file("final_model.pt", RANDOM), CompatError, ("needs torch installed",))]
      if NO_TORCH else []),
    # artifact (every other way to spoil one is in artifact_test.py)
    Case("artifact", "missing", file("m.golf"), ArtifactError, ("artifact not found",)),
    Case("artifact", "empty", file("m.golf", b""), ArtifactError, ("empty file",)),
    Case("artifact", "truncated", file("m.golf", GOOD_ARTIFACT[:-5]), ArtifactError, ("truncated artifact",)),
    Case("artifact", "wrong-magic", file("m.golf", b"NOTGOLF\0" + GOOD_ARTIFACT[8:]), ArtifactError,
         ("not a golf_jax artifact",)),
    Case("artifact", "wrong-version", file("m.golf", GOOD_ARTIFACT[:8] + (2).to_bytes(4, "little") + GOOD_ARTIFACT[12:]),
         ArtifactError, ("artifact format version 2",)),
    Case("artifact", "random-bytes", file("m.golf", RANDOM), ArtifactError, ("not a golf_jax artifact",)),
]


def snapshot(root: Path) -> dict[str, int]:
    """Every path under root (hidden temporaries too) and its size."""
    return {str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1 for p in root.rglob("*")}


def assert_clear_error(exc: BaseException, name: str, words: tuple[str, ...]) -> None:
    """The user-facing contract of every reader's error."""
    message = str(exc)
    assert message.startswith(f"{name}: ") or message.startswith(f"{name}:"), message
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    assert "\n" not in message and len(message) < 400, message
    # "Raised by golf_jax, on purpose": the raising frame is in the package (not
    # numpy, zipfile, sentencepiece or JAX leaking through a reader), and any
    # chained exception was attached deliberately (`from e` / `from None`),
    # never implicitly by a second failure inside an except block.
    raised_in = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).resolve()
    assert PACKAGE_DIR in raised_in.parents, f"raised in {raised_in}"
    assert exc.__context__ is None or exc.__suppress_context__, repr(exc.__context__)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_a_clear_error(case: Case, tmp_path: Path):
    target = case.make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(case.error) as info:
        (case.read or READERS[case.reader])(target)
    assert type(info.value) is case.error and issubclass(case.error, ValueError)
    # An override's error names the flag without its value.
    name = str(target).partition("=")[0] if case.reader == "override" else str(target)
    assert_clear_error(info.value, name, case.words)
    # No partial output: not a shard, not a temporary, not an output directory.
    assert snapshot(tmp_path) == before


def test_the_table_covers_every_reader_and_kind():
    kinds = {(c.reader, c.kind) for c in CASES}
    for reader in ("shard", "tokenizer", "reference", "artifact", "config"):
        for kind in ("missing", "empty", "random-bytes"):
            assert (reader, kind) in kinds, (reader, kind)
    assert len({c.id for c in CASES}) == len(CASES)


def test_prepare_failure_leaves_an_existing_output_directory_as_it_was(tmp_path: Path, monkeypatch):
    """Shards of the good first input are written before the bad second one
    is read: they must not appear, and earlier files must stay untouched."""
    written = []
    write_shard = data.write_shard
    monkeypatch.setattr(data, "write_shard", lambda path, tokens: (written.append(path), write_shard(path, tokens)))
    prepare_inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fineweb_val_000000.bin").write_bytes(GOOD_SHARD)  # from an earlier run
    (tmp_path / "second.jsonl").write_text('{"text": "fine"}\n' * 50 + "not json\n")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match=r"second.jsonl:51: expected a JSON object"):
        prepare_reader(tmp_path / "second.jsonl")
    assert written, "no shard was written before the failure: the test proves nothing"
    assert snapshot(tmp_path) == before
    # and the same inputs, fixed, do produce shards (the failure above was not vacuous)
    (tmp_path / "second.jsonl").write_text('{"text": "fine"}\n' * 50)
    info = prepare_reader(tmp_path / "second.jsonl")
    assert len(info["shards"]["train"]) > 1 and not list(out.glob(".*"))
    assert all(len(data.read_shard(out / n)) for n in info["shards"]["train"])


# ----------------------------------------------------------------------------- what the user sees

def assert_one_line_exit(excinfo, capsys, *words: str) -> str:
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_data_inspect_bad_shard_is_one_line(tmp_path, capsys):
    bad = tmp_path / "fineweb_val_000000.bin"
    bad.write_bytes(GOOD_SHARD[:-10])
    with pytest.raises(SystemExit) as e:
        datasets.main(["inspect", str(tmp_path / "*.bin")])
    assert_one_line_exit(e, capsys, f"error: {bad}: header says 100 tokens")


def test_data_prepare_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    prepare_inputs(tmp_path)
    (tmp_path / "bad.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SystemExit) as e:
        datasets.main(["prepare", str(tmp_path / "good.txt"), str(tmp_path / "bad.jsonl"), "--tokenizer",
                   str(tmp_path / "tok.model"), "--out", str(tmp_path / "out"), "--val-docs", "1",
                   "--shard-tokens", "8"])
    assert_one_line_exit(e, capsys, f"error: {tmp_path / 'bad.jsonl'}:1: expected a JSON object")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, words", [
    (["--config", "{tmp}/c.py"], ["config error: {tmp}/c.py: line 4", "num_layerz"]),
    (["--config", "{tmp}/missing.py"], ["config error: {tmp}/missing.py: config file not found"]),
    (["--config", "configs/smoke.py", "--config.num_layers=four"], ["config error: --config.model.num_layers"]),
    (["--config", "configs/smoke.py", "--config.num_layers"], ["config error: --config.num_layers: missing value"]),
], ids=["unknown-field", "missing-file", "override-wrong-type", "override-missing-value"])
def test_evaluate_bad_config_is_one_line(tmp_path, capsys, monkeypatch, argv, words):
    from golf_jax import evaluate

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    (tmp_path / "c.py").write_text(config_text("    return Config(model=ModelConfig(num_layerz=3))\n"))
    with pytest.raises(SystemExit) as e:
        evaluate.main([a.format(tmp=tmp_path) for a in argv])
    assert_one_line_exit(e, capsys, *(w.format(tmp=tmp_path) for w in words))


def test_evaluate_bad_reference_weights_is_one_line(tmp_path, capsys):
    """Through the real data path (a tiny val shard and tokenizer) to the
    reference import, which must fail, naming the file, before any JAX work."""
    from golf_jax import evaluate

    (tmp_path / "tok.model").write_bytes(tokenizer_bytes())
    (tmp_path / "fineweb_val_000000.bin").write_bytes(shard_bytes(np.arange(300) % VOCAB))
    (tmp_path / "w.npz").write_bytes(npz_bytes(ref_state(**{"qo_bank": np.zeros((4, 32, 32), np.int32)})))
    (tmp_path / "c.py").write_text(config_text(
        f"    return Config(model=ModelConfig(vocab_size={VOCAB}, num_layers=2, model_dim=32, num_heads=2,\n"
        "                                    num_kv_heads=1, bigram_vocab_size=0, ve_enabled=False, xsa_last_n=2),\n"
        f"                  data=DataConfig(data_dir={str(tmp_path)!r}, tokenizer_path={str(tmp_path / 'tok.model')!r}),\n"
        "                  eval=EvalConfig(eval_seq_len=64, val_batch_tokens=512))\n"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--config", str(tmp_path / "c.py"), "--init-from", str(tmp_path / "w.npz")])
    assert_one_line_exit(e, capsys, f"error: {tmp_path / 'w.npz'}: qo_bank: dtype int32")


# ----------------------------------------------------------------------------- fuzzing the shard parser

# Derandomised, no example database: the same examples on every CI run.
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None)
_names = itertools.count()


def check_read(path: Path) -> np.ndarray | None:
    """read_shard's contract: a DataError naming the file, or exactly the
    tokens after a well-formed header."""
    raw = path.read_bytes()
    try:
        tokens = data.read_shard(path)
    except DataError as e:
        assert_clear_error(e, str(path), ())
        return None
    header = np.frombuffer(raw[:data.HEADER_BYTES], "<i4")
    assert (header[0], header[1]) == (data.SHARD_MAGIC, data.SHARD_VERSION)
    assert len(raw) == data.HEADER_BYTES + 2 * int(header[2])
    assert tokens.dtype == np.uint16 and tokens.shape == (int(header[2]),)
    np.testing.assert_array_equal(tokens, np.frombuffer(raw[data.HEADER_BYTES:], "<u2"))
    return np.array(tokens)  # a copy: the memory map must not outlive the next example's file


def fuzz_file(root: Path, content: bytes) -> Path:
    path = root / f"fuzz_{next(_names)}.bin"
    path.write_bytes(content)
    return path


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(blob=st.one_of(st.binary(max_size=2100),
                      # past the magic check, so the later checks see random input too
                      st.binary(max_size=1200).map(lambda b: shard_bytes([])[:8] + b)))
def test_fuzz_arbitrary_bytes(fuzz_dir, blob):
    check_read(fuzz_file(fuzz_dir, blob))


@FUZZ
@given(tokens=st.lists(st.integers(0, 2 ** 16 - 1), max_size=64), draw=st.data())
def test_fuzz_damaged_valid_shard(fuzz_dir, tokens, draw):
    good = shard_bytes(tokens)
    buf = bytearray(good)
    # Flips land in the three meaningful header ints most of the time, anywhere otherwise.
    for offset, mask in draw.draw(st.lists(st.tuples(st.one_of(st.integers(0, 11), st.integers(0, len(buf) - 1)),
                                                     st.integers(1, 255)), max_size=3)):
        buf[offset] ^= mask
    buf = buf[:draw.draw(st.integers(0, len(buf)))] if draw.draw(st.booleans()) else buf
    tokens_read = check_read(fuzz_file(fuzz_dir, bytes(buf)))
    if bytes(buf[:12]) == good[:12] and len(buf) == len(good):
        # Only the tokens or the reserved header ints changed: still a shard.
        assert tokens_read is not None
    if bytes(buf) == good:
        np.testing.assert_array_equal(tokens_read, tokens)


@pytest.mark.parametrize("command, argv, words", [
    ("evaluate", [], "nothing to evaluate: give --checkpoint DIR, --artifact FILE or --config FILE"),
    ("evaluate", ["--checkpoint", "{tmp}", "--config", "configs/smoke.py"], "a trained model (--checkpoint"),
    ("ttt", ["--checkpoint", "{tmp}", "--max-chunks", "-1"], "error: --max-chunks -1: must be at least 0"),
    ("datasets", ["prepare", "a.txt", "--tokenizer", "t.model", "--out", "{tmp}/o", "--val-docs", "-2"],
     "error: --val-docs -2: must be at least 0"),
    ("datasets", ["prepare", "a.txt", "--tokenizer", "t.model", "--out", "{tmp}/o", "--val-fraction", "1.5"],
     "error: --val-fraction 1.5: must be below 1"),
    ("datasets", ["prepare", "a.txt", "--tokenizer", "t.model", "--out", "{tmp}/o", "--val-docs", "1",
                  "--shard-tokens", "0"], "error: --shard-tokens 0: must be at least 1"),
], ids=["evaluate-nothing", "evaluate-config-with-model", "ttt-negative-chunks", "prepare-negative-docs",
        "prepare-fraction-above-one", "prepare-empty-shards"])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, monkeypatch, command, argv, words):
    import importlib

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    main = importlib.import_module(f"golf_jax.{command}").main
    with pytest.raises(SystemExit) as e:
        main([a.format(tmp=tmp_path) for a in argv])
    assert_one_line_exit(e, capsys, words)
    assert not (tmp_path / "o").exists()
