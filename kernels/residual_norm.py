"""The residual stream's mix and the RMSNorm that follows it, as one Pallas
kernel forward and one backward:

    s = scale_a * a + scale_b * b        (per-channel scales; scale_a may be 1)
    n = rms_norm(s) * norm_scale

Each block computes two of these: x_in = resid_mix[0] x + resid_mix[1] x0 with
the attention's input norm(x_in), and x = x_in + attn_scale * attn_out with
the MLP's input norm(x). XLA runs them, with their backward, as separate
fusions per layer (the sum, the norm, the scales' column sums over the tokens
at ~1 TB/s, the norm's backward, the cotangents' sums): ~16 ms of an H200's
84.6 ms micro-step (docs/performance.md). The kernels read each operand once
and write each result once; the scales' gradients are summed per block of
rows inside the backward, then over the blocks.

Rounding is where XLA rounds the model's jnp path on the GPU
(golf_jax.layers.scaled_sum with scales_in_float32, then rms_norm). The
forward was measured there (scripts/fusion_kernel_sweep.py, GPU tests): XLA
fuses the sum into the norm and, under its excess precision, drops the bf16
round trip between them; so s is written rounded once and n is computed
from the unrounded s, rounded once. The backward follows XLA's optimised HLO
for the GPU (docs/performance.md, 2026-12-01), not yet measured against it:
the norm's gradient in float32 from the unrounded s (XLA keeps the float32 s
of the forward for it), rounded to bf16; added to s's other cotangent in
bf16 (rounded); each input's cotangent ds * scale rounded once; each scale's
gradient a float32 sum over the tokens, rounded once. XLA on the CPU rounds
otherwise (it keeps the round trips around the norm and adds the cotangents
in float32), so there the jnp path differs from this by a bf16 unit in some
values.

`SEMANTICS` names these choices; scripts/fusion_kernel_sweep.py tries the
others against XLA on the GPU.

`impl`: "pallas" runs the kernels (Pallas's Triton backend on GPUs, its
interpreter elsewhere); "jnp" runs `reference`, the same formulas in jnp.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.partition import row_partitioned
from kernels.qk_norm_rope import RMS_NORM_EPS

IMPLS = ("jnp", "pallas")
# Launch parameters (scripts/fusion_kernel_sweep.py): a program takes up to
# program_rows rows (partial sums of the scales per program), step_rows of
# them in registers at a time. TUNED and SEMANTICS are read each time the
# kernels are traced, as part of their cache key. Sequences shorter than
# short_below (the TTT's chunk windows: 8 rows of 512 tokens a GPU) take the
# short_* parameters: with 128-row programs such a call has 32 programs for an
# H200's 132 SMs, and the kernels took 16 / 29 us a call forward / backward
# there, slower than XLA's fusions (docs/performance.md, eighteenth session).
# 32-row programs in steps of 8 with 4 warps were the sweep's best at the
# training shape too (seventh session), kept there only for the measured curves.
TUNED = {kind: dict(program_rows=128, step_rows=16, num_warps=8, num_stages=2,
                    short_below=2048, short_program_rows=32, short_step_rows=8, short_num_warps=4)
         for kind in ("forward", "backward")}
# Where the kernels round (see the module docstring).
SEMANTICS = dict(norm_of_rounded_sum=False, dnorm_of_rounded_sum=False, round_dnorm=True, round_ds=True)


# ----------------------------------------------------------------------------- jnp reference

def reference(a: jax.Array, b: jax.Array, scale_a: jax.Array | None, scale_b: jax.Array,
              norm_scale: float) -> tuple[jax.Array, jax.Array]:
    """(s, n) and their gradient as the kernels compute them, in jnp (any
    backend): s = scale_a a + scale_b b and n = RMSNorm(s) * norm_scale, with
    the rounding points of the module docstring."""
    scale_a_D = jnp.ones_like(scale_b) if scale_a is None else scale_a
    return _reference(a, b, scale_a_D, scale_b, float(norm_scale))


def _inv_rms(s):
    return jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + RMS_NORM_EPS)


def _reference_sums(a, b, scale_a, scale_b):
    f32 = jnp.float32
    s = scale_a.astype(f32) * a.astype(f32) + scale_b.astype(f32) * b.astype(f32)
    return s, s.astype(a.dtype).astype(f32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _reference(a, b, scale_a, scale_b, norm_scale):
    s_exact, s = _reference_sums(a, b, scale_a, scale_b)
    normed = s if SEMANTICS["norm_of_rounded_sum"] else s_exact
    return s.astype(a.dtype), (normed * _inv_rms(normed) * norm_scale).astype(a.dtype)


def _reference_fwd(a, b, scale_a, scale_b, norm_scale):
    return _reference(a, b, scale_a, scale_b, norm_scale), (a, b, scale_a, scale_b)


def _reference_bwd(norm_scale, residuals, cotangents):
    a, b, scale_a, scale_b = residuals
    f32, dtype = jnp.float32, a.dtype
    s_exact, s = _reference_sums(a, b, scale_a, scale_b)
    s = s if SEMANTICS["dnorm_of_rounded_sum"] else s_exact
    inv = _inv_rms(s)
    u = cotangents[1].astype(dtype).astype(f32) * norm_scale
    dnorm = inv * u - inv * inv * inv * s * (jnp.sum(u * s, axis=-1, keepdims=True) / s.shape[-1])
    dnorm = dnorm.astype(dtype).astype(f32) if SEMANTICS["round_dnorm"] else dnorm
    ds = cotangents[0].astype(dtype).astype(f32) + dnorm
    ds = ds.astype(dtype).astype(f32) if SEMANTICS["round_ds"] else ds
    rows = tuple(range(a.ndim - 1))
    return ((ds * scale_a.astype(f32)).astype(dtype), (ds * scale_b.astype(f32)).astype(dtype),
            jnp.sum(ds * a.astype(f32), axis=rows).astype(scale_a.dtype),
            jnp.sum(ds * b.astype(f32), axis=rows).astype(scale_b.dtype))


_reference.defvjp(_reference_fwd, _reference_bwd)


# ----------------------------------------------------------------------------- the kernels

def _mixed(a_ref, b_ref, sa, sb, rows, dtype):
    """The step's a and b in float32, s unrounded and s rounded, in float32."""
    a, b = a_ref[rows, :].astype(jnp.float32), b_ref[rows, :].astype(jnp.float32)
    s = sa * a + sb * b
    return a, b, s, s.astype(dtype).astype(jnp.float32)


def _forward_kernel(a_ref, b_ref, sa_ref, sb_ref, s_ref, n_ref, *, steps, step_rows, norm_scale, semantics):
    dtype, sa, sb = s_ref.dtype, sa_ref[...].astype(jnp.float32), sb_ref[...].astype(jnp.float32)

    def step(i, carry):
        rows = pl.ds(i * step_rows, step_rows)
        _, _, s_exact, s = _mixed(a_ref, b_ref, sa, sb, rows, dtype)
        s_ref[rows, :] = s.astype(dtype)
        s = s if semantics["norm_of_rounded_sum"] else s_exact
        n_ref[rows, :] = (s * _inv_rms(s) * norm_scale).astype(dtype)
        return carry

    jax.lax.fori_loop(0, steps, step, 0)


def _backward_kernel(a_ref, b_ref, sa_ref, sb_ref, ds_ref, dn_ref, da_ref, db_ref, dsa_ref, dsb_ref, *,
                     steps, step_rows, norm_scale, semantics):
    dtype, sa, sb = da_ref.dtype, sa_ref[...].astype(jnp.float32), sb_ref[...].astype(jnp.float32)
    width = a_ref.shape[1]

    def step(i, sums):
        rows = pl.ds(i * step_rows, step_rows)
        a, b, s_exact, s = _mixed(a_ref, b_ref, sa, sb, rows, dtype)
        s = s if semantics["dnorm_of_rounded_sum"] else s_exact
        inv = _inv_rms(s)
        u = dn_ref[rows, :].astype(jnp.float32) * norm_scale
        # d/ds of s * rsqrt(mean(s^2) + eps): inv u - inv^3 s (u . s) / width
        dnorm = (inv * u - inv * inv * inv * s * (jnp.sum(u * s, axis=1, keepdims=True) / width))
        dnorm = dnorm.astype(dtype).astype(jnp.float32) if semantics["round_dnorm"] else dnorm
        ds = ds_ref[rows, :].astype(jnp.float32) + dnorm
        ds = ds.astype(dtype).astype(jnp.float32) if semantics["round_ds"] else ds
        da_ref[rows, :] = (ds * sa).astype(dtype)
        db_ref[rows, :] = (ds * sb).astype(dtype)
        return sums[0] + jnp.sum(ds * a, axis=0, keepdims=True), sums[1] + jnp.sum(ds * b, axis=0, keepdims=True)

    zeros = jnp.zeros((1, width), jnp.float32)
    dsa, dsb = jax.lax.fori_loop(0, steps, step, (zeros, zeros))
    dsa_ref[...] = dsa
    dsb_ref[...] = dsb


def program_rows(seq_len: int, max_rows: int = 128, step_rows: int = 16) -> tuple[int, int]:
    """(rows per program, rows per step of its loop): the largest power of two
    up to max_rows dividing the sequence length, in steps of step_rows rows or
    fewer. A function of the sequence length, not of the row count, so a batch
    split over devices (whole sequences each) has as many partial sums in all
    as unsplit."""
    rows = int(np.gcd(seq_len, max_rows))
    return rows, min(rows, step_rows)


def launch(tuned: dict, seq_len: int) -> tuple[int, int, int]:
    """(rows per program, rows per step, warps) of one of TUNED's kinds for sequences of seq_len."""
    short = "short_" if seq_len < tuned["short_below"] else ""
    rows, step_rows = program_rows(seq_len, tuned[short + "program_rows"], tuned[short + "step_rows"])
    return rows, step_rows, tuned[short + "num_warps"]


def _call(kernel, n_rows: int, seq_len: int, width: int, dtype, norm_scale: float, n_row_in: int, n_row_out: int,
          n_partial_out: int, tuned: dict, semantics: dict):
    """pallas_call of `kernel` over blocks of rows of [n_rows, width] operands
    (the first two and the last n_row_in - 2 inputs), with the two scales
    [1, width] whole; n_partial_out float32 outputs of one row per block."""
    rows, step_rows, num_warps = launch(tuned, seq_len)
    row_block = pl.BlockSpec((rows, width), lambda i: (i, 0))
    scale = pl.BlockSpec((1, width), lambda i: (0, 0))
    partial = pl.BlockSpec((1, width), lambda i: (i, 0))
    on_gpu = jax.default_backend() == "gpu"
    return pl.pallas_call(
        functools.partial(kernel, steps=rows // step_rows, step_rows=step_rows, norm_scale=norm_scale,
                          semantics=semantics),
        grid=(n_rows // rows,),
        in_specs=[row_block, row_block, scale, scale] + [row_block] * (n_row_in - 2),
        out_specs=[row_block] * n_row_out + [partial] * n_partial_out,
        out_shape=([jax.ShapeDtypeStruct((n_rows, width), dtype)] * n_row_out
                   + [jax.ShapeDtypeStruct((n_rows // rows, width), jnp.float32)] * n_partial_out),
        interpret=not on_gpu,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=tuned["num_stages"])
        if on_gpu else None)


def _settings() -> tuple:
    """TUNED and SEMANTICS as a hashable key: (forward items, backward items, semantics items)."""
    return (*(tuple(sorted(TUNED[kind].items())) for kind in ("forward", "backward")),
            tuple(sorted(SEMANTICS.items())))


@functools.lru_cache(maxsize=None)
def _kernels(seq_len: int, width: int, dtype_name: str, norm_scale: float, settings: tuple):
    """The forward and backward for one width, dtype, norm scale and settings,
    each row-partitioned (GSPMD runs them on each device's rows, scales replicated)."""
    dtype = jnp.dtype(dtype_name)
    forward_launch, backward_launch, semantics = (dict(items) for items in settings)

    def forward(a, b, scale_a, scale_b):
        return tuple(_call(_forward_kernel, a.shape[0], seq_len, width, dtype, norm_scale, 2, 2, 0,
                           forward_launch, semantics)(a, b, scale_a, scale_b))

    def backward(a, b, scale_a, scale_b, ds, dn):
        return tuple(_call(_backward_kernel, a.shape[0], seq_len, width, dtype, norm_scale, 4, 2, 2,
                           backward_launch, semantics)(a, b, scale_a, scale_b, ds, dn))

    return (row_partitioned(forward, (0, 1), 2, "m d, m d, o d, o d -> m d, m d", ("d", "o")),
            row_partitioned(backward, (0, 1, 4, 5), 4, "m d, m d, o d, o d, m d, m d -> m d, m d, b d, b d",
                            ("d", "o")))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(a_NxD, b_NxD, scale_a_D, scale_b_D, norm_scale: float, seq_len: int):
    forward, _ = _kernels(seq_len, a_NxD.shape[1], a_NxD.dtype.name, norm_scale, _settings())
    return forward(a_NxD, b_NxD, scale_a_D[None, :], scale_b_D[None, :])


def _fused_fwd(a_NxD, b_NxD, scale_a_D, scale_b_D, norm_scale, seq_len):
    return _fused(a_NxD, b_NxD, scale_a_D, scale_b_D, norm_scale, seq_len), (a_NxD, b_NxD, scale_a_D, scale_b_D)


def _fused_bwd(norm_scale, seq_len, residuals, cotangents):
    a_NxD, b_NxD, scale_a_D, scale_b_D = residuals
    ds, dn = (c.astype(a_NxD.dtype) for c in cotangents)
    _, backward = _kernels(seq_len, a_NxD.shape[1], a_NxD.dtype.name, norm_scale, _settings())
    da, db, dsa_partials, dsb_partials = backward(a_NxD, b_NxD, scale_a_D[None, :], scale_b_D[None, :], ds, dn)
    return (da, db, jnp.sum(dsa_partials, axis=0).astype(scale_a_D.dtype),
            jnp.sum(dsb_partials, axis=0).astype(scale_b_D.dtype))


_fused.defvjp(_fused_fwd, _fused_bwd)


def add_norm(a: jax.Array, b: jax.Array, scale_a: jax.Array | None, scale_b: jax.Array, norm_scale: float,
             impl: str = "jnp") -> tuple[jax.Array, jax.Array]:
    """`reference`'s (s, n) and their gradient. a, b: [B, T, d] in one dtype;
    scale_a (None: 1) and scale_b: [d] in that dtype."""
    if impl == "jnp":
        return reference(a, b, scale_a, scale_b, norm_scale)
    if impl != "pallas":
        raise ValueError(f"no residual-norm kernels named {impl!r}; expected one of {IMPLS}")
    B, T, width = a.shape
    # Without scale_a the kernel multiplies by ones: exact, and its gradient is dropped.
    scale_a_D = jnp.ones((width,), a.dtype) if scale_a is None else scale_a
    s, n = _fused(a.reshape(-1, width), b.reshape(-1, width), scale_a_D, scale_b, float(norm_scale), T)
    return s.reshape(B, T, width), n.reshape(B, T, width)


