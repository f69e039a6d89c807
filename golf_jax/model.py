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
import os
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu_attention

from golf_jax.config import ModelConfig
from kernels import mlp as mlp_kernels

Params = dict

# torch's F.rms_norm default eps for float32 inputs; the reference uses it for
# every RMSNorm, which carries no weight.
RMS_NORM_EPS = float(np.finfo(np.float32).eps)
XSA_NORM_EPS = 1e-12  # F.normalize's clamp of the value vector's norm
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191
EMBEDDING_KEYS = ("tok_emb", "bigram/embed", "ve/embed")
INPUT_GRAMS = "input_grams"  # the collection of sown Gram matrices (Hessian collection)


# ----------------------------------------------------------------------------- dtypes

def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    if cfg.compute_dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(cfg.compute_dtype)


# XLA's flags for repeatable GPU runs; under them cuDNN's attention backward
# does not compile with two or more layers (docs/fidelity.md).
DETERMINISM_FLAGS = ("--xla_gpu_exclude_nondeterministic_ops=true", "--xla_gpu_deterministic_ops=true")


def attention_impl(cfg: ModelConfig) -> str:
    """"auto": cuDNN flash attention on GPUs, the Pallas kernel there when
    XLA's determinism flags are set (repeatable runs), jnp elsewhere."""
    if cfg.attention_impl == "auto":
        if jax.default_backend() != "gpu":
            return "jnp"
        flags = os.environ.get("XLA_FLAGS", "").split()
        return "pallas" if any(flag in flags for flag in DETERMINISM_FLAGS) else "cudnn"
    return cfg.attention_impl


def mlp_impl(cfg: ModelConfig) -> str:
    """The MLP path: the fused Triton kernels on GPUs (bf16, jax-triton
    installed) unless the config says otherwise, the jnp path elsewhere."""
    if cfg.mlp_impl != "auto":
        return cfg.mlp_impl
    fits = mlp_kernels.triton_supports(cfg.model_dim, cfg.mlp_dim)
    return "triton" if compute_dtype(cfg) == jnp.bfloat16 and fits and mlp_kernels.triton_available() else "jnp"


def path_name(path) -> str:
    """A params-tree path as "section/key", e.g. "bigram/proj"."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def embedding_dtype(cfg: ModelConfig) -> jnp.dtype:
    # reference quirk: the model is cast to bf16 and only banks, small linears
    # and scalars go back to fp32, so the embedding tables stay bf16.
    return jnp.dtype(cfg.embedding_dtype)


def cast_params(params: Params, cfg: ModelConfig) -> Params:
    """Apply the parameter dtype rule: embedding tables in cfg.embedding_dtype,
    everything else float32."""
    def cast(path, x):
        return jnp.asarray(x, embedding_dtype(cfg) if path_name(path) in EMBEDDING_KEYS else jnp.float32)

    return jax.tree_util.tree_map_with_path(cast, params)


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


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


# Until 2026-11-30 (params layout 1) golf_jax gave BigramHash and the value
# embedding a projection even between equal widths; the Flax model (layout 2)
# leaves it out, as the reference does. Only such configs (configs/smoke.py's
# value embedding, 64 = 64, until then) are affected.
LEGACY_LAYOUT = ("a projection between equal widths, saved by golf_jax before 2026-11-30 (params layout 1); "
                 "this golf_jax (params layout 2, the Flax model) has none there, as the reference: "
                 "retrain the model with it")


def legacy_projections(cfg: ModelConfig) -> tuple[str, ...]:
    """The params that layout 1 had for this config and layout 2 has not."""
    return tuple(name for name, equal in (
        ("bigram/proj", cfg.bigram_enabled and cfg.bigram_dim == cfg.model_dim),
        ("ve/proj", bool(cfg.ve_layer_indices) and cfg.ve_dim == cfg.kv_dim)) if equal)


def summary(params: Params) -> str:
    """A table of the parameters: shape, dtype and count of each, a subtotal
    per submodule, and the total (printed at launch).

    Flax's `tabulate` is not used: it counts the bank slices each `Block`
    receives as that block's inputs, so its total is more than twice the
    model's."""
    lines = [f"{'parameter':<24} {'shape':<16} {'dtype':<9} {'count':>11}"]
    for module, sub in params.items():
        leaves = jax.tree_util.tree_leaves_with_path(sub)
        for path, x in leaves:
            name = "/".join([module, path_name(path)]) if path else module
            lines.append(f"{name:<24} {'x'.join(map(str, x.shape)) or '-':<16} {jnp.dtype(x.dtype).name:<9} "
                         f"{int(np.prod(x.shape)):>11,}")
        if len(leaves) > 1:
            lines.append(f"{module + ' (module)':<51} {param_count(sub):>11,}")
    lines.append(f"{'total':<51} {param_count(params):>11,}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- pieces

def rms_norm(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """Weightless RMSNorm times a constant, in float32, rounded once to x's dtype.

    The constant is applied here, in float32, because a Python float times a
    bf16 array is rounded to bf16 first in JAX (1/sqrt(3) becomes 0.578125),
    where PyTorch multiplies in float32.
    """
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_NORM_EPS) * scale).astype(x.dtype)


def linear(x: jax.Array, w_OxI: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w_OxI.astype(x.dtype))


def bigram_buckets(tokens_BxT: jax.Array, bigram_vocab_size: int,
                   prev_token_B: jax.Array | None = None) -> jax.Array:
    """(36313 t[i] XOR 27191 t[i-1]) mod (Vb - 1) in int32; position 0 -> Vb - 1.

    prev_token_B: the token before tokens[:, 0] when decoding a continuation;
    None or -1 means tokens[:, 0] starts the sequence.
    """
    t = tokens_BxT.astype(jnp.int32)
    first_prev = jnp.full_like(t[:, :1], -1) if prev_token_B is None else prev_token_B.astype(jnp.int32)[:, None]
    prev = jnp.concatenate([first_prev, t[:, :-1]], axis=1)
    mixed = jnp.bitwise_xor(BIGRAM_MUL_CUR * t, BIGRAM_MUL_PREV * prev)
    return jnp.where(prev < 0, bigram_vocab_size - 1, jnp.mod(mixed, bigram_vocab_size - 1))


def rotary_base(cfg: ModelConfig, seq_len: int) -> float:
    # reference quirk: NTK-scaled RoPE base above rope_ntk_base_len (1024) tokens.
    if seq_len > cfg.rope_ntk_base_len:
        r = cfg.rotary_dims
        return cfg.rope_base * (seq_len / cfg.rope_ntk_base_len) ** (r / (r - 2))
    return cfg.rope_base


def rotary_tables(cfg: ModelConfig, positions_T: jax.Array, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, rotary_dims / 2] in float32 (as the reference computes them)."""
    exponents = jnp.arange(0, cfg.rotary_dims, 2, dtype=jnp.float32) / cfg.rotary_dims
    inv_freq = 1.0 / (jnp.float32(base) ** exponents)
    freqs = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def apply_rotary(x_BxTxHxD: jax.Array, cos: jax.Array, sin: jax.Array, rope_dims: int) -> jax.Array:
    """The reference's convention on the first rope_dims dims (note the signs):
    (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    half = rope_dims // 2
    x1, x2, rest = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:rope_dims], x_BxTxHxD[..., rope_dims:]
    c = cos[None, :, None, :].astype(x_BxTxHxD.dtype)
    s = sin[None, :, None, :].astype(x_BxTxHxD.dtype)
    return jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c, rest], axis=-1)


def attention(q_BxTxHxD: jax.Array, k_BxSxKxD: jax.Array, v_BxSxKxD: jax.Array, impl: str,
              q_offset: jax.Array | int = 0) -> jax.Array:
    """Causal softmax attention, scale 1/sqrt(D), query head h on KV head h // G.

    Query t sits at position q_offset + t and sees keys 0..q_offset + t; with
    S > T the keys are a KV cache (the "jnp" path only).
    """
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
    s_BxKxGxTxS = jnp.where(causal_TxS, s_BxKxGxTxS, -jnp.inf)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1).astype(v_BxSxKxD.dtype)
    o_BxTxKxGxD = jnp.einsum("bkgts,bskd->btkgd", p_BxKxGxTxS, v_BxSxKxD)
    return o_BxTxKxGxD.reshape(B, T, H, D)


def pallas_attention(q_BxTxHxD: jax.Array, k_BxTxKxD: jax.Array, v_BxTxKxD: jax.Array) -> jax.Array:
    """Causal attention through JAX's Pallas flash-attention kernel (Triton on
    GPUs, interpreted elsewhere, for the tests). Its backward has no atomics,
    so under XLA's determinism flags runs repeat bit for bit. The kernel has
    no GQA: the KV heads are repeated to the query heads, and their gradient
    sums over each group. T must be a multiple of 32 (its backward's blocks).
    """
    B, T, H, D = q_BxTxHxD.shape
    G = H // k_BxTxKxD.shape[2]
    k_BxTxHxD, v_BxTxHxD = (jnp.repeat(x, G, axis=2) for x in (k_BxTxKxD, v_BxTxKxD))
    return pallas_gpu_attention.mha(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, None, sm_scale=D ** -0.5, causal=True,
                                    interpret=jax.default_backend() != "gpu")


def exclusive_self_attention(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array) -> jax.Array:
    """XSA: remove from each head's output its component along the unit value
    vector of its KV group at the same position.

    In float32 whatever the inputs, returned in y's dtype: under the
    reference's autocast F.normalize is a float32 op, so the unit vector, the
    projection and the difference are float32 until the out-projection.
    """
    B, T, H, D = y_BxTxHxD.shape
    K = v_BxTxKxD.shape[2]
    vf = v_BxTxKxD.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(vf * vf, axis=-1, keepdims=True))
    vn_BxTxKx1xD = (vf / jnp.maximum(norm, XSA_NORM_EPS))[:, :, :, None, :]
    y_BxTxKxGxD = y_BxTxHxD.reshape(B, T, K, H // K, D).astype(jnp.float32)
    along = jnp.sum(y_BxTxKxGxD * vn_BxTxKx1xD, axis=-1, keepdims=True)
    return (y_BxTxKxGxD - along * vn_BxTxKx1xD).reshape(B, T, H, D).astype(y_BxTxHxD.dtype)


def lookup(table_VxD: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Embedding rows in `dtype`, gathered from a float32 view of the table.

    The gather's gradient is a scatter-add over the token ids. Into a bf16
    table, with text's repeated tokens, it took 69 ms for a 48 x 2048
    micro-batch on an H100; through the float32 view 0.36 ms (uniform random
    ids: 1.3 ms; see docs/performance.md). The view also sums the gradient in
    float32. The values gathered are identical.
    """
    return table_VxD.astype(jnp.float32)[ids].astype(dtype)


def gram(x_NxI: jax.Array) -> jax.Array:
    """X^T X over every leading axis, float32: bf16 products are exact in
    float32, so only the accumulation rounds."""
    x = x_NxI.reshape(-1, x_NxI.shape[-1])
    return jnp.einsum("ni,nj->ij", x, x, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def sow_gram(module: nn.Module, name: str, x: jax.Array) -> None:
    """Sow the Gram matrix of a linear layer's input, when the caller collects them."""
    if module.is_mutable_collection(INPUT_GRAMS):
        module.sow(INPUT_GRAMS, name, gram(x))


def smear(gate_d: jax.Array, x_BxTxd: jax.Array, prev_x_Bxd: jax.Array | None = None) -> jax.Array:
    """SmearGate: mix each position with the previous one (zeros before the start)."""
    gate = jax.nn.sigmoid(gate_d.astype(jnp.float32)).astype(x_BxTxd.dtype)
    first = jnp.zeros_like(x_BxTxd[:, :1]) if prev_x_Bxd is None else prev_x_Bxd[:, None].astype(x_BxTxd.dtype)
    x_prev = jnp.concatenate([first, x_BxTxd[:, :-1]], axis=1)
    return (1 - gate) * x_BxTxd + gate * x_prev


def lm_head(w_Vxd: jax.Array, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """Soft-capped float32 logits of final-normed hidden states."""
    # reference quirk: under autocast the head's matmul returns the compute
    # dtype, so the logits are rounded to bf16 before the float32 softcap
    # (model.round_logits=False keeps the float32 accumulator).
    out = None if cfg.round_logits else jnp.float32
    z = jnp.einsum("btd,vd->btv", h_BxTxd, w_Vxd.astype(h_BxTxd.dtype), preferred_element_type=out)
    return cfg.logit_softcap * jnp.tanh(z.astype(jnp.float32) / cfg.logit_softcap)


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
        return h * self.scale.astype(dtype)


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
        return h * self.scale.astype(dtype)


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
        q_BxTxHxD = apply_rotary(rms_norm(q_BxTxHxD), *rope, cfg.rotary_dims) * w.q_gain[None, None, :, None]
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
            y_BxTxHxD = exclusive_self_attention(y_BxTxHxD, v_BxTxKxD)
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
        x_in = w.resid_mix[0] * x_BxTxd + w.resid_mix[1] * x0_BxTxd
        attn = CausalSelfAttention(self.cfg, self.layer, name="attn")
        x = x_in + w.attn_scale * attn(rms_norm(x_in, norm_scale), w, ve_BxTxKV, rope, decode, pos)
        return x + w.mlp_scale * MLP(self.cfg, name="mlp")(rms_norm(x, norm_scale), w.fc, w.mlp_proj)


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
        x0_BxTxd = smear(self.smear_gate, x_BxTxd, prev_x_Bxd)
        rope = rotary_tables(cfg, pos + jnp.arange(T), rotary_base(cfg, rope_len or T))
        ve_BxTxKV = self.ve(tokens_BxT, dtype) if self.ve is not None else None

        h_BxTxd, skips = x0_BxTxd, []
        for layer, block in enumerate(self.layers):
            decoder_idx = layer - cfg.num_encoder_layers
            if decoder_idx >= 0 and skips:  # U-Net: add the mirrored encoder output
                h_BxTxd = h_BxTxd + self.skip_weights[decoder_idx].astype(dtype) * skips.pop()
            ve = None
            if layer in cfg.ve_layer_indices:
                ve = ve_BxTxKV * self.ve.layer_scales[cfg.ve_layer_indices.index(layer)].astype(dtype)
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
    """Per-token cross-entropy [B, T], float32."""
    return nll_from_logits(logits(params, cfg, tokens), targets)


@functools.partial(jax.jit, static_argnames="cfg")
def loss(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over all tokens, float32."""
    return jnp.mean(token_nll(params, cfg, tokens, targets))
