"""The phased LoRA TTT's schedule (golf_jax/ttt_schedule.py): documents, the batch
queue, chunk windows, the phases' batches and the reference's ranks' claims and
pauses. Every chunk's score through this schedule against the reference's own
run is tests/ttt_lora_test.py's."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from golf_jax import packing, ttt_schedule
from golf_jax.config import Config, DataConfig, EvalConfig, TTTConfig


def test_documents_run_from_a_bos_through_the_next():
    tokens = np.array([5, 6, 1, 7, 8, 1, 9, 1, 4, 4, 4])
    starts, lengths = ttt_schedule.find_documents(tokens, 1)
    np.testing.assert_array_equal(starts, [2, 5, 7])
    np.testing.assert_array_equal(lengths, [4, 3, 4])  # the last to the end, without a BOS
    with pytest.raises(ValueError, match="ends with a BOS"):
        ttt_schedule.find_documents(np.array([1, 3, 1]), 1)


def test_batches_longest_first_partial_batch_leading():
    lengths = np.array([5, 9, 3, 8, 7, 2, 10])
    order = ttt_schedule.batch_order(lengths, 3)
    # ascending: documents 5, 2, 0 | 4, 3, 1 | 6 (lengths 2, 3, 5 | 7, 8, 9 | 10)
    assert [b for b, _ in order] == [2, 1, 0]
    np.testing.assert_array_equal(order[0][1], [6])  # the partial batch: the longest document
    np.testing.assert_array_equal(order[1][1], [4, 3, 1])
    np.testing.assert_array_equal(order[2][1], [5, 2, 0])
    # Ties, as Python's stable sorts in the reference: equal lengths keep their order, and
    # of two batches with the same longest document the earlier one goes first.
    ties = ttt_schedule.batch_order(np.array([4, 4, 4, 4]), 2)
    assert [b for b, _ in ties] == [0, 1] and ties[0][1].tolist() == [0, 1]


def test_record_windows_compile_six_programs():
    t = TTTConfig(mode="lora_phased")
    widths = {ttt_schedule.window_width(min((ci + 1) * 48, 2048), t) for ci in range(200)}
    assert widths == {64, 128, 256, 512, 1024, 2048}


def test_windows_take_the_narrowest_listed_width_that_holds_them():
    t = TTTConfig(mode="lora_phased", lora_window_widths="2048,256,768,512,1024,1536")
    t.validate(2048, 11)
    assert t.window_widths == (256, 512, 768, 1024, 1536, 2048)
    # contexts 48, 240, 288, 528, 768, 816, 1056, 1536, 1584 and the whole 2048
    assert [ttt_schedule.chunk_window(ci, t) for ci in (0, 4, 5, 10, 15, 16, 21, 31, 32, 200)] == \
        [256, 256, 512, 768, 768, 1024, 1536, 1536, 2048, 2048]
    for bad in ("256,1024", "512,512,2048", "0,2048", "a,2048"):  # the largest must be the context
        with pytest.raises(Exception, match="lora_window_widths"):
            dataclasses.replace(t, lora_window_widths=bad).validate(2048, 11)
    with pytest.raises(Exception, match="lora_min_window 0"):
        dataclasses.replace(t, lora_min_window=512).validate(2048, 11)


def test_batches_compact_to_the_rows_still_scoring_once_the_window_is_whole():
    """The record's windows with lora_compact_rows=16: a batch whose 48 shortest documents
    end within 1,024 targets runs on its 16 longest from the first 2,048-token window
    (chunk 21); the partial batch of the 16 longest documents (the queue's first), on its
    own 16 rows from there; one whose longer documents spread over more rows never."""
    t = TTTConfig(mode="lora_phased", lora_min_window=512, lora_compact_rows=16)
    short, long = np.full(48, 900), np.linspace(3_000, 60_000, 16).astype(np.int64)
    assert ttt_schedule.compact_from(np.concatenate([short, long]), t) == (21, 48)
    assert ttt_schedule.compact_from(long, t) == (21, 0)
    assert ttt_schedule.compact_from(np.concatenate([short[:40], np.full(24, 3_000)]), t) is None
    assert ttt_schedule.compact_from(long, dataclasses.replace(t, lora_compact_rows=0)) is None
    # the programs: 64 rows at each width the batches meet before compacting, 16 at 2,048
    # (a full batch and the partial one of the 8 longest, both compacted at chunk 21)
    lengths = np.concatenate([short, long, long[:8]]) + 1
    assert ttt_schedule.chunk_programs(lengths, t) == [(64, 1024), (64, 512), (16, 2048)]
    assert ttt_schedule.chunk_programs(lengths, dataclasses.replace(t, lora_compact_rows=0)) == \
        [(64, 2048), (64, 1024), (64, 512)]
    with pytest.raises(Exception, match="lora_compact_rows"):
        dataclasses.replace(t, lora_compact_rows=64).validate(2048, 11)


def test_a_long_documents_last_chunk_slides_its_window():
    """A document of 100 targets, chunks of 8, context 32: the last chunk (targets 96..99)
    is scored in the window of the 32 tokens before its end, not the template's."""
    t = TTTConfig(mode="lora_phased", lora_chunk_tokens=8, lora_context_len=32, lora_batch_docs=2)
    tokens = np.concatenate([[1], np.arange(2, 102), [1]]).astype(np.int32)  # one document, 101 targets
    (x, y, lo, hi, train_lo, train, do_step), scored, _ = ttt_schedule.chunk_inputs(
        tokens, np.array([0]), np.array([101]), 12, t)
    assert x.shape == (2, 32) and int(train_lo) == 24 and not do_step and scored.tolist() == [5]
    np.testing.assert_array_equal(x[0], tokens[101 - 32:101])  # the window ends at the last target
    assert (lo[0], hi[0]) == (27, 32) and not np.any(x[1])


def test_global_batches_of_short_documents_get_the_slots_they_need():
    """A phase's row of many short documents takes more segment slots than
    data.segments_per_fold (the next power of two), instead of failing; rows that fit
    keep the configured count (the program compile_ahead built)."""
    cfg = Config(data=DataConfig(segments_per_fold=2), eval=EvalConfig(eval_seq_len=16))
    bos = cfg.model.bos_id
    short = np.tile([bos, 5, 6], 11)[:33].astype(np.int32)  # a document every 3 tokens: 6 in a 16-token fold
    x, _, seg, _ = ttt_schedule.global_batch_rows(short, 0, 2, 16, 1, cfg)
    needed = packing.segments_per_fold_needed(
        np.append(np.flatnonzero(np.diff(seg.ids_BxT[0], prepend=-1)), 32), 32, 16)
    assert needed > 2 and seg.lengths_BxRxM.shape == (1, 2, 1 << (needed - 1).bit_length())
    assert seg.lengths_BxRxM[seg.lengths_BxRxM > 0].sum() == 32  # every token in one segment
    long = np.concatenate([[bos], np.full(32, 5)]).astype(np.int32)
    assert ttt_schedule.global_batch_rows(long, 0, 2, 16, 1, cfg)[2].lengths_BxRxM.shape == (1, 2, 2)


def test_ranks_claim_batches_by_cost_and_pause_for_a_phase():
    """rank_schedule, the reference's ranks: a rank claims the queue's next batch when it
    has scored one; the count reaching the boundary pauses each rank after its batch;
    the phase takes the first scored documents in ascending batch order."""
    t = TTTConfig(mode="lora_phased", lora_batch_docs=2, lora_chunk_tokens=8, lora_context_len=32,
                  phased_prefix_docs=4, phased_num_phases=1)
    lengths = np.array([100, 90, 10, 9, 8, 7, 6, 5])  # batches (ascending): b0 [7, 6], b1 [5, 4], b2 [3, 2], b3 [1, 0]
    # costs: b3 13 chunks (windows 8, 16, 32 x 11) = 2,040; b2 2 chunks 280; b1 and b0 one chunk 136
    costs = [ttt_schedule.batch_cost(lengths[d] - 1, t) for _, d in ttt_schedule.batch_order(lengths, 2)]
    assert costs == [2040, 280, 136, 136]
    ids = lambda era: [[b for b, _ in rank] for rank in era]  # noqa: E731
    # no phases: rank 1 scores the three short batches while rank 0 scores the long one
    free = ttt_schedule.rank_schedule(lengths, dataclasses.replace(t, phased_prefix_docs=0), 2)
    assert [ids(e) for e in free.eras] == [[[3], [2, 1, 0]]] and free.phases == []
    # rank 1 reaches 4 scored documents after b1 and waits; rank 0 ends b3; the phase; b0 after it
    s = ttt_schedule.rank_schedule(lengths, t, 2)
    assert [ids(e) for e in s.eras] == [[[3], [2, 1]], [[0], []]]
    assert [list(p) for p in s.phases] == [[5, 4, 3, 2]]  # b1's and b2's: b3's documents, the longest, are cut
    # one rank: the queue in order, the phase after the batch that reaches the boundary
    one = ttt_schedule.rank_schedule(lengths, t, 1)
    assert [ids(e) for e in one.eras] == [[[3, 2]], [[1, 0]]] and [list(p) for p in one.phases] == [[3, 2, 1, 0]]
