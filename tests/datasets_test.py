"""Datasets: preparing shards from text (byte for byte as the official exporter), the embedded
default data and its pydoc fallback, and the data-directory errors."""

from __future__ import annotations

import hashlib
import shutil
import types

import numpy as np
import pytest

from golf_jax import data, datasets


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
                                 val_pattern="fineweb_val_*.bin")  # a DataConfig's dataset fields


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

