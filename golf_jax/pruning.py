"""Selective +-1 pruning: the int6 values of +-1 zeroed, cheapest first, the
fewest that make the compressed artifact fit its byte budget (binary search).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from golf_jax.optim import BANK_KEYS
from golf_jax.quant import INT6, QTensor, QuantizedModel


def _reference_matrix_rank(name: str, matrix: np.ndarray, n_matrices: int) -> np.ndarray:
    """The position of bank matrices in the reference's unbanked state dict,
    within their bank: Q/out-proj (and K/V) interleaved per layer
    (blocks.0.attn.c_q, blocks.0.attn.proj, blocks.1.attn.c_q, ...)."""
    if name in ("qo_bank", "kv_bank"):
        half = n_matrices // 2
        return np.where(matrix < half, 2 * matrix, 2 * (matrix - half) + 1)
    return matrix


def plus_minus_one_order(qmodel: QuantizedModel) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Every int6 value equal to +-1, cheapest first: ordered by its row's
    scale squared (the squared error of zeroing it). reference quirk: ties
    (frequent: the 1/31 scale floor) go in the reference's state-dict order
    of the unbanked matrices (banks qo, kv, mlp_up, mlp_down, each layer's
    pair interleaved), then row-major position in the matrix.
    Returns (int6 tensor names, tensor index, flat index into the tensor)."""
    names, tensor_ids, flats, costs, ranks, within = [], [], [], [], [], []
    bank_first = {name: i for i, name in enumerate(BANK_KEYS)}
    offset = 0
    for name, t in sorted(qmodel.items(), key=lambda kv: bank_first.get(kv[0], len(BANK_KEYS))):
        if t.kind != INT6:
            continue
        q_RxC = t.data.reshape(-1, t.data.shape[-1])
        rows_per_matrix = t.data.shape[-2] if t.data.ndim >= 2 else 1
        n_matrices = q_RxC.shape[0] // rows_per_matrix
        rows, cols = np.nonzero(np.abs(q_RxC) == 1)
        scale_sq = np.square(t.scale.astype(np.float32).reshape(-1))
        tensor_ids.append(np.full(rows.size, len(names), np.int32))
        flats.append(rows.astype(np.int64) * q_RxC.shape[1] + cols)
        costs.append(scale_sq[rows])
        ranks.append(offset + _reference_matrix_rank(name, rows // rows_per_matrix, n_matrices))
        within.append((rows % rows_per_matrix).astype(np.int64) * q_RxC.shape[1] + cols)
        offset += n_matrices
        names.append(name)
    if not names:
        return [], np.zeros(0, np.int32), np.zeros(0, np.int64)
    order = np.lexsort((np.concatenate(within), np.concatenate(ranks), np.concatenate(costs)))
    return names, np.concatenate(tensor_ids)[order], np.concatenate(flats)[order]


def prune_values(qmodel: QuantizedModel, order: tuple[list[str], np.ndarray, np.ndarray], n: int) -> QuantizedModel:
    """A copy of qmodel with the first n values of `order` set to zero."""
    names, tensor_ids, flats = order
    out = dict(qmodel)
    for i, name in enumerate(names):
        sel = flats[:n][tensor_ids[:n] == i]
        if sel.size:
            t = qmodel[name]
            q = t.data.copy()
            q.reshape(-1)[sel] = 0
            out[name] = QTensor(t.kind, q, t.scale, t.dtype)
    return out


def fit_to_budget(qmodel: QuantizedModel, encode: Callable[[QuantizedModel], bytes], budget: int,
                  extra_bytes: int = 0) -> tuple[QuantizedModel, bytes, dict]:
    """Selective +-1 pruning, as the reference: zero the fewest +-1 int6 values
    (cheapest first) for len(encode(model)) + extra_bytes <= budget, by binary
    search. extra_bytes: what else counts (the code).

    Returns the model, its encoding (so it is not compressed again) and a
    report. When even zeroing every candidate is not enough, all are zeroed
    and the report says it does not fit.
    """
    order = plus_minus_one_order(qmodel)
    total = len(order[1])
    sizes: dict[int, int] = {}
    blobs: dict[int, bytes] = {}  # for 0, total and the smallest fitting count: at most three

    def size(n: int) -> int:
        if n not in sizes:
            blob = encode(prune_values(qmodel, order, n))
            sizes[n] = len(blob) + extra_bytes
            if sizes[n] <= budget:  # the search visits fitting counts in decreasing order
                for m in [m for m in blobs if m not in (0, total)]:
                    del blobs[m]
            if n in (0, total) or sizes[n] <= budget:
                blobs[n] = blob
        return sizes[n]

    if size(0) <= budget:
        n = 0
    elif size(total) > budget:
        n = total
    else:
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if size(mid) <= budget:
                hi = mid
            else:
                lo = mid + 1
        n = lo
    info = {"candidates": total, "pruned": n, "bytes": sizes[n], "unpruned_bytes": sizes[0], "budget": budget,
            "fits": sizes[n] <= budget, "size_evaluations": len(sizes)}
    return (prune_values(qmodel, order, n) if n else qmodel), blobs[n], info
