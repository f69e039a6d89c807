"""The benchmark runs end to end (timings are reported, never asserted).

One small section, so the suite stays fast: the other sections share its
setup and reporting, and each runs on the GPU in every device call that
measures it (scripts/device_bench.sh)."""

from __future__ import annotations

import json

from golf_jax.tools import bench
from tests.conftest import REPO


def test_bench_runs_the_grad_section_on_the_cpu(tmp_path, capsys):
    bench.main(["--config", str(REPO / "configs/smoke.py"), "--sections", "grad", "--grad-batch-seqs", "2",
                "--repeats", "1", "--out", str(tmp_path), "--config.num_layers=2", "--config.xsa_last_n=2",
                "--config.ve_layers=1"])
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["tokens"] == "text" and result["parameters"] > 0 and result["mlp_impl"] == "jnp"
    grad = result["grad"]
    assert grad["shape"] == [2, 256] and grad["tokens_per_s"] > 0 and set(result) >= {"grad", "device", "bench_wall_s"}
    assert "loss+grad micro-batch" in capsys.readouterr().out


def test_bench_fusions_section_checks_each_kernel_on_the_cpu(tmp_path):
    """The fusions section times each Pallas kernel (interpreted here) beside
    its jnp path and reports how far their values are apart: float32 on the
    CPU, so only the order of float32 sums differs (rel 1e-5)."""
    bench.main(["--config", str(REPO / "configs/smoke.py"), "--sections", "fusions", "--grad-batch-seqs", "1",
                "--repeats", "1", "--out", str(tmp_path)])
    fusions = json.loads((tmp_path / "bench.json").read_text())["fusions"]
    assert set(fusions) == set(bench.FUSIONS)
    for name, r in fusions.items():
        assert r["pallas"]["median_s"] > 0 and r["jnp"]["median_s"] > 0, name
        assert r["rel_err"] < 1e-5, name
