"""Causal attention's paths (golf_jax.attention): the jnp reference by hand, the
Pallas kernel and cuDNN (GPU-marked) against it, and per-document attention in
packed rows, on an emulation of cuDNN's packed layout for the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from golf_jax import attention, packing
from tests.model_test import rel_err


def test_gqa_attention_matches_repeated_kv_softmax():
    rng = np.random.default_rng(0)
    B, T, H, K, D = 2, 9, 4, 2, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in [(B, T, H, D), (B, T, K, D), (B, T, K, D)])
    got = attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), "jnp")
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
    loss = lambda impl: lambda q, k, v: jnp.sum(attention.causal_attention(q, k, v, impl) ** 2)  # noqa: E731
    np.testing.assert_allclose(attention.causal_attention(q, k, v, "pallas"), attention.causal_attention(q, k, v, "jnp"), atol=1e-5)
    for got, want in zip(jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v),
                         jax.grad(loss("jnp"), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, atol=1e-4)  # float32, another summation order (~1e-5 seen)



@pytest.mark.gpu
def test_cudnn_attention_matches_jnp_path_on_gpu():
    key = jax.random.key(0)
    B, T, H, K, D = 4, 2048, 8, 4, 64
    q, k, v = (jax.random.normal(kk, s, jnp.bfloat16) for kk, s in
               zip(jax.random.split(key, 3), [(B, T, H, D), (B, T, K, D), (B, T, K, D)]))
    got = attention.causal_attention(q, k, v, "cudnn")
    want = attention.causal_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), "jnp")
    assert rel_err(got, want) < 1e-2  # bf16 inputs and output



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
    truth = attention.packed_kv_offsets_follow_key_heads()
    monkeypatch.setattr(cudnn_attention, "dot_product_attention", _emulated_cudnn)
    if native_gqa is not None:
        monkeypatch.setattr(attention, "packed_kv_offsets_follow_key_heads", lambda: native_gqa)
    rows = [_packed_row(lengths, fold_len, slots)[0] for lengths in ROW_LENGTHS]
    segments = packing.Segments(*(np.concatenate(parts) for parts in zip(*rows)))
    q, k, v = _qkv(2, 64, 4, 2, 8)
    attend = lambda impl: lambda q, k, v: attention.causal_attention(q, k, v, impl, segments=segments)  # noqa: E731
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
    got = np.asarray(attention.causal_attention(q, k, v, "jnp", segments=segments))
    for b, (_, cu) in enumerate(rows):
        for lo, hi in zip(cu[:-1], cu[1:]):
            want = np.asarray(attention.causal_attention(q[b:b + 1, lo:hi], k[b:b + 1, lo:hi], v[b:b + 1, lo:hi], "jnp"))
            # float32 both ways; only the summation order over the masked (zero) terms differs.
            np.testing.assert_allclose(got[b:b + 1, lo:hi], want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    # One layout for both rows: the same as segment_ids_T.
    shared = packing.Segments(*(x[:1] for x in segments))
    np.testing.assert_array_equal(attention.causal_attention(q, k, v, "jnp", segments=shared),
                                  attention.causal_attention(q, k, v, "jnp", segment_ids_T=jnp.asarray(shared.ids_BxT[0])))


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
    assert_segments_isolate(lambda q, k, v: attention.causal_attention(q, k, v, "jnp", segments=segments),
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
    attention.packed_kv_offsets_follow_key_heads.cache_clear()
    try:
        assert attention.packed_kv_offsets_follow_key_heads() is native
    finally:
        attention.packed_kv_offsets_follow_key_heads.cache_clear()


def test_cudnn_packed_path_rejects_what_cudnn_cannot_fold():
    segments, _ = _packed_row([16, 16, 16, 16], 16, 2)
    q, k, v = _qkv(1, 48, 4, 2, 8)
    with pytest.raises(ValueError, match="needs queries and keys of its length"):
        attention.causal_attention(q, k, v, "cudnn", segments=segments)
    q, k, v = _qkv(1, 64, 4, 2, 8)
    bad = segments._replace(offsets_BxRxM1=segments.offsets_BxRxM1[:, :3])
    with pytest.raises(ValueError, match="do not fold rows of 64 tokens"):
        attention.causal_attention(q, k, v, "cudnn", segments=bad)
    with pytest.raises(ValueError, match="not implemented on the 'pallas' path"):
        attention.causal_attention(q, k, v, "pallas", segments=segments)
    with pytest.raises(ValueError, match="not both"):
        attention.causal_attention(q, k, v, "jnp", segment_ids_T=jnp.zeros(64, jnp.int32), segments=segments)


# On a GPU: cuDNN's packed layout itself. A row of 8,192 tokens, 10 segments (two 2,048-token
# chunks, one of them across a fold row's end, and a 1-token segment), the 1.0611 model's heads.
GPU_LENGTHS = [300, 2048, 1500, 37, 1, 900, 2048, 700, 400, 258]


@pytest.mark.gpu
@pytest.mark.parametrize("fold_len, slots", [(2048, 4), (8192, 16)])  # folded and unfolded
@pytest.mark.parametrize("keys", ["as this JAX allows", "repeated to the query heads"])
def test_cudnn_packed_attention_matches_the_jnp_path_on_gpu(monkeypatch, fold_len, slots, keys):
    if keys != "as this JAX allows":
        monkeypatch.setattr(attention, "packed_kv_offsets_follow_key_heads", lambda: False)
    segments, _ = _packed_row(GPU_LENGTHS, fold_len, slots)
    q, k, v = _qkv(1, 8192, 8, 4, 64, jnp.bfloat16, seed=3)
    g = jax.random.normal(jax.random.key(4), q.shape, jnp.bfloat16)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    got, vjp = jax.vjp(jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "cudnn", segments=segments)), q, k, v)
    want, vjp_want = jax.vjp(lambda q, k, v: attention.causal_attention(q, k, v, "jnp", segments=segments),
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
    packed, vjp = jax.vjp(jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "cudnn", segments=segments)), q, k, v)
    dense, vjp_dense = jax.vjp(jax.jit(lambda q, k, v: attention.causal_attention(rows(q), rows(k), rows(v), "cudnn")), q, k, v)
    # the same bf16 kernel arithmetic on the same sequences: at most a bf16 rounding (2^-8) apart
    assert rel_err(packed, dense.reshape(packed.shape)) < 4e-3
    for name, grad, grad_dense in zip("qkv", vjp(g), vjp_dense(rows(g))):
        assert rel_err(grad, grad_dense) < 4e-3, name


@pytest.mark.gpu
def test_cudnn_packed_segments_isolate_on_gpu():
    segments, cu = _packed_row(GPU_LENGTHS, 2048, 4)
    attend = jax.jit(lambda q, k, v: attention.causal_attention(q, k, v, "cudnn", segments=segments))
    # The forward has no atomics: other segments' outputs are bit for bit the same.
    assert_segments_isolate(attend, *_qkv(1, 8192, 8, 4, 64, jnp.bfloat16, seed=7), cu, changed=1)
