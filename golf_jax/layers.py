"""The model's functional pieces, pure jnp over arrays: norms, linears,
BigramHash buckets, the rotary tables, XSA, the embedding lookup, SmearGate
and the soft-capped head; the 1.0611 record's windowed SmearGate, gated U-Net skip, head-output gate and
parallel lanes' output; and which implementation a config resolves to (among
them the Pallas kernels of kernels/, whose jnp references include the rotation
itself and XSA). The Flax modules that assemble them are in golf_jax/model.py
and golf_jax/blocks.py; the attention paths themselves (cuDNN, Pallas, jnp)
in golf_jax/attention.py.

Shapes in names: B batch, T sequence, H query heads, K KV heads, G = H / K,
D head dim, d model dim.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from golf_jax.config import FUSION_KERNELS, ModelConfig
from kernels import mlp as mlp_kernels
from kernels import softcap_ce
from kernels import xsa as xsa_kernels
from kernels.qk_norm_rope import RMS_NORM_EPS

BIGRAM_MUL_CUR, BIGRAM_MUL_PREV = 36313, 27191


# ----------------------------------------------------------------------------- implementations

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


def fusion_impl(cfg: ModelConfig, kernel: str) -> str:
    """The implementation of one of the Pallas kernels of cfg.fusion_kernels
    (config.FUSION_KERNELS): cfg.fusion_impl for a listed kernel, "auto" being
    Pallas on GPUs in bf16 when the model and head dims (softcap_ce: the
    vocabulary) are powers of two (Triton's blocks); "jnp" otherwise, and for
    the kernels that multiply by the scales in float32 (norm_rope's q_gain,
    residual_norm's mixes) when scales_in_float32 is off."""
    if kernel not in FUSION_KERNELS:
        raise ValueError(f"no fused kernel named {kernel!r}; expected one of {FUSION_KERNELS}")
    if kernel not in cfg.fusion_kernels.split(",") or cfg.fusion_impl == "jnp":
        return "jnp"
    if kernel in ("norm_rope", "residual_norm") and not cfg.scales_in_float32:
        return "jnp"
    if cfg.fusion_impl == "pallas":
        return "pallas"
    power_of_two = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    if kernel == "softcap_ce":
        fits = power_of_two(cfg.vocab_size)
    elif kernel == "xsa_gate":  # a program takes one KV head's group of query heads
        fits = power_of_two(cfg.head_dim) and power_of_two(cfg.num_heads // cfg.num_kv_heads)
    else:
        fits = power_of_two(cfg.model_dim) and power_of_two(cfg.head_dim)
    return "pallas" if jax.default_backend() == "gpu" and compute_dtype(cfg) == jnp.bfloat16 and fits else "jnp"


# ----------------------------------------------------------------------------- pieces

def rms_norm(x: jax.Array, scale: float = 1.0) -> jax.Array:
    """Weightless RMSNorm times a constant, in float32, rounded once to x's dtype.

    The constant is applied here, in float32, because a Python float times a
    bf16 array is rounded to bf16 first in JAX (1/sqrt(3) becomes 0.578125),
    where PyTorch multiplies in float32.
    """
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + RMS_NORM_EPS) * scale).astype(x.dtype)


def scaled_sum(terms: list[tuple[jax.Array | None, jax.Array]], in_float32: bool) -> jax.Array:
    """sum of scale * x over (scale, x) terms (None: a scale of 1), in the first x's dtype.

    in_float32 (model.scales_in_float32), for bf16 activations: each product and
    the sum in float32, rounded once, as the fused kernel torch.compile makes of
    them computes (the reference trains compiled). The backward is that
    kernel's too (`_scaled_sum_f32`): each scale's gradient a float32 sum over
    the tokens, rounded once. Otherwise op by op in the activations' dtype
    (eager PyTorch), where the scales' gradients are sums of rounded products
    (and XLA:CPU rounds their running sums too: 15% off for the VE scale of a
    small model, against 0.1%; docs/fidelity.md).
    """
    dtype = terms[0][1].dtype
    if in_float32 and dtype != jnp.float32:
        scales = tuple(scale for scale, _ in terms if scale is not None)
        return _scaled_sum_f32(tuple(scale is not None for scale, _ in terms), scales, tuple(x for _, x in terms))
    total = None
    for scale, x in terms:
        term = x if scale is None else scale.astype(dtype) * x
        total = term if total is None else total + term
    return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scaled_sum_f32(has_scale: tuple[bool, ...], scales: tuple[jax.Array, ...], xs: tuple[jax.Array, ...]) -> jax.Array:
    next_scale, total = iter(scales), None
    for scaled, x in zip(has_scale, xs):
        term = next(next_scale).astype(jnp.float32) * x.astype(jnp.float32) if scaled else x.astype(jnp.float32)
        total = term if total is None else total + term
    return total.astype(xs[0].dtype)


def _scaled_sum_f32_fwd(has_scale, scales, xs):
    # The residuals are the inputs as they are (bf16), not float32 copies of them.
    return _scaled_sum_f32(has_scale, scales, xs), (scales, xs)


def _scaled_sum_f32_bwd(has_scale, residuals, g):
    scales, xs = residuals
    gf, next_scale = g.astype(jnp.float32), iter(scales)
    d_scales, d_xs = [], []
    for scaled, x in zip(has_scale, xs):
        if not scaled:
            d_xs.append(g.astype(x.dtype))
            continue
        scale = next(next_scale)
        d_xs.append((gf * scale.astype(jnp.float32)).astype(x.dtype))
        product = gf * x.astype(jnp.float32)
        lead = product.ndim - scale.ndim  # the scale broadcasts over leading axes and its size-1 axes
        axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(scale.shape) if n == 1)
        d_scales.append(jnp.sum(product, axis=axes).reshape(scale.shape).astype(scale.dtype))
    return tuple(d_scales), tuple(d_xs)


_scaled_sum_f32.defvjp(_scaled_sum_f32_fwd, _scaled_sum_f32_bwd)


def rounding_to(dtype):
    """A function that rounds float32 values to `dtype`'s precision, keeping them
    float32: one rounding of a result computed in float32, as a bf16 PyTorch op
    (or a fused kernel's store) rounds. reduce_precision rather than a convert
    pair, which XLA's excess precision may drop inside a fusion. The identity
    for float32."""
    info = jnp.finfo(dtype)
    if info.bits >= 32:
        return lambda x: x
    return lambda x: jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def linear(x: jax.Array, w_OxI: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x, w_OxI.astype(x.dtype))


@jax.custom_vjp
def _rounded_matmul(x: jax.Array, w_OxI: jax.Array) -> jax.Array:
    return rounding_to(x.dtype)(jnp.einsum("...i,oi->...o", x, w_OxI, preferred_element_type=jnp.float32))


def _rounded_matmul_fwd(x, w_OxI):
    return _rounded_matmul(x, w_OxI), (x, w_OxI)


def _rounded_matmul_bwd(res, g):
    x, w_OxI = res
    g = g.astype(x.dtype)  # the gradient of a bf16 tensor is bf16
    dx = jnp.einsum("...o,oi->...i", g, w_OxI)
    dw = jnp.einsum("no,ni->oi", g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))
    return dx, dw


_rounded_matmul.defvjp(_rounded_matmul_fwd, _rounded_matmul_bwd)


def linear_float32(x: jax.Array, w_OxI: jax.Array) -> jax.Array:
    """`linear`'s output as float32 values, rounded once to x's dtype as the
    output of x's-dtype matmul (a bf16 cuBLAS GEMM: float32 accumulation,
    one rounding) is; for float32 code that reads it (the head's softcap).

    Not linear(...).astype(float32): with XLA's excess precision (on by
    default) XLA:CPU turned the head's bf16 matmul and the convert after it
    into one float32-output matmul, and the rounding was gone (the record's
    round_logits did nothing there); so was an explicit reduce_precision
    after the convert. Rounding the float32 product itself with
    reduce_precision, which XLA keeps, is robust (docs/fidelity.md, "the
    first-step gap, part 2"; on the GPU the rounding was kept either way).
    The backward is the matmul's own, in x's dtype: the output's gradient
    rounded to it (the gradient of a bf16 tensor is bf16), then the two bf16
    matmuls.
    """
    w = w_OxI.astype(x.dtype)
    if jnp.finfo(x.dtype).bits >= 32:
        return jnp.einsum("...i,oi->...o", x, w)
    return _rounded_matmul(x, w)


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
    # reference quirk: NTK-scaled RoPE base above rope_ntk_base_len (1024) tokens;
    # 0 switches it off (the 1.0611 record).
    if 0 < cfg.rope_ntk_base_len < seq_len:
        r = cfg.rotary_dims
        return cfg.rope_base * (seq_len / cfg.rope_ntk_base_len) ** (r / (r - 2))
    return cfg.rope_base


def rotary_tables(cfg: ModelConfig, positions_T: jax.Array, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin [T, rotary_dims / 2] in float32 (as the reference computes them)."""
    exponents = jnp.arange(0, cfg.rotary_dims, 2, dtype=jnp.float32) / cfg.rotary_dims
    inv_freq = 1.0 / (jnp.float32(base) ** exponents)
    freqs = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def exclusive_self_attention(y_BxTxHxD: jax.Array, v_BxTxKxD: jax.Array, impl: str = "jnp",
                             gate_BxTxH: jax.Array | None = None) -> jax.Array:
    """XSA: remove from each head's output its component along the unit value
    vector of its KV group at the same position, in float32, returned in y's
    dtype (kernels/xsa.py); with gate_BxTxH (`head_gate_weights`), each head's
    result gated as `head_gate` does. impl: "jnp" (autodiff of the jnp
    expression) or "pallas" (one fused kernel forward and one backward)."""
    return xsa_kernels.xsa(y_BxTxHxD, v_BxTxKxD, impl, gate_BxTxH)


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


def smear(gate_d: jax.Array, x_BxTxd: jax.Array, prev_x_Bxd: jax.Array | None = None,
          in_float32: bool = True) -> jax.Array:
    """SmearGate: mix each position with the previous one (zeros before the start).

    The gate parameter is cast to x's dtype before its sigmoid, as the reference
    casts it; in_float32 as in `scaled_sum`."""
    dtype = x_BxTxd.dtype
    gate = jax.nn.sigmoid(gate_d.astype(dtype).astype(jnp.float32))
    if not in_float32:
        gate = gate.astype(dtype)
    first = jnp.zeros_like(x_BxTxd[:, :1]) if prev_x_Bxd is None else prev_x_Bxd[:, None].astype(dtype)
    x_prev = jnp.concatenate([first, x_BxTxd[:, :-1]], axis=1)
    return scaled_sum([(1 - gate, x_BxTxd), (gate, x_prev)], in_float32)


def _rounding(dtype, in_float32: bool):
    """The rounding after each op of a chain of elementwise ops: none when they run
    in float32 and are rounded once at the end (in_float32, as `scaled_sum`), to
    `dtype` otherwise (eager PyTorch)."""
    return (lambda x: x) if in_float32 else rounding_to(dtype)


def windowed_smear(gate_1xW: jax.Array, lambda_1: jax.Array, e_BxTxd: jax.Array, tokens_BxT: jax.Array, bos_id: int,
                   prev_e_Bxd: jax.Array | None = None, in_float32: bool = True) -> jax.Array:
    """The 1.0611 record's SmearGate, on the raw embedding e (before its norm):
    e_t + lambda sigmoid(W e_t[:window]) e_{t-1} [token_t != bos_id].

    Position 0 has no previous embedding (prev_e_Bxd, when decoding a
    continuation: the last one before it). reference quirk: only the BOS test
    separates documents, so a document split into several attention segments
    is smeared across its splits. W e_t is a matmul in e's dtype (a CastedLinear);
    the rest as `scaled_sum` (in_float32: in float32, rounded once)."""
    dtype, f32 = e_BxTxd.dtype, jnp.float32
    rnd = _rounding(dtype, in_float32)
    first = jnp.zeros_like(e_BxTxd[:, :1]) if prev_e_Bxd is None else prev_e_Bxd[:, None].astype(dtype)
    e_prev = jnp.concatenate([first, e_BxTxd[:, :-1]], axis=1).astype(f32)
    z_BxTx1 = linear(e_BxTxd[..., :gate_1xW.shape[-1]], gate_1xW)
    g_BxTx1 = rnd(lambda_1.astype(dtype).astype(f32) * rnd(jax.nn.sigmoid(z_BxTx1.astype(f32))))
    not_bos = (tokens_BxT != bos_id)[..., None].astype(f32)
    return (e_BxTxd.astype(f32) + rnd(rnd(g_BxTx1 * e_prev) * not_bos)).astype(dtype)


def torch_lerp(start: jax.Array, end: jax.Array, weight: jax.Array) -> jax.Array:
    """torch.lerp's formula (its two branches, for accuracy near either end)."""
    return jnp.where(jnp.abs(weight) < 0.5, start + weight * (end - start), end - (end - start) * (1 - weight))


def gated_skip(x_BxTxd: jax.Array, skip_BxTxd: jax.Array, weight_d: jax.Array, gate_d: jax.Array,
               in_float32: bool = True) -> jax.Array:
    """The 1.0611 record's U-Net skip: lerp(w * skip, x, sigmoid(g)), so a gate of
    0 takes half of each. The scales are cast to x's dtype first (the reference's
    .to(dtype)); in_float32 as `scaled_sum`, else rounded per op as eager PyTorch
    (whose lerp computes in float32 and rounds once)."""
    dtype, f32 = x_BxTxd.dtype, jnp.float32
    rnd = _rounding(dtype, in_float32)
    start = rnd(weight_d.astype(dtype).astype(f32) * skip_BxTxd.astype(f32))
    g = rnd(jax.nn.sigmoid(gate_d.astype(dtype).astype(f32)))
    return torch_lerp(start, x_BxTxd.astype(f32), g).astype(dtype)


def head_gate(y_BxTxHxD: jax.Array, n_BxTxd: jax.Array, gate_HxW: jax.Array, scale: float,
              in_float32: bool = True) -> jax.Array:
    """The sparse head-output gate: head h's output times sigmoid(scale W_h . n[:window]),
    n the attention's input. W n is a matmul in n's dtype; the rest as `scaled_sum`.
    After XSA this rounds XSA's output first, where the reference gates its float32
    result (model.fusion_kernels' xsa_gate computes that, kernels/xsa.py)."""
    g_BxTxH = head_gate_weights(n_BxTxd, gate_HxW, scale, in_float32)
    return (y_BxTxHxD.astype(jnp.float32) * g_BxTxH[..., None]).astype(y_BxTxHxD.dtype)


def head_gate_weights(n_BxTxd: jax.Array, gate_HxW: jax.Array, scale: float, in_float32: bool = True) -> jax.Array:
    """`head_gate`'s weights sigmoid(scale W_h . n[:window]) [B, T, H], float32 values
    (rounded to n's dtype after each op unless in_float32)."""
    rnd = _rounding(n_BxTxd.dtype, in_float32)
    z_BxTxH = linear(n_BxTxd[..., :gate_HxW.shape[-1]], gate_HxW).astype(jnp.float32)
    return rnd(jax.nn.sigmoid(rnd(scale * z_BxTxH)))


def final_lane(lane0: jax.Array, lane1: jax.Array, which: str) -> jax.Array:
    """The parallel decoder's output: the lanes' mean, or one of them."""
    if which == "attn":
        return lane0
    if which == "mlp":
        return lane1
    return 0.5 * (lane0 + lane1)


def head_projection(w_Vxd: jax.Array, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """The head's pre-softcap logits [B, T, V] as float32 values."""
    # reference quirk: under autocast the head's matmul returns the compute
    # dtype, so the logits are rounded to bf16 before the float32 softcap
    # (model.round_logits=False keeps the float32 accumulator). Through
    # linear_float32: a plain bf16 einsum's rounding was dropped by XLA.
    if cfg.round_logits:
        return linear_float32(h_BxTxd, w_Vxd)
    return jnp.einsum("btd,vd->btv", h_BxTxd, w_Vxd.astype(h_BxTxd.dtype), preferred_element_type=jnp.float32)


def softcap(z: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(z / cap), in z's dtype (float32 in the head)."""
    return cap * jnp.tanh(z / cap)


def lm_head(w_Vxd: jax.Array, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """Soft-capped float32 logits of final-normed hidden states."""
    return softcap(head_projection(w_Vxd, cfg, h_BxTxd), cfg.logit_softcap)


def head_nll(w_Vxd: jax.Array, cfg: ModelConfig, h_BxTxd: jax.Array, targets_BxT: jax.Array,
             impl: str) -> jax.Array:
    """Per-token cross-entropy [B, T] (float32) of lm_head's logits through
    kernels/softcap_ce.py (impl "pallas": one kernel each way from the
    pre-softcap logits; the float32 logits never go to memory). With
    round_logits the logits reach it in the compute dtype: the float32 values
    of head_projection are already rounded to it, so the cast is exact, and
    its backward hands the matmul the same rounded cotangent."""
    z = head_projection(w_Vxd, cfg, h_BxTxd)
    if cfg.round_logits:
        z = z.astype(h_BxTxd.dtype)
    return softcap_ce.softcap_nll(z, targets_BxT, cfg.logit_softcap, impl)


