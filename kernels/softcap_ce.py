"""The head's softcap and the per-token cross-entropy, as one Pallas kernel
forward and one backward (issues 17 and 19):

    y   = C tanh(z / C)                   (lm_head's softcap, float32)
    nll = logsumexp(y) - y[target]        (per token; the loss is their mean)

from the head's pre-softcap logits z [N, V] in their own dtype (bf16 in
training: the head's matmul rounds them, reference quirk) and the targets
[N]. XLA's jnp path runs it as fusions that pass [N, V] float32 arrays
between them (0.4 GB each at 48 x 2048 tokens of V = 1024, 3.2 GB at the
1.0611 record's V = 8192); on an H200 the head, the cross-entropy, the
embeddings and the rest took 1.8 ms and 5.4 GB of a 48 x 2048 micro-step
(docs/performance.md), so at V = 1024 that bounds the gain; the 1.0611
record's V = 8192 moves eight times more. The forward kernel reads z once
and writes, per row, the loss and the two numbers the backward needs (the
row's max and its sum of exponentials); the backward reads z once more,
recomputes the softcap in registers and writes dz once, in z's dtype. The
vocabulary is read in blocks of columns with an online logsumexp, so V =
8192 takes no more registers than V = 1024. No ignore index: neither record has one in use (the 1.1147 record's
F.cross_entropy never sees -100, the 1.0611 record's fused kernel has none).

Rounding follows the model's jnp path (layers.lm_head, model.nll_from_logits,
jax.nn.logsumexp and its autodiff), op for op, in float32:
- z / C is z times the float32 reciprocal of C: XLA rewrites the division by
  a constant into that multiplication (so does the jnp path, compiled), and
  Triton's own division would be the approximate div.full. The tanh form, not
  the 1.0611 record's 2C sigmoid(2z / C) (= C tanh(z / C) + C): the same
  function, but its values up to 2C have one more bit of rounding, and they
  are not the jnp path's.
- The forward: m = the row's max (exact), s = sum of exp(y - m), loss =
  (log(s) + m) - y[target], as jax.nn.logsumexp. s differs by the order of
  its float32 sum: blocks of columns, each block's partial sum rescaled by
  exp(m_old - m_new) when the running max moves (one or two float32 roundings
  per rescale; none with V in one block): relative ~1e-7.
- The backward saves m and s rather than their lse: autodiff computes p as
  exp(y - m) * (g / s), and exp(y - lse) would differ from it by lse's own
  rounding times |y| (~1e-6 relative, ten float32 units). Then as autodiff
  writes it: dy = g / s * exp(y - m), minus g at the target; the softcap's
  transpose (C dy) (1 - t) + (C dy) (1 - t) t over C (jax's tanh JVP, the
  division again times 1/C); rounded once to z's dtype, where autodiff of
  the jnp path rounds (the head matmul's backward takes a bf16 cotangent).
  g / s is correctly rounded on the GPU (PTX div.rn, as XLA emits it).
- On the GPU, tanh, exp and log are libdevice's (Pallas's Triton lowering:
  __nv_tanhf, __nv_expf, __nv_logf), XLA's may be its own approximations
  (XLA emits its own tanh for float32), and both compilers contract a * b +
  c into fused multiply-adds where they choose: a few float32 units apart,
  so a bf16 dz moves by one unit now and then (tests/kernels_softcap_ce_test.py
  measures it against XLA's compiled jnp path). In Pallas's interpreter (CPU)
  the functions are XLA's own, and only s's summation order differs.

Out-of-range targets: as the jnp path's take_along_axis, negative ones count
from the end and the loss of one outside [-V, V) is NaN.

`impl`: "pallas" runs the kernels (Pallas's Triton backend on GPUs, its
interpreter elsewhere); "jnp" is autodiff of `reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.partition import row_partitioned
from kernels.xsa import divide

IMPLS = ("jnp", "pallas")
# Launch parameters (scripts/fusion_kernel_sweep.py): a program takes up to
# block_rows rows and walks the vocabulary block_cols columns at a time (both
# powers of two dividing N and V, see `blocks`). Read each time the kernels
# are traced, as part of their cache key. Swept on an H200 (docs/performance.md,
# eighth session; 98,304 x 1024 bf16 logits): 8 rows x 512 columns, 4 warps
# takes 0.479 ms forward+backward, the first guess (16 x 512, 8 warps) 0.501,
# the 1.0611 record's shape (one row of 1024, 4 warps) 0.624.
TUNED = {"forward": dict(block_rows=8, block_cols=512, num_warps=4, num_stages=2),
         "backward": dict(block_rows=8, block_cols=512, num_warps=4, num_stages=2)}
# Below this many rows a block makes the interpreter's grid loop long for
# nothing: interpret mode, which has no power-of-two rule, takes all rows at once.
MIN_INTERPRET_BLOCK_ROWS = 8


# ----------------------------------------------------------------------------- jnp reference

def inverse(softcap: float) -> np.float32:
    """1 / C in float32, as XLA folds a division by the constant C into a
    multiplication (its algebraic simplifier's InvertConstant)."""
    return np.float32(1) / np.float32(softcap)


def reference(z: jax.Array, targets: jax.Array, softcap: float) -> jax.Array:
    """Per-token cross-entropy [...] (float32) of the soft-capped logits
    C tanh(z / C) of z [..., V]: the model's jnp path (lm_head's softcap, then
    model.nll_from_logits), with z / C written as XLA compiles it (times the
    float32 1 / C), so that it is the same run eagerly or compiled."""
    y = softcap * jnp.tanh(z.astype(jnp.float32) * inverse(softcap))
    target_logit = jnp.take_along_axis(y, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(y, axis=-1) - target_logit


# ----------------------------------------------------------------------------- the kernels

def _softcapped(z_ref, start, block_cols: int, softcap: float):
    """The block's tanh(z / C) and y = C tanh(z / C), float32, and its column indices."""
    z = z_ref[:, pl.ds(start, block_cols)].astype(jnp.float32)
    t = jnp.tanh(z * inverse(softcap))
    cols = start + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
    return t, softcap * t, cols


def _forward_kernel(z_ref, target_ref, loss_ref, max_ref, sum_ref, *, block_cols: int, softcap: float):
    """A block of rows: the online logsumexp over the vocabulary in blocks of
    columns, the target's logit picked out on the way (a sum of zeros and it:
    exact)."""
    rows, vocab = z_ref.shape
    target = target_ref[...]

    def step(j, carry):
        row_max, row_sum, target_logit = carry
        start = pl.multiple_of(j * block_cols, block_cols)
        _, y, cols = _softcapped(z_ref, start, block_cols, softcap)
        new_max = jnp.maximum(row_max, jnp.max(y, axis=1, keepdims=True))
        row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(jnp.exp(y - new_max), axis=1, keepdims=True)
        target_logit = target_logit + jnp.sum(jnp.where(cols == target, y, 0.0), axis=1, keepdims=True)
        return new_max, row_sum, target_logit

    zeros = jnp.zeros((rows, 1), jnp.float32)
    row_max, row_sum, target_logit = jax.lax.fori_loop(
        0, vocab // block_cols, step, (jnp.full((rows, 1), -jnp.inf, jnp.float32), zeros, zeros))
    loss_ref[...] = (jnp.log(row_sum) + row_max) - target_logit
    max_ref[...] = row_max
    sum_ref[...] = row_sum


def _backward_kernel(z_ref, target_ref, max_ref, sum_ref, g_ref, dz_ref, *, block_cols: int, softcap: float,
                     exact: bool):
    """A block of rows: dz of the loss under the cotangent g [rows, 1], in
    autodiff's order of operations (module docstring)."""
    vocab = z_ref.shape[1]
    target, row_max, g = target_ref[...], max_ref[...], g_ref[...]
    g_over_sum = divide(g, sum_ref[...], exact)

    def step(j, carry):
        start = pl.multiple_of(j * block_cols, block_cols)
        t, y, cols = _softcapped(z_ref, start, block_cols, softcap)
        dy = g_over_sum * jnp.exp(y - row_max)
        dy = jnp.where(cols == target, dy - g, dy)
        dtanh = (softcap * dy) * (1.0 - t)
        dz_ref[:, pl.ds(start, block_cols)] = ((dtanh + dtanh * t) * inverse(softcap)).astype(dz_ref.dtype)
        return carry

    jax.lax.fori_loop(0, vocab // block_cols, step, 0)


def blocks(n_rows: int, vocab: int, launch: dict, interpret: bool) -> tuple[int, int]:
    """(rows per program, columns per step): the largest powers of two up to
    TUNED's dividing N and V (Triton's tiles; the blocks tile the array with no
    masking). In the interpreter a ragged N whose largest such divisor is tiny
    is one block of all its rows."""
    for name in ("block_rows", "block_cols"):
        if launch[name] < 1 or launch[name] & (launch[name] - 1):
            raise ValueError(f"{name} must be a power of two, got {launch[name]}")
    rows = int(np.gcd(n_rows, launch["block_rows"]))
    if interpret and rows < MIN_INTERPRET_BLOCK_ROWS:
        rows = n_rows
    return rows, int(np.gcd(vocab, launch["block_cols"]))


def _call(kernel, n_rows: int, vocab: int, n_per_row_in: int, outputs: list, launch: dict, **static):
    """pallas_call of `kernel` over blocks of rows: z [N, V] whole rows, then
    n_per_row_in [N, 1] inputs; outputs ("rows" [N, V] or "one" [N, 1], dtype)."""
    interpret = jax.default_backend() != "gpu"
    rows, block_cols = blocks(n_rows, vocab, launch, interpret)
    row_block = pl.BlockSpec((rows, vocab), lambda i: (i, 0))
    one = pl.BlockSpec((rows, 1), lambda i: (i, 0))
    params = None if interpret else pltriton.CompilerParams(num_warps=launch["num_warps"],
                                                            num_stages=launch["num_stages"])
    if kernel is _backward_kernel:
        static["exact"] = not interpret
    return pl.pallas_call(
        functools.partial(kernel, block_cols=block_cols, **static), grid=(n_rows // rows,),
        in_specs=[row_block] + [one] * n_per_row_in,
        out_specs=[row_block if kind == "rows" else one for kind, _ in outputs],
        out_shape=[jax.ShapeDtypeStruct((n_rows, vocab if kind == "rows" else 1), dtype) for kind, dtype in outputs],
        interpret=interpret, compiler_params=params, name=kernel.__name__.strip("_"))


def _launch() -> tuple:
    """TUNED as a hashable key: ((forward items), (backward items))."""
    return tuple(tuple(sorted(TUNED[kind].items())) for kind in ("forward", "backward"))


@functools.lru_cache(maxsize=None)
def _kernels(vocab: int, dtype_name: str, softcap: float, launch: tuple):
    """The forward and backward for one vocabulary, dtype, softcap and launch,
    each row-partitioned (GSPMD runs them on each device's rows; the
    vocabulary is never split)."""
    dtype = jnp.dtype(dtype_name)
    forward_launch, backward_launch = (dict(items) for items in launch)
    f32 = jnp.float32

    def forward(z, target):
        return tuple(_call(_forward_kernel, z.shape[0], vocab, 1, [("one", f32)] * 3, forward_launch,
                           softcap=softcap)(z, target))

    def backward(z, target, row_max, row_sum, g):
        return _call(_backward_kernel, z.shape[0], vocab, 4, [("rows", dtype)], backward_launch,
                     softcap=softcap)(z, target, row_max, row_sum, g)[0]

    return (row_partitioned(forward, (0, 1), 3, "m v, m o -> m o, m o, m o", ("v", "o")),
            row_partitioned(backward, (0, 1, 2, 3, 4), 1, "m v, m o, m o, m o, m o -> m v", ("v", "o")))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused(z_NxV, target_Nx1, softcap: float):
    forward, _ = _kernels(z_NxV.shape[1], z_NxV.dtype.name, softcap, _launch())
    return forward(z_NxV, target_Nx1)[0][:, 0]


def _fused_fwd(z_NxV, target_Nx1, softcap):
    forward, _ = _kernels(z_NxV.shape[1], z_NxV.dtype.name, softcap, _launch())
    loss, row_max, row_sum = forward(z_NxV, target_Nx1)
    # z as it came (bf16 in training) and two float32 numbers a row: no [N, V] float32 is kept.
    return loss[:, 0], (z_NxV, target_Nx1, row_max, row_sum)


def _fused_bwd(softcap, residuals, g_N):
    z_NxV, target_Nx1, row_max, row_sum = residuals
    _, backward = _kernels(z_NxV.shape[1], z_NxV.dtype.name, softcap, _launch())
    return backward(z_NxV, target_Nx1, row_max, row_sum, g_N.astype(jnp.float32)[:, None]), None


_fused.defvjp(_fused_fwd, _fused_bwd)


# ----------------------------------------------------------------------------- dispatch

def softcap_nll(z: jax.Array, targets: jax.Array, softcap: float, impl: str = "jnp") -> jax.Array:
    """`reference`'s per-token cross-entropy (float32, targets' shape) and its
    gradient, through `impl`. z: [..., V] pre-softcap logits in any float
    dtype (the gradient comes back in it); targets: [...] integer ids."""
    if impl == "jnp":
        return reference(z, targets, softcap)
    if impl != "pallas":
        raise ValueError(f"no softcapped cross-entropy kernels named {impl!r}; expected one of {IMPLS}")
    if z.shape[:-1] != targets.shape or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"softcap_nll needs logits [..., V] and integer targets [...] of the same leading shape, "
                         f"got {z.shape} and {targets.shape} {targets.dtype}")
    if not softcap > 0:
        raise ValueError(f"softcap must be positive, got {softcap}")
    vocab = z.shape[-1]
    target_N = targets.reshape(-1).astype(jnp.int32)
    target_N = jnp.where(target_N < 0, target_N + vocab, target_N)  # take_along_axis's negative indices
    loss_N = _fused(z.reshape(-1, vocab), target_N[:, None], float(softcap))
    loss_N = jnp.where((target_N >= 0) & (target_N < vocab), loss_N, jnp.nan)
    return loss_N.reshape(targets.shape)
