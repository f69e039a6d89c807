"""kernels/xsa.py: the Pallas XSA kernels (interpreted on the CPU, Triton on
GPUs) and their custom_vjp against autodiff of xsa_reference."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers
from kernels import xsa
from tests.conftest import run_on_cpu_devices, tiny_model_loss_and_grads, triton_kernels_lowered
from tests.model_frontier_test import loss_and_gradient_errors


def operands(key, B, T, H, K, D, dtype):
    """y, v and a cotangent for out, standard normal, in `dtype`."""
    ky, kv, kc = jax.random.split(key, 3)
    return tuple(jax.random.normal(k, shape, jnp.float32).astype(dtype)
                 for k, shape in ((ky, (B, T, H, D)), (kv, (B, T, K, D)), (kc, (B, T, H, D))))


def value_and_grads(impl, y, v, cotangent):
    """(out, (dy, dv)): dy and dv are the gradients of sum(out * cotangent)."""
    def f(y, v):
        return jnp.sum((xsa.xsa(y, v, impl) * cotangent).astype(jnp.float32))
    return xsa.xsa(y, v, impl), jax.grad(f, argnums=(0, 1))(y, v)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bf16_ulps(a, b) -> float:
    """The largest |a - b| in units of the bf16 spacing at |b| (bf16 keeps 16
    fewer significand bits than float32: its spacing is float32's times 2^16)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b) / (np.spacing(np.abs(b)) * 2.0 ** 16)))


@pytest.mark.parametrize("B,T,H,K", [(2, 64, 4, 2), (2, 48, 2, 2)])  # G = 2, and G = 1 in 32-row blocks
def test_pallas_matches_reference_float32(B, T, H, K):
    """The kernels' forward and hand-derived backward against autodiff of the
    reference. Float32 throughout: only the order of the sums differs (rel 1e-6)."""
    y, v, cot = operands(jax.random.key(0), B, T, H, K, 16, jnp.float32)
    out_ref, (dy_ref, dv_ref) = value_and_grads("jnp", y, v, cot)
    out, (dy, dv) = value_and_grads("pallas", y, v, cot)
    assert out.shape == y.shape and dy.shape == y.shape and dv.shape == v.shape
    assert rel(out, out_ref) <= 1e-6
    assert rel(dy, dy_ref) <= 1e-6
    assert rel(dv, dv_ref) <= 1e-6
    assert float(jnp.abs(dv).min()) > 0 and float(jnp.abs(out - y).max()) > 0.1  # XSA did remove something


def test_pallas_matches_reference_bfloat16():
    """bf16 operands: both compute the same float32 values (but for the order of
    the sums) and round them once to bf16, so an output moves by at most one
    bf16 step. The gradients are one bf16 rounding of float32 values, but dv's
    float32 value comes from a cancellation (dvn minus its projection), where a
    summation-order difference can exceed one step of a small result: there the
    bound is the norm-relative one of one rounding, 2^-8 = 3.9e-3."""
    y, v, cot = operands(jax.random.key(1), 2, 64, 4, 2, 16, jnp.bfloat16)
    out_ref, (dy_ref, dv_ref) = value_and_grads("jnp", y, v, cot)
    out, (dy, dv) = value_and_grads("pallas", y, v, cot)
    assert out.dtype == dy.dtype == dv.dtype == jnp.bfloat16
    assert bf16_ulps(out, out_ref) <= 1
    assert bf16_ulps(dy, dy_ref) <= 1
    assert rel(dv, dv_ref) < 4e-3


def gated_value_and_grads(impl, y, v, g, cotangent):
    """(out, (dy, dv, dg)) of xsa with the head gate g [B, T, H]."""
    def f(y, v, g):
        return jnp.sum((xsa.xsa(y, v, impl, g) * cotangent).astype(jnp.float32))
    return xsa.xsa(y, v, impl, g), jax.grad(f, argnums=(0, 1, 2))(y, v, g)


def gate(key, B, T, H):
    return jax.nn.sigmoid(jax.random.normal(key, (B, T, H), jnp.float32))


def test_gated_pallas_matches_reference():
    """The head gate inside the kernels against autodiff of gated_reference (XSA's float32
    result gated, rounded once, as the reference computes it): float32, the sums in another
    order (rel 1e-6); bf16 (interpreted: the same float32 values but for that order), the
    output and dy within one bf16 step, dv a cancellation as ungated (norm-relative 2^-8),
    dg float32 (rel 1e-6). Apart (XSA's kernel, then `layers.head_gate`) XSA's output is
    rounded before the gate: a bf16 step off the reference's in some values."""
    y, v, cot = operands(jax.random.key(6), 2, 64, 4, 2, 16, jnp.float32)
    g = gate(jax.random.key(7), 2, 64, 4)
    out_ref, grads_ref = gated_value_and_grads("jnp", y, v, g, cot)
    out, grads = gated_value_and_grads("pallas", y, v, g, cot)
    assert rel(out, out_ref) <= 1e-6 and all(rel(a, b) <= 1e-6 for a, b in zip(grads, grads_ref))
    assert grads[2].shape == g.shape and rel(out, xsa.xsa(y, v, "pallas")) > 0.1  # the gate acted
    y, v, cot = (x.astype(jnp.bfloat16) for x in (y, v, cot))
    out_ref, (dy_ref, dv_ref, dg_ref) = gated_value_and_grads("jnp", y, v, g, cot)
    out, (dy, dv, dg) = gated_value_and_grads("pallas", y, v, g, cot)
    assert out.dtype == dy.dtype == dv.dtype == jnp.bfloat16 and dg.dtype == jnp.float32
    assert bf16_ulps(out, out_ref) <= 1 and bf16_ulps(dy, dy_ref) <= 1
    assert rel(dv, dv_ref) < 4e-3 and rel(dg, dg_ref) <= 1e-6
    apart = (xsa.xsa(y, v, "pallas").astype(jnp.float32) * g[..., None]).astype(jnp.bfloat16)
    assert 0 < float(jnp.mean(apart != out_ref)) < 0.5  # the double rounding the kernel avoids


def test_kernels_lower_to_triton():
    """Forward and backward, gated and not, at the record's head layout, through Pallas's
    Triton lowering (the program exported for CUDA on any machine): the gate's one-column
    tiles and the rest are accepted."""
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)  # noqa: E731
    y, v, g = shape(2, 64, 8, 64), shape(2, 64, 4, 64), jax.ShapeDtypeStruct((2, 64, 8), jnp.float32)
    for label, args in (("ungated", (y, v)), ("gated", (y, v, g))):
        def loss(*a):
            return jnp.sum(xsa.xsa(a[0], a[1], "pallas", *a[2:]).astype(jnp.float32))
        grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))))
        assert triton_kernels_lowered(grads, *args) == ["forward_kernel", "backward_kernel"], label


def test_degenerate_value_vectors():
    """v == 0 at one position (and, at another, 0 < |v| < eps, F.normalize's
    clamp): finite outputs equal to the reference's (there out = y and
    vn = v / eps). The clamp branch's gradient is autodiff's, dv = dvn / eps;
    at v == 0 autodiff gives NaN (sqrt's derivative at 0) where the kernel
    gives dv = 0 (dvn = 0 there: PyTorch's value) and dy = the cotangent.
    Float32: rel 1e-6 as above."""
    y, v, cot = operands(jax.random.key(2), 2, 32, 4, 2, 8, jnp.float32)
    v = v.at[0, 5, 1].set(0.0).at[1, 7, 0].multiply(1e-14)
    out_ref, (dy_ref, dv_ref) = value_and_grads("jnp", y, v, cot)
    out, (dy, dv) = value_and_grads("pallas", y, v, cot)
    assert bool(jnp.all(jnp.isfinite(out))) and bool(jnp.all(jnp.isfinite(dy))) and bool(jnp.all(jnp.isfinite(dv)))
    assert rel(out, out_ref) <= 1e-6 and rel(dy, dy_ref) <= 1e-6
    np.testing.assert_array_equal(out[0, 5, 2:], y[0, 5, 2:])  # heads 2, 3 use KV head 1: nothing removed
    np.testing.assert_array_equal(dy[0, 5, 2:], cot[0, 5, 2:])
    assert bool(jnp.all(jnp.isnan(dv_ref[0, 5, 1]))) and bool(jnp.all(dv[0, 5, 1] == 0))
    finite = jnp.ones(dv.shape[:3], bool).at[0, 5, 1].set(False)[..., None]
    assert rel(jnp.where(finite, dv, 0), jnp.where(finite, dv_ref, 0)) <= 1e-6
    assert float(jnp.abs(dv[1, 7, 0]).max()) > 1e9  # the clamp branch's dvn / 1e-12 is in the compared values


def test_forward_saves_only_the_inputs():
    """The backward's residuals are y and v as they came, bf16: no float32 unit
    vectors or projections are kept between the passes."""
    y, v, _ = operands(jax.random.key(3), 1, 16, 4, 2, 8, jnp.bfloat16)
    y2, v2 = y.reshape(16, 32), v.reshape(16, 16)
    _, residuals = xsa._fused_xsa_fwd(y2, v2, None, 8)
    assert len(residuals) == 3 and residuals[0] is y2 and residuals[1] is v2 and residuals[2] is None  # no gate


def test_block_rows_tile_the_rows():
    assert xsa.block_rows(98_304, 64, interpret=False) == 64
    assert xsa.block_rows(98_304, 128, interpret=False) == 128
    assert xsa.block_rows(96, 64, interpret=False) == 32  # the largest power of two dividing the rows
    assert xsa.block_rows(6, 64, interpret=False) == 2  # Triton tiles are powers of two, however small
    assert xsa.block_rows(6, 64, interpret=True) == 6  # the interpreter takes ragged rows in one block
    with pytest.raises(ValueError, match="power of two"):
        xsa.block_rows(96, 48, interpret=False)


def test_tuned_launch_rebuilds_the_kernels(monkeypatch):
    """TUNED is read when the kernels are built: a sweep that changes it gets
    kernels built for the new launch parameters (and the same values)."""
    y, v, cot = operands(jax.random.key(5), 1, 64, 4, 2, 8, jnp.float32)
    out_ref, (dy_ref, dv_ref) = value_and_grads("pallas", y, v, cot)
    y2, v2 = y.reshape(64, 32), v.reshape(64, 16)
    before = xsa._kernels(*xsa._layout(y2, v2, 8))
    monkeypatch.setitem(xsa.TUNED, "backward", dict(block_rows=16, num_warps=2, num_stages=1))
    assert xsa._kernels(*xsa._layout(y2, v2, 8)) is not before
    out, (dy, dv) = value_and_grads("pallas", y, v, cot)
    assert rel(out, out_ref) <= 1e-6 and rel(dy, dy_ref) <= 1e-6 and rel(dv, dv_ref) <= 1e-6


def test_bad_arguments_raise():
    y, v, _ = operands(jax.random.key(4), 1, 8, 4, 2, 8, jnp.float32)
    with pytest.raises(ValueError, match="no XSA kernels named 'triton'"):
        xsa.xsa(y, v, "triton")
    with pytest.raises(ValueError, match="H a multiple of K"):
        xsa.xsa(y, jnp.zeros((1, 8, 3, 8)), "pallas")
    with pytest.raises(ValueError, match="power-of-two head dim"):
        xsa.xsa(jnp.zeros((1, 8, 4, 12)), jnp.zeros((1, 8, 2, 12)), "pallas")


def test_model_loss_and_grads_same_with_pallas_fusions():
    """The whole model (XSA on every layer) with the XSA kernel alone
    (fusion_impl="pallas", fusion_kernels="xsa") equals the jnp path:
    float32, the sums in another order (rel 1e-5)."""
    out = tiny_model_loss_and_grads({"jnp": {}, "pallas": dict(fusion_impl="pallas", fusion_kernels="xsa")})
    assert rel(out["pallas"][0], out["jnp"][0]) < 1e-5
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["jnp"][1])):
        assert rel(a, b) < 1e-5


def test_frontier_model_with_the_gate_in_the_kernels_matches_the_reference(frontier_ref):
    """The 1.0611 record's tiny model (XSA and the sparse head gate on every layer; a
    packed row; unlooped, a smaller program than looped, whose layers gate alike) with
    the gate inside XSA's kernels (xsa_gate, interpreted): the reference's loss and every
    gradient, at the jnp path's tolerances (tests/model_frontier_test.py). The TTT's
    chunk step runs it looped (tests/ttt_lora_test.py)."""
    cfg, _, ref = frontier_ref
    cfg = dataclasses.replace(cfg, fusion_impl="pallas", fusion_kernels="xsa,xsa_gate")
    assert layers.fusion_impl(cfg, "xsa_gate") == "pallas" and cfg.sparse_attn_gate and cfg.xsa_on(0)
    loss_error, errors = loss_and_gradient_errors(cfg, ref, "unlooped")
    # float32 against float32, the sums in other orders (the jnp path: 7e-7 and 1.4e-5 at most)
    assert loss_error <= 1e-5
    assert max(errors.values()) <= 1e-4, {k: e for k, e in errors.items() if e > 1e-4}
    assert any("attn_gate" in k for k in errors)  # the gate's own weights are among those checked


TWO_DEVICES = textwrap.dedent("""
    import sys, json
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import xsa
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 3)
    y, v = jax.random.normal(k[0], (4, 16, 4, 8)), jax.random.normal(k[1], (4, 16, 2, 8))
    c = jax.random.normal(k[2], (4, 16, 4, 8))
    f = lambda y, v, impl: jnp.sum(xsa.xsa(y, v, impl) * c)
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1)), static_argnums=2)
    ref = g(y, v, "jnp")
    rows = NamedSharding(mesh, P("d"))
    ys, vs = jax.device_put(y, rows), jax.device_put(v, rows)
    out = g(ys, vs, "pallas")
    hlo = g.lower(ys, vs, "pallas").compile().as_text()
    gate = jax.nn.sigmoid(jax.random.normal(k[0], (4, 16, 4)))
    fg = lambda y, v, gate, impl: jnp.sum(xsa.xsa(y, v, impl, gate) * c)
    gg = jax.jit(jax.value_and_grad(fg, argnums=(0, 1, 2)), static_argnums=3)
    gated_ref, gs = gg(y, v, gate, "jnp"), jax.device_put(gate, rows)
    gated = gg(ys, vs, gs, "pallas")
    gated_hlo = gg.lower(ys, vs, gs, "pallas").compile().as_text()
    diff = lambda out, ref: [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))]
    json.dump({"diff": diff(out, ref) + diff(gated, gated_ref),
               "specs": [str(d.sharding.spec) for d in (*out[1], *gated[1])],
               "all_gather": "all-gather" in hlo + gated_hlo}, sys.stdout)
""")


def test_kernels_split_along_rows_over_two_devices():
    """A batch sharded over two devices runs the kernels, with and without the gate, on each device's rows:
    no all-gather, the gradients stay sharded like their inputs, and the values
    are the unsharded jnp path's (float32 sums in another order: 1e-4 absolute
    on O(10) values)."""
    out = run_on_cpu_devices(TWO_DEVICES)
    assert not out["all_gather"], out
    assert all(spec.startswith(("P('d'", "PartitionSpec('d'")) for spec in out["specs"]), out["specs"]
    assert max(out["diff"]) < 1e-4


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("B", [4, 48])  # 48 x 2048: the record's 98,304 rows, a (1536, 4) grid of 64-row blocks
def test_triton_kernels_match_reference_at_record_shape(B):
    """The Triton-backend kernels against XLA's run of the reference, bf16 at
    the record's head layout (8 query heads in 4 KV groups: each program
    takes one group's 2 heads). Both round the same float32 values once (sqrt
    and the divisions correctly rounded in both); the sums' order and fused
    multiply-adds move a float32 value by a few units of float32, so an output
    moves by at most one bf16 step, but where the difference cancels to a
    value near zero (|out| < ~1e-5 of O(1) operands) a few float32 units of
    the operands exceed a step of the result: 1e-6 absolute on top. dv is a
    cancellation too: norm-relative one rounding, 2^-8. Fewer than 1% of the
    values may differ at all."""
    y, v, cot = operands(jax.random.key(int.from_bytes(os.urandom(4), "little")), B, 2048, 8, 4, 64, jnp.bfloat16)
    run = jax.jit(value_and_grads, static_argnums=0)
    out_ref, (dy_ref, dv_ref) = run("jnp", y, v, cot)
    out, (dy, dv) = run("pallas", y, v, cot)
    for name, a, b in (("out", out, out_ref), ("dy", dy, dy_ref)):
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.abs(a32 - b32) <= np.spacing(np.abs(b32)) * 2.0 ** 16 + 1e-6), name
        assert np.mean(a32 != b32) < 0.01, name
    assert rel(dv, dv_ref) < 4e-3
    assert float(np.mean(np.asarray(dv != dv_ref))) < 0.01


@pytest.mark.gpu
def test_triton_gated_kernels_match_reference_at_record_shape():
    """The gate inside the Triton-backend kernels against XLA's run of gated_reference, bf16,
    48 x 2048 rows of the 1.0611 record's head layout (8 query heads in 4 KV groups). Both
    gate the same float32 XSA values (but for the sums' order and fused multiply-adds) and
    round once: the output and dy as the ungated test's (a bf16 step, plus 1e-6 absolute
    where a result cancels near zero; fewer than 1% of the values apart), dv norm-relative
    2^-8. dg: float32 sums over 64 products of float32 values a few float32 units apart,
    in another order: each within 1e-5 of the largest (a few float32 units of the
    products' sum of magnitudes)."""
    key = jax.random.key(int.from_bytes(os.urandom(4), "little"))
    y, v, cot = operands(key, 48, 2048, 8, 4, 64, jnp.bfloat16)
    g = gate(jax.random.fold_in(key, 1), 48, 2048, 8)
    run = jax.jit(gated_value_and_grads, static_argnums=0)
    out_ref, (dy_ref, dv_ref, dg_ref) = run("jnp", y, v, g, cot)
    out, (dy, dv, dg) = run("pallas", y, v, g, cot)
    for name, a, b in (("out", out, out_ref), ("dy", dy, dy_ref)):
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.all(np.abs(a32 - b32) <= np.spacing(np.abs(b32)) * 2.0 ** 16 + 1e-6), name
        assert np.mean(a32 != b32) < 0.01, name
    assert rel(dv, dv_ref) < 4e-3
    dg32, dg_ref32 = np.asarray(dg, np.float32), np.asarray(dg_ref, np.float32)
    assert np.max(np.abs(dg32 - dg_ref32)) <= 1e-5 * np.max(np.abs(dg_ref32))
