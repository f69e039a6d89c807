"""kernels/softcap_ce.py: the fused softcap + cross-entropy kernels (Pallas's
interpreter on the CPU, its Triton backend on GPUs) against autodiff of the
module's reference, and the reference against the model's jnp path."""

from __future__ import annotations

import dataclasses
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers, model
from golf_jax.config import ModelConfig
from kernels import softcap_ce as ce
from tests.conftest import run_on_cpu_devices, tiny_model_loss_and_grads, triton_kernels_lowered

SOFTCAP = 30.0


def operands(key, shape, vocab, dtype, scale=8.0):
    """Pre-softcap logits [*shape, V] (std `scale`: many beyond the cap's knee),
    targets and a cotangent for the per-token losses."""
    kz, kt, kc = jax.random.split(key, 3)
    z = (scale * jax.random.normal(kz, (*shape, vocab))).astype(dtype)
    return z, jax.random.randint(kt, shape, 0, vocab), jax.random.normal(kc, shape)


def nll_and_grad(fn, z, targets, cot):
    """(per-token losses, dz of sum(losses * cot)), one compiled program."""
    def f(z):
        nll = fn(z, targets)
        return jnp.sum(nll * cot), nll
    (_, nll), dz = jax.jit(jax.value_and_grad(f, has_aux=True))(z)
    return nll, dz


def kernel(z, targets):
    return ce.softcap_nll(z, targets, SOFTCAP, "pallas")


def reference(z, targets):
    return ce.softcap_nll(z, targets, SOFTCAP, "jnp")


def model_path(z, targets):
    """What golf_jax.model computes from the head's pre-softcap logits."""
    return model.nll_from_logits(layers.softcap(z.astype(jnp.float32), SOFTCAP), targets)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def lse_units(nll, nll_ref, vocab) -> float:
    """The largest |nll - nll_ref| in float32 units at the larger of |nll_ref|
    and C + log V (lse's bound): where the losses and their lse are rounded."""
    a, b = np.asarray(nll, np.float32), np.asarray(nll_ref, np.float32)
    return float(np.max(np.abs(a - b) / np.spacing(np.maximum(np.abs(b), np.float32(SOFTCAP + np.log(vocab))))))


def bf16_units(a, b) -> np.ndarray:
    """|a - b| in units of the bf16 spacing at |b| (float32's spacing times 2^16)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b) / (np.spacing(np.abs(b)) * 2.0 ** 16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_is_the_model_path(dtype):
    """Through the head (matmul, round_logits, softcap, cross-entropy):
    layers.head_nll's jnp reference equals the model's lm_head +
    nll_from_logits bit for bit, losses and the gradients of h and w (the
    reference's z * (1/C) is what XLA compiles the model's z / C to)."""
    cfg = ModelConfig(vocab_size=64, model_dim=32, compute_dtype=jnp.dtype(dtype).name)
    kh, kw, kt = jax.random.split(jax.random.key(0), 3)
    h, w = jax.random.normal(kh, (2, 8, 32)).astype(dtype), (2 * jax.random.normal(kw, (64, 32))).astype(dtype)
    targets = jax.random.randint(kt, (2, 8), 0, 64)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda h, w: jnp.mean(fn(h, w)), argnums=(0, 1)))(h, w)
    got = run(lambda h, w: layers.head_nll(w, cfg, h, targets, "jnp"))
    want = run(lambda h, w: model.nll_from_logits(layers.lm_head(w, cfg, h), targets))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,vocab", [((2, 16), 1024), ((6,), 8192), ((3, 5), 64)])
def test_kernels_match_reference_float32(shape, vocab):
    """Float32: 32 rows in 2 programs of 16, V = 1024 in 2 column blocks (one
    online rescale); a ragged 6 rows of V = 8192 in 16 blocks; 15 rows of 64.
    Every value and operation is the reference's but the order of the sum of
    exponentials s and its online rescaling (s relative ~1e-7): log(s) + m
    rounds to a float32 unit of lse either way, and the loss lse - y[target]
    one more (2 units); dz norm-relative 1e-6 (every dz of a row is scaled by
    g / s)."""
    z, targets, cot = operands(jax.random.key(1), shape, vocab, jnp.float32)
    nll, dz = nll_and_grad(kernel, z, targets, cot)
    nll_ref, dz_ref = nll_and_grad(reference, z, targets, cot)
    assert nll.shape == shape and nll.dtype == jnp.float32 and dz.dtype == jnp.float32
    assert lse_units(nll, nll_ref, vocab) <= 2
    assert rel(dz, dz_ref) <= 1e-6


def test_kernels_match_reference_bfloat16():
    """bf16 logits (as the head's matmul returns them): the same float32
    values but for s's summation order; dz rounded once to bf16 where
    autodiff rounds, so a value moves only where its float32 value lies
    within a few float32 units of a bf16 rounding boundary: by one bf16 unit,
    in ~2^-16 x (float32 units apart) of the values (bound 1e-3)."""
    z, targets, cot = operands(jax.random.key(2), (4, 32), 1024, jnp.bfloat16)
    nll, dz = nll_and_grad(kernel, z, targets, cot)
    nll_ref, dz_ref = nll_and_grad(reference, z, targets, cot)
    assert dz.dtype == jnp.bfloat16
    assert lse_units(nll, nll_ref, 1024) <= 2
    units = bf16_units(dz, dz_ref)
    assert units.max() <= 1 and np.mean(units > 0) < 1e-3


def test_targets_out_of_range_as_the_reference():
    """Negative targets count from the end (take_along_axis); one past the
    vocabulary gives a NaN loss, as the jnp path's gather fill."""
    z, _, _ = operands(jax.random.key(3), (4,), 64, jnp.float32)
    targets = jnp.array([0, 63, -1, 64])
    got, want = jax.jit(kernel)(z, targets), jax.jit(reference)(z, targets)
    assert float(got[2]) == float(jax.jit(kernel)(z, jnp.array([0, 63, 63, 0]))[2])
    assert lse_units(got[:3], want[:3], 64) <= 2
    assert bool(jnp.isnan(got[3])) and bool(jnp.isnan(want[3]))


def test_forward_saves_no_float32_logits():
    """The backward's residuals: z as it came (bf16), the targets, and two
    float32 numbers a row (its max and its sum of exponentials)."""
    z, targets, _ = operands(jax.random.key(4), (16,), 64, jnp.bfloat16)
    _, residuals = ce._fused_fwd(z, targets[:, None], SOFTCAP)
    assert residuals[0] is z and [r.shape for r in residuals[2:]] == [(16, 1), (16, 1)]


def test_blocks_launch_and_bad_arguments(monkeypatch):
    launch = dict(block_rows=16, block_cols=512)
    assert ce.blocks(98_304, 8192, launch, interpret=False) == (16, 512)
    assert ce.blocks(6, 1000, launch, interpret=False) == (2, 8)  # powers of two dividing N and V
    assert ce.blocks(6, 1024, launch, interpret=True) == (6, 512)  # the interpreter: ragged rows in one block
    with pytest.raises(ValueError, match="block_cols must be a power of two"):
        ce.blocks(16, 1024, dict(block_rows=16, block_cols=384), interpret=False)
    before = ce._kernels(64, "float32", SOFTCAP, ce._launch())
    monkeypatch.setitem(ce.TUNED, "backward", dict(block_rows=8, block_cols=32, num_warps=4, num_stages=1))
    assert ce._kernels(64, "float32", SOFTCAP, ce._launch()) is not before  # TUNED is part of the cache key
    z, targets, _ = operands(jax.random.key(5), (4,), 64, jnp.float32)
    with pytest.raises(ValueError, match="no softcapped cross-entropy kernels named"):
        ce.softcap_nll(z, targets, SOFTCAP, "triton")
    with pytest.raises(ValueError, match="integer targets"):
        ce.softcap_nll(z, targets[:2], SOFTCAP, "pallas")
    with pytest.raises(ValueError, match="softcap must be positive"):
        ce.softcap_nll(z, targets, 0.0, "pallas")


def test_fusion_impl_resolution():
    """Off unless named in fusion_kernels; then "pallas" wherever asked,
    "auto" on GPUs in bf16 with a power-of-two vocabulary; it multiplies by no
    scale, so scales_in_float32 does not matter."""
    named = ModelConfig(compute_dtype="bfloat16", fusion_kernels="xsa,softcap_ce")
    assert layers.fusion_impl(ModelConfig(fusion_impl="pallas"), "softcap_ce") == "jnp"  # not in the default list
    assert layers.fusion_impl(dataclasses.replace(named, fusion_impl="pallas", scales_in_float32=False),
                              "softcap_ce") == "pallas"
    auto = dataclasses.replace(named, fusion_impl="auto")
    assert layers.fusion_impl(auto, "softcap_ce") == ("pallas" if jax.default_backend() == "gpu" else "jnp")
    assert layers.fusion_impl(dataclasses.replace(auto, vocab_size=1000), "softcap_ce") == "jnp"


def test_model_loss_and_grads_same_through_the_kernel():
    """The whole tiny model (float32, V = 64) with the kernel alone equals the
    jnp path: s's summation order only (rel 1e-6)."""
    out = tiny_model_loss_and_grads({"jnp": {}, "pallas": dict(fusion_impl="pallas", fusion_kernels="softcap_ce")})
    assert rel(out["pallas"][0], out["jnp"][0]) < 1e-6
    for a, b in zip(jax.tree.leaves(out["pallas"][1]), jax.tree.leaves(out["jnp"][1])):
        assert rel(a, b) < 1e-6


TWO_DEVICES = textwrap.dedent(r"""
    import sys, json
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    sys.path.insert(0, sys.argv[1])
    from kernels import softcap_ce as ce
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    k = jax.random.split(jax.random.key(0), 3)
    z = 8 * jax.random.normal(k[0], (4, 8, 128))
    t, c = jax.random.randint(k[1], (4, 8), 0, 128), jax.random.normal(k[2], (4, 8))
    f = lambda z, impl: jnp.sum(ce.softcap_nll(z, t, 30.0, impl) * c)
    g = jax.jit(jax.value_and_grad(f), static_argnums=1)
    ref = g(z, "jnp")
    zs = jax.device_put(z, NamedSharding(mesh, P("d")))
    out = g(zs, "pallas")
    hlo = g.lower(zs, "pallas").compile().as_text()
    json.dump({"diff": [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref))],
               "dz_spec": str(out[1].sharding.spec), "all_gather": "all-gather" in hlo}, sys.stdout)
""")


def test_kernels_split_along_rows_over_two_devices():
    """Logits sharded by rows over two devices run the kernels on each
    device's rows: no all-gather, dz stays sharded, the values are the
    unsharded jnp path's (s's summation order: 1e-4 absolute on a sum of
    32 losses of O(10))."""
    out = run_on_cpu_devices(TWO_DEVICES)
    assert not out["all_gather"], out
    assert out["dz_spec"].startswith(("P('d'", "PartitionSpec('d'")), out
    assert max(out["diff"]) < 1e-4


# ----------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("rows,vocab", [(48 * 2048, 1024), (8 * 2048, 8192)])  # 1.1147, 1.0611 records' V
def test_triton_kernels_match_model_path_bfloat16(rows, vocab):
    """The Triton-backend kernels against the model's jnp path compiled by
    XLA on the GPU, bf16 logits: libdevice's tanh/exp/log against XLA's own
    and both compilers' fused multiply-adds, besides s's order (module
    docstring). The bounds are predicted, not yet measured: tanh within a few
    float32 units of |t| < 1 puts y = 30 t within ~4 units of lse's scale, and
    exp(y - m) then within ~60 float32 units, which moves a bf16 dz by one
    unit in ~60 / 2^16 of the values at most."""
    z, targets, cot = operands(jax.random.key(int.from_bytes(os.urandom(4), "little")), (rows,), vocab, jnp.bfloat16)
    nll, dz = nll_and_grad(kernel, z, targets, cot)
    nll_ref, dz_ref = nll_and_grad(model_path, z, targets, cot)
    assert lse_units(nll, nll_ref, vocab) <= 4
    units = bf16_units(dz, dz_ref)
    assert units.max() <= 1 and np.mean(units > 0) < 1e-3


@pytest.mark.gpu
def test_record_head_through_the_kernel_bfloat16():
    """The record's head in bf16 (V = 1024, d = 512, round_logits) on 8 x 2048
    tokens: layers.head_nll through the kernel against the model's lm_head +
    nll_from_logits, compiled by XLA. The mean loss within 1e-6 relative (each
    loss a few float32 units of lse apart, test above); dh and dw are bf16
    matmuls of dz, where a rare one-unit difference in dz moves a rounding of
    theirs now and then: norm-relative one bf16 rounding, 2^-8, at most."""
    cfg = ModelConfig(compute_dtype="bfloat16")
    kh, kw, kt = jax.random.split(jax.random.key(int.from_bytes(os.urandom(4), "little")), 3)
    h = jax.random.normal(kh, (8, 2048, cfg.model_dim)).astype(jnp.bfloat16)
    w = (0.3 * jax.random.normal(kw, (cfg.vocab_size, cfg.model_dim))).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (8, 2048), 0, cfg.vocab_size)

    def run(fn):
        return jax.jit(jax.value_and_grad(lambda h, w: jnp.mean(fn(h, w)), argnums=(0, 1)))(h, w)
    loss, grads = run(lambda h, w: layers.head_nll(w, cfg, h, targets, "pallas"))
    loss_ref, grads_ref = run(lambda h, w: model.nll_from_logits(layers.lm_head(w, cfg, h), targets))
    assert abs(float(loss) / float(loss_ref) - 1) <= 1e-6
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == jnp.bfloat16 and rel(g, g_ref) < 2 ** -8


def test_kernels_lower_to_triton():
    """Forward and backward over the 1.0611 record's 8,192-token vocabulary and the 1.1147
    record's 1,024, through Pallas's Triton lowering (the program exported for CUDA on
    any machine)."""
    for vocab in (8192, 1024):
        z = jax.ShapeDtypeStruct((256, vocab), jnp.bfloat16)
        targets = jax.ShapeDtypeStruct((256,), jnp.int32)

        def loss(z, targets):
            return jnp.sum(ce.softcap_nll(z, targets, 30.0, "pallas"))

        lowered = triton_kernels_lowered(jax.value_and_grad(loss), z, targets)
        assert len(lowered) == 2, (vocab, lowered)


@pytest.mark.parametrize("looping", [False, True])
def test_frontier_packed_rows_through_the_kernel(frontier_ref, looping):
    """The 1.0611 record's tiny model (packed row of several documents, unlooped and
    looped; float32) with the kernel computing its training loss: the reference's loss
    and every gradient, as the jnp path matches them (tests/model_frontier_test.py).
    Its config is the one `--config.fusion_kernels=norm_rope,xsa,softcap_ce` gives
    configs/frontier.py (the record trains with a fused softcapped CE kernel of its own)."""
    from tests.model_frontier_test import loss_and_gradient_errors

    cfg, _, ref = frontier_ref
    cfg = dataclasses.replace(cfg, fusion_impl="pallas", fusion_kernels="softcap_ce")
    loss_error, errors = loss_and_gradient_errors(cfg, ref, "looped" if looping else "unlooped")
    # float32 against float32, the sums in other orders (the jnp path: 1.2e-7 and 7e-7)
    assert loss_error <= 1e-5
    assert max(errors.values()) <= 1e-4, {k: e for k, e in errors.items() if e > 1e-4}  # as the jnp path's
