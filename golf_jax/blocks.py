"""The transformer block's Flax modules: attention, the MLP, the sequential
block and the 1.0611 record's two-lane parallel block. They declare no
parameters: `model.GPT` holds the banks and the per-layer controls and hands
each block its slices (`LayerWeights`); see golf_jax/model.py. `LoRA` and
`SlotLoRA`: the 1.0611 record's test-time adapters (golf_jax/ttt_lora.py),
which ride in `LayerWeights.lora` (None: the plain block).

Shapes in names: B batch, T sequence, H query heads, K KV heads, G = H / K,
D head dim, d model dim.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from golf_jax.config import ModelConfig
from golf_jax.packing import Segments
from golf_jax.attention import causal_attention
from golf_jax.layers import (attention_impl, exclusive_self_attention, fusion_impl, gram, head_gate,
                             head_gate_weights, linear, mlp_impl, rms_norm, scaled_sum)
from kernels import mlp as mlp_kernels
from kernels.qk_norm_rope import apply_rotary, norm_rope
from kernels.residual_norm import add_norm

INPUT_GRAMS = "input_grams"  # the collection of sown Gram matrices (Hessian collection)


def sow_gram(module: nn.Module, name: str, x: jax.Array) -> None:
    """Sow the Gram matrix of a linear layer's input, when the caller collects them.
    A layer applied several times (depth recurrence) sows one Gram per application."""
    if module.is_mutable_collection(INPUT_GRAMS):
        module.sow(INPUT_GRAMS, name, gram(x))


class SlotLoRA(NamedTuple):
    """One layer application's low-rank adapters (the 1.0611 record's TTT,
    golf_jax/ttt_lora.py), one per batch row: each target a pair (A [B, r, in],
    B [B, out, r]) whose delta is scale (x A^T) B^T. q, k, v and o read the
    attention's normed input, mlp the MLP's; q, k, v add to the projections,
    o to the attention's output, mlp to the MLP's (before their scales)."""
    q: tuple[jax.Array, jax.Array]
    k: tuple[jax.Array, jax.Array]
    v: tuple[jax.Array, jax.Array]
    o: tuple[jax.Array, jax.Array]
    mlp: tuple[jax.Array, jax.Array]
    scale: float

    def delta(self, target: str, x_BxTxI: jax.Array) -> jax.Array:
        return lora_delta(x_BxTxI, *getattr(self, target), self.scale)

    def attention_deltas(self, h_BxTxd: jax.Array, queries: tuple | None = None) -> dict[str, jax.Array]:
        """q, k, v and o's deltas: they read the same input, so their four x A^T are one
        matmul (each output column the same sum as alone; 0.55 ms less of a 29 ms chunk
        step on an H200, docs/performance.md); then each B, q's and o's at the query
        positions only (`query_slice`)."""
        targets = ("q", "k", "v", "o")
        joined = _lora_down(h_BxTxd, jnp.concatenate([getattr(self, t)[0] for t in targets], axis=1))
        lows = dict(zip(targets, jnp.split(joined, len(targets), axis=-1)))
        lows["q"], lows["o"] = query_slice(queries)(lows["q"]), query_slice(queries)(lows["o"])
        return {t: _lora_up(low, getattr(self, t)[1], self.scale) for t, low in lows.items()}


def lora_delta(x_BxTxI: jax.Array, a_BxRxI: jax.Array, b_BxOxR: jax.Array, scale: float) -> jax.Array:
    """scale (x A^T) B^T, each row of the batch with its own adapter, in x's dtype."""
    return _lora_up(_lora_down(x_BxTxI, a_BxRxI), b_BxOxR, scale)


def _lora_down(x_BxTxI: jax.Array, a_BxRxI: jax.Array) -> jax.Array:
    return jnp.einsum("bti,bri->btr", x_BxTxI, a_BxRxI.astype(x_BxTxI.dtype))


def _lora_up(low_BxTxR: jax.Array, b_BxOxR: jax.Array, scale: float) -> jax.Array:
    return jnp.einsum("btr,bor->bto", low_BxTxR, b_BxOxR.astype(low_BxTxR.dtype)) * scale


def query_slice(queries: tuple | None, axis: int = 1):
    """x -> x's positions [first, first + count) along `axis` (queries = (first, count);
    None: x whole)."""
    if queries is None:
        return lambda x: x
    return lambda x: jax.lax.dynamic_slice_in_dim(x, queries[0], queries[1], axis=axis)


LORA_TARGETS = ("q", "k", "v", "o", "mlp")  # per layer application (SlotLoRA), then "head"


@flax.struct.dataclass
class LoRA:
    """The 1.0611 record's test-time LoRA (golf_jax/ttt_lora.py), one adapter per
    batch row: factors[t] = (A [S, B, r, in], B [S, B, out, r]) for t in
    LORA_TARGETS over the S layer applications of the looped order
    (`ModelConfig.layer_order`), and factors["head"] = (A [B, r, d], B [B, V, r]),
    added to the head's logits before the softcap. A pytree (its gradient is a
    LoRA); `scale` (alpha / rank) is static."""
    factors: dict
    scale: float = flax.struct.field(pytree_node=False)

    def slot(self, i: int) -> SlotLoRA:
        return SlotLoRA(*(tuple(m[i] for m in self.factors[t]) for t in LORA_TARGETS), self.scale)

    def head_delta(self, h_BxTxd: jax.Array) -> jax.Array:
        return lora_delta(h_BxTxd, *self.factors["head"], self.scale)


class LayerWeights(NamedTuple):
    """One layer's slices of the banks ([out, in]) and its controls."""
    q: jax.Array  # [d, d]
    k: jax.Array  # [kv, d]
    v: jax.Array  # [kv, d]
    proj: jax.Array  # [d, d]: attention out-projection
    fc: jax.Array  # [hid, d]: MLP up
    mlp_proj: jax.Array  # [d, hid]: MLP down
    attn_scale: jax.Array  # [d]
    mlp_scale: jax.Array  # [d]
    resid_mix: jax.Array  # [2, d]: weights of the stream and of x0
    q_gain: jax.Array  # [H]
    attn_gate: jax.Array | None = None  # [H, gate_window]: the sparse head-output gate
    lane_resid: jax.Array | None = None  # [2]: each lane's own weight (parallel blocks)
    lane_post: jax.Array | None = None  # [2, 2]: [attention, MLP] output -> [lane 0, lane 1]
    lora: SlotLoRA | None = None  # this application's TTT adapters (GPT.hidden's lora)


class CausalSelfAttention(nn.Module):
    """GQA attention with QK RMSNorm, partial RoPE, a per-head query gain, XSA
    and the optional sparse head-output gate; V optionally plus the value
    embedding. With decode=True it reads and writes its KV cache, Flax's way
    (see golf_jax/model.py's docstring). segments (packing.Segments): per-document attention
    in a packed row (`attention.causal_attention`). queries (first, count): the outputs of
    those positions only, their keys and values from every position (a TTT chunk's last
    layer application: only its positions are scored)."""
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, h_BxTxd: jax.Array, w: LayerWeights, ve_BxTxKV: jax.Array | None,
                 rope: tuple[jax.Array, jax.Array], decode: bool = False, pos: jax.Array | int = 0,
                 segments: Segments | None = None, queries: tuple | None = None) -> jax.Array:
        cfg = self.cfg
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B, T, d = h_BxTxd.shape
        if queries is not None and (decode or segments is not None):
            raise ValueError("queries: a TTT window's positions, not decoding nor packed rows")
        sow_gram(self, "qkv", h_BxTxd)

        # with queries: q, o and the gate at those positions (h_BxQxd), k and v at all
        deltas = None if w.lora is None else w.lora.attention_deltas(h_BxTxd, queries)
        take = query_slice(queries)
        h_BxQxd, rope_q = take(h_BxTxd), tuple(map(query_slice(queries, axis=0), rope))

        def project(target: str, w_OxI: jax.Array) -> jax.Array:
            out = linear(h_BxQxd if target == "q" else h_BxTxd, w_OxI)
            return out if deltas is None else out + deltas[target]

        q_BxTxHxD = project("q", w.q).reshape(B, h_BxQxd.shape[1], H, D)
        k_BxTxKxD = project("k", w.k).reshape(B, T, K, D)
        v_BxTxKV = project("v", w.v)
        if ve_BxTxKV is not None:
            v_BxTxKV = v_BxTxKV + ve_BxTxKV
        v_BxTxKxD = v_BxTxKV.reshape(B, T, K, D)
        if not decode and fusion_impl(cfg, "norm_rope") == "pallas":
            # RMSNorm, partial RoPE and q_gain: one kernel each way, the same arithmetic
            q_BxTxHxD = norm_rope(q_BxTxHxD, *rope_q, w.q_gain, cfg.rotary_dims, "pallas")
            k_BxTxKxD = norm_rope(k_BxTxKxD, *rope, None, cfg.rotary_dims, "pallas")
        else:
            q_BxTxHxD = apply_rotary(rms_norm(q_BxTxHxD), *rope_q, cfg.rotary_dims)
            q_BxTxHxD = scaled_sum([(w.q_gain[None, None, :, None], q_BxTxHxD)], cfg.scales_in_float32)
            k_BxTxKxD = apply_rotary(rms_norm(k_BxTxKxD), *rope, cfg.rotary_dims)
        if decode:
            filled = self.has_variable("cache", "k")
            k_cache = self.variable("cache", "k", jnp.zeros, k_BxTxKxD.shape, k_BxTxKxD.dtype)  # [B, S, K, D]
            v_cache = self.variable("cache", "v", jnp.zeros, v_BxTxKxD.shape, v_BxTxKxD.dtype)
            if filled:  # write T positions at pos, attend over the whole cache (causal from pos)
                k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BxTxKxD, (0, pos, 0, 0))
                v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BxTxKxD, (0, pos, 0, 0))
                y_BxTxHxD = causal_attention(q_BxTxHxD, k_cache.value, v_cache.value, "jnp", q_offset=pos)
            else:  # the call that creates the cache
                y_BxTxHxD = causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, "jnp")
        elif queries is not None:  # a few queries over every key: the dense path, [count, T] scores
            y_BxTxHxD = causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, "jnp", q_offset=queries[0])
        else:
            y_BxTxHxD = causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, attention_impl(cfg), segments=segments)
        gate_HxW = w.attn_gate  # the head-output gate, after XSA unless XSA applies it
        if cfg.xsa_on(self.layer):
            xsa_impl = "jnp" if decode else fusion_impl(cfg, "xsa")
            # the reference gates XSA's float32 result (kernels/xsa.py): the jnp path does, and
            # XSA's kernels with xsa_gate; otherwise head_gate reads XSA's kernel's rounded output
            gate_BxTxH = None
            if gate_HxW is not None and (xsa_impl == "jnp" or fusion_impl(cfg, "xsa_gate") == "pallas"):
                gate_BxTxH = head_gate_weights(h_BxQxd, gate_HxW, cfg.sparse_attn_gate_scale, cfg.scales_in_float32)
                gate_HxW = None
            y_BxTxHxD = exclusive_self_attention(y_BxTxHxD, take(v_BxTxKxD), xsa_impl, gate_BxTxH)
        if gate_HxW is not None:
            y_BxTxHxD = head_gate(y_BxTxHxD, h_BxQxd, gate_HxW, cfg.sparse_attn_gate_scale, cfg.scales_in_float32)
        y_BxTxd = y_BxTxHxD.reshape(B, y_BxTxHxD.shape[1], d)
        sow_gram(self, "proj", y_BxTxd)
        if deltas is not None:  # the out-projection's adapter reads the attention's input
            return linear(y_BxTxd, w.proj) + deltas["o"]
        return linear(y_BxTxd, w.proj)


class MLP(nn.Module):
    """leaky_relu(h W_fc^T, slope)^2 W_proj^T: the fused kernels on GPUs, the
    jnp path elsewhere and while Grams are sown (they need the hidden
    activation itself)."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, h_BxTxd: jax.Array, w_fc: jax.Array, w_proj: jax.Array) -> jax.Array:
        slope = self.cfg.mlp_negative_slope
        w_fc, w_proj = w_fc.astype(h_BxTxd.dtype), w_proj.astype(h_BxTxd.dtype)
        if not self.is_mutable_collection(INPUT_GRAMS):
            return mlp_kernels.mlp(h_BxTxd, w_fc, w_proj, slope, mlp_impl(self.cfg))
        sow_gram(self, "fc", h_BxTxd)
        act_BxTxF = mlp_kernels.leaky_squared(linear(h_BxTxd, w_fc), slope)
        sow_gram(self, "proj", act_BxTxF)
        return linear(act_BxTxF, w_proj)


class Block(nn.Module):
    """One physical layer, applied as a sequential block (`__call__`) or as a
    two-lane parallel block (`parallel`). Its norms carry the LN scale
    1/sqrt(layer + 1) (cfg.ln_scale) of the physical layer, however often and
    wherever depth recurrence applies it."""
    cfg: ModelConfig
    layer: int

    def setup(self):
        self.attn = CausalSelfAttention(self.cfg, self.layer)
        self.mlp = MLP(self.cfg)
        self.norm_scale = (self.layer + 1) ** -0.5 if self.cfg.ln_scale else 1.0

    def mix_norm(self, a, b, scale_a, scale_b, decode: bool):
        """scale_a a + scale_b b, and its norm: one kernel each way when fused."""
        if not decode and fusion_impl(self.cfg, "residual_norm") == "pallas":
            return add_norm(a, b, scale_a, scale_b, self.norm_scale, "pallas")
        mixed = scaled_sum([(scale_a, a), (scale_b, b)], self.cfg.scales_in_float32)
        return mixed, rms_norm(mixed, self.norm_scale)

    def mlp_with_lora(self, h_BxTxd: jax.Array, w: LayerWeights) -> jax.Array:
        """The MLP of its normed input, plus its TTT adapter's delta when w has one."""
        out = self.mlp(h_BxTxd, w.fc, w.mlp_proj)
        return out if w.lora is None else out + w.lora.delta("mlp", h_BxTxd)

    def __call__(self, x_BxTxd: jax.Array, x0_BxTxd: jax.Array, w: LayerWeights, ve_BxTxKV: jax.Array | None,
                 rope: tuple[jax.Array, jax.Array], decode: bool = False, pos: jax.Array | int = 0,
                 segments: Segments | None = None, queries: tuple | None = None) -> jax.Array:
        """x_in = mix(x, x0); x = x_in + attn(norm(x_in)); x + mlp(norm(x)). queries: the
        output at those positions only (`CausalSelfAttention`)."""
        x_in, h = self.mix_norm(x_BxTxd, x0_BxTxd, w.resid_mix[0], w.resid_mix[1], decode)
        attn_out = self.attn(h, w, ve_BxTxKV, rope, decode, pos, segments, queries)
        x, h = self.mix_norm(query_slice(queries)(x_in), attn_out, None, w.attn_scale, decode)
        mlp_out = self.mlp_with_lora(h, w)
        return scaled_sum([(None, x), (w.mlp_scale, mlp_out)], self.cfg.scales_in_float32)

    def parallel(self, lane0_BxTxd: jax.Array, lane1_BxTxd: jax.Array, x0_BxTxd: jax.Array, w: LayerWeights,
                 ve_BxTxKV: jax.Array | None, rope: tuple[jax.Array, jax.Array], decode: bool = False,
                 pos: jax.Array | int = 0, segments: Segments | None = None,
                 queries: tuple | None = None) -> tuple[jax.Array, jax.Array]:
        """The 1.0611 record's parallel block: attention reads mix(lane 0, x0), the
        MLP reads lane 1, and with a = attn_scale attn, m = mlp_scale mlp,

            lane_j = r_j lane_j + P[0, j] a + P[1, j] m   (r = w.lane_resid, P = w.lane_post).

        queries: the lanes at those positions only (`CausalSelfAttention`).
        """
        f32 = self.cfg.scales_in_float32
        _, h = self.mix_norm(lane0_BxTxd, x0_BxTxd, w.resid_mix[0], w.resid_mix[1], decode)
        attn_out = scaled_sum([(w.attn_scale, self.attn(h, w, ve_BxTxKV, rope, decode, pos, segments, queries))], f32)
        lane0_BxTxd, lane1_BxTxd = (query_slice(queries)(x) for x in (lane0_BxTxd, lane1_BxTxd))
        mlp_out = scaled_sum([(w.mlp_scale, self.mlp_with_lora(rms_norm(lane1_BxTxd, self.norm_scale), w))], f32)
        r, P = w.lane_resid, w.lane_post
        lane0 = scaled_sum([(r[0], lane0_BxTxd), (P[0, 0], attn_out), (P[1, 0], mlp_out)], f32)
        lane1 = scaled_sum([(r[1], lane1_BxTxd), (P[0, 1], attn_out), (P[1, 1], mlp_out)], f32)
        return lane0, lane1
