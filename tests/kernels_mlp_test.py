"""kernels/mlp.py: the fused MLP's custom_vjp against autodiff of the jnp
expression (CPU, through the kernels' jnp references), and the Triton kernels
against those references (GPU)."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers
from golf_jax.config import ModelConfig
from kernels import mlp
from tests.conftest import run_on_cpu_devices, tiny_model_loss_and_grads


def operands(key, M, K, N, dtype, scale=1.0):
    kx, ku, kd = jax.random.split(key, 3)
    x = jax.random.normal(kx, (M, K), jnp.float32)
    w_up = jax.random.normal(ku, (N, K), jnp.float32) * K ** -0.5 * scale
    w_down = jax.random.normal(kd, (K, N), jnp.float32) * N ** -0.5
    return x.astype(dtype), w_up.astype(dtype), w_down.astype(dtype)


def value_and_grads(impl, x, w_up, w_down, slope, dy):
    def f(x, w_up, w_down):
        return jnp.sum((mlp.mlp(x, w_up, w_down, slope, impl) * dy).astype(jnp.float32))
    return jax.value_and_grad(f, argnums=(0, 1, 2))(x, w_up, w_down)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_custom_vjp_matches_autodiff_float32(slope):
    """The custom_vjp's forward and its hand-written backward, with the
    kernels' jnp references, give autodiff's values: float32 differs only in
    the order of accumulation (rel 1e-6)."""
    x, w_up, w_down = operands(jax.random.key(0), 3 * 37, 24, 40, jnp.float32)
    x = x.reshape(3, 37, 24)  # leading axes flatten into rows and come back
    dy = jax.random.normal(jax.random.key(1), (3, 37, 24))
    (v_ref, g_ref) = value_and_grads("jnp", x, w_up, w_down, slope, dy)
    (v, g) = value_and_grads("reference", x, w_up, w_down, slope, dy)
    assert mlp.mlp(x, w_up, w_down, slope, "reference").shape == x.shape
    assert rel(v, v_ref) < 1e-6
    for name, a, b in zip(("dx", "dw_up", "dw_down"), g, g_ref):
        assert rel(a, b) < 1e-6, name
    assert all(float(jnp.abs(a).max()) > 0 for a in g)


def test_custom_vjp_matches_autodiff_bfloat16():
    """In bf16 the references round where autodiff of the jnp expression
    rounds (pre, leaky, act, dact, 2 * dact * leaky), so on the CPU the two
    agree to the last bit but for the order of the matmuls' accumulation."""
    x, w_up, w_down = operands(jax.random.key(2), 256, 64, 192, jnp.bfloat16)
    dy = jax.random.normal(jax.random.key(3), (256, 64)).astype(jnp.bfloat16)
    (_, g_ref) = value_and_grads("jnp", x, w_up, w_down, 0.5, dy)
    (_, g) = value_and_grads("reference", x, w_up, w_down, 0.5, dy)
    y_ref, y = (mlp.mlp(x, w_up, w_down, 0.5, impl) for impl in ("jnp", "reference"))
    # bf16 keeps 8 significant bits (2^-8 = 3.9e-3 relative per rounding): a
    # different accumulation order moves a few values by one unit.
    assert rel(y, y_ref) < 4e-3
    for name, a, b in zip(("dx", "dw_up", "dw_down"), g, g_ref):
        assert rel(a, b) < 4e-3, name


def test_forward_saves_only_the_pre_activation():
    """The backward's residuals: x, both weights and pre; not act, not the
    leaky values (that is the memory the fused path saves)."""
    x, w_up, w_down = operands(jax.random.key(4), 32, 16, 48, jnp.float32)
    _, res = mlp._fused_mlp_fwd(x, w_up, w_down, 0.5, "reference")
    assert [r.shape for r in res] == [(32, 16), (48, 16), (16, 48), (32, 48)]
    np.testing.assert_allclose(res[3], x @ w_up.T, rtol=1e-5, atol=1e-6)  # float32, another summation order


def test_model_loss_and_grads_same_with_reference_kernels():
    """The whole model with the MLP through the custom_vjp equals the jnp path."""
    out = tiny_model_loss_and_grads({impl: dict(mlp_impl=impl) for impl in ("jnp", "reference")})
    assert rel(out["reference"][0], out["jnp"][0]) < 1e-6
    for a, b in zip(jax.tree.leaves(out["reference"][1]), jax.tree.leaves(out["jnp"][1])):
        assert rel(a, b) < 1e-5


def test_mlp_impl_resolution_and_errors():
    bf16 = ModelConfig(compute_dtype="bfloat16")
    assert layers.mlp_impl(bf16) == ("triton" if mlp.triton_available() else "jnp")
    assert layers.mlp_impl(dataclasses.replace(bf16, compute_dtype="float32")) == "jnp"  # the kernels are bf16
    assert layers.mlp_impl(dataclasses.replace(bf16, model_dim=100, num_heads=4, num_kv_heads=2)) == "jnp"  # rows % 8
    assert layers.mlp_impl(dataclasses.replace(bf16, mlp_impl="jnp")) == "jnp"
    if jax.default_backend() != "gpu":
        assert not mlp.triton_available() and layers.mlp_impl(bf16) == "jnp"
    assert mlp.triton_supports(512, 1536) and mlp.triton_supports(512, 1792) and not mlp.triton_supports(512, 1540)
    x = jnp.zeros((4, 8), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16" if mlp.triton_available() else "need a GPU and jax-triton"):
        mlp.mlp(x, jnp.zeros((12, 8)), jnp.zeros((8, 12)), 0.5, "triton")
    with pytest.raises(ValueError, match="no MLP kernels named"):
        mlp.mlp(x, jnp.zeros((12, 8)), jnp.zeros((8, 12)), 0.5, "cuda")


# ----------------------------------------------------------------------------- Triton, no GPU needed


def test_triton_kernels_compile_for_hopper():
    """Each kernel compiles for sm_90 with its tuned config at the record's
    shape, and the code is the fast path: wgmma tensor-core instructions fed
    by cp.async software pipelining. The ragged shape compiles the masked
    tile edges. Needs triton (the device image's 3.6), not a GPU."""
    pytest.importorskip("triton")
    from kernels import mlp_triton as mt

    record = dict(M=98_304, N=1536, K=512, SLOPE=0.5, NUM_SMS=132)
    builds = [(mt.up_act_kernel, mt.TUNED["up_act"], dict(record, SAVE_PRE=True)),
              (mt.down_grad_kernel, mt.TUNED["down_grad"], record),
              (mt.up_act_kernel, mt.TUNED["up_act"], dict(record, M=1000, N=200, K=64, SLOPE=0.0, SAVE_PRE=False))]
    for kernel, config, constants in builds:
        ptx = mt.compile_ptx(kernel, config, **constants).asm["ptx"]
        assert "wgmma.mma_async" in ptx and "cp.async" in ptx, (kernel, config)


# ----------------------------------------------------------------------------- GPU


def fresh_key():
    """New random operands on every run (the seed is printed for a replay)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return jax.random.key(seed)


# The shapes: the record's per-device micro-step rows are 98,304; a ragged row
# count and a ragged hidden size exercise the kernels' tile edges.
GPU_SHAPES = [(98_304, 512, 1536), (4_100, 512, 1536), (1_000, 64, 200)]


@pytest.mark.gpu
@pytest.mark.parametrize("M,K,N", GPU_SHAPES)
@pytest.mark.parametrize("slope", [0.5, 0.0])
def test_triton_kernels_match_references(M, K, N, slope):
    """Each kernel against its jnp reference, on the GPU, bf16. Both round the
    same quantities to bf16; they differ in the fp32 accumulation order
    (Triton's tiles vs cuBLAS), which moves a bf16 result by one unit (2^-8
    relative) now and then: norm-relative error < 4e-3, and fewer than 1% of
    the values differ at all."""
    from kernels import mlp_triton

    x, w_up, w_down = operands(fresh_key(), M, K, N, jnp.bfloat16)
    dy = jax.random.normal(fresh_key(), (M, K)).astype(jnp.bfloat16)
    act, pre = jax.jit(mlp_triton.up_act, static_argnums=(2, 3))(x, w_up, slope, True)
    act_r, pre_r = jax.jit(mlp.up_act_reference, static_argnums=(2, 3))(x, w_up, slope, True)
    act_only, none = jax.jit(mlp_triton.up_act, static_argnums=(2, 3))(x, w_up, slope, False)
    assert none is None
    np.testing.assert_array_equal(act_only, act)
    dpre, act_b = jax.jit(mlp_triton.down_grad, static_argnums=3)(dy, w_down, pre_r, slope)
    dpre_r, act_br = jax.jit(mlp.down_grad_reference, static_argnums=3)(dy, w_down, pre_r, slope)
    for name, a, b in (("pre", pre, pre_r), ("act", act, act_r), ("dpre", dpre, dpre_r), ("act (bwd)", act_b, act_br)):
        assert a.shape == b.shape and a.dtype == b.dtype == jnp.bfloat16, name
        assert rel(a, b) < 4e-3, name
        assert float(jnp.mean((a != b).astype(jnp.float32))) < 0.01, name
    np.testing.assert_array_equal(act_b, mlp.leaky_squared(pre_r, slope))  # elementwise only: exact


@pytest.mark.gpu
def test_triton_mlp_gradients_match_jnp_path():
    """The whole fused MLP (forward, custom_vjp backward) against autodiff of
    the jnp path, bf16 on the GPU, at a record-like shape. The gradients'
    GEMMs are the same XLA GEMMs; their inputs differ by the kernels' bf16
    units above, so the tolerance is a few bf16 units of the norm."""
    x, w_up, w_down = operands(fresh_key(), 8 * 2048, 512, 1536, jnp.bfloat16)
    dy = jax.random.normal(fresh_key(), (8 * 2048, 512)).astype(jnp.bfloat16)
    (v_ref, g_ref) = jax.jit(value_and_grads, static_argnums=(0, 4))("jnp", x, w_up, w_down, 0.5, dy)
    (v, g) = jax.jit(value_and_grads, static_argnums=(0, 4))("triton", x, w_up, w_down, 0.5, dy)
    assert rel(v, v_ref) < 4e-3
    for name, a, b in zip(("dx", "dw_up", "dw_down"), g, g_ref):
        assert rel(a, b) < 8e-3, name


TWO_DEVICES = textwrap.dedent("""
    import sys, json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import mlp
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (64, 16))
    wu, wd = jax.random.normal(k[1], (48, 16)) * 0.25, jax.random.normal(k[2], (16, 48)) * 0.15
    dy = jax.random.normal(k[3], (64, 16))
    f = lambda x, wu, wd, impl, dy: jnp.sum(mlp.mlp(x, wu, wd, 0.5, impl) * dy)
    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)), static_argnums=3)
    ref = g(x, wu, wd, "jnp", dy)
    xs = jax.device_put(x, NamedSharding(mesh, P("d", None)))
    out = g(xs, wu, wd, "reference", dy)
    hlo = g.lower(xs, wu, wd, "reference", dy).compile().as_text()
    local = lambda x, wu, wd, dy: jax.grad(f, argnums=(0, 1))(x, wu, wd, "reference", dy)
    sm = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d", None), P(), P(), P("d", None)),
                               out_specs=(P("d", None), P("d")), check_vma=False))
    dx_sm, _ = sm(xs, wu, wd, dy)
    json.dump({"diff": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))],
               "dx_spec": str(out[1][0].sharding.spec), "all_gather": "all-gather" in hlo,
               "shard_map_dx_diff": float(jnp.max(jnp.abs(dx_sm - ref[1][0])))}, sys.stdout)
""")


def test_kernels_split_along_rows_over_two_devices():
    """A row-sharded batch (TTT's windows over several GPUs) runs the kernels
    on each device's rows: no all-gather of the activations, the gradient of
    x stays sharded, and values match the unsharded jnp path (float32 sums in
    another order: 1e-4 absolute on O(10) values). Inside shard_map (the
    training step) the kernels run on the local rows as they are."""
    out = run_on_cpu_devices(TWO_DEVICES)
    assert not out["all_gather"] and out["dx_spec"] in ("P('d', None)", "PartitionSpec('d', None)")
    assert max(out["diff"]) < 1e-4 and out["shard_map_dx_diff"] < 1e-4
