"""kernels/qk_norm_rope.py: the Pallas kernels (Pallas's interpreter on the CPU,
its Triton backend on the GPU) against autodiff of the jnp reference."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers
from golf_jax.config import FUSION_KERNELS, ConfigError, ModelConfig
from kernels import qk_norm_rope as qk
from tests.conftest import run_on_cpu_devices, tiny_model_loss_and_grads, triton_kernels_lowered


def operands(key, B, T, H, D, rope_dims, dtype):
    kx, kg, kd = jax.random.split(key, 3)
    x = (3 * jax.random.normal(kx, (B, T, H, D))).astype(dtype)
    angles = jnp.arange(T)[:, None] * (0.3 / jnp.arange(1, rope_dims // 2 + 1))[None, :]
    gain = (1.5 + jax.random.normal(kg, (H,))).astype(dtype)
    dout = jax.random.normal(kd, (B, T, H, D)).astype(dtype)
    return x, jnp.cos(angles), jnp.sin(angles), gain, dout


def value_and_grads(impl, x, cos, sin, gain, dout, rope_dims):
    def f(x, gain):
        out = qk.norm_rope(x, cos, sin, gain, rope_dims, impl)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(x, gain)
    return out, grads


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("H,D,rope_dims", [(4, 16, 8), (2, 32, 0), (2, 8, 8)])
def test_kernels_match_reference_float32(H, D, rope_dims):
    """Forward, dx and the gain's gradient through the interpreted kernels
    against autodiff of the reference: float32 differs only in the order of
    the sums (mean of squares, the backward's dot and the gain's sum over
    tokens), rel 1e-6."""
    x, cos, sin, gain, dout = operands(jax.random.key(0), 2, 32, H, D, rope_dims, jnp.float32)
    out_ref, (dx_ref, dgain_ref) = value_and_grads("jnp", x, cos, sin, gain, dout, rope_dims)
    out, (dx, dgain) = value_and_grads("pallas", x, cos, sin, gain, dout, rope_dims)
    assert rel(out, out_ref) < 1e-6 and rel(dx, dx_ref) < 1e-6 and rel(dgain, dgain_ref) < 1e-6
    assert float(jnp.abs(dgain).min()) > 0


@pytest.mark.parametrize("with_gain", [True, False])
def test_kernels_round_where_the_reference_rounds_bfloat16(with_gain):
    """bf16: both round in the same places, forward and backward (the norm
    once, the rotation op by op, the gain once), so the values are identical;
    the gain's gradient is a float32 sum over the tokens in another order,
    rounded to bf16 (one bf16 unit, 2^-8 relative, at most)."""
    x, cos, sin, gain, dout = operands(jax.random.key(1), 2, 64, 4, 16, 8, jnp.bfloat16)
    gain = gain if with_gain else None
    out_ref, (dx_ref, dgain_ref) = value_and_grads("jnp", x, cos, sin, gain, dout, 8)
    out, (dx, dgain) = value_and_grads("pallas", x, cos, sin, gain, dout, 8)
    assert out.dtype == dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, out_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    if with_gain:
        assert rel(dgain, dgain_ref) <= 2 ** -8


def test_reference_rounds_where_the_model_path_rounds():
    """The reference's norm in float32 rounded once, the rotation op by op in
    bf16 (each product and sum rounded, as XLA runs apply_rotary on the GPU:
    bf16 multiplies and adds in its optimised HLO), the gain in float32
    rounded once; checked in float64 numpy."""
    x, cos, sin, gain, _ = operands(jax.random.key(2), 1, 8, 2, 8, 4, jnp.bfloat16)
    bf = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)  # noqa: E731
    xf = np.asarray(x, np.float64)
    n = bf(xf / np.sqrt(np.mean(xf * xf, -1, keepdims=True) + qk.RMS_NORM_EPS))
    c, s = bf(cos)[None, :, None, :], bf(sin)[None, :, None, :]
    n1, n2 = n[..., :2], n[..., 2:4]
    r = np.concatenate([bf(bf(n1 * c) + bf(n2 * s)), bf(bf(n2 * c) - bf(n1 * s)), n[..., 4:]], -1)
    expected = bf(np.asarray(gain, np.float64)[:, None] * r)
    np.testing.assert_array_equal(np.asarray(qk.reference(x, cos, sin, gain, 4), np.float64), expected)


def test_reference_is_the_model_path():
    """The model's jnp path (layers.rms_norm, apply_rotary, scaled_sum) and the
    reference: the same values and gradients, bf16, bit for bit."""
    x, cos, sin, gain, dout = operands(jax.random.key(4), 2, 16, 4, 16, 8, jnp.bfloat16)

    def model_path(x, gain):
        r = qk.apply_rotary(layers.rms_norm(x), cos, sin, 8)
        return layers.scaled_sum([(gain[None, None, :, None], r)], True)
    f = lambda fn: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda x, g: jnp.sum(fn(x, g).astype(jnp.float32) * dout.astype(jnp.float32)), argnums=(0, 1)))(x, gain)
    (v, g), (v_ref, g_ref) = f(lambda x, g: qk.reference(x, cos, sin, g, 8)), f(model_path)
    assert float(v) == float(v_ref)
    for a, b in zip(g, g_ref):
        np.testing.assert_array_equal(a, b)


def test_column_pieces_and_block_rows():
    """Power-of-two column pieces covering a head, rotated halves first; block
    rows a power of two dividing the sequence."""
    assert qk.column_pieces(64, 16) == ((0, 8), (8, 8), (16, 16), (32, 32))
    assert qk.column_pieces(64, 0) == ((0, 64),)
    assert qk.column_pieces(16, 16) == ((0, 8), (8, 8))
    assert qk.column_pieces(44, 8) == ((0, 4), (4, 4), (8, 4), (12, 32))
    assert (qk.block_rows(2048), qk.block_rows(96), qk.block_rows(7)) == (128, 32, 1)


def test_bad_impl_and_tables_are_refused():
    x, cos, sin, gain, _ = operands(jax.random.key(3), 1, 8, 2, 8, 4, jnp.float32)
    with pytest.raises(ValueError, match="no q/k norm-rope kernels named"):
        qk.norm_rope(x, cos, sin, gain, 4, "cuda")
    with pytest.raises(ValueError, match=r"cos/sin must be \[T, rope_dims / 2\]"):
        qk.norm_rope(x, cos[:4], sin[:4], gain, 4, "pallas")


@pytest.mark.parametrize("scales_in_float32", [True, False])
def test_model_loss_and_grads_same_through_the_kernels(scales_in_float32):
    """The whole model with all three Pallas kernels (fusion_impl="pallas",
    interpreted; without scales_in_float32 the q/k and mix kernels step
    aside) equals the jnp path, float32: the kernels' sums in another order
    (rel 1e-5)."""
    out = tiny_model_loss_and_grads({impl: dict(fusion_impl=impl, scales_in_float32=scales_in_float32)
                                     for impl in ("jnp", "pallas")})
    assert rel(out["pallas"][0], out["jnp"][0]) < 1e-6
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["jnp"][1])):
        assert rel(a, b) < 1e-5
    assert float(jnp.abs(out["pallas"][1]["blocks"]["q_gain"]).min()) > 0


def test_kernels_lower_to_triton():
    """Forward and backward at the record's q layout (8 heads of 64, 16 rotary dims, the
    gain) and its k layout (4 heads, no gain), through Pallas's Triton lowering (the
    program exported for CUDA on any machine)."""
    cos = jax.ShapeDtypeStruct((2048, 8), jnp.float32)
    for heads, gain in ((8, jax.ShapeDtypeStruct((8,), jnp.bfloat16)), (4, None)):
        x = jax.ShapeDtypeStruct((2, 2048, heads, 64), jnp.bfloat16)

        def loss(x, cos, sin, gain=None):
            return jnp.sum(qk.norm_rope(x, cos, sin, gain, 16, "pallas").astype(jnp.float32))

        args = (x, cos, cos) + (() if gain is None else (gain,))
        lowered = triton_kernels_lowered(jax.value_and_grad(loss, argnums=(0, *range(3, len(args)))), *args)
        assert len(lowered) == 2, (heads, lowered)


def test_fusion_impl_resolution():
    """By default "auto" for norm_rope and XSA: on GPUs in bf16 with power-of-two
    widths; only the kernels fusion_kernels lists, and without scales_in_float32
    only XSA; "jnp" switches them off; unknown names refused."""
    auto = ModelConfig(compute_dtype="bfloat16")
    bf16 = dataclasses.replace(auto, fusion_impl="jnp")
    on_gpu = jax.default_backend() == "gpu"
    assert FUSION_KERNELS == ("norm_rope", "xsa", "residual_norm", "softcap_ce", "xsa_gate")
    assert [layers.fusion_impl(auto, k) for k in FUSION_KERNELS] == ["pallas" if on_gpu else "jnp"] * 2 + ["jnp"] * 3
    assert [layers.fusion_impl(bf16, k) for k in FUSION_KERNELS] == ["jnp"] * 5
    assert layers.fusion_impl(auto, "xsa") == ("pallas" if on_gpu else "jnp")
    assert layers.fusion_impl(dataclasses.replace(auto, compute_dtype="float32"), "xsa") == "jnp"
    assert layers.fusion_impl(dataclasses.replace(auto, model_dim=96, num_heads=3, num_kv_heads=1), "xsa") == "jnp"
    some = dataclasses.replace(bf16, fusion_impl="pallas", fusion_kernels="norm_rope,xsa")
    assert [layers.fusion_impl(some, k) for k in FUSION_KERNELS] == ["pallas", "pallas", "jnp", "jnp", "jnp"]
    eager = dataclasses.replace(bf16, fusion_impl="pallas", scales_in_float32=False)
    assert [layers.fusion_impl(eager, k) for k in FUSION_KERNELS] == ["jnp", "pallas", "jnp", "jnp", "jnp"]
    # the gate in XSA's kernels takes a KV head's group of query heads as one tile: a power of two
    gated = dataclasses.replace(auto, fusion_kernels="xsa,xsa_gate")
    assert layers.fusion_impl(gated, "xsa_gate") == ("pallas" if on_gpu else "jnp")
    three_per_group = dataclasses.replace(gated, model_dim=384, num_heads=6, num_kv_heads=2)
    assert layers.fusion_impl(three_per_group, "xsa_gate") == "jnp"
    with pytest.raises(ValueError, match="no fused kernel named"):
        layers.fusion_impl(bf16, "mlp")
    with pytest.raises(ConfigError, match="fusion_kernels"):
        dataclasses.replace(bf16, fusion_kernels="xsa,rope").validate()


TWO_DEVICES = textwrap.dedent(r"""
    import sys, json, math, re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import qk_norm_rope as qk
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 3)
    x, dout = jax.random.normal(k[0], (4, 32, 2, 16)), jax.random.normal(k[1], (4, 32, 2, 16))
    gain = 1 + jax.random.normal(k[2], (2,))
    angles = jnp.arange(32)[:, None] * jnp.array([0.1, 0.2, 0.3, 0.4])[None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    f = lambda x, g, impl: jnp.sum(qk.norm_rope(x, cos, sin, g, 8, impl) * dout)
    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
    ref = grad(x, gain, "jnp")
    xs = jax.device_put(x, NamedSharding(mesh, P("d")))
    out = grad(xs, gain, "pallas")
    hlo = grad.lower(xs, gain, "pallas").compile().as_text()
    gathered = [math.prod(map(int, dims.split(","))) for dims in re.findall(r"= f32\[([\d,]+)\][^=]*all-gather\(", hlo)]
    terms_l1 = float(jnp.sum(jnp.abs(qk.norm_rope(x, cos, sin, gain, 8, "jnp") * dout)))
    json.dump({"diff": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))],
               "terms_l1": terms_l1,
               "dx_spec": str(out[1][0].sharding.spec), "gathered": gathered, "x_size": x.size}, sys.stdout)
""")


def test_kernels_split_along_rows_over_two_devices():
    """A batch sharded over devices (GSPMD: evaluation and TTT) runs the
    kernels on each device's rows: no all-gather of the activations (only of
    the gain's per-block partial sums, one row per 16 tokens here), dx stays
    sharded, values match the unsharded jnp path: float32 sums in another
    order. The loss sums 4096 products of either sign, so its rounding scales
    with the sum of their magnitudes (~3e3), not with the loss (~1e1): 1e-6 of
    that is ~8 float32 eps (a CI CPU once put it at 1.07e-4 absolute, 3.5e-8
    of the magnitudes). The gradients are O(1) per element: 1e-4."""
    out = run_on_cpu_devices(TWO_DEVICES)
    assert max(out["gathered"], default=0) <= out["x_size"] // 16
    assert out["dx_spec"].startswith(("P('d'", "PartitionSpec('d'"))
    loss_diff, *grad_diffs = out["diff"]
    assert loss_diff < 1e-6 * out["terms_l1"]
    assert max(grad_diffs) < 1e-4


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("heads,with_gain", [(8, True), (4, False)])
def test_triton_kernels_match_reference_at_record_shape(heads, with_gain):
    """The Triton-backend kernels against the reference compiled by XLA, bf16,
    at the record's head shape: the same stage roundings; the GPUs' rsqrt and
    the float32 sums' order may move a value by one bf16 unit now and then
    (norm-relative 4e-3, fewer than 1% of the values differ)."""
    x, cos, sin, gain, dout = operands(jax.random.key(5), 4, 2048, heads, 64, 16, jnp.bfloat16)
    gain = gain if with_gain else None
    out_ref, (dx_ref, dgain_ref) = value_and_grads("jnp", x, cos, sin, gain, dout, 16)
    out, (dx, dgain) = value_and_grads("pallas", x, cos, sin, gain, dout, 16)
    for name, a, b in (("out", out, out_ref), ("dx", dx, dx_ref)):
        assert rel(a, b) < 4e-3, name
        assert float(jnp.mean((a != b).astype(jnp.float32))) < 0.01, name
    if with_gain:
        assert rel(dgain, dgain_ref) <= 2 ** -8
