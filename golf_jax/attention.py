"""Causal attention, the paths a config can resolve to (layers.attention_impl):
cuDNN's fused kernel (and its packed, per-document layout for the 1.0611
record's document-packed rows), JAX's Pallas flash-attention kernel (repeatable
runs), and the jnp reference the others are tested against (also the one path
with a KV cache, for generation).

Shapes in names: B batch, T queries, S keys, H query heads, K KV heads,
G = H / K, D head dim; R fold rows and M segment slots (golf_jax/packing.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from golf_jax.packing import Segments


def causal_attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, impl: str,
              q_offset: jax.Array | int = 0, segment_ids_T: jax.Array | None = None,
              segments: Segments | None = None) -> jax.Array:
    """Causal softmax attention, scale 1/sqrt(D), query head h on KV head h // G.

    Query t sits at position q_offset + t and sees keys 0..q_offset + t; with
    S > T the keys are a KV cache (the "jnp" path only).

    Per-document attention in packed rows (golf_jax/packing.py; S == T,
    q_offset 0): a query sees only keys of its own segment.
    segments (packing.Segments, for B rows or 1 shared by all): on "cudnn",
    cuDNN's packed layout (`cudnn_packed_attention`, O(T x segment length));
    on "jnp", a dense [T, T] mask of its ids (tests, short rows).
    segment_ids_T: the ids alone, one layout for every row, "jnp" only.
    """
    ids_BxT = _segment_ids(q_BxTxHxD, k_BxSxKxD, impl, segment_ids_T, segments)
    if segments is not None and impl == "cudnn":
        return cudnn_packed_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, segments)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, is_causal=True,
                                            implementation="cudnn")
    if impl == "pallas":
        return pallas_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD)
    B, T, H, D = q_BxTxHxD.shape
    S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
    q_BxTxKxGxD = q_BxTxHxD.reshape(B, T, K, H // K, D)
    s_BxKxGxTxS = jnp.einsum("btkgd,bskd->bkgts", q_BxTxKxGxD, k_BxSxKxD,
                             preferred_element_type=jnp.float32) * (D ** -0.5)
    causal_TxS = jnp.arange(S)[None, :] <= (jnp.arange(T) + q_offset)[:, None]
    if ids_BxT is None:
        s_BxKxGxTxS = jnp.where(causal_TxS, s_BxKxGxTxS, -jnp.inf)
    else:
        same_BxTxS = causal_TxS & (ids_BxT[:, :, None] == ids_BxT[:, None, :])
        s_BxKxGxTxS = jnp.where(same_BxTxS[:, None, None], s_BxKxGxTxS, -jnp.inf)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", p_BxKxGxTxS, v_BxSxKxD)
    return o_BxTxKxGxD.reshape(B, T, H, D)


def _segment_ids(q_BxTxHxD, k_BxSxKxD, impl, segment_ids_T, segments) -> jax.Array | None:
    """The segment ids [B or 1, T] that `attention` was given, checked; None without segments."""
    if segment_ids_T is None and segments is None:
        return None
    name = "segment_ids_T" if segments is None else "segments"
    if segment_ids_T is not None and segments is not None:
        raise ValueError("give segments or segment_ids_T, not both")
    if impl not in (("jnp",) if segments is None else ("jnp", "cudnn")):
        raise ValueError(f"{name} (per-document attention) is not implemented on the '{impl}' path")
    B, T = q_BxTxHxD.shape[:2]
    ids_BxT = segment_ids_T[None] if segments is None else segments.ids_BxT
    if ids_BxT.ndim != 2 or ids_BxT.shape[0] not in (1, B) or ids_BxT.shape[1] != T or k_BxSxKxD.shape[1] != T:
        raise ValueError(f"{name} of shape {tuple(ids_BxT.shape)} needs queries and keys of its length and "
                         f"{B} or 1 rows (queries {tuple(q_BxTxHxD.shape)}, keys {tuple(k_BxSxKxD.shape)})")
    return ids_BxT


def cudnn_packed_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array,
                           segments: Segments) -> jax.Array:
    """Causal attention within each segment through cuDNN's packed (ragged) layout:
    JAX's private fused_attention_stablehlo.dot_product_attention with segment
    offsets and lengths (forward and backward in cuDNN; Hopper or newer, bf16/fp16).
    Each row is viewed as R fold rows of L = T / R tokens, R from segments'
    arrays (packing.cudnn_segments says why and how); cuDNN's causal mask then
    applies within each segment, as FlashAttention's varlen call does."""
    offsets_BxRxM1, lengths_BxRxM = segments.offsets_BxRxM1, segments.lengths_BxRxM
    B, T, H, D = q_BxTxHxD.shape
    K = k_BxTxKxD.shape[2]
    R, M = lengths_BxRxM.shape[1:]
    if T % R or offsets_BxRxM1.shape[1:] != (R, M + 1) or offsets_BxRxM1.shape[0] != lengths_BxRxM.shape[0]:
        raise ValueError(f"segments' offsets {tuple(offsets_BxRxM1.shape)} and lengths {tuple(lengths_BxRxM.shape)} "
                         f"do not fold rows of {T} tokens (packing.cudnn_segments)")
    if M < 2:
        raise ValueError(f"{M} segment slot per fold row: cuDNN's packed layout needs at least 2")
    if B * T * H * D >= 2 ** 31:
        raise ValueError(f"{B} x {T} x {H} x {D} elements: cuDNN's int32 offsets address at most 2^31")
    if K != H and not packed_kv_offsets_follow_key_heads():
        # This JAX scales the KV offsets by the query heads: only right without GQA.
        k_BxTxKxD, v_BxTxKxD = (jnp.repeat(x, H // K, axis=2) for x in (k_BxTxKxD, v_BxTxKxD))
    fold = lambda x: x.reshape(B * R, T // R, *x.shape[2:])  # noqa: E731
    offsets, lengths = (jnp.broadcast_to(x, (B, *x.shape[1:])).reshape(B * R, -1).astype(jnp.int32)
                        for x in (offsets_BxRxM1, lengths_BxRxM))
    o = cudnn_attention.dot_product_attention(
        fold(q_BxTxHxD), fold(k_BxTxKxD), fold(v_BxTxKxD), None, None, lengths, lengths, offsets, offsets,
        scale=D ** -0.5, mask_type=cudnn_attention.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return o.reshape(B, T, H, D)


@functools.lru_cache(maxsize=None)
def packed_kv_offsets_follow_key_heads() -> bool:
    """Whether this JAX turns packed-layout KV offsets into element offsets with
    the keys' own head count (jax-ml/jax#39521). Before that fix (JAX 0.10.2
    here) it used the queries', silently wrong under GQA. Asked of JAX's own
    conversion, on tiny arrays; False if that is gone or fails."""
    try:
        shape = lambda heads: jax.ShapeDtypeStruct((1, 4, heads, 8), jnp.bfloat16)  # noqa: E731
        with jax.ensure_compile_time_eval():
            lengths, offsets = jnp.asarray([[2, 2]], jnp.int32), jnp.asarray([[0, 2, -1]], jnp.int32)
            *_, kv_offsets = cudnn_attention._fix_seqlen_offsets(lengths, lengths, offsets, offsets,
                                                                 shape(2), shape(1))
            return int(kv_offsets[0, 1]) == 2 * 1 * 8  # token 2 of keys with 1 head of 8
    except Exception:  # noqa: BLE001 (a private function: any change means "unknown")
        return False


def pallas_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array) -> jax.Array:
    """Causal attention through JAX's Pallas flash-attention kernel (Triton on
    GPUs, interpreted elsewhere, for the tests). Its backward has no atomics,
    so under XLA's determinism flags runs repeat bit for bit. The kernel has
    no GQA: the KV heads are repeated to the query heads, and their gradient
    sums over each group. T must be a multiple of 32 (its backward's blocks).
    """
    # imported here: JAX 0.11 deprecates this module (for tokamax), and only this path needs it
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

    B, T, H, D = q_BxTxHxD.shape
    G = H // k_BxTxKxD.shape[2]
    k_BxTxHxD, v_BxTxHxD = (jnp.repeat(x, G, axis=2) for x in (k_BxTxKxD, v_BxTxKxD))
    return pallas_gpu_attention.mha(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, None, sm_scale=D ** -0.5, causal=True,
                                    interpret=jax.default_backend() != "gpu")
