"""The benchmark runs end to end (timings are reported, never asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from golf_jax import bench
from tests.conftest import REPO


def test_bench_runs_every_section_on_the_cpu(tmp_path, capsys):
    bench.main(["--config", str(REPO / "configs/smoke.py"), "--sections", "eval,grad,train,attention,mlp,after,ttt,profile",
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
    m = result["mlp"]  # the CPU has the jnp path only
    assert m["shape"] == [2 * result["grad"]["shape"][1], 128, 384] and m["jnp"]["forward_backward"]["median_s"] > 0 and "triton" not in m
    ft = result["profile"]["grad"]["fusion_traffic"]  # on the CPU: XLA's host ops, matched to the same HLO
    assert ft["fusions"] > 0 and ft["gbytes"] > 0 and ft["unmatched_ms"] >= 0
    assert "train step" in capsys.readouterr().out
