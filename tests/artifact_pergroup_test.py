"""The per-group artifact: the row reordering against the 1.0611 reference's
own function, the streams against its serializer, round trips, and every
way a file can be bad."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import zlib

import ml_dtypes
import numpy as np
import pytest

from golf_jax import artifact_pergroup as ap
from golf_jax import compressors
from golf_jax.artifact import ArtifactError
from tests.conftest import reference_source

FRONTIER = "frontier_1855/train_gpt.py"


def frontier_like(seed: int = 0, layers: int = 3, d: int = 32, vocab: int = 96) -> dict:
    """Names and kinds of the frontier quantiser's output, small."""
    rng = np.random.default_rng(seed)

    def q(shape, lim=31):
        return rng.integers(-lim, lim + 1, shape).astype(np.int8)

    out = {"tok_emb.weight.q": q((vocab, d), 63), "tok_emb.weight.scale": rng.random(vocab).astype(np.float16)}
    for i in range(layers):
        b = f"blocks.{i}."
        for name, shape in (("attn.c_q", (d, d)), ("attn.c_k", (d // 2, d)), ("attn.c_v", (d // 2, d)),
                            ("attn.proj", (d, d)), ("mlp.fc", (2 * d, d)), ("mlp.proj", (d, 2 * d))):
            out[b + name + ".weight.q"] = q(shape)
            out[b + name + ".weight.scale"] = rng.random(shape[0]).astype(np.float16)
        out[b + "attn.attn_gate_w.gq"] = q((4, d), 127)  # int8, in no group: the remainder
        out[b + "attn_scale"] = rng.standard_normal(d).astype(np.float16)
    out["blocks.0.mlp.fc.weight.lqA_a"] = q((2 * d, 4), 2)
    out["blocks.0.mlp.fc.weight.lqAs_a"] = np.float16(0.5).reshape(())
    out["skip_gates"] = rng.standard_normal((2, d)).astype(ml_dtypes.bfloat16)
    out["step"] = np.array(7, np.int64)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == list(b)
    for k in a:
        assert b[k].dtype == np.asarray(a[k]).dtype and np.array_equal(b[k], a[k]), k


@pytest.fixture(scope="module")
def reference_sort():
    ns = {}
    exec(reference_source(FRONTIER, "_similarity_sort_l1"), ns)
    return ns["_similarity_sort_l1"]


@pytest.mark.parametrize("shape,lim,dtype", [((1, 4), 3, np.int8), ((2, 3), 3, np.int8), ((97, 16), 31, np.int8),
                                             ((300, 6), 1, np.int8), ((64, 8), 127, np.int8),
                                             ((80, 12), 0, np.float32), ((50, 5), 2, np.float16)])
def test_row_order_is_the_reference_order(reference_sort, shape, lim, dtype):
    rng = np.random.default_rng(sum(shape))
    m = (rng.integers(-lim, lim + 1, shape) if lim else rng.standard_normal(shape)).astype(dtype)
    # lim 1 over 6 columns: many equal distances, so the lowest-index tie rule is exercised.
    ours, theirs = ap.similarity_order_l1(m), reference_sort(m)
    assert ours.dtype == np.uint16 and np.array_equal(ours, theirs)


def test_row_order_rejects_what_it_cannot_store():
    for bad in (np.zeros(4, np.int8), np.zeros((0, 3), np.int8), np.zeros((ap.MAX_PERMUTED_ROWS + 1, 1), np.int8)):
        with pytest.raises(ValueError, match="row"):
            ap.similarity_order_l1(bad)


def test_routing_is_by_name_dtype_and_layer_number():
    rng = np.random.default_rng(0)
    arrays = {f"blocks.{i}.attn.c_k.weight.q": rng.integers(-3, 4, (2, 2)).astype(np.int8) for i in (10, 2, 0)}
    arrays["blocks.1.attn.c_k.weight.q"] = np.zeros((2, 2), np.float16)  # not int8: the remainder
    arrays["xblocks.3.attn.c_k.weight.q"] = np.zeros((2, 2), np.int8)
    arrays["tok_emb.weight.q"] = np.zeros((2, 2), np.int8)
    members, rest = ap.route(arrays)
    assert members[0] == ["tok_emb.weight.q"]
    assert members[1] == ["blocks.0.attn.c_k.weight.q", "blocks.2.attn.c_k.weight.q", "blocks.10.attn.c_k.weight.q"]
    assert rest == ["blocks.1.attn.c_k.weight.q", "xblocks.3.attn.c_k.weight.q"]


@pytest.mark.parametrize("compressor", ["brotli", "lzma"])
def test_round_trip_is_exact_and_deterministic(compressor):
    arrays = frontier_like()
    arrays["blocks.5.mlp.fc.weight.q"] = np.zeros((0, 32), np.int8)  # no rows to reorder
    arrays["blocks.6.attn.c_k.weight.q"] = np.arange(5, dtype=np.int8)  # 1-D in a group: not transposed
    meta = {"quant": {"blocks.0.mlp.fc.weight": "gptq (int6)+lqer_asym"}, "n": np.int64(3)}
    blob = ap.serialize(arrays, meta, compressor=compressor)
    assert ap.serialize(arrays, meta, compressor=compressor) == blob
    back, meta_back = ap.deserialize(blob)
    assert_same(arrays, back)
    assert meta_back == {"quant": {"blocks.0.mlp.fc.weight": "gptq (int6)+lqer_asym"}, "n": 3}
    sizes = ap.stream_sizes(blob)
    assert sum(sizes.values()) == len(blob) and sizes["permutations"] > 0 and sizes["attn.c_k.weight.q"] > 0


def test_groups_are_coded_side_by_side_to_the_same_bytes(monkeypatch):
    """workers > 1 codes (and decodes) the groups on threads at once, as
    many as asked; the bytes are those of coding them one after another."""
    arrays = frontier_like()
    serial = ap.serialize(arrays, {}, compressor="brotli", workers=1)
    assert ap.serialize(arrays, {}, compressor="brotli", workers=4) == serial
    assert_same(arrays, ap.deserialize(serial, workers=4)[0])

    # The first `workers` calls wait for one another at a barrier: they meet only if they run
    # at once (no timing assumed; a serial coder would break the barrier after 10 s). The
    # counter checks that no more than `workers` run at once.
    state = {"lock": threading.Lock(), "active": 0, "most": 0, "calls": 0, "barrier": None}

    def gated(code):
        def run(data: bytes) -> bytes:
            with state["lock"]:
                state["calls"] += 1
                first = state["calls"] <= state["barrier"].parties
                state["active"] += 1
                state["most"] = max(state["most"], state["active"])
            if first:
                state["barrier"].wait()
            with state["lock"]:
                state["active"] -= 1
            return code(data)
        return run

    compress, decompress = compressors.COMPRESSORS["brotli"]
    monkeypatch.setitem(compressors.COMPRESSORS, "brotli", (gated(compress), gated(decompress)))
    for workers in (1, 3):
        for code in (lambda: ap.serialize(arrays, {}, compressor="brotli", workers=workers) == serial,
                     lambda: assert_same(arrays, ap.deserialize(serial, workers=workers)[0]) is None):
            state.update(active=0, most=0, calls=0, barrier=threading.Barrier(workers, timeout=10))
            assert code() and state["most"] == workers and state["calls"] == 7


def test_streams_match_the_reference_serializer():
    """The reference's _serialize_pergroup with brotli in place of its lrzip
    binary, on the same tensors: each group stream and the permutations are
    the same bytes; only the remainder differs (JSON for torch.save)."""
    torch = pytest.importorskip("torch")
    import collections
    names = ("_GROUP_ORDER", "_SIMSORT_KEYS", "_PACK_MAGIC", "_similarity_sort_l1", "_pack_streams",
             "_unpack_streams", "_serialize_pergroup")
    ns = {"collections": collections, "io": io, "os": os, "torch": torch}
    exec(reference_source(FRONTIER, *names), ns)
    ns["_lrzip_compress"] = lambda data, tmpdir, label: compressors.COMPRESSORS["brotli"][0](data)
    arrays = frontier_like(seed=1, layers=4, d=64, vocab=512)
    del arrays["skip_gates"]  # bfloat16: torch.from_numpy cannot take it
    theirs = ns["_unpack_streams"](ns["_serialize_pergroup"](
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}, {}, 4, None))
    ours = ap.serialize(arrays, {}, compressor="brotli")
    sizes = list(ap.stream_sizes(ours).values())
    table = ap.HEAD.size + 4 * (len(sizes) - 1) + 4
    ours_streams = np.split(np.frombuffer(ours[table:], np.uint8), np.cumsum(sizes[:-2]))
    for i in (*range(7), 8):  # the seven groups, the permutations
        assert ours_streams[i].tobytes() == theirs[i], i
    # The remainder is the only stream that differs: its JSON manifest is smaller than
    # torch.save's zip of pickles (1.3% of the whole here; 0.01-0.02% at the record's size,
    # where the groups dominate: tests/frontier_reference/pergroup_sizes.py).
    assert len(ours_streams[7]) < len(theirs[7])
    assert len(ours) < 8 + 4 * len(theirs) + sum(map(len, theirs))


def test_bad_input_is_refused():
    with pytest.raises(ArtifactError, match="unknown group compressor 'zstd'"):
        ap.serialize({}, compressor="zstd")
    with pytest.raises(ArtifactError, match="names must be strings"):
        ap.serialize({1: np.zeros(2, np.int8)}, compressor="brotli")
    with pytest.raises(ArtifactError, match="'c'.*complex64"):
        ap.serialize({"c": np.zeros(2, np.complex64)}, compressor="brotli")
    with pytest.raises(ArtifactError, match="JSON"):
        ap.serialize({}, {"x": object()}, compressor="brotli")


@pytest.fixture(scope="module")
def good() -> bytes:
    return ap.serialize(frontier_like(layers=1), {"run": 1}, compressor="brotli")


def test_write_and_read_a_file(tmp_path, good):
    path = tmp_path / "sub" / "model.pgrp"
    n = ap.write_artifact(path, frontier_like(layers=1), {"run": 1}, compressor="brotli")
    assert n == path.stat().st_size == len(good) and path.read_bytes() == good
    assert [p.name for p in path.parent.iterdir()] == ["model.pgrp"]  # no temporary left behind
    assert_same(frontier_like(layers=1), ap.read_artifact(path)[0])
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'none'}: artifact not found"):
        ap.read_artifact(tmp_path / "none")


def reframe(streams: list[bytes]) -> bytes:
    """A container around `streams` with a correct checksum."""
    return b"".join([ap.HEAD.pack(ap.MAGIC, ap.FORMAT_VERSION, len(streams)),
                     *(struct.pack("<I", len(s)) for s in streams), struct.pack("<I", zlib.crc32(b"".join(streams))),
                     *streams])


def split(blob: bytes) -> list[bytes]:
    sizes = list(ap.stream_sizes(blob).values())[:-1]
    body, out, at = blob[len(blob) - sum(sizes):], [], 0
    for n in sizes:
        out.append(body[at:at + n])
        at += n
    return out


def with_header(blob: bytes, edit) -> bytes:
    streams = split(blob)
    raw = compressors.brotli_module().decompress(streams[-2])
    (n,) = struct.unpack_from("<Q", raw)
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    streams[-2] = compressors.brotli_module().compress(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    return reframe(streams)


def bad_files(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[-5] ^= 0x40
    streams = split(good)
    wrong_group = list(streams)
    wrong_group[2] = compressors.COMPRESSORS["brotli"][0](b"\x00" * 3)
    bad_perm = list(streams)
    bad_perm[-1] = compressors.brotli_module().compress(b"\x00\x00" * (len(compressors.brotli_module().decompress(streams[-1])) // 2))
    return {
        "empty file": b"",
        "not a per-group artifact": b"GOLFJAX\x00" + good[8:],
        "shorter than the 12-byte header": good[:10],
        "format version 9": good[:4] + struct.pack("<I", 9) + good[8:],
        "shorter than the 52-byte header and length table": good[:30],
        "truncated artifact: the length table says": good[:-1],
        "1 unexpected bytes after": good + b"\x00",
        "checksum mismatch": bytes(flipped),
        "brotli decode error in the remainder": reframe([*streams[:-2], b"junk", streams[-1]]),
        "group 'attn.c_q.weight.q': 3 bytes decompressed": reframe(wrong_group),
        "row permutation is missing or invalid": reframe(bad_perm),
        "unknown group compressor 'zstd'": with_header(good, lambda h: h.update(compressor="zstd")),
        "do not hold shape": with_header(good, lambda h: h["tensors"][0].update(shape=[999])),
        "groups must list the 7 group streams": with_header(good, lambda h: h["groups"].pop()),
    }


def test_a_bad_file_is_a_clear_error_naming_it(tmp_path, good):
    for i, (why, blob) in enumerate(bad_files(good).items()):
        path = tmp_path / f"bad{i}.pgrp"
        path.write_bytes(blob)
        with pytest.raises(ArtifactError) as e:
            ap.read_artifact(path)
        assert str(e.value).startswith(f"{path}: ") and why in str(e.value), (why, str(e.value))
