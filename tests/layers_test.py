"""The model's functional pieces (golf_jax.layers) against the reference and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from golf_jax import layers, packing
from golf_jax.config import ModelConfig
from tests.conftest import round_to_bf16
from tests.model_test import rel_err


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



def test_gqa_attention_matches_repeated_kv_softmax():
    rng = np.random.default_rng(0)
    B, T, H, K, D = 2, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    got = layers.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), "jnp")
    kr, vr = np.repeat(k, H // K, axis=2).astype(np.float64), np.repeat(v, H // K, axis=2).astype(np.float64)
    s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kr) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", p, vr)
    assert rel_err(got, want) < 1e-6  # float32 vs float64



def test_pallas_attention_matches_the_jnp_path_forward_and_backward():
    """The repeatable-runs path (Pallas kernel, interpreted off GPUs) against the jnp reference."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 64, h, 16)) for i, h in enumerate((4, 2, 2)))
    loss = lambda impl: lambda q, k, v: jnp.sum(layers.attention(q, k, v, impl) ** 2)  # noqa: E731
    np.testing.assert_allclose(layers.attention(q, k, v, "pallas"), layers.attention(q, k, v, "jnp"), atol=1e-5)
    for got, want in zip(jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss("jnp"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-4)  # float32, another summation order (~1e-5 seen)



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



@pytest.mark.gpu
def test_cudnn_attention_matches_jnp_path_on_gpu():
    key = jax.random.key(0)
    B, T, H, K, D = 4, 2048, 8, 4, 64
    q, k, v = (jax.random.normal(kk, s, jnp.bfloat16) for kk, s in
               zip(jax.random.split(key, 3), [(B, T, H, D), (B, T, K, D), (B, T, K, D)]))
    got = layers.attention(q, k, v, "cudnn")
    want = layers.attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), "jnp")
    assert rel_err(got, want) < 1e-2  # bf16 inputs and output



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


# ----------------------------------------------------------------------------- per-document attention

def _packed_row(lengths, fold_len, slots):
    """Segments of the given lengths, in order, filling one row."""
    total_len = int(np.sum(lengths))
    cu = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return packing.make_segments(cu, total_len, fold_len, slots), cu


def _qkv(B, T, H, K, D, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(kk, (B, T, h, D), dtype) for kk, h in zip(keys, (H, K, K)))


def _emulated_cudnn(query, key, value, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *,
                    scale, mask_type, qkv_layout):
    """cuDNN's packed attention, run from what JAX's own conversion (_fix_seqlen_offsets) hands
    it: sequence i is q_seqlen[i] tokens from element q_offsets[i] of the query buffer (and its
    keys from kv_offsets[i], in the key buffer's own elements), causal within. float32 jnp math
    (differentiable), the masks from the concrete offsets."""
    assert bias is None and mask is None and qkv_layout == "BTNH"
    assert mask_type == cudnn_attention.MaskType.PADDING_CAUSAL
    q_len, kv_len, q_off, kv_off = (np.asarray(x).reshape(-1) for x in cudnn_attention._fix_seqlen_offsets(
        q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key))
    rows, L, H, D = query.shape
    K = key.shape[2]

    def owners(offsets, lengths, heads):  # each token's sequence (-1: none) and place in it
        owner, place = np.full(rows * L, -1), np.zeros(rows * L, int)
        for i, (start, n) in enumerate(zip(offsets[:lengths.size] // (heads * D), lengths)):
            tokens = np.arange(start, start + n)
            inside = tokens < rows * L
            owner[tokens[inside]], place[tokens[inside]] = i, (tokens - start)[inside]
        return owner, place

    (q_owner, q_place), (k_owner, k_place) = owners(q_off, q_len, H), owners(kv_off, kv_len, K)
    sees = (q_owner[:, None] == k_owner[None, :]) & (q_owner[:, None] >= 0) & (k_place[None, :] <= q_place[:, None])
    q = query.reshape(rows * L, K, H // K, D)
    s = jnp.einsum("tkgd,skd->kgts", q, key.reshape(rows * L, K, D)) * scale
    p = jnp.where(sees.any(-1)[:, None], jax.nn.softmax(jnp.where(sees, s, -jnp.inf), axis=-1), 0.0)
    return jnp.einsum("kgts,skd->tkgd", p, value.reshape(rows * L, K, D)).reshape(rows, L, H, D)


# Two rows of 64 tokens with different documents (a 1-token one; 16-token chunks crossing fold rows).
ROW_LENGTHS = ([5, 16, 1, 16, 10, 16], [16, 16, 3, 13, 16])


@pytest.mark.parametrize("fold_len, slots", [(16, 4), (64, 8)])  # folded and unfolded
@pytest.mark.parametrize("native_gqa", [None, True])  # what this JAX does; the native GQA path regardless
def test_cudnn_packed_path_on_an_emulated_cudnn(monkeypatch, fold_len, slots, native_gqa):
    """The cuDNN path's own work (folding, the GQA keys, JAX's packed arrays) on the CPU: cuDNN's
    packed attention emulated from what JAX hands it, forward and gradients, against the jnp path."""
    truth = layers.packed_kv_offsets_follow_key_heads()
    monkeypatch.setattr(cudnn_attention, "dot_product_attention", _emulated_cudnn)
    if native_gqa is not None:
        monkeypatch.setattr(layers, "packed_kv_offsets_follow_key_heads", lambda: native_gqa)
    rows = [_packed_row(lengths, fold_len, slots)[0] for lengths in ROW_LENGTHS]
    segments = packing.Segments(*(np.concatenate(parts) for parts in zip(*rows)))
    q, k, v = _qkv(2, 64, 4, 2, 8)
    attend = lambda impl: lambda q, k, v: layers.attention(q, k, v, impl, segments=segments)  # noqa: E731
    got, want = attend("cudnn")(q, k, v), attend("jnp")(q, k, v)
    if native_gqa and not truth:  # a JAX before jax-ml/jax#39521: its KV offsets point at other tokens
        assert rel_err(got, want) > 0.1
        return
    assert rel_err(got, want) < 1e-6  # float32 both ways, the keys summed in the same order
    cotangent = jax.random.normal(jax.random.key(9), q.shape)
    for g, w in zip(jax.vjp(attend("cudnn"), q, k, v)[1](cotangent), jax.vjp(attend("jnp"), q, k, v)[1](cotangent)):
        assert rel_err(g, w) < 1e-6


def test_jnp_segments_per_row_equal_attention_per_segment():
    rows = [_packed_row(lengths, 16, 4) for lengths in ROW_LENGTHS]
    segments = packing.Segments(*(np.concatenate(parts) for parts in zip(*(r[0] for r in rows))))
    q, k, v = _qkv(2, 64, 4, 2, 8, seed=1)
    got = np.asarray(layers.attention(q, k, v, "jnp", segments=segments))
    for b, (_, cu) in enumerate(rows):
        for lo, hi in zip(cu[:-1], cu[1:]):
            want = np.asarray(layers.attention(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], "jnp"))
            # float32 both ways; only the summation order over the masked (zero) terms differs.
            np.testing.assert_allclose(got[b:b + 1, lo:hi], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # One layout for both rows: the same as segment_ids_T.
    shared = packing.Segments(*(x[:1] for x in segments))
    np.testing.assert_array_equal(layers.attention(q, k, v, "jnp", segments=shared),
                                  layers.attention(q, k, v, "jnp", segment_ids_T=jnp.asarray(shared.ids_BxT[0])))


def assert_segments_isolate(attend, q, k, v, cu, changed: int):
    """Changing segment `changed`'s queries, keys and values changes no other segment's output;
    a cotangent on one other segment only gives gradients on that segment's tokens, exactly."""
    lo, hi = cu[changed], cu[changed + 1]
    out = np.asarray(attend(q, k, v), np.float32)
    q2, k2, v2 = (x.at[:, lo:hi].set(-x[:, lo:hi] + 1) for x in (q, k, v))
    out2 = np.asarray(attend(q2, k2, v2), np.float32)
    np.testing.assert_array_equal(np.delete(out2, np.s_[lo:hi], axis=1), np.delete(out, np.s_[lo:hi], axis=1))
    assert np.all(np.any(out2[:, lo:hi] != out[:, lo:hi], axis=(0, 2, 3)))
    other = 0 if changed else 1
    lo, hi = cu[other], cu[other + 1]
    g = jnp.zeros_like(q).at[:, lo:hi].set(1)
    for grad in jax.vjp(attend, q, k, v)[1](g):
        grad = np.asarray(grad, np.float32)
        assert np.all(np.delete(grad, np.s_[lo:hi], axis=1) == 0) and np.any(grad[:, lo:hi] != 0)


def test_jnp_segments_isolate():
    segments, cu = _packed_row(ROW_LENGTHS[0], 16, 4)
    assert_segments_isolate(lambda q, k, v: layers.attention(q, k, v, "jnp", segments=segments),
                            *_qkv(1, 64, 4, 2, 8, seed=2), cu, changed=1)


@pytest.mark.parametrize("conversion, native", [
    ("key heads", True), ("query heads", False), ("gone", False)])
def test_packed_kv_offsets_probe(monkeypatch, conversion, native):
    """Native GQA on the packed layout only where JAX converts KV offsets with the keys' heads."""
    real = cudnn_attention._fix_seqlen_offsets

    def with_key_heads(q_len, kv_len, q_off, kv_off, query, key):
        q_len, kv_len, q_off, kv_off = real(q_len, kv_len, q_off, kv_off, query, query)
        return q_len, kv_len, q_off, kv_off // query.shape[2] * key.shape[2]

    def gone(*args):
        raise AttributeError("no _fix_seqlen_offsets")

    conversions = {"key heads": with_key_heads, "query heads": lambda *a: real(*a[:5], a[4]), "gone": gone}
    monkeypatch.setattr(cudnn_attention, "_fix_seqlen_offsets", conversions[conversion])
    layers.packed_kv_offsets_follow_key_heads.cache_clear()
    try:
        assert layers.packed_kv_offsets_follow_key_heads() is native
    finally:
        layers.packed_kv_offsets_follow_key_heads.cache_clear()


def test_cudnn_packed_path_rejects_what_cudnn_cannot_fold():
    segments, _ = _packed_row([16, 16, 16, 16], 16, 2)
    q, k, v = _qkv(1, 48, 4, 2, 8)
    with pytest.raises(ValueError, match="needs queries and keys of its length"):
        layers.attention(q, k, v, "cudnn", segments=segments)
    q, k, v = _qkv(1, 64, 4, 2, 8)
    bad = segments._replace(offsets_BxRxM1=segments.offsets_BxRxM1[:, :3])
    with pytest.raises(ValueError, match="do not fold rows of 64 tokens"):
        layers.attention(q, k, v, "cudnn", segments=bad)
    with pytest.raises(ValueError, match="not implemented on the 'pallas' path"):
        layers.attention(q, k, v, "pallas", segments=segments)
    with pytest.raises(ValueError, match="not both"):
        layers.attention(q, k, v, "jnp", segment_ids_T=jnp.zeros(64, jnp.int32), segments=segments)


# On a GPU: cuDNN's packed layout itself. A row of 8,192 tokens, 10 segments (two 2,048-token
# chunks, one of them across a fold row's end, and a 1-token segment), the 1.0611 model's heads.
GPU_LENGTHS = [300, 2048, 1500, 37, 1, 900, 2048, 700, 400, 258]


@pytest.mark.gpu
@pytest.mark.parametrize("fold_len, slots", [(2048, 4), (8192, 16)])  # folded and unfolded
@pytest.mark.parametrize("keys", ["as this JAX allows", "repeated to the query heads"])
def test_cudnn_packed_attention_matches_the_jnp_path_on_gpu(monkeypatch, fold_len, slots, keys):
    if keys != "as this JAX allows":
        monkeypatch.setattr(layers, "packed_kv_offsets_follow_key_heads", lambda: False)
    segments, _ = _packed_row(GPU_LENGTHS, fold_len, slots)
    q, k, v = _qkv(1, 8192, 8, 4, 64, jnp.bfloat16, seed=3)
    g = jax.random.normal(jax.random.key(4), q.shape, jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    got, vjp = jax.vjp(jax.jit(lambda q, k, v: layers.attention(q, k, v, "cudnn", segments=segments)), q, k, v)
    want, vjp_want = jax.vjp(lambda q, k, v: layers.attention(q, k, v, "jnp", segments=segments),
                             f32(q), f32(k), f32(v))
    # bf16 inputs and output, cuDNN's probabilities and their gradients in bf16 (~2^-8 relative
    # each): the bound of the dense path's test above.
    assert rel_err(got, want) < 1e-2
    for name, grad, grad_want in zip("qkv", vjp(g), vjp_want(f32(g))):
        assert rel_err(grad, grad_want) < 1e-2, name


@pytest.mark.gpu
def test_cudnn_packed_full_chunks_equal_dense_rows_on_gpu():
    """Four 2,048-token segments are the 1.1147 record's four dense causal rows."""
    segments, _ = _packed_row([2048] * 4, 2048, 2)
    q, k, v = _qkv(1, 8192, 8, 4, 64, jnp.bfloat16, seed=5)
    g = jax.random.normal(jax.random.key(6), q.shape, jnp.bfloat16)
    rows = lambda x: x.reshape(4, 2048, *x.shape[2:])  # noqa: E731
    packed, vjp = jax.vjp(jax.jit(lambda q, k, v: layers.attention(q, k, v, "cudnn", segments=segments)), q, k, v)
    dense, vjp_dense = jax.vjp(jax.jit(lambda q, k, v: layers.attention(rows(q), rows(k), rows(v), "cudnn")), q, k, v)
    # the same bf16 kernel arithmetic on the same sequences: at most a bf16 rounding (2^-8) apart
    assert rel_err(packed, dense.reshape(packed.shape)) < 4e-3
    for name, grad, grad_dense in zip("qkv", vjp(g), vjp_dense(rows(g))):
        assert rel_err(grad, grad_dense) < 4e-3, name


@pytest.mark.gpu
def test_cudnn_packed_segments_isolate_on_gpu():
    segments, cu = _packed_row(GPU_LENGTHS, 2048, 4)
    attend = jax.jit(lambda q, k, v: layers.attention(q, k, v, "cudnn", segments=segments))
    # The forward has no atomics: other segments' outputs are bit for bit the same.
    assert_segments_isolate(attend, *_qkv(1, 8192, 8, 4, 64, jnp.bfloat16, seed=7), cu, changed=1)
