"""Training's data feed: the packed rows of each step (data_feed.PackedSteps) are the 1.0611
record's loader's (packing.PackedBatches, checked against the record's own in packing_test.py)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from golf_jax import data_feed, packing, train_step
from golf_jax.config import Config, DataConfig
from tests.packing_test import write_shards

# 4 rows of 32 tokens a step (the record: 8 of 98,304), documents cut at 16 tokens.
CFG = Config(data=DataConfig(train_seq_len=16, train_batch_tokens=128, micro_batches_per_step=4,
                             packed_documents=True))


def reference_rows(pattern: str, steps: int) -> list[list[tuple]]:
    """Each step's rows as the record's 4-rank run reads them: rank r's next()."""
    ranks = [packing.PackedBatches(pattern, r, 4, 16) for r in range(4)]
    return [[b.next(32) for b in ranks] for _ in range(steps)]


def test_each_device_micro_step_gets_its_row_of_the_records_span(tmp_path):
    pattern = write_shards(tmp_path, np.random.default_rng(1))
    want = reference_rows(pattern, 6)  # across shard advances
    # n devices, accum micro-steps: device d's micro-step a is row a n + d, whatever n.
    for n, accum, ranks in [(1, 4, [0]), (2, 2, [0, 1]), (4, 1, [1, 3]), (2, 2, [1])]:
        feed = data_feed.PackedSteps(pattern, CFG, n, accum, ranks)
        for step in range(6):
            xs, ys, segs = feed.next_step()
            assert xs.shape == ys.shape == segs.ids_BxT.shape == (accum, len(ranks), 32)
            # Two folds of 16 tokens, DataConfig.segments_per_fold slots each: static shapes.
            assert segs.offsets_BxRxM1.shape == (accum, len(ranks), 2, 33)
            assert segs.lengths_BxRxM.shape == (accum, len(ranks), 2, 32)
            for a in range(accum):
                for i, d in enumerate(ranks):
                    x, y, cu, _ = want[step][a * n + d]
                    row = packing.make_segments(cu, 32, 16, CFG.data.segments_per_fold)
                    np.testing.assert_array_equal(xs[a, i], x[0])
                    np.testing.assert_array_equal(ys[a, i], y[0])
                    for got, want_row in zip(segs, row):
                        np.testing.assert_array_equal(got[a, i], want_row[0])


def test_step_batches_on_the_devices_and_the_cursor(tmp_path):
    pattern = write_shards(tmp_path, np.random.default_rng(2))
    mesh = train_step.make_mesh(1)
    sharding = NamedSharding(mesh, P(None, train_step.AXIS))
    feed = data_feed.PackedSteps(pattern, CFG, 1, 4, [0])
    first = data_feed.next_step_batch(feed, 4, sharding)
    assert isinstance(first.xs, jax.Array) and first.xs.shape == (4, 1, 32) and first.xs.sharding == sharding
    assert first.segments.offsets_BxRxM1.shape == (4, 1, 2, 33)
    later = [data_feed.next_step_batch(feed, 4, sharding) for _ in range(3)]
    again = data_feed.PackedSteps(pattern, CFG, 1, 4, [0])
    again.restore(first.cursor)  # a checkpoint's cursor: the stream goes on exactly
    for want in later:
        got = data_feed.next_step_batch(again, 4, sharding)
        for g, w in zip(jax.tree.leaves((got.xs, got.ys, got.segments)), jax.tree.leaves((want.xs, want.ys,
                                                                                          want.segments))):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert got.cursor == want.cursor


def test_bos_and_vocabulary_come_from_the_model(tmp_path):
    pattern = write_shards(tmp_path, np.random.default_rng(3))
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(CFG.model, vocab_size=512))
    feed = data_feed.PackedSteps(pattern, cfg, 1, 4, [0])
    assert feed.loader.bos_id == cfg.model.bos_id and feed.loader.vocab_size == 512 and feed.row_len == 32


def test_fast_slots_when_every_row_of_the_step_fits(tmp_path):
    """data.segments_per_fold_fast: a step takes the fewest of its slot counts that all its rows
    (every process's, so all take one program) fit, else the full ones; `capacity` forces the full
    ones (the warm-up's first step). The rows and their segments are the same either way."""
    pattern = write_shards(tmp_path, np.random.default_rng(4))
    fast = (2, 4)  # these rows' steps need 2, 4 or 5 slots
    cfg = dataclasses.replace(CFG, data=dataclasses.replace(CFG.data, segments_per_fold_fast="4,2"))
    assert cfg.data.fast_segment_slots == fast
    plain = data_feed.PackedSteps(pattern, CFG, 2, 2, [0, 1])
    feeds = [data_feed.PackedSteps(pattern, cfg, 2, 2, ranks) for ranks in ([0, 1], [1])]
    seen = set()
    for step in range(8):
        capacity = step == 0
        want = plain.next_step()
        every = packing.PackedBatches(pattern, 0, 4, 16)  # the step's 4 rows, as the loader reads them
        for _ in range(step):
            every.next_rows(32, range(4))
        needed = max(packing.segments_per_fold_needed(cu, 32, 16) for _, _, cu, _ in every.next_rows(32, range(4)))
        slots = CFG.data.segments_per_fold if capacity or needed > max(fast) else min(m for m in fast if needed <= m)
        seen.add(slots)
        for feed, cols in zip(feeds, ([0, 1], [1])):
            xs, ys, segs = feed.next_step(capacity)
            assert segs.lengths_BxRxM.shape[-1] == slots  # every process the same program
            np.testing.assert_array_equal(xs, want[0][:, cols])
            np.testing.assert_array_equal(segs.ids_BxT, want[2].ids_BxT[:, cols])
            # the same segments (row start, length), filling the fold rows `slots` at a time
            for a in range(2):
                for i, c in enumerate(cols):
                    assert segment_list(segs, a, i) == segment_list(want[2], a, c)
    assert seen == {*fast, CFG.data.segments_per_fold}, seen  # every layout met in these 8 steps


def segment_list(segs: packing.Segments, a: int, i: int) -> list[tuple[int, int]]:
    """(start in the row, length) of every segment of micro-step a, row i, in order."""
    offsets, lengths = segs.offsets_BxRxM1[a, i, :, :-1], segs.lengths_BxRxM[a, i]
    fold_len = segs.ids_BxT.shape[-1] // offsets.shape[0]
    return [(int(r * fold_len + o), int(n)) for r in range(offsets.shape[0])
            for o, n in zip(offsets[r], lengths[r]) if n >= 0]
