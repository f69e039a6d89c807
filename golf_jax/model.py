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
    mlp_up_bank    [L, hid, d]       hid = mlp_mult d (3d in the 1.1147 record, 4d in the 1.0611)
    mlp_down_bank  [L, d, hid]
    blocks         {attn_scale [L, d], mlp_scale [L, d], resid_mix [L, 2, d], q_gain [L, H]}
    skip_weights   [S, d]            S = min(encoder, decoder applications) (ModelConfig.num_skip_weights)
    smear_gate     [d]                                                if smear_gate == "static"
    bigram         {embed [Vb, db], proj [d, db], scale []}          if bigram_vocab_size
    ve             {embed [V, dv], proj [kv, dv], scale [], layer_scales [n_ve, 1]}  if VE layers
    lm_head        [V, d]                                             if not tie_embeddings
    The 1.0611 record's, each behind its config field:
    blocks         {attn_gate_w [L, H, gate_window]}                  if sparse_attn_gate
    skip_gates     [S, d]                                             if skip_gates
    parallel_resid_lambdas [L, 2], parallel_post_lambdas [L, 2, 2]    if parallel_start_layer
    smear          {gate [1, gate_window], lambda [1]}                if smear_gate == "windowed"

The banks are why a `Block` declares no parameters of its own: Parallel Muon
orthogonalises a whole bank per device and GPTQ walks its matrices, so `GPT`
declares the banks (and the per-layer controls, stacked over layers, in the
`blocks` submodule) and hands each block its slices (`LayerWeights`).
`golf_jax.compat` maps the banks to the reference's per-layer names. The
blocks' modules are in golf_jax/blocks.py.

Depth recurrence applies a layer's `Block` several times in one call
(`looping=True`, a static argument: at most two programs per shape); each
application sows its own Grams. The decoder's two-lane layers are the same
`Block`s through `Block.parallel`.

Test-time adapters (golf_jax/ttt_lora.py): `GPT.hidden(lora=...)` hands layer
application i `lora.slot(i)` in its `LayerWeights`, `lora_token_nll` adds the
head's; without `lora` nothing of them is traced (the same program as before).

Modules and collections:

    GPT                     params above; cache: pos, prev_token, prev_x
      blocks: BlockControls   the per-layer controls
      bigram: BigramHash      sows the Gram of proj's input
      ve: ValueEmbedding      sows the Gram of proj's input
      smear: WindowedSmear    the 1.0611 record's SmearGate
      layers_i: Block         (golf_jax/blocks.py)
        attn: CausalSelfAttention   cache: k, v; sows the Grams of the q/k/v input and of proj's
        mlp: MLP                    sows the Grams of fc's and proj's inputs

- "cache" (`decode=True`): the KV cache of autoregressive generation, made the
  way Flax's own attention makes it: a first call with `mutable=["cache"]`
  creates it at the input's shape, later calls write T positions at `pos`.
- "input_grams" (`INPUT_GRAMS`, sown when the caller makes it mutable): X^T X
  of every linear layer's input X, and of the final norm's output ("final_norm",
  the tied head's input), for the GPTQ Hessians.

Shapes in names: B batch, T sequence, H query heads, K KV heads, G = H / K,
D head dim, d model dim.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

# INPUT_GRAMS, MLP and CausalSelfAttention re-exported: model.INPUT_GRAMS etc. as before the split.
from golf_jax.blocks import (INPUT_GRAMS, MLP, Block, CausalSelfAttention, LayerWeights, LoRA,  # noqa: F401
                             query_slice, sow_gram)
from golf_jax.config import ModelConfig
from golf_jax.packing import Segments
from golf_jax.layers import (bigram_buckets, compute_dtype, final_lane, fusion_impl, gated_skip, head_nll, linear,
                             head_projection, lm_head, lookup, rms_norm, rotary_base, rotary_tables, scaled_sum,
                             smear, softcap, windowed_smear)
from golf_jax.param_tree import Params, embedding_dtype


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
        if self.cfg.sparse_attn_gate:
            self.attn_gate_w = self.param("attn_gate_w", nn.initializers.zeros,
                                          (L, self.cfg.num_heads, self.cfg.gate_window))


class WindowedSmear(nn.Module):
    """The 1.0611 record's SmearGate (`layers.windowed_smear`): its gate's weight
    [1, gate_window] and lambda [1], both zero (the identity) at init."""
    cfg: ModelConfig

    def setup(self):
        self.gate = self.param("gate", nn.initializers.zeros, (1, self.cfg.gate_window))
        self.scale = self.param("lambda", nn.initializers.zeros, (1,))

    def __call__(self, e_BxTxd: jax.Array, tokens_BxT: jax.Array, prev_e_Bxd: jax.Array | None = None) -> jax.Array:
        return windowed_smear(self.gate, self.scale, e_BxTxd, tokens_BxT, self.cfg.bos_id, prev_e_Bxd,
                              self.cfg.scales_in_float32)


class GPT(nn.Module):
    """Embedding (token + BigramHash, SmearGate, RMSNorm), the blocks with U-Net
    skips, value embeddings, depth recurrence and the parallel decoder as the
    config asks, final norm, tied soft-capped head."""
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
        self.skip_gates = (self.param("skip_gates", nn.initializers.zeros, (cfg.num_skip_weights, d))
                           if cfg.skip_gates else None)
        if cfg.parallel_start_layer > 0:  # over all layers, as the reference (only the parallel ones use theirs)
            self.lane_resid = self.param("parallel_resid_lambdas", bf16_representable(nn.initializers.constant(1.1)),
                                         (L, 2))
            self.lane_post = self.param("parallel_post_lambdas", nn.initializers.ones, (L, 2, 2))
        self.smear_gate = self.param("smear_gate", nn.initializers.zeros, (d,)) if cfg.smear_gate == "static" else None
        self.smear = WindowedSmear(cfg) if cfg.smear_gate == "windowed" else None
        self.bigram = BigramHash(cfg) if cfg.bigram_enabled else None
        self.ve = ValueEmbedding(cfg) if cfg.ve_layer_indices else None
        self.lm_head = None if cfg.tie_embeddings else self.param("lm_head", nn.initializers.zeros, (V, d))
        self.layers = [Block(cfg, layer) for layer in range(L)]

    def layer_weights(self, layer: int, dtype) -> LayerWeights:
        cfg, c = self.cfg, self.controls
        L = cfg.num_layers
        parallel = cfg.parallel_on(layer)
        return LayerWeights(
            q=self.qo_bank[layer], k=self.kv_bank[layer], v=self.kv_bank[L + layer], proj=self.qo_bank[L + layer],
            fc=self.mlp_up_bank[layer], mlp_proj=self.mlp_down_bank[layer],
            attn_scale=c.attn_scale[layer].astype(dtype), mlp_scale=c.mlp_scale[layer].astype(dtype),
            resid_mix=c.resid_mix[layer].astype(dtype), q_gain=c.q_gain[layer].astype(dtype),
            attn_gate=c.attn_gate_w[layer] if cfg.sparse_attn_gate else None,
            lane_resid=self.lane_resid[layer].astype(dtype) if parallel else None,
            lane_post=self.lane_post[layer].astype(dtype) if parallel else None)

    def skip(self, x_BxTxd: jax.Array, skip_BxTxd: jax.Array, i: int) -> jax.Array:
        """U-Net skip i into the stream: x + w skip, or lerp(w skip, x, sigmoid(g))."""
        w = self.skip_weights[i].astype(x_BxTxd.dtype)
        if self.skip_gates is None:
            return scaled_sum([(None, x_BxTxd), (w, skip_BxTxd)], self.cfg.scales_in_float32)
        return gated_skip(x_BxTxd, skip_BxTxd, w, self.skip_gates[i], self.cfg.scales_in_float32)

    def stack(self, x0_BxTxd: jax.Array, looping: bool, apply_layer) -> jax.Array:
        """The encoder, then the decoder (`ModelConfig.layer_order`). Each encoder
        output is a skip; the decoder's applications pop them, last in first out,
        while skip weights last (`num_skip_weights`). Decoder applications of
        layers >= parallel_start_layer run on two lanes, both starting from the
        stream, the skips going into lane 0; the output is `final_lane` of them.

        apply_layer(layer, x, lanes): a block's output (lanes None) or lanes' update.
        """
        cfg = self.cfg
        encoder, decoder = cfg.layer_order(looping)
        x_BxTxd, skips = x0_BxTxd, []
        for layer in encoder:
            x_BxTxd = apply_layer(layer, x_BxTxd, None)
            skips.append(x_BxTxd)
        lanes = None
        for i, layer in enumerate(decoder):
            parallel = cfg.parallel_on(layer)
            if parallel and lanes is None:
                lanes = (x_BxTxd, x_BxTxd)
            stream = lanes[0] if parallel else x_BxTxd
            if i < cfg.num_skip_weights and skips:
                stream = self.skip(stream, skips.pop(), i)
            if parallel:
                lanes = apply_layer(layer, stream, lanes[1])
            else:
                x_BxTxd = apply_layer(layer, stream, None)
        # reference quirk: a sequential block after the lanes began would run on the
        # stream before them and be discarded here (no config of the record's does that)
        return x_BxTxd if lanes is None else final_lane(*lanes, cfg.parallel_final_lane)

    def embed(self, tokens_BxT: jax.Array, dtype, prev_token_B=None, prev_x_Bxd=None) -> tuple[jax.Array, jax.Array]:
        """x0 [B, T, d], and the embedding a continuation's SmearGate reads as previous."""
        cfg = self.cfg
        x_BxTxd = lookup(self.tok_emb, tokens_BxT, dtype)
        if self.bigram is not None:
            x_BxTxd = x_BxTxd + self.bigram(tokens_BxT, dtype, prev_token_B)
        if self.smear is not None:  # on the raw embedding, before the norm
            return rms_norm(self.smear(x_BxTxd, tokens_BxT, prev_x_Bxd)), x_BxTxd
        x_BxTxd = rms_norm(x_BxTxd)
        if self.smear_gate is None:
            return x_BxTxd, x_BxTxd
        return smear(self.smear_gate, x_BxTxd, prev_x_Bxd, cfg.scales_in_float32), x_BxTxd

    @nn.compact
    def hidden(self, tokens_BxT: jax.Array, rope_len: int | None = None, decode: bool = False,
               looping: bool = False, segments: Segments | None = None, lora: LoRA | None = None,
               queries: tuple | None = None) -> jax.Array:
        """Final-normed hidden states [B, T, d] in the compute dtype.

        rope_len: the sequence length whose rotary base to use (default T; see
        `rotary_base`); decode=True needs it (the training length).
        looping: the depth recurrence's order (`ModelConfig.layer_order`), a Python bool.
        segments (`packing.Segments`): the documents of packed rows: attention
        stays within a document, RoPE positions stay those of the row (the
        reference's).
        lora: test-time adapters, the i-th layer application's `lora.slot(i)`.
        queries (first, count): those positions' states only, all the last application computes.
        """
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        B, T = tokens_BxT.shape
        pos, prev_token_B, prev_x_Bxd = 0, None, None
        if decode:
            if rope_len is None:
                raise ValueError("decode=True needs rope_len (the training sequence length)")
            if looping and cfg.num_loops > 0 or segments is not None:
                raise ValueError("decode=True: the KV cache holds one application of each layer and one "
                                 "sequence; it has no depth recurrence (looping) nor packed rows (segments)")
            if lora is not None:
                raise ValueError("decode=True: test-time adapters (lora) are for scoring, not decoding")
            filled = self.has_variable("cache", "pos")
            pos_var = self.variable("cache", "pos", lambda: jnp.zeros((), jnp.int32))
            prev_token_var = self.variable("cache", "prev_token", lambda: jnp.full((B,), -1, jnp.int32))
            prev_x_var = self.variable("cache", "prev_x", lambda: jnp.zeros((B, cfg.model_dim), dtype))
            pos, prev_token_B, prev_x_Bxd = pos_var.value, prev_token_var.value, prev_x_var.value

        x0_BxTxd, smear_input_BxTxd = self.embed(tokens_BxT, dtype, prev_token_B, prev_x_Bxd)
        rope = rotary_tables(cfg, pos + jnp.arange(T), rotary_base(cfg, rope_len or T))
        ve_BxTxKV = self.ve(tokens_BxT, dtype) if self.ve is not None else None

        applications, last = [], cfg.layer_applications(looping) - 1  # the i-th gets lora.slot(i)

        def apply_layer(layer, x_BxTxd, lane1_BxTxd):
            ve = None
            if layer in cfg.ve_layer_indices:
                ve = scaled_sum([(self.ve.layer_scales[cfg.ve_layer_indices.index(layer)].astype(dtype), ve_BxTxKV)],
                                cfg.scales_in_float32)
            w = self.layer_weights(layer, dtype)
            if lora is not None:
                w = w._replace(lora=lora.slot(len(applications)))
            args = (w, ve, rope, decode, pos, segments, queries if len(applications) == last else None)
            applications.append(layer)
            if lane1_BxTxd is None:
                return self.layers[layer](x_BxTxd, x0_BxTxd, *args)
            return self.layers[layer].parallel(x_BxTxd, lane1_BxTxd, x0_BxTxd, *args)

        h_BxTxd = self.stack(x0_BxTxd, looping, apply_layer)
        if decode and filled:
            pos_var.value = pos + T
            prev_token_var.value = tokens_BxT[:, -1].astype(jnp.int32)
            prev_x_var.value = smear_input_BxTxd[:, -1]
        h_BxTxd = rms_norm(h_BxTxd)
        sow_gram(self, "final_norm", h_BxTxd)  # the tied head's input: the 1.0611 record's tok_emb Hessian
        return h_BxTxd

    def declare_parameters(self) -> None:
        """For `init`: every submodule's setup declares its parameters; nothing is computed."""
        # Reading one attribute of a setup-style submodule runs its setup.
        self.controls.q_gain
        if self.bigram is not None:
            self.bigram.embed
        if self.ve is not None:
            self.ve.embed
        if self.smear is not None:
            self.smear.gate

    def head_weight(self) -> jax.Array:
        """The head's [V, d]: the token embedding when tied."""
        return self.tok_emb if self.lm_head is None else self.lm_head

    def head(self, h_BxTxd: jax.Array) -> jax.Array:
        """Soft-capped float32 logits [B, T, V] of final-normed hidden states."""
        return lm_head(self.head_weight(), self.cfg, h_BxTxd)

    def lora_nll(self, tokens_BxT: jax.Array, targets_BxT: jax.Array, lora: LoRA, looping: bool,
                 first: jax.Array | int = 0, count: int | None = None) -> jax.Array:
        """Per-token cross-entropy [B, count] of positions [first, first + count) (default all T)
        with test-time adapters in every layer application and on the head's logits (forward_ttt);
        the last application and the head on those only (a TTT chunk scores 48 of 2,048 positions)."""
        slots = self.cfg.layer_applications(looping)
        if lora.factors["q"][0].shape[0] != slots:
            raise ValueError(f"lora has {lora.factors['q'][0].shape[0]} layer applications; looping={looping}: {slots}")
        queries = None if count is None else (first, count)
        h = self.hidden(tokens_BxT, looping=looping, lora=lora, queries=queries)
        z = head_projection(self.head_weight(), self.cfg, h) + lora.head_delta(h).astype(jnp.float32)
        return nll_from_logits(softcap(z, self.cfg.logit_softcap), query_slice(queries)(targets_BxT))

    def __call__(self, tokens_BxT: jax.Array, rope_len: int | None = None, decode: bool = False,
                 looping: bool = False, segments: Segments | None = None) -> jax.Array:
        """Soft-capped float32 logits [B, T, V]."""
        return self.head(self.hidden(tokens_BxT, rope_len, decode, looping, segments))

    def fused_nll(self, tokens_BxT: jax.Array, targets_BxT: jax.Array, looping: bool = False,
                  segments: Segments | None = None) -> jax.Array:
        """Per-token cross-entropy [B, T] through the fused softcap + cross-entropy kernel."""
        h = self.hidden(tokens_BxT, None, False, looping, segments)
        return head_nll(self.head_weight(), self.cfg, h, targets_BxT, "pallas")


# ----------------------------------------------------------------------------- the model as functions
# looping (static) and segments (packed rows' documents, packing.Segments) as in GPT.hidden.

def hidden(params: Params, cfg: ModelConfig, tokens: jax.Array, rope_len: int | None = None, *,
           looping: bool = False, segments: Segments | None = None) -> jax.Array:
    """Final-normed hidden states [B, T, d] in the compute dtype."""
    return GPT(cfg).apply({"params": params}, tokens, rope_len, looping=looping, segments=segments,
                          method=GPT.hidden)


def logits_from_hidden(params: Params, cfg: ModelConfig, h_BxTxd: jax.Array) -> jax.Array:
    """Soft-capped float32 logits of final-normed hidden states."""
    return GPT(cfg).apply({"params": params}, h_BxTxd, method=GPT.head)


@functools.partial(jax.jit, static_argnames=("cfg", "rope_len", "looping"))
def logits(params: Params, cfg: ModelConfig, tokens: jax.Array, rope_len: int | None = None, *,
           looping: bool = False, segments: Segments | None = None) -> jax.Array:
    """Soft-capped logits [B, T, vocab], float32."""
    return GPT(cfg).apply({"params": params}, tokens, rope_len, looping=looping, segments=segments)


def nll_from_logits(z: jax.Array, targets: jax.Array) -> jax.Array:
    """Cross-entropy of each target under logits z [..., vocab]."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def lora_token_nll(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array, lora: LoRA, *,
                   looping: bool = False, first: jax.Array | int = 0, count: int | None = None) -> jax.Array:
    """Per-token cross-entropy [B, count] of positions [first, first + count) (default
    [B, T]), float32, with test-time adapters (`GPT.lora_nll`; jitted in ttt_lora.py)."""
    return GPT(cfg).apply({"params": params}, tokens, targets, lora, looping, first, count, method=GPT.lora_nll)


@functools.partial(jax.jit, static_argnames=("cfg", "looping"))
def token_nll(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array, *,
              looping: bool = False, segments: Segments | None = None) -> jax.Array:
    """Per-token cross-entropy [B, T], float32 (with the softcap_ce kernel of
    model.fusion_impl, from the pre-softcap logits: kernels/softcap_ce.py)."""
    if fusion_impl(cfg, "softcap_ce") == "pallas":
        return GPT(cfg).apply({"params": params}, tokens, targets, looping, segments, method=GPT.fused_nll)
    return nll_from_logits(logits(params, cfg, tokens, looping=looping, segments=segments), targets)


@functools.partial(jax.jit, static_argnames=("cfg", "looping"))
def loss(params: Params, cfg: ModelConfig, tokens: jax.Array, targets: jax.Array, *,
         looping: bool = False, segments: Segments | None = None) -> jax.Array:
    """Mean cross-entropy over all tokens, float32."""
    return jnp.mean(token_nll(params, cfg, tokens, targets, looping=looping, segments=segments))
