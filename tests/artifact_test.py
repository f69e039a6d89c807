"""The artifact format: round trip, determinism, atomic writes, every way a
file can be bad, and the byte budget."""

from __future__ import annotations

import json
import lzma
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import golf_jax
from golf_jax import artifact, atomic
from golf_jax import config as config_lib
from golf_jax.artifact import ArtifactError
from golf_jax.quant import FP16, FP32, INT6, INT8, KINDS, QTensor


def small_model(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def q(shape, lim):
        return rng.integers(-lim, lim + 1, shape).astype(np.int8)

    def f(shape, dtype):
        return rng.standard_normal(shape).astype(dtype)

    return {
        "qo_bank": QTensor(INT6, q((2, 8, 16), 31), f((2, 8), np.float16), "float32"),
        "blocks/mlp_w": QTensor(INT6, q((6, 16), 31), f((6,), np.float16), "float32"),
        "tok_emb": QTensor(INT8, q((16, 8), 127), f((16,), np.float16), "bfloat16"),
        "ve/embed": QTensor(INT8, q((4, 8), 127), f((4,), np.float32), "bfloat16"),
        "bigram/proj": QTensor(FP16, f((8, 4), np.float16), None, "float32"),
        "blocks/attn_scale": QTensor(FP32, f((3, 8), np.float32), None, "float32"),
        "smear/gate": QTensor(FP32, np.array(0.25, np.float32), None, "float32"),
        "empty": QTensor(FP16, np.zeros((0, 4), np.float16), None, "bfloat16"),
    }


def small_meta() -> dict:
    return {"config": config_lib.to_dict(config_lib.Config()),
            "quant": {"int6_mse": 1.5e-3, "pruned": 12, "layers": ["qo_bank", "tok_emb"]},
            "note": "naïve ünïcode"}


@pytest.fixture(scope="module")
def good() -> bytes:
    return artifact.serialize(small_model(), small_meta())


def assert_same_model(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        assert (x.kind, x.dtype) == (y.kind, y.dtype), name
        assert x.data.dtype == y.data.dtype and x.data.shape == y.data.shape, name
        np.testing.assert_array_equal(x.data, y.data)
        if x.scale is None:
            assert y.scale is None, name
        else:
            assert x.scale.dtype == y.scale.dtype and x.scale.shape == y.scale.shape, name
            np.testing.assert_array_equal(x.scale, y.scale)


def assert_valid_model(qmodel: dict) -> None:
    """What `deserialize` promises about anything it returns."""
    for name, qt in qmodel.items():
        assert isinstance(name, str) and qt.kind in KINDS
        assert qt.data.dtype == np.dtype(artifact.STORAGE_DTYPE[qt.kind])
        if qt.kind in (INT6, INT8):
            assert qt.scale.shape == qt.data.shape[:-1]
            assert qt.dequantize().shape == qt.data.shape
        else:
            assert qt.scale is None


def wrap(raw: bytes, preset: int = 0) -> bytes:
    """A valid outer header and checksum around any decompressed body."""
    body = lzma.compress(raw, format=lzma.FORMAT_XZ, preset=preset)
    return artifact.HEADER.pack(artifact.MAGIC, artifact.FORMAT_VERSION, len(body), zlib.crc32(body)) + body


def split_raw(buf: bytes) -> tuple[dict, bytes]:
    """(JSON header, payload) of an artifact, read by hand from the documented layout."""
    raw = lzma.decompress(buf[artifact.HEADER.size:])
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_raw(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + payload


# ----------------------------------------------------------------------------- format

def test_round_trip_all_kinds(good):
    qmodel, meta = artifact.deserialize(good)
    assert_same_model(small_model(), qmodel)
    assert meta == small_meta()
    assert config_lib.from_dict(meta["config"]) == config_lib.Config()
    assert all(qt.data.flags.writeable and qt.data.flags.c_contiguous for qt in qmodel.values())


def test_layout_is_the_documented_one(good):
    magic, version, length, crc = struct.unpack_from("<8sIQI", good)
    assert (magic, version) == (b"GOLFJAX\x00", 1)
    assert length == len(good) - 24 and crc == zlib.crc32(good[24:])
    assert good[24:30] == b"\xfd7zXZ\x00"  # an .xz stream
    header, payload = split_raw(good)
    assert header["format_version"] == 1 and header["meta"] == small_meta()
    bank = header["tensors"][0]
    assert (bank["name"], bank["kind"], bank["dtype"], bank["shape"]) == ("qo_bank", "int6", "float32", [2, 8, 16])
    assert bank["data"] == {"dtype": "int8", "shape": [2, 8, 16], "offset": 0, "nbytes": 256}
    assert bank["scale"] == {"dtype": "float16", "shape": [2, 8], "offset": 256, "nbytes": 32}
    # int6 is one value per int8 byte, raw little-endian C order.
    model = small_model()
    assert payload[:256] == model["qo_bank"].data.tobytes()
    assert payload[256:288] == model["qo_bank"].scale.astype("<f2").tobytes()
    ends = [r["offset"] + r["nbytes"] for t in header["tensors"] for r in (t["data"], t["scale"]) if r]
    assert max(ends) == len(payload)


def test_deterministic(good):
    assert artifact.serialize(small_model(), small_meta()) == good
    # Fresh arrays, big-endian copies and a reordered meta dict change nothing.
    model = {k: QTensor(v.kind, v.data.astype(v.data.dtype.newbyteorder(">")),
                        None if v.scale is None else v.scale.astype(v.scale.dtype.newbyteorder(">")), v.dtype)
             for k, v in small_model().items()}
    meta = dict(reversed(list(small_meta().items())))
    assert artifact.serialize(model, meta) == good


def test_preset_changes_only_the_compression():
    fast = artifact.serialize(small_model(), small_meta(), preset=0)
    qmodel, meta = artifact.deserialize(fast)
    assert_same_model(small_model(), qmodel) and meta == small_meta()
    with pytest.raises(ArtifactError, match="preset"):
        artifact.serialize(small_model(), {}, preset=42)


def test_meta_accepts_numpy_scalars_and_rejects_the_rest():
    _, meta = artifact.deserialize(artifact.serialize({}, {"mse": np.float32(0.5), "rows": np.arange(3)}, preset=0))
    assert meta == {"mse": 0.5, "rows": [0, 1, 2]}
    with pytest.raises(ArtifactError, match="not JSON-serialisable"):
        artifact.serialize({}, {"bad": object()})


@pytest.mark.parametrize("qt, message", [
    (QTensor("int4", np.zeros((2, 2), np.int8), np.ones(2, np.float16), "float32"), "kind 'int4'"),
    (QTensor(INT6, np.zeros((2, 2), np.int32), np.ones(2, np.float16), "float32"), "stores int8 data, got int32"),
    (QTensor(INT6, np.full((2, 2), 40, np.int8), np.ones(2, np.float16), "float32"), "int6 values must lie"),
    (QTensor(INT8, np.zeros((2, 2), np.int8), None, "float32"), "needs a scale"),
    (QTensor(INT8, np.zeros((2, 2), np.int8), np.ones(3, np.float16), "float32"), "scale shape"),
    (QTensor(INT8, np.zeros((2, 2), np.int8), np.ones(2, np.int8), "float32"), "scale dtype int8"),
    (QTensor(FP16, np.zeros(2, np.float16), np.ones(2, np.float16), "float32"), "has no scale"),
    (QTensor(FP32, np.zeros(2, np.float32), None, "int8"), "dtype 'int8'"),
])
def test_serialize_rejects_what_it_could_not_read_back(qt, message):
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.serialize({"w": qt}, {})
    assert "'w'" in str(e.value)


# ----------------------------------------------------------------------------- files

def test_write_and_read(tmp_path, good):
    path = tmp_path / "sub" / "final_model.golf"
    assert artifact.write_artifact(path, small_model(), small_meta()) == len(good) == path.stat().st_size
    assert path.read_bytes() == good
    qmodel, meta = artifact.read_artifact(path)
    assert_same_model(small_model(), qmodel) and meta == small_meta()
    assert os.listdir(path.parent) == [path.name]  # no temporary left behind
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic.current_umask()


@pytest.mark.parametrize("fail_in", ["fsync", "replace"])
def test_failed_write_leaves_the_old_artifact(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "final_model.golf"
    artifact.write_artifact(path, small_model(0), {"run": "old"}, preset=0)
    old = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash")

    monkeypatch.setattr(atomic.os, fail_in, crash)
    with pytest.raises(OSError, match="simulated crash"):
        artifact.write_artifact(path, small_model(1), {"run": "new"}, preset=0)
    monkeypatch.undo()
    assert path.read_bytes() == old and artifact.read_artifact(path)[1] == {"run": "old"}
    assert os.listdir(tmp_path) == [path.name]
    artifact.write_artifact(path, small_model(1), {"run": "new"}, preset=0)
    assert artifact.read_artifact(path)[1] == {"run": "new"}


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ArtifactError, match="artifact not found") as e:
        artifact.read_artifact(tmp_path / "nope.golf")
    assert "nope.golf" in str(e.value)
    with pytest.raises(ArtifactError, match="not a file"):
        artifact.read_artifact(tmp_path)


# ----------------------------------------------------------------------------- corruption

def _flip(buf: bytes, at: int) -> bytes:
    return buf[:at] + bytes([buf[at] ^ 0x40]) + buf[at + 1:]


CORRUPTIONS = [
    ("empty", lambda b: b"", "empty file"),
    ("magic only", lambda b: b[:8], "truncated artifact: 8 bytes, shorter than the 24-byte header"),
    ("inside header", lambda b: b[:17], "shorter than the 24-byte header"),
    ("header only", lambda b: b[:24], r"the body is \d+ bytes, only 0 are present"),
    ("inside body", lambda b: b[:len(b) // 2], r"truncated artifact: the header says the body is \d+ bytes"),
    ("last byte", lambda b: b[:-1], "truncated artifact"),
    ("trailing bytes", lambda b: b + b"\0", "1 unexpected bytes after"),
    ("wrong magic", lambda b: b"PK\x03\x04" + b[4:], "not a golf_jax artifact"),
    ("short wrong magic", lambda b: b"\x89PNG", "not a golf_jax artifact"),
    ("version + 1", lambda b: b[:8] + struct.pack("<I", 2) + b[12:],
     "artifact format version 2, this golf_jax reads version 1"),
    ("flipped body byte", lambda b: _flip(b, len(b) // 2), "checksum mismatch.*corrupted"),
    ("flipped checksum", lambda b: _flip(b, 21), "checksum mismatch"),
    ("random bytes", lambda b: np.random.default_rng(0).bytes(len(b)), "not a golf_jax artifact"),
]


@pytest.mark.parametrize("mutate, message", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_files_name_file_and_problem(tmp_path, good, mutate, message):
    bad = tmp_path / "bad.golf"
    bad.write_bytes(mutate(good))
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.read_artifact(bad)
    assert str(e.value).startswith(f"{bad}: ")
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.deserialize(mutate(good))
    assert str(e.value).startswith("<bytes>: ")


def _edit(good: bytes, edit) -> bytes:
    header, payload = split_raw(good)
    result = edit(header, payload)
    return join_raw(header, payload) if result is None else result


def _set(path, value):
    def edit(header, payload):
        *keys, last = path
        d = header
        for k in keys:
            d = d[k]
        d[last] = value
    return edit


INNER = [
    ("lzma garbage", lambda g: b"\xfd7zXZ\x00 not really xz", None, "LZMA decode error"),
    ("body too short", lambda g: b"\x05", 0, "too short for the JSON header length"),
    ("json length past body", lambda g: struct.pack("<Q", 10**9) + b"{}", 0, "runs past"),
    ("not json", lambda g: struct.pack("<Q", 5) + b"{oops", 0, "malformed JSON header"),
    ("not utf-8", lambda g: struct.pack("<Q", 2) + b"\xff\xfe", 0, "malformed JSON header"),
    ("json list", lambda g: join_raw([], b""), 0, "expected an object with format_version"),
    ("inner version", _set(["format_version"], 2), 1, "format_version 2 does not match"),
    ("tensors not list", _set(["tensors"], {}), 1, "tensors is not a list"),
    ("entry not object", _set(["tensors", 0], 7), 1, "entry 0: expected an object"),
    ("name not str", _set(["tensors", 0, "name"], 3), 1, "name 3 is not a string"),
    ("bad kind", _set(["tensors", 0, "kind"], "int4"), 1, "'qo_bank': kind 'int4' is not one of"),
    ("bad dtype", _set(["tensors", 0, "dtype"], "float64"), 1, "dtype 'float64' is not one of"),
    ("bad storage dtype", _set(["tensors", 0, "data", "dtype"], "uint8"), 1, "storage dtype 'uint8' is not allowed"),
    ("bad scale dtype", _set(["tensors", 0, "scale", "dtype"], "int8"), 1, "scale: storage dtype 'int8'"),
    ("negative dim", _set(["tensors", 0, "shape"], [2, -8, 16]), 1, "not a list of at most 32 non-negative"),
    ("bool dim", _set(["tensors", 4, "shape"], [True, 4]), 1, "not a list of at most 32 non-negative"),
    ("shape mismatch", _set(["tensors", 0, "shape"], [2, 16, 8]), 1, "does not match the tensor shape"),
    ("size mismatch", _set(["tensors", 0, "data", "shape"], [2, 8, 15]), 1, "256 bytes do not hold shape"),
    ("out of bounds", _set(["tensors", 0, "data", "offset"], 10**6), 1, "out of bounds"),
    ("negative offset", _set(["tensors", 0, "data", "offset"], -1), 1, "must be non-negative integers"),
    ("missing scale", _set(["tensors", 0, "scale"], None), 1, "needs a scale"),
    ("extra scale", _set(["tensors", 4, "scale"], {"dtype": "float16"}), 1, "has no scale"),
    ("scale shape", _set(["tensors", 1, "scale", "shape"], [3, 2]), 1, "minus its last axis"),
    ("duplicate name", _set(["tensors", 1, "name"], "qo_bank"), 1, "duplicate name 'qo_bank'"),
    ("absurd empty dim", lambda h, p: _set(["tensors", 7, "shape"], [0, 2**62, 2**62])(h, p)
     or _set(["tensors", 7, "data", "shape"], [0, 2**62, 2**62])(h, p), 1, "cannot build an array"),
    ("unclaimed payload", lambda h, p: join_raw(h, p + b"\0"), 1, "claims \\d+ payload bytes, the payload has"),
    ("int6 out of range", lambda h, p: join_raw(h, bytes([100]) + p[1:]), 1, "int6 values outside"),
]


@pytest.mark.parametrize("make, level, message", [c[1:] for c in INNER], ids=[c[0] for c in INNER])
def test_malformed_bodies(good, make, level, message):
    """Bodies with a valid checksum but bad contents (level: None = the
    compressed body itself, 0 = a raw body, 1 = an edited JSON header)."""
    if level is None:
        body = make(good)
        buf = artifact.HEADER.pack(artifact.MAGIC, 1, len(body), zlib.crc32(body)) + body
    elif level == 0:
        buf = wrap(make(good))
    else:
        buf = wrap(_edit(good, make))
    with pytest.raises(ArtifactError, match=message) as e:
        artifact.deserialize(buf, source="x.golf")
    assert str(e.value).startswith("x.golf: ")


def test_empty_model_round_trips():
    assert artifact.deserialize(artifact.serialize({}, None, preset=0)) == ({}, None)


# ----------------------------------------------------------------------------- properties

def _deserialize_or_artifact_error(buf: bytes) -> None:
    try:
        qmodel, _ = artifact.deserialize(buf)
    except ArtifactError as e:
        assert str(e).startswith("<bytes>: ")
        return
    assert_valid_model(qmodel)


FAST = artifact.serialize(small_model(), small_meta(), preset=0)
PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=64).map(lambda b: artifact.MAGIC + b)))
def test_arbitrary_bytes_never_escape(buf):
    _deserialize_or_artifact_error(buf)


@PROPERTY
@given(st.data())
def test_truncated_or_flipped_artifacts(data):
    buf = bytearray(FAST)
    if data.draw(st.booleans()):
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    for _ in range(data.draw(st.integers(0 if len(buf) < len(FAST) else 1, 3))):
        if buf:
            buf[data.draw(st.integers(0, len(buf) - 1))] ^= data.draw(st.integers(1, 255))
    _deserialize_or_artifact_error(bytes(buf))


@PROPERTY
@given(st.data())
def test_flips_behind_a_valid_checksum(data):
    """Past the checksum: damage to the .xz stream, the raw body, or the JSON table."""
    where = data.draw(st.sampled_from(["xz", "raw", "json"]))
    if where == "xz":
        body = bytearray(FAST[artifact.HEADER.size:])
        body[data.draw(st.integers(0, len(body) - 1))] ^= data.draw(st.integers(1, 255))
        buf = artifact.HEADER.pack(artifact.MAGIC, 1, len(body), zlib.crc32(body)) + bytes(body)
    elif where == "raw":
        raw = bytearray(lzma.decompress(FAST[artifact.HEADER.size:]))
        for _ in range(data.draw(st.integers(1, 3))):
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= data.draw(st.integers(1, 255))
        buf = wrap(bytes(raw))
    else:
        header, payload = split_raw(FAST)
        entry = header["tensors"][data.draw(st.integers(0, len(header["tensors"]) - 1))]
        field = data.draw(st.sampled_from(["name", "kind", "dtype", "shape", "data", "scale"]))
        target = entry
        if field in ("data", "scale") and entry[field] is not None and data.draw(st.booleans()):
            target, field = entry[field], data.draw(st.sampled_from(["dtype", "shape", "offset", "nbytes"]))
        json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=8)
                                   | st.sampled_from(["int8", "float16", "float32", "int6", "bfloat16"]),
                                   lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                                   max_leaves=8)
        target[field] = data.draw(json_values)
        buf = wrap(join_raw(header, payload))
    _deserialize_or_artifact_error(buf)


# ----------------------------------------------------------------------------- the budget

def test_code_bytes_is_the_packages_source_without_the_tooling():
    package = Path(golf_jax.__file__).parent
    kernels_dir = package.parent / "kernels"
    size = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
    tools = size((package / "tools").rglob("*.py"))
    expected = size(p for d in (package, kernels_dir) for p in d.rglob("*.py")) - tools
    assert tools > 0 and artifact.code_bytes() == expected > artifact.code_bytes(kernels_dir) > 0
    assert artifact.code_bytes(package) + artifact.code_bytes(kernels_dir) == expected


def test_code_bytes_of_a_tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_bytes(b"x" * 10)
    (tmp_path / "sub" / "b.py").write_bytes(b"y" * 7)
    (tmp_path / "notes.md").write_bytes(b"z" * 100)
    assert artifact.code_bytes(tmp_path) == 17


def test_budget_report():
    report = artifact.artifact_budget_report(15_000_000, 16_000_000, code=101_850)
    assert report == {"weights_bytes": 15_000_000, "code_bytes": 101_850, "total_bytes": 15_101_850,
                      "budget_bytes": 16_000_000, "headroom_bytes": 898_150, "fits": True}
    assert not artifact.artifact_budget_report(15_950_000, 16_000_000, code=101_850)["fits"]
    assert artifact.artifact_budget_report(10, 10**9)["code_bytes"] == artifact.code_bytes()

