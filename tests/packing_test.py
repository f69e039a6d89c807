"""Document packing (golf_jax.packing) against the 1.0611 record's own `_build_cu_seqlens`
and `DocumentPackingLoader`, and per-document attention (attention.causal_attention's segments)."""

from __future__ import annotations

import glob
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from golf_jax import attention, data, packing
from tests.conftest import reference_source

FRONTIER = "frontier_1855/train_gpt.py"


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def reference_namespace(torch, *names: str) -> dict:
    namespace = {"torch": torch, "np": np, "glob": glob, "Path": Path, "ThreadPoolExecutor": ThreadPoolExecutor,
                 "BOS_ID": None}
    source = reference_source(FRONTIER, "get_next_multiple_of_n", "_build_cu_seqlens", *names)
    # Pinned host memory only speeds the record loader's copies to the GPU and needs an accelerator:
    # CPU-only torch refuses it (RuntimeError), so the loader runs here without it. Values are unchanged.
    for pinned, plain in [("pin_memory=True", "pin_memory=False"), ("cu_seqlens.pin_memory()", "cu_seqlens")]:
        if "DocumentPackingLoader" in names:
            assert pinned in source, f"the record's loader no longer has {pinned!r}: revisit this test"
        source = source.replace(pinned, plain)
    exec(source, namespace)
    return namespace


@pytest.fixture(scope="module")
def reference_cu_seqlens(torch):
    build = reference_namespace(torch)["_build_cu_seqlens"]

    def run(bos_positions, total_len, max_doc_len, bucket_size):
        cu, max_seqlen = build(list(bos_positions), total_len, "cpu", max_doc_len, bucket_size)
        return cu.numpy(), max_seqlen
    return run


def assert_same_segments(reference_cu_seqlens, bos_positions, total_len, max_doc_len, bucket_size):
    want_cu, want_max = reference_cu_seqlens(bos_positions, total_len, max_doc_len, bucket_size)
    got_cu, got_max = packing.document_segments(bos_positions, total_len, max_doc_len, bucket_size)
    assert got_cu.dtype == np.int32 and want_cu.dtype == np.int32
    np.testing.assert_array_equal(got_cu, want_cu)
    assert got_max == want_max and isinstance(got_max, int)


# ----------------------------------------------------------------------------- segments

@pytest.mark.parametrize("bos_positions, total_len, max_doc_len, bucket_size", [
    ([], 40, 16, 64),  # no BOS: the row is one (cut) document, in 16-token chunks
    ([], 10, 16, 64),
    ([0], 16, 16, 64),  # BOS at 0, exactly one chunk
    ([0, 7, 8, 30], 40, 16, 64),  # a one-token document; a 22-token one split in two
    ([5], 40, 16, 64),  # BOS mid-row: a segment at 0 comes first
    ([3, 39], 40, 16, 64),  # BOS on the last token
    ([2, 70], 100, 16, 4),  # documents longer than max_doc_len, small buckets
    ([0, 1, 2, 3, 4, 5, 6, 7], 8, 16, 4),  # boundaries fill exactly two buckets, then a third
    ([1, 9, 40, 41, 90], 100, 0, 64),  # max_doc_len 0: documents whole
])
def test_document_segments_match_the_record(reference_cu_seqlens, bos_positions, total_len, max_doc_len,
                                             bucket_size):
    assert_same_segments(reference_cu_seqlens, bos_positions, total_len, max_doc_len, bucket_size)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, n - 1), unique=True).map(sorted), st.just(n),
    st.integers(0, 40), st.sampled_from([1, 3, 64]))))
def test_document_segments_match_the_record_on_generated_rows(reference_cu_seqlens, case):
    assert_same_segments(reference_cu_seqlens, *case)


def test_document_segments_by_hand():
    cu, max_seqlen = packing.document_segments([5, 30], 40, 16, bucket_size=8)
    assert cu.tolist() == [0, 5, 21, 30, 40, 40, 40, 40] and max_seqlen == 16


@pytest.mark.parametrize("bos_positions, total_len", [([3, 3], 10), ([4, 2], 10), ([10], 10), ([-1], 10), ([], 0)])
def test_document_segments_rejects_bad_positions(bos_positions, total_len):
    with pytest.raises(ValueError):
        packing.document_segments(bos_positions, total_len, 16)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, n - 1), unique=True).map(sorted), st.just(n), st.integers(0, 30))))
def test_segment_ids_round_trip_with_cu_seqlens(case):
    bos_positions, total_len, max_doc_len = case
    cu, max_seqlen = packing.document_segments(bos_positions, total_len, max_doc_len, bucket_size=8)
    ids = packing.segment_ids(cu, total_len)
    assert ids.dtype == np.int32 and ids.shape == (total_len,)
    # Segment k is exactly the tokens [cu[k], cu[k + 1]): the ids count up from 0 with no gaps.
    assert ids[0] == 0 and set(np.diff(ids).tolist()) <= {0, 1}
    real = np.unique(cu)  # the padding repeats total_len
    np.testing.assert_array_equal(np.flatnonzero(np.diff(ids, prepend=-1)), real[:-1])
    assert np.bincount(ids).max() == max_seqlen
    assert set(bos_positions) <= set(real[:-1].tolist())  # every document starts a segment


# ----------------------------------------------------------------------------- cuDNN's packed layout

def test_cudnn_segments_by_hand():
    # Segments 0-2, 2-3, 3-5, 5-6, 6-9, 9-16 in two fold rows of 8 tokens. Segment 4 (at 6) must sit
    # in fold row 0, so row 0 needs 5 slots; segment 5 (9-16) goes to row 1 at 1, past row 1's end.
    cu, _ = packing.document_segments([2, 3, 5, 6, 9], 16, 8, bucket_size=8)
    assert packing.segments_per_fold_needed(cu, 16, 8) == 5
    offsets, lengths = packing.cudnn_segments(cu, 16, 8, segments_per_fold=5)
    assert offsets.tolist() == [[0, 2, 3, 5, 6, -1], [1, -1, -1, -1, -1, -1]]
    assert lengths.tolist() == [[2, 1, 2, 1, 3], [7, -1, -1, -1, -1]]
    assert offsets.dtype == lengths.dtype == np.int32
    # Unfolded (one row of 16): one slot per segment.
    offsets, lengths = packing.cudnn_segments(cu, 16, 16, segments_per_fold=6)
    assert offsets.tolist() == [[0, 2, 3, 5, 6, 9, -1]] and lengths.tolist() == [[2, 1, 2, 1, 3, 7]]
    with pytest.raises(ValueError, match="need 5 slots per fold row of 8 tokens, not 4"):
        packing.cudnn_segments(cu, 16, 8, segments_per_fold=4)


@pytest.mark.parametrize("total_len, fold_len, slots, match", [
    (16, 6, 8, "must divide"), (16, 8, 1, "at least 2 slots"), (16, 4, 8, "longer than fold_len 4")])
def test_cudnn_segments_rejects_bad_folds(total_len, fold_len, slots, match):
    cu, _ = packing.document_segments([0, 9], total_len, 8, bucket_size=4)
    with pytest.raises(ValueError, match=match):
        packing.cudnn_segments(cu, total_len, fold_len, slots)


def cudnn_view(offsets, lengths, fold_len):
    """The sequences cuDNN runs, as JAX's dot_product_attention documents its packed arrays:
    fold row r's non-negative entries, r x fold_len added to its offsets, in row order.
    (start token, length) of each, then the empty ones, at the row's end."""
    real = lengths >= 0
    fold_starts = np.arange(offsets.shape[0])[:, None] * fold_len
    n, total_len = int(real.sum()), offsets.shape[0] * fold_len
    starts = np.r_[(offsets[:, :-1] + fold_starts)[real], np.full(real.size - n, total_len)]
    return starts, np.r_[lengths[real], np.zeros(real.size - n, int)]


@settings(max_examples=100, deadline=None)
@given(st.tuples(st.integers(1, 6), st.integers(1, 24)).flatmap(lambda folds_len: st.tuples(
    st.lists(st.integers(0, folds_len[0] * folds_len[1] - 1), unique=True).map(sorted),
    st.just(folds_len[0] * folds_len[1]), st.just(folds_len[1]), st.integers(0, 3))))
def test_cudnn_segments_hand_cudnn_every_segment_once(case):
    bos_positions, total_len, fold_len, spare_slots = case
    cu, _ = packing.document_segments(bos_positions, total_len, fold_len, bucket_size=8)
    needed = packing.segments_per_fold_needed(cu, total_len, fold_len)
    offsets, lengths = packing.cudnn_segments(cu, total_len, fold_len, needed + spare_slots)
    folds, slots = lengths.shape
    assert offsets.shape == (folds, slots + 1) and folds * fold_len == total_len
    assert np.all((offsets[:, :-1] >= 0) == (lengths >= 0)) and np.all(offsets[:, -1] == -1)
    starts, seq_lengths = cudnn_view(offsets, lengths, fold_len)
    # The row's segments, each once, in order (so cuDNN's offsets never decrease), then empty ones.
    real = np.unique(cu)
    n = real.size - 1
    np.testing.assert_array_equal(starts[:n], real[:-1])
    np.testing.assert_array_equal(seq_lengths[:n], np.diff(real))
    assert np.all(seq_lengths[n:] == 0)
    if needed > 2:
        with pytest.raises(ValueError, match="raise segments_per_fold"):
            packing.cudnn_segments(cu, total_len, fold_len, needed - 1)


@pytest.mark.parametrize("bos_positions, total_len, fold_len, slots", [
    ([2, 3, 5, 6, 9], 16, 8, 5), ([0, 9, 30], 32, 8, 3), ([4, 11, 12], 30, 30, 8)])
def test_cudnn_view_is_what_jax_hands_cudnn(bos_positions, total_len, fold_len, slots):
    """JAX's own conversion (fused_attention_stablehlo._fix_seqlen_offsets, no GQA: heads 2,
    head dim 4) gives cuDNN the sequences `cudnn_view` reads from the arrays."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
    cu, _ = packing.document_segments(bos_positions, total_len, fold_len, bucket_size=8)
    offsets, lengths = packing.cudnn_segments(cu, total_len, fold_len, slots)
    qkv = jax.ShapeDtypeStruct((offsets.shape[0], fold_len, 2, 4), jnp.bfloat16)
    seq, _, off, _ = (np.asarray(x).reshape(-1) for x in cudnn_attention._fix_seqlen_offsets(
        jnp.asarray(lengths), jnp.asarray(lengths), jnp.asarray(offsets), jnp.asarray(offsets), qkv, qkv))
    starts, seq_lengths = cudnn_view(offsets, lengths, fold_len)
    np.testing.assert_array_equal(off[:seq.size], starts * 2 * 4)  # offsets in elements: tokens x heads x dim
    np.testing.assert_array_equal(seq, seq_lengths)
    assert off[seq.size] == total_len * 2 * 4  # cuDNN's closing offset: the row's end


def test_make_segments_one_row():
    cu, _ = packing.document_segments([3, 10], 16, 8, bucket_size=8)
    segments = packing.make_segments(cu, 16, fold_len=8, segments_per_fold=2)
    np.testing.assert_array_equal(segments.ids_BxT, packing.segment_ids(cu, 16)[None])
    offsets, lengths = packing.cudnn_segments(cu, 16, 8, 2)
    np.testing.assert_array_equal(segments.offsets_BxRxM1, offsets[None])
    np.testing.assert_array_equal(segments.lengths_BxRxM, lengths[None])


# ----------------------------------------------------------------------------- the packed stream

def write_shards(directory: Path, rng: np.random.Generator) -> str:
    """Three shards with BOS (1) at irregular places: the first not at 0 in two of them,
    documents shorter and longer than the 16-token train_seq_len below."""
    for name, size, first_bos in [("a", 260, 0), ("b", 190, 7), ("c", 330, 13)]:
        tokens = rng.integers(2, 1000, size)
        bos = first_bos + np.cumsum(np.r_[0, rng.choice([1, 3, 9, 16, 17, 40], size=size)])
        tokens[bos[bos < size]] = 1
        data.write_shard(directory / f"train_{name}.bin", tokens)
    return str(directory / "train_*.bin")


@pytest.mark.parametrize("rank", [0, 1])
def test_packed_batches_match_the_records_loader(torch, tmp_path, rank):
    pattern = write_shards(tmp_path, np.random.default_rng(rank))
    world_size, train_seq_len, global_tokens, accum = 2, 16, 160, 2  # 40 tokens a rank, 82 a global span
    namespace = reference_namespace(torch, "load_data_shard", "DocumentPackingLoader")
    h = type("H", (), dict(rank=rank, world_size=world_size, train_seq_len=train_seq_len, train_files=pattern))
    loader = namespace["DocumentPackingLoader"](h, "cpu")
    ours = packing.PackedBatches(pattern, rank, world_size, train_seq_len)
    shards_seen, rows_seen, segments_seen, lengths_seen = [], [], [], []
    try:
        # 12 micro-batches: a, b, c hold 3, 2 and 3 global spans from their first BOS, so this
        # runs through all three shards and back into a and b (cycling).
        for step in range(12):
            want = loader.next_batch(global_tokens, accum)
            got = ours.next(global_tokens // (world_size * accum))
            shards_seen.append(ours.file_idx)
            rows_seen.append(got[0])
            segments_seen.append(got[2])
            lengths_seen.append(got[3])
            for name, g, w in zip(("inputs", "targets", "cu_seqlens"), got[:3], want[:3]):
                np.testing.assert_array_equal(g, w.numpy(), err_msg=f"step {step}: {name}")
            assert got[3] == want[3], f"step {step}: max_seqlen"
            assert got[0].shape == (1, 40) and got[2].dtype == np.int32
    finally:
        loader._batch_pool.shutdown(wait=True)
    assert shards_seen == [0, 0, 0, 1, 1, 2, 2, 2, 0, 0, 0, 1]
    # The rows compared hold several documents, and documents split at train_seq_len (a segment
    # starting at no BOS, past the row's start).
    assert max(len(np.unique(cu)) for cu in segments_seen) > 3 and 16 in lengths_seen
    assert any(set(np.unique(cu)[1:-1]) - set(np.flatnonzero(x[0] == 1)) for x, cu in zip(rows_seen, segments_seen))


def test_packed_batches_restore_and_rank_spans(tmp_path):
    pattern = write_shards(tmp_path, np.random.default_rng(5))
    shard_a = np.asarray(data.read_shard(tmp_path / "train_a.bin"), np.int32)  # its first BOS at 0
    ranks = [packing.PackedBatches(pattern, r, 2, 16) for r in (0, 1)]
    # Each rank's span is 41 tokens (40 inputs, and the last only as a target); rank 1's follows rank 0's.
    for cursor in (0, 82, 164):
        for rank, batches in enumerate(ranks):
            x, y, _, _ = batches.next(40)
            start = cursor + 41 * rank
            np.testing.assert_array_equal(x[0], shard_a[start:start + 40])
            np.testing.assert_array_equal(y[0], shard_a[start + 1:start + 41])
    saved = ranks[0].state()
    after = [ranks[0].next(40) for _ in range(5)]
    fresh = packing.PackedBatches(pattern, 0, 2, 16)
    fresh.restore(saved)
    for want in after:
        for g, w in zip(fresh.next(40), want):
            np.testing.assert_array_equal(g, w)


def test_next_rows_are_each_ranks_next(tmp_path):
    """next_rows reads one global span for several ranks: rank r's row is what a
    PackedBatches of rank r gives (the record's loader's, test above)."""
    pattern = write_shards(tmp_path, np.random.default_rng(3))
    world = 4
    per_rank = [packing.PackedBatches(pattern, r, world, 16) for r in range(world)]
    together = packing.PackedBatches(pattern, 0, world, 16)
    for _ in range(7):  # across shard advances (a global span is 4 x 21 tokens)
        got = together.next_rows(20, [3, 0, 2])
        want = [b.next(20) for b in per_rank]
        for r, row in zip([3, 0, 2], got):
            for g, w in zip(row, want[r]):
                np.testing.assert_array_equal(g, w)
        assert together.state() == per_rank[0].state()
    with pytest.raises(ValueError, match="ranks"):
        together.next_rows(20, [4])


def test_row_segments_have_a_static_shape():
    """However many documents a row holds, its Segments have one shape: no program recompiles."""
    for bos_positions in ([0, 5, 9], list(range(32))):  # three documents; every token its own
        cu, _ = packing.document_segments(bos_positions, 32, 16, bucket_size=packing.DEFAULT_BUCKET_SIZE)
        row = packing.make_segments(cu, 32, 16)
        assert [a.shape for a in row] == [(1, 32), (1, 2, packing.DEFAULT_SEGMENTS_PER_FOLD + 1),
                                          (1, 2, packing.DEFAULT_SEGMENTS_PER_FOLD)]
        assert all(a.dtype == np.int32 for a in row)
        np.testing.assert_array_equal(row.ids_BxT[0], packing.segment_ids(cu, 32))
        assert packing.model_inputs(row) == {"segments": row}
    assert packing.model_inputs(None) == {}


def test_packed_batches_bad_input_names_the_file(tmp_path):
    with pytest.raises(data.DataError, match="no shards match"):
        packing.PackedBatches(str(tmp_path / "none_*.bin"), 0, 1, 16)
    data.write_shard(tmp_path / "train_0.bin", np.full(100, 5))
    with pytest.raises(data.DataError, match=r"train_0\.bin: no BOS token"):
        packing.PackedBatches(str(tmp_path / "train_*.bin"), 0, 1, 16)
    data.write_shard(tmp_path / "train_0.bin", np.r_[1, np.full(50, 5)])
    short = packing.PackedBatches(str(tmp_path / "train_*.bin"), 0, 1, 16)
    with pytest.raises(data.DataError, match="no shard matching the pattern holds a global span of 65"):
        short.next(64)
    data.write_shard(tmp_path / "train_0.bin", np.r_[1, np.full(50, 5000)])
    with pytest.raises(data.DataError, match=r"train_0\.bin: token id 5000 at position 1"):
        packing.PackedBatches(str(tmp_path / "train_*.bin"), 0, 1, 16, vocab_size=1024).next(8)


# ----------------------------------------------------------------------------- per-document attention

def qkv(T: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    B, H, K, D = 2, 4, 2, 8
    return (jax.random.normal(keys[0], (B, T, H, D)), jax.random.normal(keys[1], (B, T, K, D)),
            jax.random.normal(keys[2], (B, T, K, D)))


def test_attention_with_segments_equals_attention_per_segment():
    # Segments 0-4, 4-11, 11-12 (one token), then 12-20, 20-28, 28-30 (an 18-token document in chunks of 8).
    cu, _ = packing.document_segments([4, 11, 12], 30, 8, bucket_size=8)
    q, k, v = qkv(30)
    got = np.asarray(attention.causal_attention(q, k, v, "jnp", segment_ids_T=jnp.asarray(packing.segment_ids(cu, 30))))
    bounds = np.unique(cu)
    assert bounds.tolist() == [0, 4, 11, 12, 20, 28, 30]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        want = np.asarray(attention.causal_attention(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], "jnp"))
        # float32 both ways; only the summation order over the masked (zero) terms differs.
        np.testing.assert_allclose(got[:, lo:hi], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


def test_attention_with_one_segment_is_the_causal_path_exactly():
    q, k, v = qkv(24, seed=1)
    plain = attention.causal_attention(q, k, v, "jnp")
    one = attention.causal_attention(q, k, v, "jnp", segment_ids_T=jnp.zeros(24, jnp.int32))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(plain))


@pytest.mark.parametrize("impl, T_ids", [("cudnn", 24), ("pallas", 24), ("jnp", 23)])
def test_attention_segments_reject_other_paths_and_lengths(impl, T_ids):
    q, k, v = qkv(24)
    with pytest.raises(ValueError, match="segment_ids_T"):
        attention.causal_attention(q, k, v, impl, segment_ids_T=jnp.zeros(T_ids, jnp.int32))
