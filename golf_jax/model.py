"""The record GPT as pure functions of (params, config, tokens).

Params are a plain dict pytree in the reference's banked layout, linear
weights [out, in] (y = x @ W.T):

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

Shapes in names: B batch, T sequence, H query heads, K KV heads, G = H / K,
D head dim.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from golf_jax.config import ModelConfig
from kernels import mlp as mlp_kernels

Params = dict

# torch's F.rms_norm default eps for float32 inputs; the reference uses it for
# every RMSNorm, which carries no weight.
RMS_NORM_EPS = float(np.finfo(np.float32).eps)
XSA_NORM_EPS = 1e-12  # F.normalize's clamp of the value vector's norm
BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191
EMBEDDING_KEYS = ("tok_emb", "bigram/embed", "ve/embed")


# ----------------------------------------------------------------------------- dtypes

def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    if cfg.compute_dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(cfg.compute_dtype)


def attention_impl(cfg: ModelConfig) -> str:
    if cfg.attention_impl == "auto":
        return "cudnn" if jax.default_backend() == "gpu" else "jnp"
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


def cast_params(params: Params, cfg: ModelConfig) -> Params:
    """Apply the parameter dtype rule: embedding tables in cfg.embedding_dtype,
    everything else float32."""
    emb = jnp.dtype(cfg.embedding_dtype)

    def cast(path, x):
        return jnp.asarray(x, emb if path_name(path) in EMBEDDING_KEYS else jnp.float32)

    return jax.tree_util.tree_map_with_path(cast, params)


# ----------------------------------------------------------------------------- init

def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Initialise as the reference does, including its bf16 round trip.

    Not jitted as a whole: XLA:CPU (jax 0.10) can deadlock running several
    batched QR decompositions of one program on a 2-core machine; one QR per
    dispatch is safe, and init runs once.
    """
    cfg.validate()
    L, d, kv, hid, V = cfg.num_layers, cfg.model_dim, cfg.kv_dim, cfg.mlp_dim, cfg.vocab_size
    ortho = jax.nn.initializers.orthogonal()
    keys = iter(jax.random.split(key, 16))

    def ortho_stack(k, n, shape):
        return jax.vmap(lambda kk: ortho(kk, shape, jnp.float32))(jax.random.split(k, n))

    def small_linear(k, shape):
        # The reference zero-inits these, then its generic pass makes every
        # linear with both sides >= 64 orthogonal.
        return ortho(k, shape, jnp.float32) if min(shape) >= 64 else jnp.zeros(shape, jnp.float32)

    params: Params = {
        "tok_emb": cfg.tied_embed_init_std * jax.random.normal(next(keys), (V, d), jnp.float32),
        "qo_bank": jnp.concatenate([ortho_stack(next(keys), L, (d, d)), jnp.zeros((L, d, d))]),
        "kv_bank": jnp.concatenate([ortho_stack(next(keys), L, (kv, d)), ortho_stack(next(keys), L, (kv, d))]),
        "mlp_up_bank": ortho_stack(next(keys), L, (hid, d)),
        "mlp_down_bank": jnp.zeros((L, d, hid), jnp.float32),
        "blocks": {
            "attn_scale": jnp.ones((L, d)),
            "mlp_scale": jnp.ones((L, d)),
            "resid_mix": jnp.stack([jnp.ones((L, d)), jnp.zeros((L, d))], axis=1),
            "q_gain": jnp.full((L, cfg.num_heads), cfg.qk_gain_init),
        },
        "skip_weights": jnp.ones((cfg.num_skip_weights, d)),
        "smear_gate": jnp.zeros((d,)),
    }
    if cfg.bigram_enabled:
        params["bigram"] = {
            "embed": jnp.zeros((cfg.bigram_vocab_size, cfg.bigram_dim)),
            "proj": small_linear(next(keys), (d, cfg.bigram_dim)),
            "scale": jnp.asarray(0.05),
        }
    if cfg.ve_layer_indices:
        params["ve"] = {
            "embed": 0.01 * jax.random.normal(next(keys), (V, cfg.ve_dim), jnp.float32),
            "proj": small_linear(next(keys), (kv, cfg.ve_dim)),
            "scale": jnp.asarray(0.1),
            "layer_scales": jnp.ones((len(cfg.ve_layer_indices), 1)),
        }
    if not cfg.tie_embeddings:
        params["lm_head"] = jnp.zeros((V, d))
    # reference quirk: model.bfloat16() then fp32 restored for all but the
    # embedding tables, so every initial value is bf16-representable.
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    return cast_params(params, cfg)


def param_count(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


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


# ----------------------------------------------------------------------------- the model

def lookup(table_VxD: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Embedding rows in `dtype`, gathered from a float32 view of the table.

    The gather's gradient is a scatter-add over the token ids. Into a bf16
    table, with text's repeated tokens, it took 69 ms for a 48 x 2048
    micro-batch on an H100; through the float32 view 0.36 ms (uniform random
    ids: 1.3 ms; see docs/performance.md). The view also sums the gradient in
    float32. The values gathered are identical.
    """
    return table_VxD.astype(jnp.float32)[ids].astype(dtype)


Taps = dict  # {(site, layer): Gram matrix [in, in]}, filled while tracing


def gram(x_NxI: jax.Array) -> jax.Array:
    """X^T X over every leading axis, float32: bf16 products are exact in
    float32, so only the accumulation rounds."""
    x = x_NxI.reshape(-1, x_NxI.shape[-1])
    return jnp.einsum("ni,nj->ij", x, x, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def tap(taps: Taps | None, site: str, layer: int, x: jax.Array) -> None:
    """Record the Gram matrix of a linear layer's input (Hessian collection)."""
    if taps is not None:
        taps[(site, layer)] = gram(x)


def normed_embedding(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array, dtype,
                     prev_token_B: jax.Array | None = None, taps: Taps | None = None) -> jax.Array:
    """Token + BigramHash embedding, RMSNorm (before the SmearGate)."""
    x = lookup(params["tok_emb"], tokens_BxT, dtype)
    if cfg.bigram_enabled:
        bg = params["bigram"]
        h = lookup(bg["embed"], bigram_buckets(tokens_BxT, cfg.bigram_vocab_size, prev_token_B), dtype)
        if "proj" in bg:  # absent (identity) when bigram_dim == model_dim
            tap(taps, "bigram_proj", 0, h)
            h = linear(h, bg["proj"])
        x = x + h * bg["scale"].astype(dtype)
    return rms_norm(x)


def smear(params: Params, x_BxTxd: jax.Array, prev_x_Bxd: jax.Array | None = None) -> jax.Array:
    """SmearGate: mix each position with the previous one (zeros before the start)."""
    gate = jax.nn.sigmoid(params["smear_gate"].astype(jnp.float32)).astype(x_BxTxd.dtype)
    first = jnp.zeros_like(x_BxTxd[:, :1]) if prev_x_Bxd is None else prev_x_Bxd[:, None].astype(x_BxTxd.dtype)
    x_prev = jnp.concatenate([first, x_BxTxd[:, :-1]], axis=1)
    return (1 - gate) * x_BxTxd + gate * x_prev


def embed(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array, dtype) -> jax.Array:
    """Token + BigramHash embedding, RMSNorm, SmearGate: the x0 of every block."""
    return smear(params, normed_embedding(params, cfg, tokens_BxT, dtype))


def value_embedding(params: Params, tokens_BxT: jax.Array, dtype, taps: Taps | None = None) -> jax.Array:
    """The shared value embedding, projected to kv_dim, before its per-layer scale."""
    ve = params["ve"]
    h = lookup(ve["embed"], tokens_BxT, dtype)
    if "proj" in ve:  # absent (identity) when ve_dim == kv_dim
        tap(taps, "ve_proj", 0, h)
        h = linear(h, ve["proj"])
    return h * ve["scale"].astype(dtype)


# attend(layer, q, k, v) -> attention output [B, T, H, D]; generation passes
# one that reads and writes a KV cache.
Attend = Callable[[int, jax.Array, jax.Array, jax.Array], jax.Array]


def block(params: Params, cfg: ModelConfig, layer: int, x: jax.Array, x0: jax.Array,
          ve_BxTxKV: jax.Array | None, rope: tuple[jax.Array, jax.Array],
          attend: Attend | None = None, taps: Taps | None = None) -> jax.Array:
    L, H, K, D = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T, d = x.shape
    p = jax.tree.map(lambda a: a[layer].astype(x.dtype), params["blocks"])
    norm_scale = (layer + 1) ** -0.5 if cfg.ln_scale else 1.0

    x_in = p["resid_mix"][0] * x + p["resid_mix"][1] * x0
    h = rms_norm(x_in, norm_scale)
    tap(taps, "attn_in", layer, h)
    q = linear(h, params["qo_bank"][layer]).reshape(B, T, H, D)
    k = linear(h, params["kv_bank"][layer]).reshape(B, T, K, D)
    v = linear(h, params["kv_bank"][L + layer])
    if ve_BxTxKV is not None:
        v = v + ve_BxTxKV
    v = v.reshape(B, T, K, D)
    q = apply_rotary(rms_norm(q), *rope, cfg.rotary_dims) * p["q_gain"][None, None, :, None]
    k = apply_rotary(rms_norm(k), *rope, cfg.rotary_dims)
    y = attend(layer, q, k, v) if attend else attention(q, k, v, attention_impl(cfg))
    if cfg.xsa_on(layer):
        y = exclusive_self_attention(y, v)
    y = y.reshape(B, T, d)
    tap(taps, "attn_out", layer, y)
    x = x_in + p["attn_scale"] * linear(y, params["qo_bank"][L + layer])

    h = rms_norm(x, norm_scale)
    w_up, w_down = (params[bank][layer].astype(x.dtype) for bank in ("mlp_up_bank", "mlp_down_bank"))
    if taps is None:
        y = mlp_kernels.mlp(h, w_up, w_down, cfg.mlp_negative_slope, mlp_impl(cfg))
    else:  # Hessian collection needs the hidden activation itself
        tap(taps, "mlp_in", layer, h)
        act = mlp_kernels.leaky_squared(linear(h, w_up), cfg.mlp_negative_slope)
        tap(taps, "mlp_hidden", layer, act)
        y = linear(act, w_down)
    return x + p["mlp_scale"] * y


def run_blocks(params: Params, cfg: ModelConfig, x0: jax.Array, ve_base: jax.Array | None,
               rope: tuple[jax.Array, jax.Array], attend: Attend | None = None,
               taps: Taps | None = None) -> jax.Array:
    """Every block with the U-Net skips and the per-layer value embeddings."""
    dtype = x0.dtype
    ve_layers = cfg.ve_layer_indices
    x = x0
    skips = []
    for layer in range(cfg.num_layers):
        decoder_idx = layer - cfg.num_encoder_layers
        if decoder_idx >= 0 and skips:  # U-Net: pop the mirrored encoder output
            x = x + params["skip_weights"][decoder_idx].astype(dtype) * skips.pop()
        ve = None
        if layer in ve_layers:
            ve = ve_base * params["ve"]["layer_scales"][ve_layers.index(layer)].astype(dtype)
        x = block(params, cfg, layer, x, x0, ve, rope, attend, taps)
        if decoder_idx < 0:
            skips.append(x)
    return x


def hidden(params: Params, cfg: ModelConfig, tokens_BxT: jax.Array, rope_len: int | None = None,
           taps: Taps | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, d] in the compute dtype.

    rope_len: the sequence length whose rotary base to use (default T; see
    `rotary_base`). taps: a dict to fill with the Gram matrix of every linear
    layer's input, for the GPTQ Hessians.
    """
    dtype = compute_dtype(cfg)
    T = tokens_BxT.shape[1]
    rope = rotary_tables(cfg, jnp.arange(T), rotary_base(cfg, rope_len or T))
    x0 = smear(params, normed_embedding(params, cfg, tokens_BxT, dtype, taps=taps))
    ve_base = value_embedding(params, tokens_BxT, dtype, taps) if cfg.ve_layer_indices else None
    return rms_norm(run_blocks(params, cfg, x0, ve_base, rope, taps=taps))


def head_weight(params: Params, cfg: ModelConfig) -> jax.Array:
    return params["tok_emb"] if cfg.tie_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """Soft-capped float32 logits of final-normed hidden states."""
    w = head_weight(params, cfg).astype(h_BxTxd.dtype)
    # reference quirk: under autocast the head's matmul returns the compute
    # dtype, so the logits are rounded to bf16 before the float32 softcap
    # (model.round_logits=False keeps the float32 accumulator).
    out = None if cfg.round_logits else jnp.float32
    z = jnp.einsum("btd,vd->btv", h_BxTxd, w, preferred_element_type=out).astype(jnp.float32)
    return cfg.logit_softcap * jnp.tanh(z / cfg.logit_softcap)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_len"))
def logits(params: Params, cfg: ModelConfig, tokens: jax.Array, rope_len: int | None = None) -> jax.Array:
    """Soft-capped logits [B, T, vocab], float32."""
    return logits_from_hidden(params, cfg, hidden(params, cfg, tokens, rope_len))


@functools.partial(jax.jit, static_argnames="cfg")
def token_nll(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token cross-entropy [B, T], float32."""
    return nll_from_logits(logits(params, cfg, tokens), targets)


def nll_from_logits(z: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each target under logits z [..., vocab]."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames="cfg")
def loss(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over all tokens, float32."""
    return jnp.mean(token_nll(params, cfg, tokens, targets))
