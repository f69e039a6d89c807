"""Queries and keys after their projections: RMSNorm per head, partial RoPE on
the first `rope_dims` dims, and (queries) the per-head gain, as one Pallas
kernel forward and one backward.

XLA runs this chain, with its backward, as ~6 fusions per layer on q and k,
moving ~0.6 GB per layer for a 48 x 2048 micro-batch (slices, concatenates
and float32 intermediates round-tripping through memory; 7.2 ms of an H200's
84.6 ms micro-step, docs/performance.md). The kernels read each input once and
write each output once: forward x -> out, backward (x, dout) -> dx and the
gain's per-block partial sums.

Rounding is the model's jnp path's (`reference`), as XLA runs it on the GPU
(read from its optimised HLO, docs/performance.md): the norm in float32,
rounded once; the rotation op by op in bf16 (each product and each sum
rounded, cos and sin rounded to bf16); the gain times that in float32,
rounded once (`scales_in_float32`). The backward rounds where autodiff of that
path does: after the gain, each product and sum of the rotation's transpose,
and dx; the gain's gradient is a float32 sum over the tokens, rounded once.

`impl`: "pallas" runs the kernels (Pallas's Triton backend on GPUs, its
interpreter elsewhere: the CPU tests run the kernel code itself); "jnp" is
autodiff of `reference`.

Triton loads blocks whose sides are powers of two, so each head's D dims are
read as power-of-two column pieces: the rotated halves, then the rest by its
binary expansion (64 with 16 rotated: 8, 8, 16, 32).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.partition import row_partitioned

IMPLS = ("jnp", "pallas")
# torch's F.rms_norm default eps for float32 inputs; the reference uses it for
# every RMSNorm, which carries no weight.
RMS_NORM_EPS = float(np.finfo(np.float32).eps)
# Launch parameters (scripts/fusion_kernel_sweep.py): a program takes up to
# block_rows rows of heads_per_program heads. Read each time the kernels are
# traced, as part of their cache key.
TUNED = {"forward": dict(block_rows=128, heads_per_program=1, num_warps=4, num_stages=1),
         "backward": dict(block_rows=128, heads_per_program=1, num_warps=4, num_stages=1)}


# ----------------------------------------------------------------------------- jnp reference

def apply_rotary(x_BxTxHxD: jax.Array, cos: jax.Array, sin: jax.Array, rope_dims: int) -> jax.Array:
    """The reference's convention on the first rope_dims dims (note the signs):
    (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos), op by op in x's dtype,
    cos and sin rounded to it (as XLA runs it on the GPU too: bf16 ops)."""
    half = rope_dims // 2
    x1, x2, rest = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:rope_dims], x_BxTxHxD[..., rope_dims:]
    c = cos[None, :, None, :].astype(x_BxTxHxD.dtype)
    s = sin[None, :, None, :].astype(x_BxTxHxD.dtype)
    return jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c, rest], axis=-1)


def reference(x_BxTxHxD: jax.Array, cos_TxR: jax.Array, sin_TxR: jax.Array, gain_H: jax.Array | None,
              rope_dims: int) -> jax.Array:
    """The model's jnp path: the weightless RMSNorm of each head in float32,
    rounded once; `apply_rotary`, op by op; then (queries) gain * that in
    float32, rounded once."""
    xf = x_BxTxHxD.astype(jnp.float32)
    normed = (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_NORM_EPS)).astype(x_BxTxHxD.dtype)
    rotated = apply_rotary(normed, cos_TxR, sin_TxR, rope_dims)
    if gain_H is None:
        return rotated
    return (gain_H[:, None].astype(jnp.float32) * rotated.astype(jnp.float32)).astype(rotated.dtype)


# ----------------------------------------------------------------------------- the kernels

def column_pieces(head_dim: int, rope_dims: int) -> tuple[tuple[int, int], ...]:
    """(start, width) pieces of a head, each a power of two: the two rotated
    halves, then the rest by its binary expansion, smallest first (so the
    record's pieces start at multiples of their widths)."""
    half = rope_dims // 2
    pieces = [(0, half), (half, half)] if half else []
    start, rest = rope_dims, head_dim - rope_dims
    for bit in range(rest.bit_length()):  # smallest first: 64 with 16 rotated puts 16 at 16, 32 at 32
        if rest & (1 << bit):
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return tuple(pieces)


def _forward_pieces(x_ref, cos_ref, sin_ref, pieces, rotated: bool, dtype):
    """(the tile's float32 pieces, 1/rms, the rounded norm's pieces, the
    rotated pieces rounded): the forward's values, for both kernels."""
    xs = [x_ref[:, s:s + w].astype(jnp.float32) for s, w in pieces]
    inv_rms = jax.lax.rsqrt(sum(jnp.sum(x * x, axis=1, keepdims=True) for x in xs) / sum(w for _, w in pieces)
                            + RMS_NORM_EPS)
    normed = [(x * inv_rms).astype(dtype).astype(jnp.float32) for x in xs]
    rot = list(normed)
    if rotated:  # op by op, each product and sum rounded, as apply_rotary's bf16 ops
        c, s = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
        n1, n2 = normed[0], normed[1]
        rot[0] = _rounded(_rounded(n1 * c, dtype) + _rounded(n2 * s, dtype), dtype)
        rot[1] = _rounded(_rounded(n2 * c, dtype) - _rounded(n1 * s, dtype), dtype)
    return xs, inv_rms, normed, rot


def _rounded(x, dtype):
    """x rounded to dtype, kept in float32."""
    return x.astype(dtype).astype(jnp.float32)


def _per_head(kernel):
    """kernel over the heads of a program's block in turn: each head's column
    pieces shifted to its columns (Triton's Pallas takes one indexer per
    ref, so no ref views)."""
    def run(*refs, heads, head_dim, pieces, **static):
        for h in range(heads):
            kernel(*refs, pieces=tuple((start + h * head_dim, width) for start, width in pieces), **static)
    return run


@_per_head
def _forward_kernel(x_ref, cos_ref, sin_ref, gain_ref, out_ref, *, pieces, rotated, has_gain):
    dtype = out_ref.dtype
    _, _, _, rot = _forward_pieces(x_ref, cos_ref, sin_ref, pieces, rotated, dtype)
    for (s, w), r in zip(pieces, rot):
        out_ref[:, s:s + w] = (gain_ref[:, s:s + w].astype(jnp.float32) * r if has_gain else r).astype(dtype)


@_per_head
def _backward_kernel(x_ref, cos_ref, sin_ref, gain_ref, dout_ref, dx_ref, dgain_ref, *, pieces, rotated, has_gain):
    dtype = dx_ref.dtype
    xs, inv_rms, _, rot = _forward_pieces(x_ref, cos_ref, sin_ref, pieces, rotated, dtype)
    douts = [dout_ref[:, s:s + w].astype(jnp.float32) for s, w in pieces]
    if has_gain:  # the gain's partial sums over this block's rows; d(rot) = bf16(dout * gain)
        for (s, w), do, r in zip(pieces, douts, rot):
            dgain_ref[:, s:s + w] = jnp.sum(do * r, axis=0, keepdims=True)
        douts = [(do * gain_ref[:, s:s + w].astype(jnp.float32)).astype(dtype).astype(jnp.float32)
                 for (s, w), do in zip(pieces, douts)]
    dnormed = list(douts)
    if rotated:  # autodiff of apply_rotary's bf16 ops: each product rounded, then their sum
        c, s = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
        d1, d2 = douts[0], douts[1]
        dnormed[0] = _rounded(_rounded(d1 * c, dtype) - _rounded(d2 * s, dtype), dtype)
        dnormed[1] = _rounded(_rounded(d1 * s, dtype) + _rounded(d2 * c, dtype), dtype)
    # d/dx of x * rsqrt(mean(x^2) + eps): r g - r^3 x (g . x) / D
    dot = sum(jnp.sum(g * x, axis=1, keepdims=True) for g, x in zip(dnormed, xs))
    coef = inv_rms * inv_rms * inv_rms * dot / sum(w for _, w in pieces)
    for (s, w), g, x in zip(pieces, dnormed, xs):
        dx_ref[:, s:s + w] = (inv_rms * g - coef * x).astype(dtype)


def block_rows(seq_len: int, max_rows: int = 128) -> int:
    """Rows per program: the largest power of two up to max_rows dividing the
    sequence length, so a block's rows share one stretch of positions."""
    return int(np.gcd(seq_len, max_rows))


def _call(kernel, n_rows: int, seq_len: int, heads: int, head_dim: int, rope_half: int, outputs, n_row_args: int,
          tuned: dict):
    """pallas_call of `kernel` over (row blocks, groups of heads) of
    [rows, heads * head_dim] views; cos/sin [seq_len, rope_half] are read at
    the block's positions."""
    bt = block_rows(seq_len, tuned["block_rows"])
    hp = int(np.gcd(heads, tuned["heads_per_program"]))
    blocks_per_seq = seq_len // bt
    head_block = pl.BlockSpec((bt, hp * head_dim), lambda i, h: (i, h))
    table = pl.BlockSpec((bt, max(rope_half, 1)), lambda i, h: (i % blocks_per_seq, 0))
    gain = pl.BlockSpec((1, hp * head_dim), lambda i, h: (0, h))
    partial = pl.BlockSpec((1, hp * head_dim), lambda i, h: (i, h))
    kernel = functools.partial(kernel, heads=hp, head_dim=head_dim)
    in_specs = [head_block, table, table, gain] + [head_block] * (n_row_args - 1)
    out_specs = [head_block if kind == "rows" else partial for kind, _ in outputs]
    out_shape = [jax.ShapeDtypeStruct((n_rows if kind == "rows" else n_rows // bt, heads * head_dim), dtype)
                 for kind, dtype in outputs]
    on_gpu = jax.default_backend() == "gpu"
    params = pltriton.CompilerParams(num_warps=tuned["num_warps"], num_stages=tuned["num_stages"]) if on_gpu else None
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(n_rows // bt, heads // hp), in_specs=in_specs,
                          out_specs=out_specs, interpret=not on_gpu, compiler_params=params)


def _launch() -> tuple:
    """TUNED as a hashable key: ((forward items), (backward items))."""
    return tuple(tuple(sorted(TUNED[kind].items())) for kind in ("forward", "backward"))


@functools.lru_cache(maxsize=None)
def _kernels(seq_len: int, heads: int, head_dim: int, rope_dims: int, has_gain: bool, dtype_name: str, launch: tuple):
    """The forward and backward of one shape and launch, each row-partitioned
    (GSPMD runs them on each device's rows; the tables and gain are replicated)."""
    dtype = jnp.dtype(dtype_name)
    forward_launch, backward_launch = (dict(items) for items in launch)
    pieces = column_pieces(head_dim, rope_dims)
    static = dict(pieces=pieces, rotated=rope_dims > 0, has_gain=has_gain)

    def forward(x, cos, sin, gain_cols):
        call = _call(functools.partial(_forward_kernel, **static), x.shape[0], seq_len, heads, head_dim,
                     rope_dims // 2, [("rows", dtype)], 1, forward_launch)
        return call(x, cos, sin, gain_cols)[0]

    def backward(x, cos, sin, gain_cols, dout):
        call = _call(functools.partial(_backward_kernel, **static), x.shape[0], seq_len, heads, head_dim,
                     rope_dims // 2, [("rows", dtype), ("partial", jnp.float32)], 2, backward_launch)
        return tuple(call(x, cos, sin, gain_cols, dout))

    return (row_partitioned(forward, (0,), 1, "m a, t r, t r, o a -> m a", ("a", "t", "r", "o")),
            row_partitioned(backward, (0, 4), 2, "m a, t r, t r, o a, m a -> m a, b a", ("a", "t", "r", "o")))


def _tables(cos_TxR, sin_TxR, dtype):
    """cos/sin in the activations' dtype, as apply_rotary casts them; a dummy
    column when nothing rotates (a block cannot be empty)."""
    if cos_TxR.shape[1] == 0:
        z = jnp.zeros((cos_TxR.shape[0], 1), dtype)
        return z, z
    return cos_TxR.astype(dtype), sin_TxR.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(x_NxHD, cos_TxR, sin_TxR, gain_H, shape):
    seq_len, heads, head_dim, rope_dims, has_gain = shape
    forward, _ = _kernels(seq_len, heads, head_dim, rope_dims, has_gain, x_NxHD.dtype.name, _launch())
    gain_cols = jnp.repeat(gain_H, head_dim)[None, :]
    return forward(x_NxHD, *_tables(cos_TxR, sin_TxR, x_NxHD.dtype), gain_cols)


def _fused_fwd(x_NxHD, cos_TxR, sin_TxR, gain_H, shape):
    return _fused(x_NxHD, cos_TxR, sin_TxR, gain_H, shape), (x_NxHD, cos_TxR, sin_TxR, gain_H)


def _fused_bwd(shape, residuals, dout_NxHD):
    seq_len, heads, head_dim, rope_dims, has_gain = shape
    x_NxHD, cos_TxR, sin_TxR, gain_H = residuals
    _, backward = _kernels(seq_len, heads, head_dim, rope_dims, has_gain, x_NxHD.dtype.name, _launch())
    gain_cols = jnp.repeat(gain_H, head_dim)[None, :]
    dx, dgain_partials = backward(x_NxHD, *_tables(cos_TxR, sin_TxR, x_NxHD.dtype), gain_cols,
                                  dout_NxHD.astype(x_NxHD.dtype))
    dgain = jnp.sum(dgain_partials.reshape(-1, heads, head_dim), axis=(0, 2)).astype(gain_H.dtype)
    # The tables are functions of the positions, not of any parameter.
    return dx, jnp.zeros_like(cos_TxR), jnp.zeros_like(sin_TxR), dgain if has_gain else jnp.zeros_like(gain_H)


_fused.defvjp(_fused_fwd, _fused_bwd)


def norm_rope(x_BxTxHxD: jax.Array, cos_TxR: jax.Array, sin_TxR: jax.Array, gain_H: jax.Array | None,
              rope_dims: int, impl: str = "jnp") -> jax.Array:
    """`reference`'s value (and gradient): RMSNorm, partial RoPE and the gain.

    cos/sin: float32 [T, rope_dims / 2] for positions 0..T-1 of every sequence.
    gain_H: the per-head gain in x's dtype, or None.
    """
    if impl == "jnp":
        return reference(x_BxTxHxD, cos_TxR, sin_TxR, gain_H, rope_dims)
    if impl != "pallas":
        raise ValueError(f"no q/k norm-rope kernels named {impl!r}; expected one of {IMPLS}")
    B, T, H, D = x_BxTxHxD.shape
    if cos_TxR.shape != (T, rope_dims // 2):
        raise ValueError(f"cos/sin must be [T, rope_dims / 2] = {(T, rope_dims // 2)}, got {cos_TxR.shape}")
    has_gain = gain_H is not None
    gain = gain_H if has_gain else jnp.ones((H,), x_BxTxHxD.dtype)
    out = _fused(x_BxTxHxD.reshape(B * T, H * D), cos_TxR, sin_TxR, gain, (T, H, D, rope_dims, has_gain))
    return out.reshape(B, T, H, D)
