"""Multi-process runs: the flags and environment, process 0's decisions, and
two CPU processes on localhost training exactly as one process does."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from golf_jax import checkpoint, distributed, stop_signal
from golf_jax.config import ConfigError
from tests.conftest import REPO, cpu_devices_env


def parsed(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_settings_from_flags_then_environment():
    assert distributed.settings(parsed(), environ={}) is None  # one process: nothing to initialise
    flags = parsed("--coordinator-address", "h0:1234", "--num-processes", "2", "--process-id", "1",
                   "--local-device-ids", "0,1")
    assert distributed.settings(flags, environ={}) == {"coordinator_address": "h0:1234", "num_processes": 2,
                                                      "process_id": 1, "local_device_ids": [0, 1]}
    env = {"JAX_COORDINATOR_ADDRESS": "h1:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.settings(parsed(), environ=env) == {"coordinator_address": "h1:99", "num_processes": 4,
                                                          "process_id": 3}
    # A flag wins over the environment.
    assert distributed.settings(parsed("--process-id", "0"), environ=env)["process_id"] == 0
    # --distributed alone: JAX's cluster detection fills everything in.
    assert distributed.settings(parsed("--distributed"), environ={}) == {}


@pytest.mark.parametrize("argv, env, message", [
    (("--num-processes", "2", "--process-id", "2"), {}, r"--process-id 2: must be in 0 .. 1"),
    (("--num-processes", "0",), {}, r"--num-processes 0: must be at least 1"),
    ((), {"JAX_PROCESS_ID": "one"}, r"JAX_PROCESS_ID='one': not an integer"),
    (("--local-device-ids", "0;1"), {}, r"--local-device-ids '0;1': expected comma-separated integers"),
])
def test_bad_settings_name_the_flag(argv, env, message):
    with pytest.raises(ConfigError, match=message):
        distributed.settings(parsed(*argv), environ=env)


class FakeStore:
    """The coordinator's key-value store, as the processes see it."""

    def __init__(self):
        self.kv: dict[str, str] = {}

    def key_value_set(self, key, value):
        assert key not in self.kv, f"{key} set twice"
        self.kv[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if key not in self.kv:
            raise TimeoutError(key)  # the real store would wait for process 0
        return self.kv[key]

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]

    def key_value_delete(self, key):
        del self.kv[key]


def agreement(store: FakeStore, index: int) -> distributed.StepAgreement:
    a = distributed.StepAgreement(client=store)
    a.primary, a.index = index == 0, index
    return a


def test_every_process_takes_process_zeros_decision():
    store = FakeStore()
    p0, p1 = agreement(store, 0), agreement(store, 1)
    # Each process's own clock would give its own multiplier; process 1 adopts process 0's.
    d0 = p0.decide(5, lambda sigterm: {"mult": 0.5, "sigterm": sigterm}, sigterm=False)
    d1 = p1.decide(5, lambda sigterm: {"mult": 0.49, "sigterm": sigterm}, sigterm=False)
    assert d0 == d1 == {"mult": 0.5, "sigterm": False}
    p0.done(5)
    assert not store.kv  # the decision is dropped once every process ran its step
    # A SIGTERM that reached process 1 alone stops every process at one step.
    with pytest.raises(TimeoutError):  # process 1 forwards it, then waits for process 0's step 6
        p1.decide(6, lambda sigterm: {"sigterm": sigterm}, sigterm=True)
    assert p0.decide(6, lambda sigterm: {"sigterm": sigterm}, sigterm=False) == {"sigterm": True}
    assert p1.decide(6, lambda sigterm: {"sigterm": sigterm}, sigterm=True) == {"sigterm": True}
    # One process: its own decisions, no store.
    solo = distributed.StepAgreement()
    assert solo.client is None and solo.decide(1, lambda s: {"sigterm": s}, sigterm=True) == {"sigterm": True}


# A two-layer model with every feature of the record; float32 everywhere, so
# the only difference between the runs is the order of float32 sums in the
# all-reduce (see train_test.test_one_two_and_eight_devices_agree).
TINY = {"num_layers": "2", "model_dim": "64", "num_heads": "2", "num_kv_heads": "1", "ve_layers": "1",
        "xsa_last_n": "2", "bigram_dim": "32", "ve_dim": "16", "iterations": "10", "warmup_steps": "0",
        "max_val_tokens": "512", "micro_batches_per_step": "4", "checkpoint_every": "0", "val_loss_every": "0",
        "train_log_every": "1", "muon_momentum_dtype": "float32", "muon_ns_dtype": "float32",
        "embedding_dtype": "float32"}


def launch(out: Path, devices: int, *extra: str) -> subprocess.Popen:
    env = dict(cpu_devices_env(devices), PYTHONPATH=str(REPO))
    argv = [sys.executable, "train.py", "--config", "configs/smoke.py", "--no-progress", "--no-quantize",
            f"--config.output_dir={out}", *(f"--config.{k}={v}" for k, v in TINY.items()), *extra]
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(out: Path, *extra: str) -> list[subprocess.Popen]:
    port = free_port()
    return [launch(out, 2, "--coordinator-address", f"localhost:{port}", "--num-processes", "2",
                   "--process-id", str(i), *extra) for i in range(2)]


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=400), p.stdout.read()) for p in procs]


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_two_processes_train_as_one_stop_together_and_resume(tmp_path):
    """Two processes of two CPU devices each against one process of four: the
    same losses and weights. A SIGTERM to process 1 alone stops both at one
    step with one checkpoint, and both resume from it."""
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    baseline = launch(single, 4)
    procs = two_processes(multi)
    deadline = time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if (multi / "train.jsonl").is_file() and any(s >= 2 for s in train_losses(multi)):
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    (rc0, out0), (rc1, out1) = finish(procs)
    assert (rc0, rc1) == (stop_signal.EXIT_SIGTERM, stop_signal.EXIT_SIGTERM), out0[-2000:] + out1[-2000:]
    stopped = checkpoint.TrainCheckpoints(multi / "checkpoints").latest_step()
    assert 2 <= stopped < 10 and f"SIGTERM at step {stopped}/10" in (multi / "train.log").read_text()

    (rc0, out0), (rc1, out1) = finish(two_processes(multi, "--resume"))
    assert (rc0, rc1) == (0, 0), out0[-2000:] + out1[-2000:]
    rc, out = finish([baseline])[0]
    assert rc == 0, out[-2000:]

    # Process 0 alone logs and reports: each line once, none from process 1.
    assert "devices: 4 x cpu in 2 processes" in out0 and "val_loss" not in out1
    assert (multi / "train.log").read_text().count("final (EMA) val_loss") == 1
    assert json.loads((multi / "summary.json").read_text())["processes"] == 2

    mine, ref = train_losses(multi), train_losses(single)
    assert sorted(mine) == sorted(ref) == list(range(1, 11))
    for s in ref:
        assert abs(mine[s] - ref[s]) < 1e-5, (s, mine[s], ref[s])  # float32 sums in another order
    a, _ = checkpoint.load_params(multi / "final_model")
    b, _ = checkpoint.load_params(single / "final_model")
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
        assert np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))) <= 1e-4

    # Written once: the two processes' checkpoint of step 10 is the size of the
    # one process's (each array by one replica; process 1 writes only its own
    # slices of the Muon momentum), not twice it.
    two, one = dir_bytes(multi / "checkpoints" / "10"), dir_bytes(single / "checkpoints" / "10")
    assert 0.9 < two / one < 1.1, (two, one)


def jax_leaves(tree):
    import jax
    return jax.tree.leaves(tree)
