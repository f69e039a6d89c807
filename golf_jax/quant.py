"""Quantisation: full-Hessian GPTQ int6 for the bank matrices, per-row int8
for the embedding tables, fp16/fp32 passthrough for small tensors (the
selective +-1 pruning that fits the artifact to its budget: golf_jax.pruning).

A quantised model is a flat dict {params path name: QTensor} (names as
`param_tree.path_name` writes them, e.g. "qo_bank", "blocks/attn_scale",
"bigram/embed"); banks stay stacked: q [N, out, in], scale [N, out].
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax import model, param_tree
from golf_jax.config import ModelConfig, QuantConfig
from golf_jax.param_tree import Params, path_name
from golf_jax.optim import BANK_KEYS

# Storage kinds of a QTensor.
INT6 = "int6"  # q int8 in [-clip_range, clip_range], one fp16 scale per row
INT8 = "int8"  # q int8 in [-127, 127], one fp16 scale per row
FP16 = "fp16"  # values stored as float16
FP32 = "fp32"  # values stored as float32 (control scalars)
KINDS = (INT6, INT8, FP16, FP32)


@dataclass
class QTensor:
    """One stored tensor, on the host.

    kind: one of KINDS.
    data: int8 q (INT6/INT8) or the float16/float32 values (FP16/FP32).
    scale: float16 [*data.shape[:-1]] for INT6/INT8, else None.
    dtype: the parameter's dtype to dequantise to ("float32", "bfloat16").
    """

    kind: str
    data: np.ndarray
    scale: np.ndarray | None
    dtype: str

    def dequantize(self) -> np.ndarray:
        """float32 values (q * scale for the quantised kinds)."""
        if self.kind in (INT6, INT8):
            return self.data.astype(np.float32) * self.scale.astype(np.float32)[..., None]
        return self.data.astype(np.float32)


QuantizedModel = dict  # {name: QTensor}

# reference quirk: tensors of at most this many values are kept as floats,
# whatever else the rules say (checked before the int6/int8 rules).
KEEP_FLOAT_MAX_NUMEL = 65_536
# Per-row clip levels the int6 quantisers try; the one of least squared error wins.
CLIP_PERCENTILES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)
INT8_CLIP_PERCENTILE = 0.9999984  # the reference's 99.99984th percentile
INT8_CLIP_RANGE = 127
# GPTQ damping, as fractions of the Hessian's mean diagonal: the reference's 1%,
# then larger steps when the Cholesky factorisation fails. At 100% the Hessian's
# off-diagonal guidance is mostly damped away, so past it the Hessian-free
# quantiser does as well and is the fallback.
DAMPING_LADDER = (0.01, 0.1, 1.0)
# Scalars and per-channel gains: few values, large effect, kept exact.
CONTROL_NAMES = ("skip_weights", "smear_gate", "bigram/scale", "ve/scale", "ve/layer_scales")
HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls even where TF32 is the default


class QuantError(ValueError):
    """Input the quantiser cannot take (NaN/inf, mismatched shapes); the
    message names the tensor."""


@dataclass(frozen=True)
class GPTQReport:
    """What GPTQ did: per matrix for a bank ([N] arrays), scalars for one matrix.

    damping: the damping that let the Cholesky factorisation through, as a
        fraction of mean(diag(H)); nan where every step failed.
    fallback: every damping step failed, so the Hessian-free row quantiser ran.
    """

    damping: np.ndarray | float
    fallback: np.ndarray | bool


# ----------------------------------------------------------------------------- per-row scales

def _quantile_sorted(a_sorted: jax.Array, pct: float) -> jax.Array:
    """torch.quantile(..., dim=-1) ('linear') of rows sorted ascending, in
    torch's own float32 arithmetic (jnp.quantile interpolates differently
    in the last bit): rank = float32(pct) * (n - 1), then torch.lerp."""
    rank = np.float32(pct) * np.float32(a_sorted.shape[-1] - 1)
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    w = np.float32(rank - np.float32(lo))
    below, above = a_sorted[..., lo], a_sorted[..., hi]
    if w < 0.5:
        return below + w * (above - below)
    return above - (above - below) * (np.float32(1) - w)


def to_fp16(x: jax.Array) -> jax.Array:
    """float32 x rounded to float16 values, kept float32. A convert to float16
    and back is not enough under jit: XLA (allow_excess_precision, on by
    default) may drop the pair inside a fusion, and on an H100 the row
    quantiser then divided by the unrounded scale (0.0322581 for 0.0322571)."""
    return jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)


def _clip_scales(W_OxI: jax.Array, clip_range: int) -> jax.Array:
    """The candidate row scales [P, O], one per CLIP_PERCENTILES level: float16
    values, as float32."""
    a = jnp.sort(jnp.abs(W_OxI), axis=-1)
    clips = jnp.stack([_quantile_sorted(a, p) if p < 1.0 else a[..., -1] for p in CLIP_PERCENTILES])
    # reference quirk: the scale's floor is 1/clip_range, so a row whose clip
    # is below 1 gets the step 1/clip_range whatever its spread, and the
    # percentile search changes nothing there (so for every row of the gptq
    # fixture, and for most rows of trained banks of small weights).
    return to_fp16(jnp.maximum(clips / jnp.float32(clip_range), jnp.float32(1.0 / clip_range)))


def _rows_int6(W_OxI: jax.Array, clip_range: int) -> tuple[jax.Array, jax.Array]:
    s_PxOx1 = _clip_scales(W_OxI, clip_range)[..., None]
    q_PxOxI = jnp.clip(jnp.round(W_OxI / s_PxOx1), -clip_range, clip_range)
    err_P = jnp.mean(jnp.square(W_OxI - q_PxOxI * s_PxOx1), axis=(1, 2))
    best = jnp.argmin(err_P)  # the first of equal errors, as the reference's strict <
    return q_PxOxI[best].astype(jnp.int8), s_PxOx1[best, :, 0].astype(jnp.float16)


@functools.partial(jax.jit, static_argnames="clip_range")
def quantize_int6_rows(W_OxI: jax.Array, clip_range: int = 31) -> tuple[jax.Array, jax.Array]:
    """Hessian-free int6: per row q = round(W / s) in [-clip_range, clip_range]
    with the fp16 scale s of the clip percentile of least mean squared error
    over the matrix. Returns (q int8 [O, I], scale float16 [O])."""
    return _rows_int6(W_OxI.astype(jnp.float32), clip_range)


_rows_int6_bank = jax.jit(jax.vmap(_rows_int6, in_axes=(0, None)), static_argnums=1)


@jax.jit
def quantize_int8_rows(E_VxD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row int8 of an embedding table: clip at the 99.99984th percentile
    of |row|, scale = clip / 127 (at least 1/127). Returns (q int8, scale float16)."""
    E = E_VxD.astype(jnp.float32)
    clip_V = _quantile_sorted(jnp.sort(jnp.abs(E), axis=-1), INT8_CLIP_PERCENTILE)
    clipped = jnp.clip(E, -clip_V[:, None], clip_V[:, None])
    # reference quirk: the scale's floor is 1/127, as for int6 (see _clip_scales).
    scale_V = jnp.maximum(clip_V / jnp.float32(INT8_CLIP_RANGE), jnp.float32(1.0 / INT8_CLIP_RANGE))
    # The float32 scale divides; only the stored copy is fp16. The fixture pins
    # this: dividing by the fp16 copy changes 39 of its 131,072 values.
    q = jnp.clip(jnp.round(clipped / scale_V[:, None]), -INT8_CLIP_RANGE, INT8_CLIP_RANGE)
    return q.astype(jnp.int8), scale_V.astype(jnp.float16)


# ----------------------------------------------------------------------------- GPTQ

def inverse_factor(H_IxI: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Upper U with U^T U = (H + damping * mean(diag H) I)^-1, trying the
    DAMPING_LADDER in turn until the factorisations come out finite.
    Returns (U, damping, ok); U is the identity where no step worked."""
    n = H_IxI.shape[0]
    eye = jnp.eye(n, dtype=jnp.float32)
    mean_diag = jnp.mean(jnp.diag(H_IxI))
    ladder = jnp.asarray(DAMPING_LADDER, jnp.float32)

    def attempt(k):
        Hd = H_IxI + (ladder[k] * mean_diag) * eye
        # The lower triangles only, as torch.linalg.cholesky and potri read them.
        L = jnp.linalg.cholesky(Hd, symmetrize_input=False)
        Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
        Hinv = jnp.matmul(Linv.T, Linv, precision=HIGHEST)  # cholesky_inverse
        U = jnp.linalg.cholesky(Hinv, symmetrize_input=False).T
        return U, jnp.all(jnp.isfinite(U)) & jnp.all(jnp.diag(U) > 0)

    def retry(state):
        k = state[0] + 1
        return (k, *attempt(k))

    # A while_loop stops at the first step that works; under vmap every
    # matrix of a bank keeps the result of its own first success.
    last = len(DAMPING_LADDER) - 1
    k, U, ok = jax.lax.while_loop(lambda s: ~s[2] & (s[0] < last), retry, (jnp.int32(0), *attempt(0)))
    return jnp.where(ok, U, eye), jnp.where(ok, ladder[k], jnp.nan), ok


def gptq_pass(Wp_OxI: jax.Array, U_IxI: jax.Array, s_O: jax.Array, clip_range: int, block_size: int) -> jax.Array:
    """One GPTQ sweep over the (permuted) columns at fixed row scales: quantise
    a column, spread its scaled error over the columns still to come; within a
    block column by column, across blocks as one matmul (lazy batch updates)."""
    rows, cols = Wp_OxI.shape
    n_blocks = -(-cols // block_size)
    pad = n_blocks * block_size - cols
    # Padding columns of zero weight on a unit diagonal take and give no error.
    W = jnp.pad(Wp_OxI, ((0, 0), (0, pad)))
    U = jnp.pad(U_IxI, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(cols + pad) >= cols)

    def column(i, carry, U1):
        W1, Q1, E1 = carry
        w = jax.lax.dynamic_index_in_dim(W1, i, axis=1, keepdims=False)
        q = jnp.clip(jnp.round(w / s_O), -clip_range, clip_range)
        err = (w - q * s_O) / U1[i, i]
        W1 = W1 - err[:, None] * U1[i][None, :]
        return W1, Q1.at[:, i].set(q), E1.at[:, i].set(err)

    def block(W, b):
        U_rows = jax.lax.dynamic_slice_in_dim(U, b * block_size, block_size, axis=0)
        U1 = jax.lax.dynamic_slice_in_dim(U_rows, b * block_size, block_size, axis=1)
        zeros = jnp.zeros((rows, block_size), jnp.float32)
        W1 = jax.lax.dynamic_slice_in_dim(W, b * block_size, block_size, axis=1)
        _, Q1, E1 = jax.lax.fori_loop(0, block_size, functools.partial(column, U1=U1), (W1, zeros, zeros))
        # U is upper triangular, so these updates (the in-block ones above and
        # this one across the whole width) leave every column left of the one
        # being quantised exactly as it was: only columns still to come change.
        return W - jnp.matmul(E1, U_rows, precision=HIGHEST), Q1

    # One traced block for any width: compilation time independent of cols.
    _, Q_BxOxb = jax.lax.scan(block, W, jnp.arange(n_blocks))
    return jnp.moveaxis(Q_BxOxb, 0, 1).reshape(rows, -1)[:, :cols]


def _gptq_one(W_OxI: jax.Array, H_IxI: jax.Array, clip_range: int, block_size: int):
    W_OxI, H_IxI = W_OxI.astype(jnp.float32), H_IxI.astype(jnp.float32)
    diag = jnp.diag(H_IxI)
    dead_I = diag == 0  # inputs that never fire: their weights carry nothing
    H_IxI = H_IxI + jnp.diag(jnp.where(dead_I, 1.0, 0.0))
    diag = jnp.diag(H_IxI)
    # Act-order: the most active inputs first. Sorting the 1%-damped diagonal,
    # as the reference does, gives the same order for every damping step.
    perm = jnp.argsort(-(diag + jnp.float32(DAMPING_LADDER[0]) * jnp.mean(diag)), stable=True)
    inv_perm = jnp.argsort(perm)
    Wp_OxI = jnp.where(dead_I[perm][None, :], 0.0, W_OxI[:, perm])
    U_IxI, damping, ok = inverse_factor(H_IxI[perm][:, perm])

    s_PxO = _clip_scales(W_OxI, clip_range)  # from the unpermuted W, dead columns included
    Q_PxOxI = jax.vmap(gptq_pass, in_axes=(None, None, 0, None, None))(Wp_OxI, U_IxI, s_PxO, clip_range, block_size)
    mse_P = jnp.mean(jnp.square(Wp_OxI - Q_PxOxI * s_PxO[..., None]), axis=(1, 2))
    best = jnp.argmin(mse_P)  # the first of equal errors, as the reference's strict <
    q_OxI = Q_PxOxI[best][:, inv_perm].astype(jnp.int8)

    q_rows, s_rows = _rows_int6(W_OxI, clip_range)
    s_O = s_PxO[best].astype(jnp.float16)
    return jnp.where(ok, q_OxI, q_rows), jnp.where(ok, s_O, s_rows), damping, ~ok


# GPTQ runs once per shape: on an H100, XLA's GEMM autotuning took 27 of the
# 33 s that the record's four banks needed to compile and run once, and its
# choices saved 26 ms of the 136 ms that the run then took.
_gptq_bank = jax.jit(jax.vmap(_gptq_one, in_axes=(0, 0, None, None)), static_argnums=(2, 3),
                     compiler_options={"xla_gpu_autotune_level": 0})


def _check_finite(name: str, **arrays_NxAxB: jax.Array) -> None:
    for what, x in arrays_NxAxB.items():
        bad = np.flatnonzero(~np.asarray(jnp.all(jnp.isfinite(x), axis=(-2, -1))))
        if bad.size:
            raise QuantError(f"{name}[{bad[0]}]: {what} holds NaN or inf")


def gptq_int6_bank(W_NxOxI: jax.Array, H_NxIxI: jax.Array, clip_range: int = 31, block_size: int = 128,
                   name: str = "bank") -> tuple[jax.Array, jax.Array, GPTQReport]:
    """Full-Hessian GPTQ int6 (act-order, lazy batch updates, clip-percentile
    search) of every matrix of a bank at once: W [N, out, in], H [N, in, in]
    the Hessian of each matrix's input (X^T X up to a factor).

    Returns (q int8 [N, out, in], scale float16 [N, out], report). Never
    fails on an ill-conditioned H: see DAMPING_LADDER and GPTQReport.
    """
    W, H = jnp.asarray(W_NxOxI, jnp.float32), jnp.asarray(H_NxIxI, jnp.float32)
    if W.ndim != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise QuantError(f"{name}: Hessians {tuple(H.shape)} do not fit weights {tuple(W.shape)} "
                         f"(need [N, in, in] for W [N, out, in])")
    _check_finite(name, W=W, H=H)
    q, s, damping, fallback = _gptq_bank(W, H, clip_range, block_size)
    return q, s, GPTQReport(np.asarray(damping), np.asarray(fallback))


def gptq_int6(W_OxI: jax.Array, H_IxI: jax.Array, clip_range: int = 31, block_size: int = 128,
              name: str = "W") -> tuple[jax.Array, jax.Array, GPTQReport]:
    """GPTQ int6 of one matrix [out, in]: (q int8, scale float16 [out], report)."""
    W, H = jnp.asarray(W_OxI), jnp.asarray(H_IxI)
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise QuantError(f"{name}: Hessian {tuple(H.shape)} does not fit weights {tuple(W.shape)}")
    for what, x in (("W", W), ("H", H)):
        if not bool(jnp.all(jnp.isfinite(x))):
            raise QuantError(f"{name}: {what} holds NaN or inf")
    q, s, report = gptq_int6_bank(W[None], H[None], clip_range, block_size, name)
    return q[0], s[0], GPTQReport(float(report.damping[0]), bool(report.fallback[0]))


# ----------------------------------------------------------------------------- whole model

def tensor_kind(name: str, x: jax.Array) -> str:
    """The storage kind of one param (see `quantize_params`)."""
    if name in BANK_KEYS:
        # The reference applies its "<= 65,536 values stay fp16" rule before
        # its int6 rule: at the record size every bank matrix is larger, so
        # that changes nothing, and quantising bank matrices whatever their
        # size lets small configs exercise GPTQ.
        return INT6
    # As the reference: every tensor of at most 65,536 values (per layer for
    # our stacked block params) is kept fp16, the control scalars included;
    # only a larger control tensor would stay fp32.
    per_tensor = x.size // x.shape[0] if name.startswith("blocks/") else x.size
    if per_tensor <= KEEP_FLOAT_MAX_NUMEL:
        return FP16
    if name.startswith("blocks/") or name in CONTROL_NAMES:
        return FP32
    return INT8  # the embedding tables at the record size, an untied lm_head


def quantize_params(params: Params, cfg: ModelConfig, hessians: dict | None,
                    qcfg: QuantConfig) -> tuple[QuantizedModel, dict]:
    """Mixed quantisation of a whole model, on the host.

    Banks: every matrix int6, by GPTQ where `hessians[bank]` ([N, in, in],
    aligned with the bank's matrices) is given, else by the Hessian-free row
    quantiser, whatever the matrix size. Hessians of tensors stored otherwise
    (the small projections, kept fp16) go unused, as in the reference.
    Control tensors ("blocks/*", skip and gate scalars) fp32; other tensors of
    <= 65,536 values fp16; larger ones (the embedding tables, an untied
    lm_head) int8 per row.

    Returns (QuantizedModel, report): report["matrices"]["qo_bank[3]"] =
    {"method": "gptq" | "rows", "damping": fraction of mean diag(H) or None,
    "fallback": bool}, and the GPTQ stage's wall time, compilation included,
    in report["gptq_seconds"]. JSON-able, for the artifact's metadata.
    """
    leaves = [(path_name(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    _check_names({name: tuple(x.shape) for name, x in leaves}, cfg)
    hessians = {k: v for k, v in (hessians or {}).items() if v is not None}
    unknown = sorted(set(hessians) - {name for name, _ in leaves})
    if unknown:
        raise QuantError(f"hessians: {', '.join(unknown)}: not a param of this model")
    qmodel: QuantizedModel = {}
    matrices, gptq_seconds = {}, 0.0
    for name, x in leaves:
        dtype = jnp.dtype(x.dtype).name
        x32 = jnp.asarray(x, jnp.float32)
        if not bool(jnp.all(jnp.isfinite(x32))):
            raise QuantError(f"{name}: holds NaN or inf")
        kind = tensor_kind(name, x)
        if kind == INT6 and name in hessians:
            start = time.perf_counter()
            q, s, rep = gptq_int6_bank(x32, hessians[name], qcfg.clip_range, qcfg.gptq_block_size, name)
            jax.block_until_ready(q)
            gptq_seconds += time.perf_counter() - start
            for i, (damp, fell) in enumerate(zip(rep.damping.tolist(), rep.fallback.tolist())):
                matrices[f"{name}[{i}]"] = {"method": "rows" if fell else "gptq",
                                            "damping": None if fell else round(damp, 6), "fallback": fell}
        elif kind == INT6:
            q, s = _rows_int6_bank(x32, qcfg.clip_range)
            matrices.update({f"{name}[{i}]": {"method": "rows", "damping": None, "fallback": False}
                             for i in range(x.shape[0])})
        elif kind == INT8:
            q, s = quantize_int8_rows(x32.reshape(-1, x.shape[-1]))
            q, s = q.reshape(x.shape), s.reshape(x.shape[:-1])
        else:
            q, s = x32.astype(jnp.float16 if kind == FP16 else jnp.float32), None
        qmodel[name] = QTensor(kind, np.asarray(q), None if s is None else np.asarray(s), dtype)
    return qmodel, {"matrices": matrices, "gptq_seconds": gptq_seconds}


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    tree = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    return {path_name(p): tuple(leaf.shape) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_names(shapes: dict[str, tuple[int, ...]], cfg: ModelConfig) -> None:
    """Raise QuantError unless `shapes` (name -> shape) are the config's params."""
    expected = _expected_shapes(cfg)
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise QuantError(f"{', '.join(missing)}: missing for this model config")
    legacy = param_tree.legacy_projections(cfg)
    for name, shape in shapes.items():
        if name in legacy:
            raise QuantError(f"{name}: {param_tree.LEGACY_LAYOUT}")
        if name not in expected:
            raise QuantError(f"{name}: not a param of this model config")
        if shape != expected[name]:
            raise QuantError(f"{name}: shape {shape}, the config needs {expected[name]}")


def dequantize_params(qmodel: QuantizedModel, cfg: ModelConfig) -> Params:
    """The params pytree back (the structure `model.init_params` gives), each
    leaf in its original dtype; names and shapes are checked against the config."""
    _check_names({name: tuple(qt.data.shape) for name, qt in qmodel.items()}, cfg)
    params: Params = {}
    for name, qt in qmodel.items():
        *sections, key = name.split("/")
        node = params
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = jnp.asarray(qt.dequantize()).astype(qt.dtype)
    return params
