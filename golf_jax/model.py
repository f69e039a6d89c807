"""The record GPT as a functional Flax (Linen) model.

`GPT(cfg)` is a Linen module. Its parameters are a plain dict held outside
it, and every call is a pure function of (params, config, inputs):

    params = model.init_params(cfg, key)                   # GPT(cfg).init(...)["params"]
    z = model.logits(params, cfg, tokens)                  # GPT(cfg).apply({"params": params}, tokens)

The parameters are in the reference's banked layout, linear weights
[out, in] (y = x @ W.T):

    tok_emb        [V, d]            (bf16 in the record: reference quirk)
    qo_bank        [2L, d, d]        rows 0..L-1 Q, L..2L-1 attention out-proj
    kv_bank        [2L, kv, d]       rows 0..L-1 K, L..2L-1 V
    mlp_up_bank    [L, 3d, d]
    mlp_down_bank  [L, d, 3d]
    blocks         {attn_scale [L, d], mlp_scale [L, d], resid_mix [L, 2, d], q_gain [L, H]}
    skip_weights   [S, d]            S = min(L // 2, L - L // 2)
    smear_gate     [d]
    bigram         {embed [Vb, db], proj [d, db], scale []}          if bigram_vocab_size
    ve             {embed [V, dv], proj [kv, dv], scale [], layer_scales [n_ve, 1]}  if VE layers
    lm_head        [V, d]                                             if not tie_embeddings

The banks are why a `Block` declares no parameters of its own: Parallel Muon
orthogonalises a whole bank per device and GPTQ walks its matrices, so `GPT`
declares the banks (and the per-layer controls, stacked over layers, in the
`blocks` submodule) and hands each block its slices (`LayerWeights`).
`golf_jax.compat` maps the banks to the reference's per-layer names.

Modules and collections:

    GPT                     params above; cache: pos, prev_token, prev_x
      blocks: BlockControls   the per-layer controls
      bigram: BigramHash      sows the Gram of proj's input
      ve: ValueEmbedding      sows the Gram of proj's input
      layers_i: Block
        attn: CausalSelfAttention   cache: k, v; sows the Grams of the q/k/v input and of proj's
        mlp: MLP                    sows the Grams of fc's and proj's inputs

- "cache" (`decode=True`): the KV cache of autoregressive generation, made the
  way Flax's own attention makes it: a first call with `mutable=["cache"]`
  creates it at the input's shape, later calls write T positions at `pos`.
- "input_grams" (`INPUT_GRAMS`, sown when the caller makes it mutable): X^T X
  of every linear layer's input X, for the GPTQ Hessians.

Shapes in names: B batch, T sequence, H query heads, K KV heads, G = H / K,
D head dim, d model dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from golf_jax.config import ModelConfig
from golf_jax.layers import (attention, attention_impl, bigram_buckets, compute_dtype,
                             exclusive_self_attention, fusion_impl, gram, head_nll, linear, lm_head, lookup, mlp_impl,
                             rms_norm, rotary_base, rotary_tables, scaled_sum, smear)
from golf_jax.param_tree import Params, embedding_dtype
from kernels import mlp as mlp_kernels
from kernels.qk_norm_rope import apply_rotary, norm_rope
from kernels.residual_norm import add_norm

INPUT_GRAMS = "input_grams"  # the collection of sown Gram matrices (Hessian collection)


# ----------------------------------------------------------------------------- initialisers

def bf16_representable(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
    """`init` drawn in float32, rounded to bf16, stored in the param's dtype.

    reference quirk: model.bfloat16() then fp32 restored for all but the
    embedding tables, so every initial value is bf16-representable.
    """
    def wrapped(key, shape, dtype=jnp.float32):
        return init(key, shape, jnp.float32).astype(jnp.bfloat16).astype(dtype)
    return wrapped


def orthogonal_bank(num_zero: int = 0) -> nn.initializers.Initializer:
    """A bank [n, out, in] of independently orthogonal matrices, the last
    `num_zero` of them zero (the reference zero-inits its output projections)."""
    orthogonal = nn.initializers.orthogonal()

    def init(key, shape, dtype=jnp.float32):
        n = shape[0] - num_zero
        mats = jax.vmap(lambda k: orthogonal(k, shape[1:], dtype))(jax.random.split(key, n))
        return jnp.concatenate([mats, jnp.zeros((num_zero, *shape[1:]), dtype)])
    return init


def small_linear(key, shape, dtype=jnp.float32):
    """The reference zero-inits the BigramHash and value-embedding projections,
    then its generic pass makes every linear with both sides >= 64 orthogonal."""
    if min(shape) >= 64:
        return nn.initializers.orthogonal()(key, shape, dtype)
    return jnp.zeros(shape, dtype)


def resid_mix_init(key, shape, dtype=jnp.float32):
    """[L, 2, d]: all of the stream, none of x0."""
    return jnp.stack([jnp.ones((shape[0], shape[2]), dtype), jnp.zeros((shape[0], shape[2]), dtype)], axis=1)


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """The reference's initialisation (see the initialisers above), without a
    forward pass.

    Not jitted as a whole: XLA:CPU (jax 0.10) can deadlock running several
    batched QR decompositions of one program on a 2-core machine; one QR per
    dispatch is safe, and init runs once.
    """
    cfg.validate()
    return GPT(cfg).init(key, method=GPT.declare_parameters)["params"]


def sow_gram(module: nn.Module, name: str, x: jax.Array) -> None:
    """Sow the Gram matrix of a linear layer's input, when the caller collects them."""
    if module.is_mutable_collection(INPUT_GRAMS):
        module.sow(INPUT_GRAMS, name, gram(x))




# ----------------------------------------------------------------------------- the modules

class BigramHash(nn.Module):
    """An embedding of the hashed (previous, current) token pair, projected to d."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = self.param("embed", bf16_representable(nn.initializers.zeros),
                                (cfg.bigram_vocab_size, cfg.bigram_dim), embedding_dtype(cfg))
        # The reference has no projection (an identity) between equal widths.
        self.proj = (self.param("proj", bf16_representable(small_linear), (cfg.model_dim, cfg.bigram_dim))
                     if cfg.bigram_dim != cfg.model_dim else None)
        self.scale = self.param("scale", bf16_representable(nn.initializers.constant(0.05)), ())

    def __call__(self, tokens_BxT: jax.Array, dtype, prev_token_B: jax.Array | None = None) -> jax.Array:
        h = lookup(self.embed, bigram_buckets(tokens_BxT, self.cfg.bigram_vocab_size, prev_token_B), dtype)
        if self.proj is not None:
            sow_gram(self, "proj", h)
            h = linear(h, self.proj)
        return scaled_sum([(self.scale.astype(dtype), h)], self.cfg.scales_in_float32)


class ValueEmbedding(nn.Module):
    """A value embedding shared by the VE layers: its output [B, T, kv] before
    the per-layer scales `layer_scales` [n_ve, 1]."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed = self.param("embed", bf16_representable(nn.initializers.normal(0.01)),
                                (cfg.vocab_size, cfg.ve_dim), embedding_dtype(cfg))
        # The reference has no projection (an identity) between equal widths.
        self.proj = (self.param("proj", bf16_representable(small_linear), (cfg.kv_dim, cfg.ve_dim))
                     if cfg.ve_dim != cfg.kv_dim else None)
        self.scale = self.param("scale", bf16_representable(nn.initializers.constant(0.1)), ())
        self.layer_scales = self.param("layer_scales", nn.initializers.ones, (len(cfg.ve_layer_indices), 1))

    def __call__(self, tokens_BxT: jax.Array, dtype) -> jax.Array:
        h = lookup(self.embed, tokens_BxT, dtype)
        if self.proj is not None:
            sow_gram(self, "proj", h)
            h = linear(h, self.proj)
        return scaled_sum([(self.scale.astype(dtype), h)], self.cfg.scales_in_float32)


class BlockControls(nn.Module):
    """The reference's per-block control tensors, stacked over layers."""
    cfg: ModelConfig

    def setup(self):
        L, d = self.cfg.num_layers, self.cfg.model_dim
        self.attn_scale = self.param("attn_scale", nn.initializers.ones, (L, d))
        self.mlp_scale = self.param("mlp_scale", nn.initializers.ones, (L, d))
        self.resid_mix = self.param("resid_mix", resid_mix_init, (L, 2, d))
        self.q_gain = self.param("q_gain", bf16_representable(nn.initializers.constant(self.cfg.qk_gain_init)),
                                 (L, self.cfg.num_heads))


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


class CausalSelfAttention(nn.Module):
    """GQA attention with QK RMSNorm, partial RoPE, a per-head query gain and
    XSA; V optionally plus the value embedding. With decode=True it reads and
    writes its KV cache, Flax's way (see the module docstring)."""
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, h_BxTxd: jax.Array, w: LayerWeights, ve_BxTxKV: jax.Array | None,
                 rope: tuple[jax.Array, jax.Array], decode: bool = False, pos: jax.Array | int = 0) -> jax.Array:
        cfg = self.cfg
        H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        B, T, d = h_BxTxd.shape
        sow_gram(self, "qkv", h_BxTxd)
        q_BxTxHxD = linear(h_BxTxd, w.q).reshape(B, T, H, D)
        k_BxTxKxD = linear(h_BxTxd, w.k).reshape(B, T, K, D)
        v_BxTxKV = linear(h_BxTxd, w.v)
        if ve_BxTxKV is not None:
            v_BxTxKV = v_BxTxKV + ve_BxTxKV
        v_BxTxKxD = v_BxTxKV.reshape(B, T, K, D)
        if not decode and fusion_impl(cfg, "norm_rope") == "pallas":
            # RMSNorm, partial RoPE and q_gain: one kernel each way, the same arithmetic
            q_BxTxHxD = norm_rope(q_BxTxHxD, *rope, w.q_gain, cfg.rotary_dims, "pallas")
            k_BxTxKxD = norm_rope(k_BxTxKxD, *rope, None, cfg.rotary_dims, "pallas")
        else:
            q_BxTxHxD = apply_rotary(rms_norm(q_BxTxHxD), *rope, cfg.rotary_dims)
            q_BxTxHxD = scaled_sum([(w.q_gain[None, None, :, None], q_BxTxHxD)], cfg.scales_in_float32)
            k_BxTxKxD = apply_rotary(rms_norm(k_BxTxKxD), *rope, cfg.rotary_dims)
        if decode:
            filled = self.has_variable("cache", "k")
            k_cache = self.variable("cache", "k", jnp.zeros, k_BxTxKxD.shape, k_BxTxKxD.dtype)  # [B, S, K, D]
            v_cache = self.variable("cache", "v", jnp.zeros, v_BxTxKxD.shape, v_BxTxKxD.dtype)
            if filled:  # write T positions at pos, attend over the whole cache (causal from pos)
                k_cache.value = jax.lax.dynamic_update_slice(k_cache.value, k_BxTxKxD, (0, pos, 0, 0))
                v_cache.value = jax.lax.dynamic_update_slice(v_cache.value, v_BxTxKxD, (0, pos, 0, 0))
                y_BxTxHxD = attention(q_BxTxHxD, k_cache.value, v_cache.value, "jnp", q_offset=pos)
            else:  # the call that creates the cache
                y_BxTxHxD = attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, "jnp")
        else:
            y_BxTxHxD = attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, attention_impl(cfg))
        if cfg.xsa_on(self.layer):
            y_BxTxHxD = exclusive_self_attention(y_BxTxHxD, v_BxTxKxD, "jnp" if decode else fusion_impl(cfg, "xsa"))
        y_BxTxd = y_BxTxHxD.reshape(B, T, d)
        sow_gram(self, "proj", y_BxTxd)
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
    """x_in = mix(x, x0); x = x_in + attn(norm(x_in)); x + mlp(norm(x)).

    The norms carry the LN scale 1/sqrt(layer + 1) (cfg.ln_scale)."""
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x_BxTxd: jax.Array, x0_BxTxd: jax.Array, w: LayerWeights, ve_BxTxKV: jax.Array | None,
                 rope: tuple[jax.Array, jax.Array], decode: bool = False, pos: jax.Array | int = 0) -> jax.Array:
        norm_scale = (self.layer + 1) ** -0.5 if self.cfg.ln_scale else 1.0
        f32 = self.cfg.scales_in_float32
        fused = not decode and fusion_impl(self.cfg, "residual_norm") == "pallas"

        def mix_norm(a, b, scale_a, scale_b):  # a mix, and the norm after it: one kernel each way when fused
            if fused:
                return add_norm(a, b, scale_a, scale_b, norm_scale, "pallas")
            mixed = scaled_sum([(scale_a, a), (scale_b, b)], f32)
            return mixed, rms_norm(mixed, norm_scale)
        x_in, h = mix_norm(x_BxTxd, x0_BxTxd, w.resid_mix[0], w.resid_mix[1])
        attn_out = CausalSelfAttention(self.cfg, self.layer, name="attn")(h, w, ve_BxTxKV, rope, decode, pos)
        x, h = mix_norm(x_in, attn_out, None, w.attn_scale)
        mlp_out = MLP(self.cfg, name="mlp")(h, w.fc, w.mlp_proj)
        return scaled_sum([(None, x), (w.mlp_scale, mlp_out)], f32)


class GPT(nn.Module):
    """Embedding (token + BigramHash, RMSNorm, SmearGate), the blocks with
    U-Net skips and value embeddings, final norm, tied soft-capped head."""
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        L, d, kv, V = cfg.num_layers, cfg.model_dim, cfg.kv_dim, cfg.vocab_size
        self.tok_emb = self.param("tok_emb", bf16_representable(nn.initializers.normal(cfg.tied_embed_init_std)),
                                  (V, d), embedding_dtype(cfg))
        self.qo_bank = self.param("qo_bank", bf16_representable(orthogonal_bank(num_zero=L)), (2 * L, d, d))
        self.kv_bank = self.param("kv_bank", bf16_representable(orthogonal_bank()), (2 * L, kv, d))
        self.mlp_up_bank = self.param("mlp_up_bank", bf16_representable(orthogonal_bank()), (L, cfg.mlp_dim, d))
        self.mlp_down_bank = self.param("mlp_down_bank", nn.initializers.zeros, (L, d, cfg.mlp_dim))
        self.controls = BlockControls(cfg, name="blocks")
        self.skip_weights = self.param("skip_weights", nn.initializers.ones, (cfg.num_skip_weights, d))
        self.smear_gate = self.param("smear_gate", nn.initializers.zeros, (d,))
        self.bigram = BigramHash(cfg) if cfg.bigram_enabled else None
        self.ve = ValueEmbedding(cfg) if cfg.ve_layer_indices else None
        self.lm_head = None if cfg.tie_embeddings else self.param("lm_head", nn.initializers.zeros, (V, d))
        self.layers = [Block(cfg, layer) for layer in range(L)]

    def layer_weights(self, layer: int, dtype) -> LayerWeights:
        L, c = self.cfg.num_layers, self.controls
        return LayerWeights(
            q=self.qo_bank[layer], k=self.kv_bank[layer], v=self.kv_bank[L + layer], proj=self.qo_bank[L + layer],
            fc=self.mlp_up_bank[layer], mlp_proj=self.mlp_down_bank[layer],
            attn_scale=c.attn_scale[layer].astype(dtype), mlp_scale=c.mlp_scale[layer].astype(dtype),
            resid_mix=c.resid_mix[layer].astype(dtype), q_gain=c.q_gain[layer].astype(dtype))

    @nn.compact
    def hidden(self, tokens_BxT: jax.Array, rope_len: int | None = None, decode: bool = False) -> jax.Array:
        """Final-normed hidden states [B, T, d] in the compute dtype.

        rope_len: the sequence length whose rotary base to use (default T; see
        `rotary_base`); decode=True needs it (the training length).
        """
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        B, T = tokens_BxT.shape
        pos, prev_token_B, prev_x_Bxd = 0, None, None
        if decode:
            if rope_len is None:
                raise ValueError("decode=True needs rope_len (the training sequence length)")
            filled = self.has_variable("cache", "pos")
            pos_var = self.variable("cache", "pos", lambda: jnp.zeros((), jnp.int32))
            prev_token_var = self.variable("cache", "prev_token", lambda: jnp.full((B,), -1, jnp.int32))
            prev_x_var = self.variable("cache", "prev_x", lambda: jnp.zeros((B, cfg.model_dim), dtype))
            pos, prev_token_B, prev_x_Bxd = pos_var.value, prev_token_var.value, prev_x_var.value

        x_BxTxd = lookup(self.tok_emb, tokens_BxT, dtype)
        if self.bigram is not None:
            x_BxTxd = x_BxTxd + self.bigram(tokens_BxT, dtype, prev_token_B)
        x_BxTxd = rms_norm(x_BxTxd)
        x0_BxTxd = smear(self.smear_gate, x_BxTxd, prev_x_Bxd, cfg.scales_in_float32)
        rope = rotary_tables(cfg, pos + jnp.arange(T), rotary_base(cfg, rope_len or T))
        ve_BxTxKV = self.ve(tokens_BxT, dtype) if self.ve is not None else None

        h_BxTxd, skips = x0_BxTxd, []
        for layer, block in enumerate(self.layers):
            decoder_idx = layer - cfg.num_encoder_layers
            if decoder_idx >= 0 and skips:  # U-Net: add the mirrored encoder output
                h_BxTxd = scaled_sum([(None, h_BxTxd), (self.skip_weights[decoder_idx].astype(dtype), skips.pop())],
                                     cfg.scales_in_float32)
            ve = None
            if layer in cfg.ve_layer_indices:
                ve = scaled_sum([(self.ve.layer_scales[cfg.ve_layer_indices.index(layer)].astype(dtype), ve_BxTxKV)],
                                cfg.scales_in_float32)
            h_BxTxd = block(h_BxTxd, x0_BxTxd, self.layer_weights(layer, dtype), ve, rope, decode, pos)
            if decoder_idx < 0:
                skips.append(h_BxTxd)

        if decode and filled:
            pos_var.value = pos + T
            prev_token_var.value = tokens_BxT[:, -1].astype(jnp.int32)
            prev_x_var.value = x_BxTxd[:, -1]
        return rms_norm(h_BxTxd)

    def declare_parameters(self) -> None:
        """For `init`: every submodule's setup declares its parameters; nothing is computed."""
        # Reading one attribute of a setup-style submodule runs its setup.
        self.controls.q_gain
        if self.bigram is not None:
            self.bigram.embed
        if self.ve is not None:
            self.ve.embed

    def head(self, h_BxTxd: jax.Array) -> jax.Array:
        """Soft-capped float32 logits [B, T, V] of final-normed hidden states."""
        return lm_head(self.tok_emb if self.lm_head is None else self.lm_head, self.cfg, h_BxTxd)

    def __call__(self, tokens_BxT: jax.Array, rope_len: int | None = None, decode: bool = False) -> jax.Array:
        """Soft-capped float32 logits [B, T, V]."""
        return self.head(self.hidden(tokens_BxT, rope_len, decode))

    def fused_nll(self, tokens_BxT: jax.Array, targets_BxT: jax.Array) -> jax.Array:
        """Per-token cross-entropy [B, T] through the fused softcap + cross-entropy kernel."""
        w = self.tok_emb if self.lm_head is None else self.lm_head
        return head_nll(w, self.cfg, self.hidden(tokens_BxT), targets_BxT, "pallas")


# ----------------------------------------------------------------------------- the model as functions

def hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, rope_len: int | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, d] in the compute dtype."""
    return GPT(cfg).apply({"params": params}, tokens, rope_len, method=GPT.hidden)


def logits_from_hidden(params: Params, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """Soft-capped float32 logits of final-normed hidden states."""
    return GPT(cfg).apply({"params": params}, h_BxTxd, method=GPT.head)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_len"))
def logits(params: Params, cfg: ModelConfig, tokens: jax.Array, rope_len: int | None = None) -> jax.Array:
    """Soft-capped logits [B, T, vocab], float32."""
    return GPT(cfg).apply({"params": params}, tokens, rope_len)


def nll_from_logits(z: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each target under logits z [..., vocab]."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames="cfg")
def token_nll(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, T], float32 (with the softcap_ce kernel of
    model.fusion_impl, from the pre-softcap logits: kernels/softcap_ce.py)."""
    if fusion_impl(cfg, "softcap_ce") == "pallas":
        return GPT(cfg).apply({"params": params}, tokens, targets, method=GPT.fused_nll)
    return nll_from_logits(logits(params, cfg, tokens), targets)


@functools.partial(jax.jit, static_argnames="cfg")
def loss(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over all tokens, float32."""
    return jnp.mean(token_nll(params, cfg, tokens, targets))
