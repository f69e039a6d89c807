"""The model's functional pieces (golf_jax.layers) against the reference and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import layers
from golf_jax.config import ModelConfig
from tests.conftest import round_to_bf16


def test_bigram_buckets_exact(tiny_ref, tiny_cfg):
    got = layers.bigram_buckets(jnp.asarray(tiny_ref["x"]), tiny_cfg.bigram_vocab_size)
    np.testing.assert_array_equal(np.asarray(got), tiny_ref["bigram_hash"])


def test_rotary_base_quirk():
    cfg = ModelConfig()
    assert layers.rotary_base(cfg, 1024) == cfg.rope_base
    assert layers.rotary_base(cfg, 2048) == pytest.approx(10000.0 * 2.0 ** (16 / 14))


def test_rotary_base_unscaled_when_the_quirk_is_off():
    cfg = ModelConfig(rope_ntk_base_len=0)  # the 1.0611 record's ROPE_YARN=0
    assert layers.rotary_base(cfg, 2048) == layers.rotary_base(cfg, 98_304) == cfg.rope_base


def test_torch_lerp_is_torchs_and_the_gated_skip_mixes_in_float32():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    start, end = (rng.standard_normal((3, 64)).astype(np.float32) for _ in range(2))
    weight = rng.uniform(0, 1, 64).astype(np.float32)  # both of torch's branches
    want = torch.lerp(*(torch.from_numpy(a) for a in (start, end, weight))).numpy()
    # torch's kernel fuses each branch into an FMA (one rounding fewer): an ulp apart at most.
    np.testing.assert_allclose(np.asarray(layers.torch_lerp(start, end, weight)), want, rtol=3e-7, atol=3e-7)
    # bf16 activations: in float32, rounded once (in_float32), or the product and the gate
    # rounded first, as eager PyTorch's w * skip and sigmoid (its lerp computes in float32).
    x, skip = (jnp.asarray(a).astype(jnp.bfloat16) for a in (start, end))
    w, g = jnp.asarray(1.0 + 0.1 * weight), jnp.asarray(weight - 0.5)
    f32 = [a.astype(jnp.float32) for a in (x, skip, w.astype(jnp.bfloat16), g.astype(jnp.bfloat16))]
    once = layers.torch_lerp(f32[2] * f32[1], f32[0], jax.nn.sigmoid(f32[3])).astype(jnp.bfloat16)
    np.testing.assert_array_equal(layers.gated_skip(x, skip, w, g, in_float32=True), once)
    r = layers.rounding_to(jnp.bfloat16)
    eager = layers.torch_lerp(r(f32[2] * f32[1]), f32[0], r(jax.nn.sigmoid(f32[3]))).astype(jnp.bfloat16)
    np.testing.assert_array_equal(layers.gated_skip(x, skip, w, g, in_float32=False), eager)


def test_windowed_smear_skips_document_starts_and_continues_from_a_previous_embedding():
    rng = np.random.default_rng(6)
    e = jnp.asarray(rng.standard_normal((2, 6, 16)).astype(np.float32))
    tokens = jnp.asarray([[5, 1, 7, 7, 1, 1], [1, 3, 4, 1, 9, 2]])
    gate, lam = jnp.asarray(rng.standard_normal((1, 12)).astype(np.float32)), jnp.asarray([0.7])
    got = np.asarray(layers.windowed_smear(gate, lam, e, tokens, bos_id=1))
    g = 0.7 * jax.nn.sigmoid(e[..., :12] @ gate.T)
    want = np.asarray(e).copy()
    want[:, 1:] += np.asarray(g[:, 1:] * e[:, :-1] * (tokens[:, 1:, None] != 1))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)  # float32 products in another order
    np.testing.assert_array_equal(got[tokens == 1], np.asarray(e)[tokens == 1])
    # A continuation: its first position smears from the embedding before it.
    cont = layers.windowed_smear(gate, lam, e[:, 3:], tokens[:, 3:], 1, prev_e_Bxd=e[:, 2])
    np.testing.assert_allclose(np.asarray(cont), got[:, 3:], rtol=1e-6, atol=1e-6)


def test_head_gate_scales_each_heads_output():
    rng = np.random.default_rng(7)
    y = jnp.asarray(rng.standard_normal((2, 5, 4, 8)).astype(np.float32))
    n = jnp.asarray(rng.standard_normal((2, 5, 32)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((4, 12)).astype(np.float32))
    want = np.asarray(y) * np.asarray(jax.nn.sigmoid(0.5 * n[..., :12] @ w.T))[..., None]
    np.testing.assert_allclose(np.asarray(layers.head_gate(y, n, w, 0.5)), want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(layers.head_gate(y, n, jnp.zeros((4, 12)), 0.5), 0.5 * y)


def test_rope_dims_zero_means_every_head_dim():
    cfg = ModelConfig(rope_dims=0)
    assert cfg.rotary_dims == cfg.head_dim == 64
    assert layers.rotary_base(cfg, 2048) == pytest.approx(10000.0 * 2.0 ** (64 / 62))
    cos, _ = layers.rotary_tables(cfg, jnp.arange(4), 10000.0)
    assert cos.shape == (4, 32)


def test_auto_attention_is_pallas_under_xla_determinism_flags(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_exclude_nondeterministic_ops=true")
    assert layers.attention_impl(ModelConfig()) == "pallas"
    monkeypatch.setenv("XLA_FLAGS", "")
    assert layers.attention_impl(ModelConfig()) == "cudnn"


def test_xsa_output_is_orthogonal_to_its_value_vector():
    rng = np.random.default_rng(1)
    y, v = rng.standard_normal((2, 5, 4, 8)), rng.standard_normal((2, 5, 2, 8))
    out = np.asarray(layers.exclusive_self_attention(jnp.asarray(y, jnp.float32), jnp.asarray(v, jnp.float32)))
    vn = v / np.linalg.norm(v, axis=-1, keepdims=True)
    dots = np.einsum("btkgd,btkd->btkg", out.reshape(2, 5, 2, 2, 8), vn)
    assert np.max(np.abs(dots)) < 1e-5  # float32 rounding of unit-scale vectors


def _bf16(a):
    return jnp.asarray(a, jnp.bfloat16)


def _round_bf16(a64):
    """float64 values rounded to bf16 (through float32: exact for the sums below to ~1e-7), as float64."""
    return round_to_bf16(a64).astype(np.float64)


@pytest.mark.full_optimization
def test_scaled_sum_in_float32_rounds_once_forward_and_backward():
    """scales_in_float32: mix(x, x0), a residual add and a per-head gain as the fused kernel of
    torch.compile computes them: one rounding of the float32 result; in the backward each
    scale's gradient a float32 sum over the tokens rounded once, and each input's the
    float32 product g * scale rounded once."""
    rng = np.random.default_rng(0)
    x, x0, g = (_bf16(rng.standard_normal((4, 256, 8, 16))) for _ in range(3))
    s0, s1 = _bf16(1 + 0.1 * rng.standard_normal((16,))), _bf16(0.1 * rng.standard_normal((16,)))
    gain = _bf16(rng.uniform(1, 2, (1, 1, 8, 1)))
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731

    def mixed(s0, s1, gain, x, x0):
        return layers.scaled_sum([(gain, layers.scaled_sum([(s0, x), (s1, x0)], True)), (None, x)], True)

    out, vjp = jax.vjp(mixed, s0, s1, gain, x, x0)
    inner = _round_bf16(f64(s0) * f64(x) + f64(s1) * f64(x0))
    want = _round_bf16(f64(gain) * inner + f64(x))
    # float32 sums of exact bf16 products, then one rounding: equal to the float64 result rounded
    # but where the float32 sum sits on a bf16 rounding boundary (measured: none here; allowed 0.1%).
    assert out.dtype == jnp.bfloat16 and np.mean(f64(out) != want) < 1e-3
    d_s0, d_s1, d_gain, d_x, d_x0 = vjp(g)
    gf = f64(g)
    d_inner = _round_bf16(gf * f64(gain))
    # products of two bf16 values are exact in float32: one rounding
    np.testing.assert_array_equal(f64(d_x0), _round_bf16(d_inner * f64(s1)))
    np.testing.assert_array_equal(f64(d_x), _round_bf16(_round_bf16(d_inner * f64(s0)) + gf))
    for got, want in ((d_s0, (d_inner * f64(x)).sum((0, 1, 2))), (d_s1, (d_inner * f64(x0)).sum((0, 1, 2))),
                      (d_gain, (gf * inner).sum((0, 1, 3), keepdims=True))):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        # float32 sums of 4,096-16,384 terms against float64: at most one bf16 step apart after the rounding
        np.testing.assert_allclose(f64(got), _round_bf16(want), rtol=2 ** -7)


def test_scaled_sum_op_by_op_rounds_every_op():
    rng = np.random.default_rng(1)
    x, x0 = _bf16(rng.standard_normal((2, 64, 32))), _bf16(rng.standard_normal((2, 64, 32)))
    s0, s1 = _bf16(rng.standard_normal((32,))), _bf16(rng.standard_normal(()))
    got = layers.scaled_sum([(s0, x), (s1, x0)], False)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(s0 * x + s1 * x0, np.float32))
    # float32 activations (the parity path): the plain sum whatever the switch.
    xf = x.astype(jnp.float32)
    np.testing.assert_array_equal(layers.scaled_sum([(s0, xf), (None, xf)], True), s0.astype(jnp.float32) * xf + xf)
