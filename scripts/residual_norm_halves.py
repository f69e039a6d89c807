"""Bisecting the residual-mix kernel's drift (issue 17; docs/fidelity.md, thirteenth session).

Every 60-step run with kernels/residual_norm.py has left the reference's curve from step 2,
whatever the kernel rounded (its backward's roundings, the residual stream's dtype), though
each half equals XLA's compiled path in isolation. This gives `Block.mix_norm` a kernel with
one half only: "forward" (the kernel's forward, the backward of the model's jnp path,
recomputed) or "backward" (the jnp path's forward, the kernel's backward). A run of each
tells which half moves the curve. "stream" is no kernel at all: the jnp path's forward with
the residual stream rounded to bf16 where the kernel's reads and writes round it (a, b and
s, with n from the unrounded s), and the jnp path's backward. On the GPU XLA keeps that
stream float32 from one fusion to the next (docs/fidelity.md, thirteenth session); a run of
it tells whether those roundings alone move the curve as the forward half does. It did, and it
took the first steps to the reference's (docs/fidelity.md, twentieth session). The reference's
stream is bf16 wherever its compiled code stores it, so two more variants round more of it:
"stream_blocks" also rounds each block's output (the skips' copies and the final norm's input
among its readers; `Block.__call__`, so the 1.1147 record's blocks, not the parallel lanes), and
"stream_both" also rounds the cotangent of each block's output in the backward.

    RESIDUAL_NORM_HALF=forward python scripts/fidelity_curve.py train --out runs/H1 -- \
        --config.fusion_kernels=norm_rope,xsa,residual_norm

(`scripts/fidelity_curve.py train` calls `patch` before train.py; the gradient probe,
scripts/residual_grad_probe.py, has a row for each half.) Tooling, outside the code counted
in the artifact.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from golf_jax import blocks, layers
from kernels import residual_norm

HALVES = ("forward", "backward", "stream", "stream_blocks", "stream_both")


def model_path(a, b, scale_a, scale_b, norm_scale):
    """What Block.mix_norm computes without the kernel."""
    mixed = layers.scaled_sum([(scale_a, a), (scale_b, b)], True)
    return mixed, layers.rms_norm(mixed, norm_scale)


def rounded_stream_path(a, b, scale_a, scale_b, norm_scale):
    """model_path's values with a, b and s rounded to a's dtype as the kernel's memory rounds
    them, n from the unrounded s, rounded once. The optimization barriers keep a, b and s
    bf16 tensors: XLA's excess precision could otherwise drop their round trips again."""
    f32 = jnp.float32
    a, b = jax.lax.optimization_barrier((a, b))
    s = scale_a.astype(f32) * a.astype(f32) + scale_b.astype(f32) * b.astype(f32)
    return jax.lax.optimization_barrier(s.astype(a.dtype)), layers.rms_norm(s, norm_scale).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _half(a, b, scale_a, scale_b, norm_scale: float, seq_len: int, half: str):
    if half == "backward":
        return model_path(a, b, scale_a, scale_b, norm_scale)
    if half == "stream":
        return rounded_stream_path(a, b, scale_a, scale_b, norm_scale)
    forward, _ = residual_norm._kernels(seq_len, a.shape[-1], a.dtype.name, norm_scale, residual_norm._settings())
    s, n = forward(a.reshape(-1, a.shape[-1]), b.reshape(-1, a.shape[-1]), scale_a[None, :], scale_b[None, :])
    return s.reshape(a.shape), n.reshape(a.shape)


def _half_fwd(a, b, scale_a, scale_b, norm_scale, seq_len, half):
    return _half(a, b, scale_a, scale_b, norm_scale, seq_len, half), (a, b, scale_a, scale_b)


def _half_bwd(norm_scale, seq_len, half, residuals, cotangents):
    a, b, scale_a, scale_b = residuals
    if half in ("forward", "stream"):
        _, vjp = jax.vjp(lambda *x: model_path(*x, norm_scale), a, b, scale_a, scale_b)
        return vjp(tuple(c.astype(a.dtype) for c in cotangents))
    _, backward = residual_norm._kernels(seq_len, a.shape[-1], a.dtype.name, norm_scale, residual_norm._settings())
    width = a.shape[-1]
    ds, dn = (c.astype(a.dtype).reshape(-1, width) for c in cotangents)
    da, db, dsa, dsb = backward(a.reshape(-1, width), b.reshape(-1, width), scale_a[None, :], scale_b[None, :], ds, dn)
    return (da.reshape(a.shape), db.reshape(a.shape), jnp.sum(dsa, axis=0).astype(scale_a.dtype),
            jnp.sum(dsb, axis=0).astype(scale_b.dtype))


_half.defvjp(_half_fwd, _half_bwd)


def half_add_norm(half: str):
    """A stand-in for kernels.residual_norm.add_norm with only `half` of the kernel."""
    if half not in HALVES:
        raise ValueError(f"RESIDUAL_NORM_HALF must be one of {HALVES}, got {half!r}")

    def add_norm(a, b, scale_a, scale_b, norm_scale, impl="pallas"):
        scale_a = jnp.ones_like(scale_b) if scale_a is None else scale_a
        return _half(a, b, scale_a, scale_b, float(norm_scale), a.shape[1], half)
    return add_norm


def stored_as_dtype(cotangent_too: bool):
    """The identity, with x as its dtype stores it (bf16): the barrier keeps XLA's excess
    precision from dropping that rounding. With cotangent_too its cotangent likewise; else the
    cotangent as XLA leaves it."""
    @jax.custom_vjp
    def stored(x):
        return jax.lax.optimization_barrier(x)

    def stored_bwd(_, g):
        return (jax.lax.optimization_barrier(g) if cotangent_too else g,)

    stored.defvjp(lambda x: (stored(x), None), stored_bwd)
    return stored


def patch(half: str):
    """Block.mix_norm's kernel (model.fusion_kernels naming residual_norm) becomes `half` of it;
    with stream_blocks and stream_both, Block.__call__ rounds its output too."""
    if half in ("stream_blocks", "stream_both"):
        block_call, round_output = blocks.Block.__call__, stored_as_dtype(half == "stream_both")

        def rounded_output_call(self, *args, **kwargs):
            return round_output(block_call(self, *args, **kwargs))
        blocks.Block.__call__ = rounded_output_call
        half = "stream"
    blocks.add_norm = half_add_norm(half)
