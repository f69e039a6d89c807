"""Selective +-1 pruning: its order (the reference's ties included) and the budget search."""

from __future__ import annotations

import numpy as np

from golf_jax import pruning, quant


def test_pruning_order_is_cheapest_first():
    scale = np.asarray([[2.0, 1.0], [0.5, 3.0]], np.float16)
    q = np.asarray([[[1, -1, 2], [0, 1, 1]], [[-1, 5, 0], [1, 0, 0]]], np.int8)
    qm = {"bank": quant.QTensor(quant.INT6, q, scale, "float32"),
          "emb": quant.QTensor(quant.INT8, np.ones((2, 3), np.int8), np.ones(2, np.float16), "float32")}
    names, ids, flats = pruning.plus_minus_one_order(qm)
    assert names == ["bank"]
    # rows by scale^2: row 2 (0.5), row 1 (1.0), row 0 (2.0), row 3 (3.0); row-major inside a row
    np.testing.assert_array_equal(flats, [6, 4, 5, 0, 1, 9])
    pruned = pruning.prune_values(qm, (names, ids, flats), 2)
    assert pruned["bank"].data.reshape(-1)[6] == 0 and pruned["bank"].data.reshape(-1)[4] == 0
    assert q.reshape(-1)[6] == -1  # the input is not modified
    assert pruned["emb"] is qm["emb"]



def test_pruning_ties_follow_the_reference_matrix_order():
    # Four equal-scale matrices of one qo_bank (2 layers): the reference's
    # unbanked order is c_q 0, proj 0, c_q 1, proj 1, i.e. bank matrices 0, 2, 1, 3.
    q = np.zeros((4, 2, 2), np.int8)
    q[:, 1, 0] = 1
    qm = {"qo_bank": quant.QTensor(quant.INT6, q, np.ones((4, 2), np.float16), "float32")}
    _, _, flats = pruning.plus_minus_one_order(qm)
    np.testing.assert_array_equal(flats // 4, [0, 2, 1, 3])



def test_fit_to_budget_finds_the_fewest_and_reports_misfits():
    rng = np.random.default_rng(0)
    q = rng.integers(-2, 3, (3, 8, 16)).astype(np.int8)
    qm = {"bank": quant.QTensor(quant.INT6, q, rng.uniform(0.01, 0.1, (3, 8)).astype(np.float16), "float32")}
    encode = lambda m: bytes(int(np.count_nonzero(m["bank"].data)))  # noqa: E731  size = non-zeros
    nonzero, ones = np.count_nonzero(q), int(np.sum(np.abs(q) == 1))
    for budget, want in ((nonzero + 10, 0), (nonzero - 7 + 5, 7), (nonzero - ones + 5, ones)):
        pruned, blob, info = pruning.fit_to_budget(qm, encode, budget, extra_bytes=5)
        assert info["pruned"] == want and info["fits"] and len(blob) == nonzero - want
        assert info["bytes"] == len(blob) + 5 and encode(pruned) == blob
    _, _, info = pruning.fit_to_budget(qm, encode, nonzero - ones - 1)
    assert info["pruned"] == ones and not info["fits"]

