"""A small model with every feature of the record, sized to run on a CPU in
a minute or two on the embedded data: the tinyshakespeare shards and the
competition tokenizer in ../shared/data when present, else a corpus built
once from CPython's own pydoc topics with a tokenizer trained on it."""

from golf_jax.config import Config, DataConfig, EvalConfig, ModelConfig, QuantConfig, RunConfig, ScheduleConfig


def get_config() -> Config:
    return Config(
        # ve_dim is half of kv_dim (64), as in the record (128 of 256), so that the
        # value embedding has its projection.
        model=ModelConfig(
            num_layers=4, model_dim=128, num_heads=4, num_kv_heads=2, mlp_mult=3.0,
            bigram_vocab_size=3072, bigram_dim=112, xsa_last_n=4, rope_dims=16, ve_dim=32, ve_layers="2,3",
        ),
        data=DataConfig(data_dir="embedded", train_seq_len=256, train_batch_tokens=4096, micro_batches_per_step=1),
        schedule=ScheduleConfig(iterations=150, warmup_steps=2, warmdown_iters=50, max_wallclock_seconds=0.0,
                                ema_decay=0.95),
        quant=QuantConfig(calib_num_seqs=8, calib_seq_len=256, calib_batch_size=8),
        eval=EvalConfig(eval_seq_len=256, val_batch_tokens=8192, val_loss_every=50, sliding_stride=64,
                        sliding_batch_windows=32),
        run=RunConfig(seed=314, output_dir="runs/smoke", train_log_every=20, checkpoint_every=50),
    )
