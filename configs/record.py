"""The record: "AR Self-Gen GPTQ + XSA-all + BigramHash 3072x112" (val_bpb 1.1147),
2026-03-25, 8x H100, 600 s. Every hyperparameter of that run, stated here
even where it equals the dataclass default, so this file is the record's spec.

Data: the FineWeb 10B sp1024 shards (see README: getting the data).
"""

from golf_jax.config import (Config, DataConfig, EvalConfig, ModelConfig, OptimizerConfig, QuantConfig,
                             RunConfig, ScheduleConfig)


def get_config() -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=1024, num_layers=11, model_dim=512, num_heads=8, num_kv_heads=4, mlp_mult=3.0,
            tie_embeddings=True, tied_embed_init_std=0.005, logit_softcap=30.0, rope_base=10000.0,
            qk_gain_init=1.5, bigram_vocab_size=3072, bigram_dim=112, xsa_last_n=11, rope_dims=16,
            ln_scale=True, ve_enabled=True, ve_dim=128, ve_layers="9,10",
            rope_ntk_base_len=1024, embedding_dtype="bfloat16", round_logits=True, scales_in_float32=True,
        ),
        data=DataConfig(
            data_dir="data/datasets/fineweb10B_sp1024",
            tokenizer_path="data/tokenizers/fineweb_1024_bpe.model",
            train_seq_len=2048, train_batch_tokens=786_432, micro_batches_per_step=8,
        ),
        optimizer=OptimizerConfig(
            matrix_lr=0.025, muon_momentum=0.99, muon_momentum_warmup_start=0.92,
            muon_momentum_warmup_steps=1500, muon_backend_steps=5, muon_weight_decay=0.04,
            muon_momentum_dtype="bfloat16", muon_ns_dtype="bfloat16", muon_ns_coefficients="quintic",
            muon_ns_rounding="eager", muon_row_normalize=False,
            tied_embed_lr=0.035, scalar_lr=0.025, beta1=0.9, beta2=0.95, adam_eps=1e-8,
            adam_weight_decay=0.04, embed_weight_decay=0.04, grad_clip_norm=0.3, grad_accum_dtype="param",
        ),
        schedule=ScheduleConfig(
            iterations=20_000, warmup_steps=20, warmdown_iters=4000, warmdown_frac=0.0, min_lr_mult=0.0,
            max_wallclock_seconds=600.0,
            ema_decay=0.997, swa_enabled=False, swa_every=50, swa_lr_threshold=0.2,
            late_qat_threshold=0.15, qat_scope="none",
        ),
        quant=QuantConfig(
            clip_range=31, gptq_block_size=128, calib_num_seqs=64, calib_seq_len=2048,
            calib_temperature=0.8, calib_batch_size=64, lzma_preset=9, artifact_budget_bytes=16_000_000,
        ),
        eval=EvalConfig(
            eval_seq_len=2048, val_batch_tokens=524_288, val_loss_every=4000, sliding_stride=64,
            sliding_batch_windows=32, sliding_score_once=False,
        ),
        run=RunConfig(seed=314, output_dir="runs/record", train_log_every=500),
    )
