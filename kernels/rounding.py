"""Rounding float32 values to a narrower dtype's precision, kept as float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rounding_to(dtype):
    """A function that rounds float32 values to `dtype`'s precision, keeping them
    float32: one rounding of a result computed in float32, as a bf16 PyTorch op
    (or a fused kernel's store) rounds. reduce_precision rather than a convert
    pair, which XLA's excess precision may drop inside a fusion. The identity
    for float32."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return lambda x: x
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)
