"""configs/frontier.py at the size of configs/smoke.py: a 7-layer model with every feature
of the 1.0611 record scaled to its depth (layers 2-3 looped twice more: encoder [0,1,2,3,2],
decoder [3,2,3,4,5,6]; two lanes from layer 5; gated skips, the sparse head gate, the
windowed SmearGate), packed document rows of 512 tokens, the loop switched on at 35% of
the iterations, the record's quantisation (calibrated on 2 batches of 2 train windows; at this
width every bank matrix has at most 65,536 values, so only the embedding is GPTQ'd); on the
embedded CaseOps data (tinyshakespeare with the record's SP8192 tokenizer, from
../shared/reference). A minute or two end to end on a CPU."""

import dataclasses
from pathlib import Path

from golf_jax import cli
from golf_jax.config import Config, DataConfig, EvalConfig, RunConfig


def get_config() -> Config:
    cfg = cli.load_config_file(Path(__file__).with_name("frontier.py"))
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, num_layers=7, model_dim=64, num_heads=4, num_kv_heads=2, xsa_last_n=7,
                                  rope_dims=8, loop_start=2, loop_end=3, parallel_start_layer=5),
        data=DataConfig(data_dir="embedded", text_transform="caseops", train_seq_len=128, train_batch_tokens=1024,
                        micro_batches_per_step=2, packed_documents=True),
        schedule=dataclasses.replace(cfg.schedule, iterations=40, warmup_steps=2, max_wallclock_seconds=0.0,
                                     gptq_reserve_seconds=0.0, ema_decay=0.9),
        # brotli groups and raw code bytes: no lrzip binary or python-minifier needed to try it.
        quant=dataclasses.replace(cfg.quant, calib_num_seqs=4, calib_seq_len=128, calib_batch_size=2,
                                  group_compressor="brotli", code_size_count="raw"),
        eval=EvalConfig(eval_seq_len=256, val_batch_tokens=4096, val_loss_every=20, sliding_stride=128,
                        sliding_batch_windows=16, max_val_tokens=8192, sliding_enabled=False,
                        # 2 ranks of the record's document-masked evaluation: its 8 would each get
                        # under one batch of these 8,191 targets (31 sequences)
                        document_masked=True, document_eval_ranks=2),
        # The phased LoRA TTT at this size: rank 8, batches of 16 speeches (~58 tokens each), windows
        # of 64 or 128 tokens (two chunk programs, and one of 4 rows for the compacted batches'
        # last steps), one global phase after the first 64 documents.
        ttt=dataclasses.replace(cfg.ttt, lora_rank=8, lora_alpha=14.4, lora_batch_docs=16, lora_context_len=128,
                                lora_window_widths="64,128", lora_compact_rows=4, phased_prefix_docs=64,
                                phased_num_phases=1, global_chunk_tokens=1024, global_batch_seqs=4),
        run=RunConfig(seed=42, output_dir="runs/frontier_smoke", train_log_every=5, checkpoint_every=20),
    )
