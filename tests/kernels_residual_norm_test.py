"""kernels/residual_norm.py: the Pallas kernels (Pallas's interpreter on the
CPU, its Triton backend on the GPU) against the model's jnp path (scaled_sum
with scales_in_float32, then rms_norm) and the module's reference."""

from __future__ import annotations

import dataclasses
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers
from kernels import residual_norm as rn
from tests.conftest import run_on_cpu_devices, triton_kernels_lowered
from tests.model_frontier_test import loss_and_gradient_errors


def operands(key, shape, dtype):
    ks = jax.random.split(key, 6)
    d = shape[-1]
    a, b = 2 * jax.random.normal(ks[0], shape), jax.random.normal(ks[1], shape)
    scale_a, scale_b = 1 + 0.3 * jax.random.normal(ks[2], (d,)), 0.5 * jax.random.normal(ks[3], (d,))
    ds, dn = jax.random.normal(ks[4], shape), jax.random.normal(ks[5], shape)
    return [x.astype(dtype) for x in (a, b, scale_a, scale_b, ds, dn)]


def model_path(a, b, scale_a, scale_b, norm_scale):
    """What golf_jax.model.Block computes without the kernels."""
    mixed = layers.scaled_sum([(scale_a, a), (scale_b, b)], True)
    return mixed, layers.rms_norm(mixed, norm_scale)


def outputs_and_grads(fn, a, b, scale_a, scale_b, ds, dn):
    """(s, n) and the gradients of a, b and the scales under cotangents (ds, dn)."""
    def f(a, b, scale_a, scale_b):
        s, n = fn(a, b, scale_a, scale_b)
        dot = jnp.sum(s.astype(jnp.float32) * ds.astype(jnp.float32)) + jnp.sum(n.astype(jnp.float32) * dn)
        return dot, (s, n)
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))(a, b, scale_a, scale_b)
    return out, grads


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def fused(norm_scale, with_scale_a=True):
    return lambda a, b, sa, sb: rn.add_norm(a, b, sa if with_scale_a else None, sb, norm_scale, "pallas")


@pytest.mark.parametrize("shape", [(2, 256, 32), (3, 6, 16)])  # blocks of 128 rows in steps of 16; of 2
def test_kernels_match_model_path_float32(shape):
    """float32: the kernels against the model's path, forward and every
    gradient; only the order of float32 sums differs (rel 1e-6)."""
    a, b, sa, sb, ds, dn = operands(jax.random.key(0), shape, jnp.float32)
    (s, n), grads = outputs_and_grads(fused(0.5), a, b, sa, sb, ds, dn)
    (s_ref, n_ref), grads_ref = outputs_and_grads(lambda *x: model_path(*x, 0.5), a, b, sa, sb, ds, dn)
    assert rel(s, s_ref) < 1e-6 and rel(n, n_ref) < 1e-6
    for name, g, g_ref in zip(("da", "db", "dscale_a", "dscale_b"), grads, grads_ref):
        assert rel(g, g_ref) < 1e-6, name


@pytest.mark.parametrize("with_scale_a", [True, False])
def test_kernels_equal_the_reference_bfloat16(with_scale_a):
    """bf16: the kernels and the jnp reference round in the same places
    (XLA's on the GPU: n from the unrounded sum, the norm's gradient rounded,
    s's two cotangents summed in bf16), so s is identical, and n and the inputs' gradients but for
    the order of float32 sums; the scales' gradients are float32 sums over
    the tokens in another order, rounded to bf16 (one unit, 2^-8, at most)."""
    a, b, sa, sb, ds, dn = operands(jax.random.key(1), (2, 64, 32), jnp.bfloat16)
    pick = (lambda sa: sa) if with_scale_a else (lambda sa: None)
    (s, n), grads = outputs_and_grads(fused(3 ** -0.5, with_scale_a), a, b, sa, sb, ds, dn)
    (s_ref, n_ref), grads_ref = outputs_and_grads(
        lambda a, b, sa, sb: rn.add_norm(a, b, pick(sa), sb, 3 ** -0.5, "jnp"), a, b, sa, sb, ds, dn)
    np.testing.assert_array_equal(s, s_ref)
    for name, x, x_ref in (("n", n, n_ref), ("da", grads[0], grads_ref[0]), ("db", grads[1], grads_ref[1])):
        assert x.dtype == jnp.bfloat16, name
        # The mean of squares of the unrounded sum, a float32 sum in another
        # order, moves a value across a bf16 rounding boundary now and then:
        # at most one bf16 unit (2^-7 relative with the leading bit), in at most 0.1% of the values.
        x, x_ref = np.asarray(x, np.float64), np.asarray(x_ref, np.float64)
        assert np.all(np.abs(x - x_ref) <= 2 ** -7 * np.abs(x_ref)), name
        assert np.mean(x != x_ref) <= 1e-3, name
    assert rel(grads[3], grads_ref[3]) <= 2 ** -8
    if with_scale_a:
        assert rel(grads[2], grads_ref[2]) <= 2 ** -8
    else:
        assert float(jnp.abs(grads[2]).max()) == 0  # no scale_a: nothing flows to the argument


def test_reference_against_the_model_path_on_the_cpu():
    """float32: the reference is the model's path (sums in another order).
    bf16: XLA on the CPU rounds otherwise (s before the norm, s's cotangents
    summed in float32), so some values differ by a bf16 unit: norm-relative
    4e-3 at most, and the sum s is identical."""
    for dtype, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 4e-3)):
        a, b, sa, sb, ds, dn = operands(jax.random.key(2), (2, 16, 32), dtype)
        (s, n), grads = outputs_and_grads(lambda *x: rn.add_norm(*x, 0.5, "jnp"), a, b, sa, sb, ds, dn)
        (s_ref, n_ref), grads_ref = outputs_and_grads(lambda *x: model_path(*x, 0.5), a, b, sa, sb, ds, dn)
        np.testing.assert_array_equal(s, s_ref)
        for x, x_ref in zip((n, *grads), (n_ref, *grads_ref)):
            assert rel(x, x_ref) < tol


def test_frontier_model_through_the_kernels_matches_the_reference(frontier_ref):
    """configs/frontier.py names the kernel: the 1.0611 record's tiny model (a packed row of
    several documents, looped: its parallel lanes and gated skips too) with the kernels
    (interpreted) computing every residual mix and norm: the reference's loss and every
    gradient, as the jnp path matches them (tests/model_frontier_test.py; the kernels'
    float32 sums in another order moved the gradients by 2.3e-6 from the jnp path's)."""
    cfg, _, ref = frontier_ref
    cfg = dataclasses.replace(cfg, fusion_impl="pallas", fusion_kernels="residual_norm", scales_in_float32=True)
    assert layers.fusion_impl(cfg, "residual_norm") == "pallas"
    loss_error, errors = loss_and_gradient_errors(cfg, ref, "looped")
    # float32 against float32, the sums in other orders (the jnp path: 7e-7 and 1.4e-5 at most)
    assert loss_error <= 1e-5
    assert max(errors.values()) <= 1e-4, {k: e for k, e in errors.items() if e > 1e-4}


def test_kernels_lower_to_triton():
    """Forward and backward, at the training's launch (2,048-token sequences) and the short
    one (512), through Pallas's Triton lowering (the program exported for CUDA on any machine)."""
    scale = jax.ShapeDtypeStruct((512,), jnp.bfloat16)

    def loss(a, b, scale_a, scale_b):
        s, n = rn.add_norm(a, b, scale_a, scale_b, 0.5, "pallas")
        return jnp.sum(s.astype(jnp.float32)) + jnp.sum(n.astype(jnp.float32))

    for seq_len in (2048, 512):
        a = jax.ShapeDtypeStruct((2, seq_len, 512), jnp.bfloat16)
        lowered = triton_kernels_lowered(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)), a, a, scale, scale)
        assert len(lowered) == 2, (seq_len, lowered)


def test_program_rows_and_bad_impl():
    assert rn.program_rows(2048) == (128, 16) and rn.program_rows(48) == (16, 16) and rn.program_rows(12) == (4, 4)
    # training's sequences (and packed rows) keep the launch their curves were measured with; the
    # TTT's shorter windows and scored chunks take programs of 32 rows at most
    for kind in ("forward", "backward"):
        assert [rn.launch(rn.TUNED[kind], t) for t in (2048, 98_304, 1024, 512, 48)] == \
            [(128, 16, 8), (128, 16, 8), (32, 8, 4), (32, 8, 4), (16, 8, 4)]
    x = jnp.zeros((2, 4, 8))
    with pytest.raises(ValueError, match="no residual-norm kernels named"):
        rn.add_norm(x, x, None, jnp.ones(8), 1.0, "cuda")


TWO_DEVICES = textwrap.dedent(r"""
    import sys, json, math, re
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import residual_norm as rn
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 4)
    a, b, dn = (jax.random.normal(key, (4, 32, 16)) for key in k[:3])
    sa, sb = 1 + 0.1 * jax.random.normal(k[3], (2, 16))
    def f(a, b, sa, sb, impl):
        s, n = rn.add_norm(a, b, sa, sb, 0.5, impl)
        return jnp.sum(s) + jnp.sum(n * dn)
    grad = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)), static_argnums=4)
    ref = grad(a, b, sa, sb, "jnp")
    a_s, b_s = (jax.device_put(x, NamedSharding(mesh, P("d"))) for x in (a, b))
    out = grad(a_s, b_s, sa, sb, "pallas")
    hlo = grad.lower(a_s, b_s, sa, sb, "pallas").compile().as_text()
    gathered = [math.prod(map(int, dims.split(","))) for dims in re.findall(r"= f32\[([\d,]+)\][^=]*all-gather\(", hlo)]
    json.dump({"diff": [float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref))],
               "da_spec": str(out[1][0].sharding.spec), "gathered": gathered, "a_size": a.size}, sys.stdout)
""")


def test_kernels_split_along_rows_over_two_devices():
    """A batch sharded over devices (GSPMD: evaluation and TTT) runs the
    kernels on each device's rows: no all-gather of the activations (only of
    the scales' per-block partial sums), da stays sharded, values match the
    unsharded jnp path (float32 sums in another order, 1e-4 on O(10) values)."""
    out = run_on_cpu_devices(TWO_DEVICES)
    assert max(out["gathered"], default=0) <= out["a_size"] // 16
    assert out["da_spec"].startswith(("P('d'", "PartitionSpec('d'"))
    assert max(out["diff"]) < 1e-4


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
def test_triton_kernels_match_model_path_at_record_shape():
    """The Triton-backend kernels against the model's path compiled by XLA on
    the GPU, bf16, at a record-like shape (8 x 2048 rows of 512): the same
    roundings (that is how they were chosen, see the module docstring);
    the GPUs' rsqrt and the float32 sums' order may move a value by one bf16
    unit now and then (norm-relative 4e-3, fewer than 1% of the values
    differ); the scales' gradients, sums over 16,384 tokens, within 2^-7."""
    a, b, sa, sb, ds, dn = operands(jax.random.key(5), (8, 2048, 512), jnp.bfloat16)
    (s, n), grads = outputs_and_grads(fused(0.5), a, b, sa, sb, ds, dn)
    (s_ref, n_ref), grads_ref = outputs_and_grads(lambda *x: model_path(*x, 0.5), a, b, sa, sb, ds, dn)
    for name, x, x_ref in (("s", s, s_ref), ("n", n, n_ref), ("da", grads[0], grads_ref[0]),
                           ("db", grads[1], grads_ref[1])):
        assert rel(x, x_ref) < 4e-3, name
        assert float(jnp.mean((x != x_ref).astype(jnp.float32))) < 0.01, name
    assert rel(grads[2], grads_ref[2]) < 2 ** -7 and rel(grads[3], grads_ref[3]) < 2 ** -7
