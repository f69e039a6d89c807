"""Shards, the exporter, the token streams, byte tables, the byte sidecar, the tokenizer checks
and the embedded dataset."""

from __future__ import annotations

import math

import numpy as np
import pytest

from golf_jax import data, datasets
from tests.conftest import fixture_path


def write(path, tokens):
    data.write_shard(path, np.asarray(tokens, np.uint16))
    return path


# ----------------------------------------------------------------------------- shard format

def test_shard_round_trip_and_header(tmp_path):
    toks = np.random.default_rng(0).integers(0, 1024, 1000)
    path = write(tmp_path / "s.bin", toks)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 1000
    header = np.frombuffer(raw[:1024], "<i4")
    assert list(header[:3]) == [20240520, 1, 1000] and not header[3:].any()
    np.testing.assert_array_equal(data.read_shard(path), toks)
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary name


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:500], "truncated shard"),
    (lambda b: b[:-2], "truncated"),
    (lambda b: b + b"\0\0", "header says"),
    (lambda b: np.int32(7).tobytes() + b[4:], "bad shard magic"),
    (lambda b: b[:4] + np.int32(2).tobytes() + b[8:], "unsupported shard version"),
    (lambda b: b"", "shorter than the 1024-byte header"),
])
def test_bad_shards_name_file_and_problem(tmp_path, mutate, message):
    good = write(tmp_path / "good.bin", np.arange(100)).read_bytes()
    bad = tmp_path / "bad.bin"
    bad.write_bytes(mutate(good))
    with pytest.raises(data.DataError, match=message) as e:
        data.read_shard(bad)
    assert str(bad) in str(e.value)


def test_missing_shard_and_empty_pattern(tmp_path):
    with pytest.raises(data.DataError, match="not found"):
        data.read_shard(tmp_path / "nope.bin")
    with pytest.raises(data.DataError, match="no shards match"):
        data.shard_files(str(tmp_path / "x_*.bin"))


# ----------------------------------------------------------------------------- exporter


# ----------------------------------------------------------------------------- token streams

def test_token_stream_crosses_shards_and_wraps(tmp_path):
    write(tmp_path / "t_000001.bin", [5, 6, 7])
    write(tmp_path / "t_000000.bin", [0, 1, 2, 3, 4])  # sorted order, not creation order
    s = data.TokenStream(str(tmp_path / "t_*.bin"), vocab_size=16)
    np.testing.assert_array_equal(s.take(4), [0, 1, 2, 3])
    np.testing.assert_array_equal(s.take(6), [4, 5, 6, 7, 0, 1])
    state = s.state()
    a = s.take(5)
    s.restore(state)
    np.testing.assert_array_equal(s.take(5), a)


def test_train_batches_same_tokens_for_every_device_count(tmp_path):
    rng = np.random.default_rng(0)
    write(tmp_path / "t_000000.bin", rng.integers(0, 64, 3000))
    write(tmp_path / "t_000001.bin", rng.integers(0, 64, 2000))
    pattern, global_tokens, seq = str(tmp_path / "t_*.bin"), 512, 16
    streams = {}
    for world in (1, 2, 4, 8):
        b = data.TrainBatches(pattern, 64, global_tokens, seq, world_size=world, accum_steps=8 // world)
        micro = [b.next_micro_batch() for _ in range(3 * (8 // world))]  # three optimizer steps
        xs = np.concatenate([x for x, _ in micro])
        ys = np.concatenate([y for _, y in micro])
        assert xs.shape == (3 * global_tokens // seq, seq)
        streams[world] = (xs, ys)
    for world in (2, 4, 8):
        np.testing.assert_array_equal(streams[world][0], streams[1][0])
        np.testing.assert_array_equal(streams[world][1], streams[1][1])


def test_train_batches_of_some_ranks_are_their_rows_of_the_whole(tmp_path):
    """A process of a multi-process run loads only its devices' spans: the
    same rows as the whole micro-batch's, and the same cursor after it."""
    rng = np.random.default_rng(1)
    write(tmp_path / "t_000000.bin", rng.integers(0, 64, 1500))
    write(tmp_path / "t_000001.bin", rng.integers(0, 64, 700))  # spans cross this boundary and wrap
    pattern, rows = str(tmp_path / "t_*.bin"), 2  # 4 ranks x 2 rows of 16 tokens per micro-step
    whole = data.TrainBatches(pattern, 64, 512, 16, world_size=4, accum_steps=4)
    parts = {ranks: data.TrainBatches(pattern, 64, 512, 16, world_size=4, accum_steps=4, ranks=ranks)
             for ranks in [(0, 1), (2, 3), (1, 3)]}
    for _ in range(20):
        x, y = whole.next_micro_batch()
        for ranks, b in parts.items():
            px, py = b.next_micro_batch()
            want = np.concatenate([np.arange(r * rows, (r + 1) * rows) for r in ranks])
            np.testing.assert_array_equal(px, x[want])
            np.testing.assert_array_equal(py, y[want])
            assert b.state() == whole.state()
    with pytest.raises(data.DataError, match=r"ranks \[4\]: expected some of 0 .. 3"):
        data.TrainBatches(pattern, 64, 512, 16, world_size=4, accum_steps=4, ranks=[4])


def test_train_batch_layout_matches_reference_spans(tmp_path):
    toks = np.arange(10_000) % 1000
    write(tmp_path / "t_000000.bin", toks)
    b = data.TrainBatches(str(tmp_path / "t_*.bin"), 1024, global_tokens=64, seq_len=8, world_size=2, accum_steps=2)
    x, y = b.next_micro_batch()  # 2 ranks x (16 + 1) tokens; rank r owns rows 2r, 2r+1
    np.testing.assert_array_equal(x.reshape(2, 16), [toks[0:16], toks[17:33]])
    np.testing.assert_array_equal(y.reshape(2, 16), [toks[1:17], toks[18:34]])
    x2, _ = b.next_micro_batch()
    assert x2[0, 0] == toks[34]


def test_train_batches_reject_indivisible_batch(tmp_path):
    write(tmp_path / "t_000000.bin", np.arange(100))
    with pytest.raises(data.DataError, match="not divisible"):
        data.TrainBatches(str(tmp_path / "t_*.bin"), 1024, global_tokens=100, seq_len=8, world_size=1, accum_steps=8)


def test_validation_tokens_trimmed_plus_one(tmp_path):
    write(tmp_path / "v_000000.bin", np.arange(50))
    write(tmp_path / "v_000001.bin", np.arange(50, 75))
    v = data.load_validation_tokens(str(tmp_path / "v_*.bin"), seq_len=16, vocab_size=100)
    np.testing.assert_array_equal(v, np.arange(65))  # 4 x 16 + 1
    assert len(data.load_validation_tokens(str(tmp_path / "v_*.bin"), 16, 100, max_tokens=40)) == 33


def test_token_ids_beyond_vocab_are_an_error(tmp_path):
    path = write(tmp_path / "v_000000.bin", [1, 2, 3, 1500, 4])
    with pytest.raises(data.DataError, match=r"token id 1500 at position 3 is >= vocab_size 1024") as e:
        data.load_validation_tokens(str(tmp_path / "v_*.bin"), 2, 1024)
    assert str(path) in str(e.value)
    # The training stream checks the tokens it takes (a process of a
    # multi-process run takes only its own spans and skips the others').
    stream = data.TokenStream(str(tmp_path / "v_*.bin"), 1024)
    stream.skip(3)
    with pytest.raises(data.DataError, match=r"v_000000.bin: token id 1500 at position 3 is >= vocab_size 1024"):
        stream.take(2)
    stream = data.TokenStream(str(tmp_path / "v_*.bin"), 1024)
    np.testing.assert_array_equal(stream.take(3), [1, 2, 3])
    stream.skip(1)  # past the bad id, unread
    np.testing.assert_array_equal(stream.take(2), [4, 1])  # wraps to the start


# ----------------------------------------------------------------------------- tokenizer and bytes

def test_byte_tables_match_reference(shared_data):
    e = np.load(fixture_path("eval_tiny.npz"))
    t = data.byte_tables(data.load_tokenizer(shared_data / datasets.EMBEDDED_TOKENIZER, 1024), 1024)
    np.testing.assert_array_equal(t.base_bytes, e["base_bytes"])
    np.testing.assert_array_equal(t.has_leading_space, e["has_leading_space"])
    np.testing.assert_array_equal(t.is_boundary, e["is_boundary"])


def test_target_bytes_count_utf8_of_decoded_text(shared_data):
    """Summed target bytes equal the UTF-8 length of the decoded documents
    (for text the tokenizer covers: an unknown piece counts 0 bytes)."""
    sp = data.load_tokenizer(shared_data / datasets.EMBEDDED_TOKENIZER, 1024)
    t = data.byte_tables(sp, 1024)
    docs = ["Hello there, friend.", "Second  document: 42 naive cafes!"]
    tokens = np.concatenate([[1] + sp.encode(d) for d in docs])
    assert sp.unk_id() not in tokens
    assert int(t.target_bytes(tokens).sum()) == sum(len(sp.decode(sp.encode(d)).encode()) for d in docs)


def test_tokenizer_vocab_mismatch_and_bad_file(tmp_path, shared_data):
    with pytest.raises(data.DataError, match=r"has 1024 tokens but the model's vocab_size is 2048"):
        data.load_tokenizer(shared_data / datasets.EMBEDDED_TOKENIZER, 2048)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(data.DataError, match="not a SentencePiece model"):
        data.load_tokenizer(junk)
    with pytest.raises(data.DataError, match="tokenizer not found"):
        data.load_tokenizer(tmp_path / "none.model")


def test_bits_per_byte():
    loss, bpb = data.bits_per_byte(loss_sum=200.0, token_count=100, byte_count=400)
    assert loss == 2.0 and bpb == pytest.approx(2.0 / np.log(2) / 4)


def test_caseops_tokenizer_vocab_and_transform_checks(caseops_tokenizer, shared_data):
    sp = data.load_tokenizer(caseops_tokenizer, 8192, "caseops")
    assert sp.vocab_size() == 8192
    with pytest.raises(data.DataError, match=r"caseops_v1_reserved.model: tokenizer has 8192 tokens but the "
                                             r"model's vocab_size is 1024"):
        data.load_tokenizer(caseops_tokenizer, 1024, "caseops")
    with pytest.raises(data.DataError, match=r"caseops_v1_reserved.model: a CaseOps tokenizer .* set "
                                             r"data.text_transform='caseops'"):
        data.load_tokenizer(caseops_tokenizer, 8192, "")
    with pytest.raises(data.DataError, match=r"fineweb_1024_bpe.model: data.text_transform='caseops' needs a "
                                             r"CaseOps tokenizer.*this one's are"):
        data.load_tokenizer(shared_data / datasets.EMBEDDED_TOKENIZER, 1024, "caseops")
    data.load_tokenizer(caseops_tokenizer, 8192)  # no transform given: no check (e.g. identifying the file)


# ----------------------------------------------------------------------------- the byte sidecar

def val_with_sidecar(tmp_path, docs):
    """Val shards (one per list of documents) of [BOS] + ids and their
    sidecars: each document a list of (id, bytes)."""
    for i, shard_docs in enumerate(docs):
        ids = [t for doc in shard_docs for t in [1] + [tok for tok, _ in doc]]
        nbytes = [b for doc in shard_docs for b in [0] + [n for _, n in doc]]
        write(tmp_path / f"fineweb_val_{i:06d}.bin", ids)
        write(tmp_path / f"fineweb_val_bytes_{i:06d}.bin", nbytes)
    return str(tmp_path / "fineweb_val_*.bin"), str(tmp_path / "fineweb_val_bytes_*.bin")


DOCS = [[[(5, 0), (300, 3), (301, 1)], [(9, 2), (10, 4)]], [[(11, 1), (12, 7), (13, 2), (14, 1)]]]


def test_sidecar_parallels_the_val_tokens_which_leave_it_out(tmp_path):
    val, bytes_pattern = val_with_sidecar(tmp_path, DOCS)
    tokens = data.load_validation_tokens(val, seq_len=4, vocab_size=8192)  # reference quirk: sidecars match val
    np.testing.assert_array_equal(tokens, [1, 5, 300, 301, 1, 9, 10, 1, 11])
    sidecar = data.load_byte_sidecar(val, bytes_pattern, tokens, bos_id=1)
    np.testing.assert_array_equal(sidecar.target_bytes(tokens), [0, 3, 1, 0, 2, 4, 0, 1])
    # Bits per byte as the reference's (L2786, L2878): sum nats / (ln 2 x sum sidecar[targets]).
    loss_sum = 17.5
    assert data.bits_per_byte(loss_sum, 8, int(sidecar.target_bytes(tokens).sum()))[1] == pytest.approx(
        loss_sum / (math.log(2) * 11), rel=1e-15)  # float64, two orders of the same products
    with pytest.raises(data.DataError, match=r"fineweb_val_bytes_\*.bin: the byte sidecar covers 9 validation "
                                             r"tokens, asked for 5"):
        sidecar.target_bytes(tokens[:5])
    with pytest.raises(data.DataError, match=r"fineweb_val_bytes_\*.bin: only byte sidecars .* no validation shards"):
        data.load_validation_tokens(bytes_pattern, 4, 8192)


@pytest.mark.parametrize("damage, message", [
    (lambda d: [p.unlink() for p in d.glob("*_bytes_*")], r"fineweb_val_bytes_\*.bin: no byte sidecar found "
                                                         r"\(data.val_bytes_pattern\)"),
    (lambda d: (d / "fineweb_val_bytes_000001.bin").unlink(), r"1 byte sidecar files for 2 validation shards"),
    (lambda d: write(d / "fineweb_val_bytes_000001.bin", [0, 1, 7, 2]),
     r"fineweb_val_bytes_000001.bin: 4 byte counts, but its validation shard \S*fineweb_val_000001.bin has 5 tokens"),
    (lambda d: (d / "fineweb_val_bytes_000000.bin").write_bytes(b"\0" * 1030),
     r"fineweb_val_bytes_000000.bin: bad shard magic"),
    (lambda d: write(d / "fineweb_val_bytes_000000.bin", [0, 0, 3, 1, 2, 2, 4]),
     r"fineweb_val_bytes_000000.bin: 2 bytes at position 4, where \S*fineweb_val_000000.bin has BOS"),
])
def test_sidecar_errors_name_the_file(tmp_path, damage, message):
    val, bytes_pattern = val_with_sidecar(tmp_path, DOCS)
    tokens = data.load_validation_tokens(val, 4, 8192)
    damage(tmp_path)
    with pytest.raises(data.DataError, match=message):
        data.load_byte_sidecar(val, bytes_pattern, tokens, bos_id=1)


# ----------------------------------------------------------------------------- embedded dataset


