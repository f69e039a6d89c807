"""Datasets: preparing shards from text (byte for byte as the official exporter, and with CaseOps
as the 1.0611 record's prepare_caseops_data.py), the embedded default data, its pydoc fallback and
its CaseOps build, and the data-directory errors."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from golf_jax import caseops, data, datasets
from tests.conftest import REFERENCE, missing


def test_prepare_reproduces_embedded_shards_byte_for_byte(tmp_path, shared_data):
    out = tmp_path / "shards"
    info = datasets.prepare([shared_data / "corpus" / "tinyshakespeare.txt"],
                        shared_data / datasets.EMBEDDED_TOKENIZER, out, val_fraction=0.1)
    assert info["val_documents"] == 722
    for name in ["fineweb_val_000000.bin", "fineweb_train_000000.bin"]:
        assert (out / name).read_bytes() == (shared_data / datasets.EMBEDDED_SHARDS / name).read_bytes(), name


def test_prepare_jsonl_and_shard_size(tmp_path, shared_data):
    import json
    src = tmp_path / "docs.jsonl"
    docs = [f"Document number {i}: to be or not to be." for i in range(20)]
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    tok = shared_data / datasets.EMBEDDED_TOKENIZER
    info = datasets.prepare([src], tok, tmp_path / "out", val_docs=3, shard_tokens=50)
    sp = data.load_tokenizer(tok)
    want_val = np.concatenate([[1] + sp.encode(d) for d in docs[:3]])
    want_train = np.concatenate([[1] + sp.encode(d) for d in docs[3:]])
    val = np.concatenate([data.read_shard(p) for p in sorted((tmp_path / "out").glob("*_val_*.bin"))])
    train_files = sorted((tmp_path / "out").glob("*_train_*.bin"))
    train = np.concatenate([data.read_shard(p) for p in train_files])
    np.testing.assert_array_equal(val, want_val)
    np.testing.assert_array_equal(train, want_train)
    assert all(len(data.read_shard(p)) == 50 for p in train_files[:-1]) and len(train_files) == -(-len(want_train) // 50)
    assert info["tokens"] == {"val": len(want_val), "train": len(want_train)}


def test_prepare_rejects_bad_jsonl(tmp_path, shared_data):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(data.DataError, match=r"bad.jsonl:2"):
        datasets.prepare([src], shared_data / datasets.EMBEDDED_TOKENIZER, tmp_path / "o", val_docs=1)


def test_pydoc_fallback_dataset(pydoc_data, monkeypatch):
    """Offline, without ../shared/data: a corpus from CPython's pydoc topics."""
    monkeypatch.setenv("GOLF_JAX_SHARED_DATA", str(pydoc_data / "absent"))
    monkeypatch.setenv("GOLF_JAX_CACHE", str(pydoc_data.parent))
    ds = datasets.resolve_dataset("embedded", "", "fineweb_train_*.bin", "fineweb_val_*.bin", 1024)
    assert ds.tokenizer == str(pydoc_data / "tokenizer.model") and "pydoc fallback corpus" in ds.name
    sp = data.load_tokenizer(ds.tokenizer, 1024)
    val = data.load_validation_tokens(ds.val_pattern, 256, 1024)
    train = data.TokenStream(ds.train_pattern, 1024).take(10_000)
    assert len(val) > 5000 and val[0] == sp.bos_id()
    assert "def" in sp.decode(train.tolist())  # real Python documentation text
    # Built once: a second resolve reuses the cache.
    mtime = (pydoc_data / "tokenizer.model").stat().st_mtime_ns
    datasets.resolve_dataset("embedded", "", "fineweb_train_*.bin", "fineweb_val_*.bin", 1024)
    assert (pydoc_data / "tokenizer.model").stat().st_mtime_ns == mtime


EMBEDDED = types.SimpleNamespace(data_dir="embedded", tokenizer_path="", train_pattern="fineweb_train_*.bin",
                                 val_pattern="fineweb_val_*.bin", text_transform="")  # a DataConfig's dataset fields


def test_the_record_identifies_the_tokenizer(shared_data):
    ds = datasets.resolve_dataset("embedded", "", EMBEDDED.train_pattern, EMBEDDED.val_pattern, 1024)
    record = ds.record()
    tok = shared_data / datasets.EMBEDDED_TOKENIZER
    assert record["tokenizer"] == {"path": str(tok), "absolute": str(tok.absolute()), "vocab_size": 1024,
                                   "sha256": hashlib.sha256(tok.read_bytes()).hexdigest()}
    assert "tinyshakespeare" in record["name"] and record["val_pattern"] == ds.val_pattern
    assert record["tokenizer"]["sha256"][:12] in ds.describe()


def test_a_model_gets_its_own_tokenizer_or_a_clear_error(shared_data, pydoc_data, tmp_path):
    """A model trained on the pydoc fallback, used where ../shared/data is
    present (the config's "embedded" now means the competition tokenizer)."""
    fallback = datasets.Dataset(str(pydoc_data / EMBEDDED.train_pattern), str(pydoc_data / EMBEDDED.val_pattern),
                                str(pydoc_data / "tokenizer.model"), "pydoc").record()
    competition = datasets.resolve_dataset("embedded", "", EMBEDDED.train_pattern, EMBEDDED.val_pattern, 1024)

    def for_model(recorded, tokenizer=None):
        return datasets.dataset_for_model(EMBEDDED, 1024, recorded, tokenizer, where="the model")

    assert for_model(competition.record()) == competition  # the config's resolution, when it is the model's
    assert for_model(None) == competition  # a model saved before records: as before
    own = for_model(fallback)  # the recorded dataset, still at hand
    assert own.tokenizer == str(pydoc_data / "tokenizer.model") and own.val_pattern == fallback["val_pattern"]
    explicit = for_model(fallback, tokenizer=competition.tokenizer)  # --tokenizer: the user's word
    assert explicit.tokenizer == competition.tokenizer
    # Gone: an error naming both files, never a silent decode with the wrong one.
    moved = tmp_path / "tokenizer.model"
    shutil.copy(pydoc_data / "tokenizer.model", moved)
    gone = {**fallback, "tokenizer": datasets.tokenizer_identity(moved)}
    moved.unlink()
    with pytest.raises(data.DataError) as e:
        for_model(gone)
    message = str(e.value)
    assert str(moved) in message and competition.tokenizer in message and "--tokenizer" in message
    assert "\n" not in message
    with pytest.raises(data.DataError, match="dataset record is damaged"):
        for_model({"tokenizer": {"path": "x"}})


def test_missing_data_dir_names_field(tmp_path):
    with pytest.raises(data.DataError, match=r"data directory not found \(data.data_dir\)"):
        datasets.resolve_dataset(str(tmp_path / "nope"), "", "a*", "b*", 1024)



# ----------------------------------------------------------------------------- CaseOps

@pytest.fixture(scope="module")
def reference_prepare():
    """run(docs.jsonl, out, val_docs, shard_tokens): the record's own
    prepare_caseops_data.py on those documents; the folder it writes."""
    import sentencepiece as spm

    path = REFERENCE / "frontier_1855" / "prepare_caseops_data.py"
    if not path.is_file():
        missing(f"reference code {path} not present (set GOLF_JAX_REFERENCE)")
    spec = importlib.util.spec_from_file_location("reference_prepare_caseops_data", path)
    module = importlib.util.module_from_spec(spec)
    with mock.patch.object(sys, "path", list(sys.path)):  # it puts its own folder first
        spec.loader.exec_module(module)

    class Processor(spm.SentencePieceProcessor):
        # The script's encode_as_immutable_proto fails from sentencepiece 0.2.2 on; "proto" has the same
        # pieces (0.2.0 serializes that one, and there the script's call works).
        def encode_as_immutable_proto(self, text):
            proto = self.encode(text, out_type="proto")
            return super().encode_as_immutable_proto(text) if isinstance(proto, bytes) else proto

    module.spm = types.SimpleNamespace(SentencePieceProcessor=Processor)

    def run(docs, out, val_docs, shard_tokens, tokenizer):
        module.SHARD_TOKENS = shard_tokens
        argv = ["prepare_caseops_data.py", "--docs", str(docs), "--out", str(out), "--sp", str(tokenizer),
                "--val-docs", str(val_docs)]
        with mock.patch.object(sys, "argv", argv):
            module.main()
        return out / "datasets" / "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"

    return run


def speeches(shared_data) -> list[str]:
    """The embedded corpus's documents, as `datasets.iter_documents` reads the .txt."""
    return list(datasets.iter_documents(shared_data / datasets.EMBEDDED_CORPUS))


def assert_same_files(ours, theirs):
    names = sorted(p.name for p in theirs.iterdir())
    assert sorted(p.name for p in ours.glob("fineweb_*.bin")) == names
    for name in names:
        assert (ours / name).read_bytes() == (theirs / name).read_bytes(), name


def test_caseops_prepare_writes_what_the_reference_writes(tmp_path, shared_data, caseops_tokenizer,
                                                          reference_prepare, capsys):
    """Several shards of each kind (a small shard size), and documents that
    test the transform and the sidecar: operators in the text, non-ASCII,
    collapsed and leading whitespace, an empty document."""
    tricky = ["The NASA Launch", "iPhone McDonald ABc x2Y", f"literal {caseops.TITLE}{caseops.ESC} operators",
              "  leading and trailing spaces  ", "double  spaces\tand\n\nnewlines", "", "é É ß ẞ 漢字 🙂 ﬁ Ｈi",
              "\ue000 private use"]
    docs = tricky[:4] + speeches(shared_data)[::25] + tricky[4:]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    shard_tokens = 1500
    theirs = reference_prepare(src, tmp_path / "theirs", 120, shard_tokens, caseops_tokenizer)
    capsys.readouterr()
    info = datasets.prepare([src], caseops_tokenizer, tmp_path / "ours", val_docs=120, shard_tokens=shard_tokens,
                            text_transform="caseops")
    longest = max(len(ids) + 1 for ids, _ in caseops.encode_documents(data.load_tokenizer(caseops_tokenizer), docs))
    assert longest < shard_tokens  # where the reference's one-shard-per-document flush cuts as ours does
    assert len(info["shards"]["val"]) >= 3 and len(info["shards"]["train"]) >= 3
    assert info["shards"]["val_bytes"] == [n.replace("_val_", "_val_bytes_") for n in info["shards"]["val"]]
    assert_same_files(tmp_path / "ours", theirs)


def test_embedded_caseops_dataset_is_the_reference_scripts_output(tmp_path, shared_data, caseops_tokenizer,
                                                                   caseops_data, reference_prepare, capsys):
    """tinyshakespeare's speeches as documents, the first 722 for val: the
    record's script writes the same files; the sidecar sums to the
    documents' UTF-8 bytes; the documents are short for packing."""
    docs = speeches(shared_data)
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    theirs = reference_prepare(src, tmp_path / "theirs", 722, datasets.CASEOPS_SHARD_TOKENS, caseops_tokenizer)
    capsys.readouterr()
    assert_same_files(caseops_data, theirs)
    val = data.read_shard(caseops_data / "fineweb_val_000000.bin")
    sidecar = data.read_shard(caseops_data / "fineweb_val_bytes_000000.bin")
    assert int(np.sum(val == 1)) == 722
    assert int(sidecar.astype(np.int64).sum()) == sum(len(d.encode("utf-8")) for d in docs[:722])
    assert len(val) / 722 < 2048 / 8  # many documents to a 2048-token row


def test_embedded_caseops_resolution(caseops_data, caseops_tokenizer, monkeypatch):
    monkeypatch.setenv("GOLF_JAX_CACHE", str(caseops_data.parent))
    monkeypatch.setenv("GOLF_JAX_REFERENCE", str(REFERENCE))
    ds = datasets.resolve_dataset("embedded", "", "fineweb_train_*.bin", "fineweb_val_*.bin", 8192,
                                  text_transform="caseops")
    assert ds.tokenizer == str(caseops_data / "tokenizer.model") and "CaseOps" in ds.name
    assert datasets.file_sha256(ds.tokenizer) == datasets.file_sha256(caseops_tokenizer)
    mtime = (caseops_data / "fineweb_val_000000.bin").stat().st_mtime_ns
    again = datasets.resolve_dataset("embedded", str(caseops_tokenizer), "a", "b", 8192, text_transform="caseops")
    assert again.tokenizer == str(caseops_tokenizer) and Path(again.val_pattern).parent == caseops_data
    assert (caseops_data / "fineweb_val_000000.bin").stat().st_mtime_ns == mtime  # built once

    monkeypatch.setenv("GOLF_JAX_REFERENCE", str(caseops_data / "absent"))
    with pytest.raises(data.DataError, match=r"needs the 1.0611 record's tokenizer .*GOLF_JAX_REFERENCE"):
        datasets.resolve_dataset("embedded", "", "a", "b", 8192, text_transform="caseops")
    with pytest.raises(data.DataError, match=r"nope.model: tokenizer not found \(data.tokenizer_path\)"):
        datasets.resolve_dataset("embedded", str(caseops_data / "nope.model"), "a", "b", 8192,
                                 text_transform="caseops")


def test_prepare_refuses_a_tokenizer_transform_mismatch(tmp_path, shared_data, caseops_tokenizer):
    src = tmp_path / "docs.txt"
    src.write_text("To be.\n\nOr not.\n")
    with pytest.raises(data.DataError, match=r"CaseOps-transformed text only.*--text-transform caseops"):
        datasets.prepare([src], caseops_tokenizer, tmp_path / "a", val_docs=1)
    with pytest.raises(data.DataError, match=r"fineweb_1024_bpe.model: data.text_transform='caseops' needs a CaseOps"):
        datasets.prepare([src], shared_data / datasets.EMBEDDED_TOKENIZER, tmp_path / "b", val_docs=1,
                         text_transform="caseops")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_prepare_cli_with_caseops(tmp_path, caseops_tokenizer, capsys):
    src = tmp_path / "docs.txt"
    src.write_text("To BE.\n\nOr NOT to be.\n\nThat is the Question.\n")
    datasets.main(["prepare", str(src), "--tokenizer", str(caseops_tokenizer), "--out", str(tmp_path / "o"),
                   "--val-docs", "2", "--text-transform", "caseops"])
    info = json.loads(capsys.readouterr().out)
    assert info["shards"] == {"val": ["fineweb_val_000000.bin"], "train": ["fineweb_train_000000.bin"],
                              "val_bytes": ["fineweb_val_bytes_000000.bin"]}
    sidecar = data.read_shard(tmp_path / "o" / "fineweb_val_bytes_000000.bin")
    assert int(sidecar.sum()) == len("To BE.") + len("Or NOT to be.")
