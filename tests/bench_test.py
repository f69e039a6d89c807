"""The benchmark runs end to end (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from golf_jax import bench
from tests.conftest import REPO


def test_bench_runs_every_section_on_the_cpu(tmp_path, capsys):
    bench.main(["--config", str(REPO / "configs/smoke.py"), "--sections", "eval,grad,train,attention,after,ttt,profile",
                "--grad-batch-seqs", "2", "--attention-batch", "1", "--repeats", "1", "--out", str(tmp_path),
                "--config.num_layers=2", "--config.xsa_last_n=2", "--config.ve_layers=1",
                "--config.sliding_batch_windows=2", "--config.calib_num_seqs=2", "--config.calib_seq_len=16",
                "--config.calib_batch_size=2", "--ttt-chunks", "3", "--config.ttt.chunk_tokens=256",
                "--config.ttt.seq_len=128", "--config.ttt.batch_seqs=2", "--config.ttt.epochs=1"])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["tokens"] == "text" and result["parameters"] > 0
    assert result["eval"]["forward_tokens_per_s"] > 0 and result["grad"]["tokens_per_s"] > 0
    assert result["train"]["micro_batches"] == 1 and result["attention"]["jnp"]["forward"]["median_s"] > 0
    after = result["after"]
    assert after["gptq"]["bank_matrices"] == 4 * 2 + 2 * 2 and not after["gptq"]["fallbacks"]
    assert after["serialize"]["bytes"] > 0 and after["generate"]["tokens_per_s"] > 0
    t = result["ttt"]
    assert t["chunks"] == 3 and t["train_steps"] == 2 and t["per_chunk_s"] > 0  # the last chunk: scored only
    assert t["fineweb_val_chunks"] == -(-(bench.FINEWEB_VAL_TOKENS - 1) // 256) and t["devices"] == 1
    for key in ("grad", "train_step"):
        prof = result["profile"][key]  # the CPU records host events only: the plumbing, not kernels
        assert prof["busy_ms"] > 0 and prof["wall_ms"] > 0 and Path(prof["trace"]).is_file()
        assert [k["ms"] for k in prof["top"]] == sorted((k["ms"] for k in prof["top"]), reverse=True)
    assert bench.kernel_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert bench.kernel_category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert bench.kernel_category("loop_multiply_fusion_3") == "xla fusion"
    assert "train step" in capsys.readouterr().out


def test_collective_overlap_from_trace_spans():
    """Two devices: on 0 an all-reduce of 10 us, 6 us of it beside a GEMM; on 1
    one of 4 us alone. Microseconds in, ms per repeat out."""
    spans = [
        {"pid": 0, "name": "ncclDevKernel_AllReduce_Sum_bf16", "ts": 100.0, "dur": 10.0},
        {"pid": 0, "name": "nvjet_sm90_tst_128x128", "ts": 94.0, "dur": 10.0},  # 100..104 overlaps
        {"pid": 0, "name": "loop_add_fusion_3", "ts": 106.0, "dur": 2.0},  # 106..108 overlaps
        {"pid": 0, "name": "loop_add_fusion_4", "ts": 107.0, "dur": 2.0},  # 108..109 more (107..108 merged)
        {"pid": 0, "name": "loop_add_fusion_5", "ts": 120.0, "dur": 5.0},  # after it
        {"pid": 1, "name": "ncclDevKernel_ReduceScatter", "ts": 0.0, "dur": 4.0},
        {"pid": 1, "name": "loop_add_fusion_3", "ts": 4.0, "dur": 2.0},
    ]
    got = bench.collective_overlap(spans, repeats=1)
    assert got[0]["collective_ms"] == pytest.approx(0.010) and got[0]["overlapped_ms"] == pytest.approx(0.007)
    assert got[1]["collective_ms"] == pytest.approx(0.004) and got[1]["overlapped_ms"] == 0.0
