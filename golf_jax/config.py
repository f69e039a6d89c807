"""Configuration: frozen dataclasses, one per stage, and their validation.

Hyperparameters live here and nowhere else; shapes derive from them. A config
file is a plain Python file with a `get_config()` returning a `Config`
(see `configs/record.py`); `golf_jax.cli` loads it and applies
`--config.<field>=<value>` overrides.

About 530 lines, over the ~450 the project aims for: every setting of both
records, each with its reason beside it, is the one page users read to know
what a field means; split by stage, it would be read across files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
from dataclasses import dataclass, field

# The Pallas kernels model.fusion_kernels can name (golf_jax.layers.fusion_impl).
FUSION_KERNELS = ("norm_rope", "xsa", "residual_norm", "softcap_ce", "xsa_gate")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    """The record architecture. The first 19 field names are the reference
    constructor's arguments, so its JSON configs load with `ModelConfig(**d)`."""

    vocab_size: int = 1024
    num_layers: int = 11
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 3.0
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    rope_base: float = 10000.0
    qk_gain_init: float = 1.5
    bigram_vocab_size: int = 3072  # 0 disables BigramHash
    bigram_dim: int = 112
    xsa_last_n: int = 11  # XSA on layers >= num_layers - xsa_last_n
    rope_dims: int = 16  # rotary on the first rope_dims of each head's dims; 0 = all
    ln_scale: bool = True  # pre-norm outputs scaled by 1/sqrt(layer + 1)
    ve_enabled: bool = True
    ve_dim: int = 128
    ve_layers: str = "9,10"
    # Beyond the reference constructor.
    # reference quirk: NTK-scaled rotary base for sequences above this length
    # (the reference's Rotary default train length, not the run's seq len).
    # 0: the base unscaled at every length (the 1.0611 record's ROPE_YARN=0).
    rope_ntk_base_len: int = 1024
    # reference quirk: the model is cast to bf16 and only banks, small linears
    # and scalars go back to fp32, so the three embedding tables are bf16 params.
    embedding_dtype: str = "bfloat16"
    # "auto": bfloat16 on GPUs, float32 elsewhere (parity tests run float32).
    compute_dtype: str = "auto"
    # reference quirk: the tied head's matmul output is rounded to the compute
    # dtype before the softcap; False keeps its float32 accumulator.
    round_logits: bool = True
    # How the per-channel scales and gates (resid_mix, attn/mlp_scale, skip_weights,
    # q_gain, SmearGate, the BigramHash/VE scales) meet the activations. True: each
    # product and the sum it feeds in float32, rounded once (the fused kernel
    # torch.compile makes of them, as the reference trains), so each scale's
    # gradient is a float32 sum over the tokens; False: one rounding per op (eager
    # PyTorch), where XLA:CPU also rounds the gradients' running sums.
    scales_in_float32: bool = True
    # "auto": cuDNN flash attention on GPUs (the Pallas kernel under XLA's
    # determinism flags, see layers.attention_impl), the plain jnp path elsewhere.
    attention_impl: str = "auto"
    # The MLP's activation is leaky_relu(x, slope)^2: 0.5 in the record,
    # 0 for the ReLU^2 of earlier entries (e.g. PR #1234's "Approach G").
    mlp_negative_slope: float = 0.5
    # "auto": the fused jax-triton MLP kernels (kernels/mlp.py) on GPUs with
    # jax-triton installed and a bf16 compute dtype, the jnp path elsewhere;
    # "jnp" switches the kernels off; "reference" runs the kernels' jnp
    # references through the same custom_vjp (tests).
    mlp_impl: str = "auto"
    # The Pallas kernels of the elementwise stages around the matmuls, each one
    # pass forward and one backward (issue 17; docs/performance.md): q/k
    # RMSNorm + partial RoPE + q_gain ("norm_rope", kernels/qk_norm_rope.py),
    # XSA ("xsa", kernels/xsa.py), and each residual mix with the RMSNorm after
    # it ("residual_norm", kernels/residual_norm.py; with scales_in_float32).
    # "auto" (the default): on GPUs in bf16 when the model and head dims are
    # powers of two (Triton's blocks), jnp elsewhere; "jnp" switches them off;
    # "pallas" off GPUs runs the kernels in Pallas's interpreter (tests). A
    # fourth, opt-in: the head's softcap with the per-token cross-entropy of
    # model.token_nll and loss ("softcap_ce", kernels/softcap_ce.py; issues 17,
    # 19), "auto" when the vocabulary is a power of two.
    fusion_impl: str = "auto"
    # Which of those kernels "auto"/"pallas" applies to, comma-separated. Not
    # residual_norm by default: with it the 60-step fidelity curve drifts
    # (warmdown +0.84% and +1.38%, against -0.27% and -0.41% with the other two;
    # docs/fidelity.md), though it rounds as XLA does in isolation; so it did with a
    # float32 backward and with a float32 residual stream (thirteenth session), and so
    # does the stream rounded where it rounds it, without the kernel (twentieth session).
    # configs/frontier.py names it: on the 1.0611 record its curves pass those checks
    # (docs/frontier.md, eighteenth session). xsa_gate runs the 1.0611 record's
    # head-output gate inside XSA's kernels (with xsa, where a layer has both), gating
    # XSA's float32 result as the reference does (apart, XSA's output is rounded
    # first); configs/frontier.py names it too (docs/frontier.md, twentieth session).
    fusion_kernels: str = "norm_rope,xsa"

    # The 1.0611 record's architecture (docs/frontier.md); the defaults are the 1.1147 record's.
    # Depth recurrence: with looping=True, layers loop_start..loop_end run num_loops more times (`layer_order`).
    num_loops: int = 0
    loop_start: int = 0
    loop_end: int = 0
    skip_gates: bool = False  # U-Net skips lerp(w skip, x, sigmoid(g)), not x + w skip
    # Decoder layers >= this (> 0) are two-lane parallel blocks (blocks.Block.parallel);
    # the output is the lanes' "mean", or lane "attn" (0) or "mlp" (1).
    parallel_start_layer: int = 0
    parallel_final_lane: str = "mean"
    sparse_attn_gate: bool = False  # each head's output times sigmoid(scale W_h . n[:gate_window]), n its input
    sparse_attn_gate_scale: float = 1.0
    gate_window: int = 12  # also the windowed SmearGate's
    # "static": the 1.1147 record's per-channel SmearGate after the embedding's norm;
    # "windowed": the 1.0611 record's on the raw embedding, before it, its gate
    # lambda sigmoid(W e_t[:gate_window]), none where token t is bos_id; "none".
    smear_gate: str = "static"
    bos_id: int = 1

    # Derived shapes: one source of truth.
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dims(self) -> int:
        return self.rope_dims or self.head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def num_encoder_layers(self) -> int:
        return self.num_layers // 2

    @property
    def num_skip_weights(self) -> int:
        # From the looped order when there is one, as the reference sizes them.
        encoder, decoder = self.layer_order(looping=True)
        return min(len(encoder), len(decoder))

    def layer_order(self, looping: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The physical layers the encoder and then the decoder apply, in order.

        Unlooped: the first num_layers // 2 layers, then the rest. Looped (with
        num_loops > 0): the layers with loop_start..loop_end repeated num_loops
        more times, split at half the applications (the 1.0611 record: encoder
        [0,1,2,3,4,5,3,4], decoder [5,3,4,5,6,7,8,9,10]).
        """
        if not looping or self.num_loops == 0:
            n = self.num_encoder_layers
            return tuple(range(n)), tuple(range(n, self.num_layers))
        loop = list(range(self.loop_start, self.loop_end + 1))
        order = [*range(self.loop_start), *loop * (self.num_loops + 1), *range(self.loop_end + 1, self.num_layers)]
        n = len(order) // 2
        return tuple(order[:n]), tuple(order[n:])

    def layer_applications(self, looping: bool) -> int:
        """How many layer applications a forward makes (`layer_order`'s, both halves)."""
        return len(sum(self.layer_order(looping), ()))

    @property
    def looping_after_training(self) -> bool:
        """Whether every stage after training (the final EMA evaluation, the
        Hessians, the evaluations of the artifact, TTT) runs the depth
        recurrence: whenever the model has one, as the 1.0611 record switches
        it on for its evaluation models (L3596, L3621). Training itself switches
        it on at schedule.enable_looping_at (golf_jax.train)."""
        return self.num_loops > 0

    def parallel_on(self, layer: int) -> bool:
        """Whether a decoder application of `layer` is a two-lane parallel block."""
        return 0 < self.parallel_start_layer <= layer

    @property
    def ve_layer_indices(self) -> tuple[int, ...]:
        if not self.ve_enabled or not self.ve_layers.strip():
            return ()
        return tuple(int(s) for s in self.ve_layers.split(",") if s.strip())

    @property
    def bigram_enabled(self) -> bool:
        return self.bigram_vocab_size > 0

    def xsa_on(self, layer: int) -> bool:
        return layer >= self.num_layers - self.xsa_last_n

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"model.{name}: {why}")

        need(self.vocab_size > 0, "vocab_size", "must be positive")
        need(self.vocab_size <= 65536, "vocab_size", "shards store uint16 token ids, so at most 65536")
        need(self.num_layers > 0, "num_layers", "must be positive")
        need(self.num_heads > 0 and self.model_dim % self.num_heads == 0, "num_heads",
             f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}")
        need(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
             f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        need(self.rope_dims == 0 or (self.rope_dims % 2 == 0 and 2 < self.rope_dims <= self.head_dim), "rope_dims",
             f"must be 0 (all dims) or even, > 2 and <= head_dim {self.head_dim} (got {self.rope_dims})")
        need(self.mlp_dim > 0, "mlp_mult", "must give a positive hidden size")
        need(self.logit_softcap > 0, "logit_softcap", "must be positive")
        need(0 <= self.xsa_last_n <= self.num_layers, "xsa_last_n",
             f"must be in [0, num_layers={self.num_layers}]")
        need(self.bigram_vocab_size == 0 or (self.bigram_vocab_size >= 2 and self.bigram_dim > 0),
             "bigram_vocab_size", "must be 0 (off) or >= 2 with bigram_dim > 0")
        try:
            layers = self.ve_layer_indices
        except ValueError:
            raise ConfigError(f"model.ve_layers: expected comma-separated layer indices, got {self.ve_layers!r}") from None
        need(all(0 <= i < self.num_layers for i in layers), "ve_layers",
             f"layer indices must be in [0, {self.num_layers}), got {self.ve_layers!r}")
        need(len(set(layers)) == len(layers), "ve_layers", f"repeated layer in {self.ve_layers!r}")
        need(not layers or self.ve_dim > 0, "ve_dim", "must be positive when value embeddings are on")
        need(self.embedding_dtype in ("bfloat16", "float32"), "embedding_dtype", "bfloat16 or float32")
        need(self.compute_dtype in ("auto", "bfloat16", "float32"), "compute_dtype", "auto, bfloat16 or float32")
        need(self.attention_impl in ("auto", "cudnn", "pallas", "jnp"), "attention_impl", "auto, cudnn, pallas or jnp")
        need(0.0 <= self.mlp_negative_slope <= 1.0, "mlp_negative_slope", "must be in [0, 1]")
        need(self.mlp_impl in ("auto", "triton", "jnp", "reference"), "mlp_impl", "auto, triton, jnp or reference")
        need(self.fusion_impl in ("auto", "pallas", "jnp"), "fusion_impl", "auto, pallas or jnp")
        need(self.rope_ntk_base_len >= 0, "rope_ntk_base_len", "must be >= 0 (0: no NTK scaling)")
        need(self.num_loops >= 0, "num_loops", "must be >= 0")
        need(self.num_loops == 0 or 0 <= self.loop_start <= self.loop_end < self.num_layers, "loop_start",
             f"loop_start <= loop_end: layers in [0, {self.num_layers}), got {self.loop_start}..{self.loop_end}")
        need(0 <= self.parallel_start_layer <= self.num_layers, "parallel_start_layer",
             f"must be in [0, num_layers={self.num_layers}] (0: off)")
        need(self.parallel_final_lane in ("mean", "attn", "mlp"), "parallel_final_lane", "mean, attn or mlp")
        need(self.smear_gate in ("static", "windowed", "none"), "smear_gate", "static, windowed or none")
        need(not (self.sparse_attn_gate or self.smear_gate == "windowed") or 0 < self.gate_window <= self.model_dim,
             "gate_window",
             f"must be in [1, model_dim={self.model_dim}] for the sparse attention gate and the windowed SmearGate")
        need(self.smear_gate != "windowed" or 0 <= self.bos_id < self.vocab_size, "bos_id",
             f"must be a token id in [0, {self.vocab_size}) for the windowed SmearGate")
        unknown = set(self.fusion_kernels.split(",")) - set(FUSION_KERNELS) - {""}
        need(not unknown, "fusion_kernels", f"names from {', '.join(FUSION_KERNELS)}, got {sorted(unknown)}")


@dataclass(frozen=True)
class DataConfig:
    # "embedded": the tinyshakespeare shards in ../shared/data when present,
    # else a corpus built once from CPython's pydoc_data (see golf_jax.datasets).
    data_dir: str = "embedded"
    tokenizer_path: str = ""  # "" = the tokenizer that comes with data_dir
    train_pattern: str = "fineweb_train_*.bin"
    val_pattern: str = "fineweb_val_*.bin"
    train_seq_len: int = 2048
    train_batch_tokens: int = 786_432  # global, per optimizer step
    # world_size x accumulation steps: every device count sees the same stream.
    micro_batches_per_step: int = 8
    # The transform the shards' text went through before tokenizing: "" (none)
    # or "caseops" (golf_jax/caseops.py, the 1.0611 record's), which its SP8192
    # tokenizer needs (both mismatches are refused). With "caseops", bits per
    # byte counts the original text's bytes through the val byte sidecar, and
    # data_dir="embedded" is tinyshakespeare prepared with the record's tokenizer.
    text_transform: str = ""
    # The byte sidecar, beside the val shards: each val token's original bytes.
    val_bytes_pattern: str = "fineweb_val_bytes_*.bin"
    # The 1.0611 record's DocumentPackingLoader (golf_jax.packing): each of a
    # step's micro_batches_per_step micro-batches is one packed row of
    # train_batch_tokens / micro_batches_per_step tokens (98,304), read from
    # the stream from the first document start (model.bos_id) of each shard, with
    # attention within its documents, cut into train_seq_len chunks (the
    # model's segment ids). The rows come in the order of the record's 8-GPU
    # run (one global span per step) whatever the device count. False: the
    # 1.1147 record's rows of train_seq_len, attention across documents.
    packed_documents: bool = False
    # Segment slots per train_seq_len fold of a packed row in cuDNN's packed
    # layout (golf_jax/packing.py's docstring): a static shape, so a capacity,
    # not a hyperparameter. Rows of 98,304 tokens with lognormal document
    # lengths (mean 700 tokens, sigma 1.0-1.6) needed 5-7 (median), at most 18
    # over 300 rows; a row that needs more raises an error naming this field.
    segments_per_fold: int = 32
    # Fewer-slot layouts, comma-separated ("" off; e.g. "8,16"): a step whose rows all fit
    # one of them takes the fewest that fits, else segments_per_fold (each layout is a
    # program of its own, compiled in the warm-up). cuDNN's backward works through every
    # slot, empty or not: one attention call over a 98,304-token row took 2.66 / 3.27 ms
    # forward+backward with 8 / 16 slots on an H200 (docs/performance.md, 2026-12-03);
    # rows of FineWeb-like documents need 3-9, and 86% of steps' eight rows fit 8.
    segments_per_fold_fast: str = ""

    @property
    def fast_segment_slots(self) -> tuple[int, ...]:
        """segments_per_fold_fast's slot counts, fewest first."""
        return tuple(sorted(int(s) for s in str(self.segments_per_fold_fast).split(",") if s.strip()))


@dataclass(frozen=True)
class OptimizerConfig:
    matrix_lr: float = 0.025  # Muon, the four banks
    muon_momentum: float = 0.99
    muon_momentum_warmup_start: float = 0.92
    muon_momentum_warmup_steps: int = 1500
    # True: each warm-up step's momentum is the reference's (1 - f) start + f end
    # computed in double on the host and rounded to float32 once, as torch takes
    # the Python float into its float32 arithmetic (the 1.0611 record's); False:
    # optax's linear schedule in float32, 1 ulp off it at 713 of the 1.0611
    # record's 1500 warm-up steps (kept: the 1.1147 record's runs, bit for bit).
    muon_momentum_warmup_exact: bool = False
    muon_backend_steps: int = 5  # Newton-Schulz iterations
    muon_weight_decay: float = 0.04
    # reference quirk: bf16 gradient, momentum buffer and Newton-Schulz.
    muon_momentum_dtype: str = "bfloat16"
    muon_ns_dtype: str = "bfloat16"
    # Newton-Schulz coefficients: "quintic", (3.4445, -4.775, 2.0315) at every
    # step (the record); "polar_express", five per-step minimax tuples (the
    # 1.0611 record). Where its bf16 rounds: "eager", after every op (the record's
    # uncompiled Newton-Schulz); "compiled", once per fused product-and-sum (the
    # 1.0611 record's @torch.compile'd one).
    muon_ns_coefficients: str = "quintic"
    muon_ns_rounding: str = "eager"
    # Each row of Muon's update divided by its L2 norm before Newton-Schulz (the 1.0611 record).
    muon_row_normalize: bool = False
    tied_embed_lr: float = 0.035  # AdamW: tok_emb, bigram table, VE table
    scalar_lr: float = 0.025  # AdamW: everything else
    head_lr: float = 0.008  # AdamW: an untied lm_head (the record ties it)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_weight_decay: float = 0.04  # AdamW on the scalars
    embed_weight_decay: float = 0.04  # AdamW on the embedding tables
    grad_clip_norm: float = 0.3
    # The dtype micro-batch gradients are summed in (and averaged across
    # devices in). reference quirk "param": each parameter's own dtype, so the
    # bf16 embedding tables sum theirs in bf16; "float32" is the better option.
    grad_accum_dtype: str = "param"


@dataclass(frozen=True)
class ScheduleConfig:
    iterations: int = 20_000
    warmup_steps: int = 20  # compile-and-prime steps, then state restored
    warmdown_iters: int = 4000
    # > 0: the 1.0611 record's schedule instead of warmdown_iters. The training
    # fraction f (of the wall-clock cap, else of the iterations); the multiplier
    # is 1 until f = 1 - warmdown_frac, then max((1 - f) / warmdown_frac, min_lr_mult).
    warmdown_frac: float = 0.0
    min_lr_mult: float = 0.0
    max_wallclock_seconds: float = 600.0  # 0 = no cap
    # The 1.0611 record's GPTQ_RESERVE_SECONDS: with a cap, training's cap (its
    # stop and the fraction its schedule follows) is max_wallclock_seconds less
    # this (600 - 0.5 = 599.5 s). reference quirk: the name reserves time for
    # GPTQ, but nothing after training is timed against it (the record's
    # Hessians and GPTQ run after the cap; its log rounds the 0.5 s to "0s").
    # Budget mode (quant_in_budget) is the timed alternative.
    gptq_reserve_seconds: float = 0.0
    # Depth recurrence (model.num_loops > 0): the training fraction (of the
    # cap, else of the iterations: optim.training_fraction) at which training
    # switches to the looped model, for good (the 1.0611 record: 0.35).
    enable_looping_at: float = 0.35
    ema_decay: float = 0.997
    swa_enabled: bool = False  # reference quirk: collected, never applied
    swa_every: int = 50
    swa_lr_threshold: float = 0.2
    late_qat_threshold: float = 0.15
    # "small": the bigram/VE projections, what the record's code asks for;
    # "all": the banks too; "none": nothing. reference quirk: the record runs
    # "none", since torch.compile traced its model with QAT off and flipping
    # the class flag never re-traces it (no recompilation is logged).
    qat_scope: str = "none"
    # Budget mode (PR #1234): max_wallclock_seconds covers training plus the
    # AR self-generated calibration, the Hessians and GPTQ. Training stops
    # early enough to leave their time, measured once during warm-up on the
    # live weights unless quant_reserve_seconds > 0 gives it.
    quant_in_budget: bool = False
    quant_reserve_seconds: float = 0.0
    # Headroom on the measured time (run-to-run jitter of the stages).
    quant_reserve_margin: float = 0.10


@dataclass(frozen=True)
class QuantConfig:
    clip_range: int = 31  # int6
    gptq_block_size: int = 128
    calib_num_seqs: int = 64
    calib_seq_len: int = 2048
    calib_temperature: float = 0.8
    calib_batch_size: int = 64
    lzma_preset: int = 9
    artifact_budget_bytes: int = 16_000_000  # decimal, weights + code
    # "lzma": the 1.1147 record's artifact (golf_jax.artifact); "pergroup": the 1.0611
    # record's per-group streams (golf_jax.artifact_pergroup), for the frontier quantiser.
    artifact_format: str = "lzma"
    group_compressor: str = "lrzip"  # pergroup: "lrzip" (the reference's binary), "zpaq", "brotli", "lzma"
    # "raw": file sizes on disk (the 1.1147 record's count); "minified_brotli": minified,
    # brotli-11, base85 in an exec wrapper (the 1.0611 record's, golf_jax.code_size).
    code_size_count: str = "raw"

    # The 1.0611 record's quantisation (golf_jax/quant_frontier.py); the defaults are the 1.1147 record's.
    # "percentile": GPTQ int6 of the banks with the clip-percentile search, int8 embedding rows
    # (golf_jax.quant); "sdclip": GPTQ with the scales k std(row) / clip_range of every matrix of more
    # than keep_float_max_numel values (the tied embedding too, at embed_clip_range), per-row int8
    # sparse-gate weights, fp16 for the rest, and LQER on the lqer_top_k worst matrices.
    scheme: str = "percentile"
    # "self_generated": calib_num_seqs sequences sampled from the model (the 1.1147 record's);
    # "train_shards": calib_num_seqs windows of calib_seq_len + 1 train tokens in the order rank 0
    # of calib_loader_world_size ranks reads them (the 1.0611 record's ShuffledSequenceLoader).
    calib_source: str = "self_generated"
    calib_loader_world_size: int = 8
    # k of the scale rule, by the matrix's role (the reference's *_CLIP_SIGMAS; the 1.0611 record's run).
    attn_clip_sigmas: float = 13.0
    mlp_clip_sigmas: float = 11.5
    embed_clip_sigmas: float = 14.0
    matrix_clip_sigmas: float = 12.85  # a GPTQ'd matrix of no other role (none in the record)
    embed_clip_range: int = 63  # int7 tied embedding
    # reference quirk: every tensor of at most this many values is stored fp16, matrices that
    # GPTQ could take included (at small sizes every bank matrix; the record's are all larger).
    keep_float_max_numel: int = 65_536
    gate_int8: bool = True  # the sparse gate's attn_gate_w as per-row int8 (GATED_ATTN_QUANT_GATE)
    lqer_top_k: int = 3  # 0: no LQER
    lqer_rank: int = 4
    # > 0: A int2 in [-2, 1] with one scale, B int4 in groups of this many values (where they
    # divide B); else (or where they do not divide it) both per-row int(lqer_factor_bits).
    lqer_asym_group: int = 64
    lqer_factor_bits: int = 4

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"quant.{name}: {why}")

        compressors = ("lrzip", "zpaq", "brotli", "lzma")
        need(self.scheme in ("percentile", "sdclip"), "scheme", f"'percentile' or 'sdclip', got {self.scheme!r}")
        need(self.calib_source in ("self_generated", "train_shards"), "calib_source",
             f"'self_generated' or 'train_shards', got {self.calib_source!r}")
        need(self.calib_num_seqs > 0 and self.calib_seq_len > 1 and self.calib_batch_size > 0, "calib_num_seqs",
             "calib_num_seqs, calib_batch_size must be positive and calib_seq_len > 1")
        need(self.calib_loader_world_size > 0, "calib_loader_world_size", "must be positive")
        need(0 < self.clip_range <= 127 and 0 < self.embed_clip_range <= 127, "clip_range",
             "clip_range and embed_clip_range must be in [1, 127] (int8 storage)")
        need(min(self.attn_clip_sigmas, self.mlp_clip_sigmas, self.embed_clip_sigmas,
                 self.matrix_clip_sigmas) > 0, "attn_clip_sigmas", "every *_clip_sigmas must be positive")
        need(self.keep_float_max_numel >= 0, "keep_float_max_numel", "must be >= 0")
        need(self.lqer_top_k >= 0 and self.lqer_rank > 0, "lqer_top_k", "lqer_top_k >= 0 and lqer_rank > 0")
        need(self.lqer_asym_group >= 0 and 2 <= self.lqer_factor_bits <= 8, "lqer_asym_group",
             "lqer_asym_group >= 0 (0: symmetric) and lqer_factor_bits in [2, 8]")
        need(self.artifact_format in ("lzma", "pergroup"), "artifact_format", f"'lzma' or 'pergroup', got "
             f"{self.artifact_format!r}")
        need(self.group_compressor in compressors, "group_compressor",
             f"one of {', '.join(map(repr, compressors))}, got {self.group_compressor!r}")
        need(self.code_size_count in ("raw", "minified_brotli"), "code_size_count",
             f"'raw' or 'minified_brotli', got {self.code_size_count!r}")
        # Each scheme has its format: the 1.1147 record's QuantizedModel goes to the lzma
        # artifact, the 1.0611 record's named arrays to the per-group one.
        need((self.scheme == "sdclip") == (self.artifact_format == "pergroup"), "artifact_format",
             f"scheme {self.scheme!r} is written as {'pergroup' if self.scheme == 'sdclip' else 'lzma'}")


    def missing_tools(self) -> str | None:
        """What the stages after training need and this machine lacks (a message), else
        None: train.py asks before training, so a run does not fail after it. Not part of
        `validate`: a config stays loadable (and replayable) where the tools are missing."""
        need_minifier = self.code_size_count == "minified_brotli"
        missing = [m for m in ("python_minifier", "brotli") if importlib.util.find_spec(m) is None
                   and (need_minifier or (m == "brotli" and self.artifact_format == "pergroup"))]
        if missing:
            return f"quant: needs the Python packages {' and '.join(missing)} (pip install golf_jax[codesize])"
        if self.artifact_format != "pergroup":
            return None
        lrzip_problem = self.group_compressor == "lrzip" and _binary_problem("lrzip", "-V")
        if lrzip_problem:
            return (f"quant.group_compressor='lrzip' needs a working lrzip binary ({lrzip_problem}): apt-get install "
                    "lrzip, or choose 'zpaq' (as small: pip install zpaq), 'brotli' or 'lzma'")
        if self.group_compressor == "zpaq" and importlib.util.find_spec("zpaq") is None:
            return "quant.group_compressor='zpaq' needs the zpaq package (pip install zpaq)"
        return None


def _binary_problem(name: str, *version_args: str) -> str | None:
    """Why the binary `name` cannot run here (not on PATH, or it fails to start, e.g. a
    missing shared library), else None: asked by running it with `version_args`."""
    if not shutil.which(name):
        return f"{name} is not on PATH"
    try:
        run = subprocess.run([name, *version_args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{name} {' '.join(version_args)} did not run: {e}"
    if run.returncode:
        return f"{name} {' '.join(version_args)} exits {run.returncode}: {(run.stderr or run.stdout).strip()[-200:]}"
    return None


@dataclass(frozen=True)
class EvalConfig:
    eval_seq_len: int = 2048
    # Global, as the reference: each of world_size x accumulation ranks
    # evaluates val_batch_tokens / data.micro_batches_per_step per call.
    val_batch_tokens: int = 524_288
    val_loss_every: int = 4000
    sliding_stride: int = 64
    sliding_batch_windows: int = 32
    # The sliding-window evaluation after quantisation; the 1.0611 record has none
    # (its EVAL_STRIDE is unused: its score is the phased LoRA TTT's).
    sliding_enabled: bool = True
    # reference quirk: trailing windows all re-score the last `stride` tokens.
    # True scores every token exactly once instead.
    sliding_score_once: bool = False
    max_val_tokens: int = 0  # 0 = the whole validation set
    # The 1.0611 record's standard evaluation (its eval_val, a diagnostic: its score is the
    # TTT's): each per-rank batch of standard_batch_windows sequences is one packed row whose
    # attention stays within documents (split at eval_seq_len), as training's rows.
    # reference quirk: each of its document_eval_ranks ranks (8: the record's GPUs) drops its
    # last partial batch of sequences.
    document_masked: bool = False
    document_eval_ranks: int = 8

    def standard_batch_windows(self, micro_batches_per_step: int) -> int:
        """Sequences per standard-eval call: the reference's per-rank val batch
        (32 in the record, equal to sliding_batch_windows: one compilation)."""
        return max(1, self.val_batch_tokens // (micro_batches_per_step * self.eval_seq_len))


@dataclass(frozen=True)
class TTTConfig:
    """Score-first test-time training (the competition's legal protocol, PR
    #461/#549): validation is cut into chunks; each chunk is scored by the
    sliding-window evaluation first, then trained on; the last is never
    trained on. Runs after quantisation, on the artifact's weights."""

    enabled: bool = False
    chunk_tokens: int = 32_768
    optimizer: str = "sgd"  # "sgd" (momentum) or "adamw"
    lr: float = 0.002  # cosine-decayed across chunks to 0 at the last trained one
    momentum: float = 0.9  # SGD momentum; AdamW's beta1
    beta2: float = 0.999  # AdamW only
    weight_decay: float = 0.0  # AdamW only
    epochs: int = 3  # passes over each chunk
    batch_seqs: int = 32  # sequences per step (global)
    seq_len: int = 0  # training sequence length; 0 = eval.eval_seq_len
    grad_clip_norm: float = 1.0  # 0 = no clip
    freeze_blocks: int = 0  # the first N blocks stay fixed ("all blocks trainable": 0)
    score_batch_windows: int = 0  # sliding windows per scoring call; 0 = eval.sliding_batch_windows
    # "global": the above (the 1.1147 record's, golf_jax/ttt.py); "lora_phased": the 1.0611
    # record's (golf_jax/ttt_lora.py, SPEC.md section 5), whose settings follow (its values):
    # per-document LoRA of lora_rank (scale lora_alpha / lora_rank) on the looped model, one
    # AdamW step per scored chunk of lora_chunk_tokens (context up to lora_context_len), batches
    # of lora_batch_docs documents; global SGD of all weights on the first phased_prefix_docs
    # scored documents in phased_num_phases phases (global_*; sequences of eval.eval_seq_len).
    mode: str = "global"
    lora_rank: int = 80
    lora_alpha: float = 144.0
    lora_lr: float = 1e-4
    lora_beta1: float = 0.0
    lora_beta2: float = 0.99
    lora_eps: float = 1e-10
    lora_weight_decay: float = 0.5
    lora_chunk_tokens: int = 48
    lora_context_len: int = 2048
    lora_batch_docs: int = 64
    lora_min_window: int = 0  # chunk windows are padded to a power of two, at least this (fewer programs)
    # Or the widths chunk windows are padded to, comma-separated (each chunk the smallest that
    # holds its context; the largest lora_context_len; lora_min_window then 0): fewer padded
    # positions than powers of two, one program per width. "": powers of two.
    lora_window_widths: str = ""
    # Once a batch's windows are the whole context and its rows still scoring fit in this many
    # consecutive rows, its steps run on those alone (ttt_schedule.compact_from; one more
    # program), the others' adapters put through the AdamW steps they sat out (zero gradient)
    # at the batch's end: the same scores, fewer rows. 0: off. A multiple of run.num_devices.
    lora_compact_rows: int = 0
    # The reference's ranks (golf_jax/ttt_lora.py's rank_schedule): each claims the queue's
    # next batch when it has scored one, with a LoRA chain of its own; a phase pauses them
    # all. 1: the queue in order (the default); 8: the record's 8 GPUs' schedule (run here
    # one rank after another: its scores at one rank's speed).
    lora_ranks: int = 1
    phased_prefix_docs: int = 2500
    phased_num_phases: int = 3
    global_lr: float = 1e-3  # cosine over the phase's chunks
    global_momentum: float = 0.9
    global_chunk_tokens: int = 32_768
    global_batch_seqs: int = 32
    global_grad_clip: float = 1.0
    # On several devices (run.num_devices), the global phases' batches split as the reference's
    # ranks split them (each device's sequences a packed row of its own, the mean of the rows'
    # means: the record's 8-GPU run); False: every device takes the whole batch, one device's
    # result on any number of devices, at one device's speed.
    global_data_parallel: bool = True

    @property
    def window_widths(self) -> tuple[int, ...]:
        """lora_window_widths' widths, narrowest first (() for powers of two)."""
        return tuple(sorted(int(w) for w in str(self.lora_window_widths).split(",") if w.strip()))

    def validate(self, eval_seq_len: int, num_layers: int) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"ttt.{name}: {why}")

        need(self.chunk_tokens > 0, "chunk_tokens", "must be positive")
        need(self.optimizer in ("sgd", "adamw"), "optimizer", "'sgd' or 'adamw'")
        need(self.lr >= 0, "lr", "must be >= 0")
        need(0 <= self.momentum < 1 and 0 <= self.beta2 < 1, "momentum", "momentum and beta2 must be in [0, 1)")
        need(self.epochs >= 0, "epochs", "must be >= 0")
        need(self.batch_seqs > 0, "batch_seqs", "must be positive")
        need(0 <= self.seq_len <= self.chunk_tokens, "seq_len", f"must be in [0, chunk_tokens={self.chunk_tokens}]")
        need(self.seq_len > 0 or eval_seq_len <= self.chunk_tokens, "seq_len",
             f"0 means eval.eval_seq_len={eval_seq_len}, longer than chunk_tokens={self.chunk_tokens}")
        need(self.grad_clip_norm >= 0, "grad_clip_norm", "must be >= 0")
        need(0 <= self.freeze_blocks <= num_layers, "freeze_blocks", f"must be in [0, num_layers={num_layers}]")
        need(self.score_batch_windows >= 0, "score_batch_windows", "must be >= 0")
        need(self.mode in ("global", "lora_phased"), "mode", "'global' or 'lora_phased'")
        need(self.lora_rank > 0 and self.lora_batch_docs > 0 and self.lora_chunk_tokens > 0, "lora_rank",
             "lora_rank, lora_batch_docs and lora_chunk_tokens must be positive")
        need(self.lora_context_len >= self.lora_chunk_tokens, "lora_context_len", "must be >= lora_chunk_tokens")
        need(0 <= self.lora_min_window <= self.lora_context_len, "lora_min_window", "in [0, lora_context_len]")
        try:
            widths = self.window_widths
        except ValueError:
            widths = (0,)
        need(not widths or (min(widths) > 0 and len(set(widths)) == len(widths)
                            and max(widths) == self.lora_context_len and self.lora_min_window == 0),
             "lora_window_widths", f"{self.lora_window_widths!r}: '' (powers of two) or distinct positive "
             f"comma-separated widths, the largest lora_context_len ({self.lora_context_len}), with "
             f"lora_min_window 0")
        need(self.lora_ranks >= 1, "lora_ranks", "must be positive")
        need(0 <= self.lora_compact_rows < self.lora_batch_docs, "lora_compact_rows",
             f"in [0, lora_batch_docs={self.lora_batch_docs})")
        need(0 <= self.lora_beta1 < 1 and 0 <= self.lora_beta2 < 1, "lora_beta1", "lora_beta1 and lora_beta2 in [0, 1)")
        need(self.phased_prefix_docs >= 0 and self.phased_num_phases >= 1, "phased_num_phases",
             "phased_prefix_docs >= 0 and phased_num_phases >= 1")
        need(self.global_chunk_tokens >= eval_seq_len and self.global_batch_seqs > 0, "global_chunk_tokens",
             f"global_chunk_tokens >= eval.eval_seq_len={eval_seq_len} and global_batch_seqs > 0")


@dataclass(frozen=True)
class RunConfig:
    seed: int = 314
    output_dir: str = "runs/record"
    init_from: str = ""  # .npz of reference-named arrays or a reference final_model.pt
    train_log_every: int = 500
    checkpoint_every: int = 1000  # steps; 0 = only at the end
    num_devices: int = 0  # 0 = every local device


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ttt: TTTConfig = field(default_factory=TTTConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self) -> "Config":
        """Raise ConfigError naming the field if this config cannot run."""
        self.model.validate()
        d, e = self.data, self.eval
        if d.train_seq_len <= 0:
            raise ConfigError("data.train_seq_len: must be positive")
        if d.micro_batches_per_step <= 0:
            raise ConfigError("data.micro_batches_per_step: must be positive")
        if d.packed_documents and d.segments_per_fold < 2:
            raise ConfigError(f"data.segments_per_fold: {d.segments_per_fold}; cuDNN's packed layout needs at least 2")
        try:
            fast = d.fast_segment_slots
        except ValueError:
            fast = (0,)
        if any(not 2 <= m < d.segments_per_fold for m in fast) or len(set(fast)) < len(fast):
            raise ConfigError(f"data.segments_per_fold_fast: {d.segments_per_fold_fast!r}; '' (off) or distinct "
                              f"comma-separated slot counts, each at least 2 and below data.segments_per_fold "
                              f"({d.segments_per_fold})")
        if d.text_transform not in ("", "caseops"):
            raise ConfigError(f"data.text_transform: '' (none) or 'caseops', got {d.text_transform!r}")
        if d.train_batch_tokens % (d.micro_batches_per_step * d.train_seq_len):
            raise ConfigError(
                f"data.train_batch_tokens: {d.train_batch_tokens} is not divisible by "
                f"micro_batches_per_step x train_seq_len = {d.micro_batches_per_step} x {d.train_seq_len}")
        if e.eval_seq_len <= 0:
            raise ConfigError("eval.eval_seq_len: must be positive")
        if not 0 < e.sliding_stride <= e.eval_seq_len:
            raise ConfigError(f"eval.sliding_stride: must be in (0, eval_seq_len={e.eval_seq_len}]")
        if e.val_batch_tokens < e.eval_seq_len * d.micro_batches_per_step:
            raise ConfigError(f"eval.val_batch_tokens: must be at least eval_seq_len x micro_batches_per_step "
                              f"= {e.eval_seq_len * d.micro_batches_per_step}")
        if e.sliding_batch_windows <= 0:
            raise ConfigError("eval.sliding_batch_windows: must be positive")
        if e.document_eval_ranks <= 0:
            raise ConfigError("eval.document_eval_ranks: must be positive")
        if self.run.train_log_every <= 0:
            raise ConfigError("run.train_log_every: must be positive")
        if self.run.checkpoint_every < 0 or self.run.num_devices < 0:
            raise ConfigError("run.checkpoint_every and run.num_devices: must be >= 0")
        if self.optimizer.grad_accum_dtype not in ("param", "float32"):
            raise ConfigError("optimizer.grad_accum_dtype: 'param' or 'float32'")
        o = self.optimizer
        if (o.muon_ns_coefficients not in ("quintic", "polar_express")
                or o.muon_ns_rounding not in ("eager", "compiled")):
            raise ConfigError("optimizer.muon_ns_coefficients: 'quintic' or 'polar_express'; "
                              "optimizer.muon_ns_rounding: 'eager' or 'compiled'")
        if not 0 <= self.schedule.warmdown_frac <= 1 or not 0 <= self.schedule.min_lr_mult <= 1:
            raise ConfigError("schedule.warmdown_frac and schedule.min_lr_mult: must be in [0, 1]")
        if self.schedule.qat_scope not in ("none", "small", "all"):
            raise ConfigError("schedule.qat_scope: 'none', 'small' or 'all'")
        if self.schedule.quant_in_budget and self.schedule.max_wallclock_seconds <= 0:
            raise ConfigError("schedule.quant_in_budget: needs a wall-clock cap (schedule.max_wallclock_seconds > 0)")
        if self.schedule.quant_reserve_seconds < 0 or self.schedule.quant_reserve_margin < 0:
            raise ConfigError("schedule.quant_reserve_seconds and quant_reserve_margin: must be >= 0")
        self._validate_frontier_schedule()
        self.quant.validate()
        self.ttt.validate(e.eval_seq_len, self.model.num_layers)
        return self


    def _validate_frontier_schedule(self) -> None:
        s = self.schedule
        cap = s.max_wallclock_seconds
        if s.gptq_reserve_seconds < 0 or (cap > 0 and s.gptq_reserve_seconds >= cap):
            raise ConfigError(f"schedule.gptq_reserve_seconds: must be >= 0 and below the wall-clock cap "
                              f"(max_wallclock_seconds={cap}); got {s.gptq_reserve_seconds}")
        if s.gptq_reserve_seconds > 0 and s.quant_in_budget:
            raise ConfigError("schedule.gptq_reserve_seconds: the 1.0611 record's fixed reserve and budget mode "
                              "(quant_in_budget) both shorten training; set one")
        if s.enable_looping_at < 0:
            raise ConfigError(f"schedule.enable_looping_at: a training fraction, >= 0; got {s.enable_looping_at}")


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> Config:
    """Inverse of `to_dict`; unknown sections or fields raise ConfigError."""
    sections = {}
    for f in dataclasses.fields(Config):
        sub = dict(d.get(f.name, {}))
        cls = f.default_factory  # type: ignore[misc]
        known = {g.name for g in dataclasses.fields(cls)}
        unknown = sorted(set(sub) - known)
        if unknown:
            raise ConfigError(f"{f.name}: unknown field(s) {', '.join(unknown)}")
        sections[f.name] = cls(**sub)
    unknown = sorted(set(d) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {', '.join(unknown)}")
    return Config(**sections)
