"""Faults: killed runs (SIGKILL mid-step and mid-save, SIGTERM, Ctrl-C), half-written
checkpoints and models, unwritable or full output directories, a failing save,
damaged checkpoints, and a non-finite loss.

The killed runs are real `python train.py` processes; each resume happens in
this process (one interpreter and jax start fewer) and must end bit for bit
where one uninterrupted run ends.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from golf_jax import checkpoint, model, optim, param_tree, stop_signal, train, train_step
from golf_jax.checkpoint import CheckpointError
from golf_jax.run_dir import RunDirError
from tests.conftest import REPO
from tests.train_test import assert_trees_equal, tiny_config

ITERATIONS = "20"
EVERY = "4"  # periodic checkpoints at 4, 8, 12, ...


def fault_config(out_dir, **overrides):
    return tiny_config(out_dir, **{"schedule.iterations": ITERATIONS, "run.checkpoint_every": EVERY, **overrides})


def cli_args(cfg) -> list[str]:
    """Every field of `cfg` as a `--config.` override: the process trains
    exactly the config this test compares against, by construction."""
    return [f"--config.{section.name}.{f.name}={getattr(getattr(cfg, section.name), f.name)}"
            for section in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, section.name))]


def launch(cfg, env_extra: dict | None = None) -> subprocess.Popen:
    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The matmul precision this test process runs with (tests/conftest.py), so
    # both sides compile the same program.
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "train.py", "--config", str(REPO / "configs/smoke.py"), "--no-progress",
                             "--no-quantize", *cli_args(cfg)], cwd=REPO, env=env,
                            stdout=open(out / "stdout.txt", "w"), stderr=open(out / "stderr.txt", "w"))


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def last_logged_step(out_dir: Path) -> int:
    try:
        lines = (out_dir / "train.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]
    return max(steps, default=0)


def complete(ckpt_dir: Path, step: int) -> bool:
    return all((ckpt_dir / str(step) / f).is_file() for f in checkpoint._STEP_FILES)


def latest_step(out_dir: Path) -> int | None:
    ckpts = checkpoint.TrainCheckpoints(out_dir / "checkpoints")
    try:
        return ckpts.latest_step()
    finally:
        ckpts.close()


def final_params(out_dir: Path):
    return checkpoint.load_params(Path(out_dir) / "final_model")[0]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted run: what every interrupted one must end at."""
    out = tmp_path_factory.mktemp("straight")
    before = signal.getsignal(signal.SIGTERM)
    train.train(fault_config(out), progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # the loop leaves no handler behind
    return out


# ----------------------------------------------------------------------------- killed runs

def test_sigkill_mid_step_resumes_exactly(tmp_path, straight):
    cfg = fault_config(tmp_path)
    proc = launch(cfg)
    ckpts = tmp_path / "checkpoints"
    # Killed with steps in flight after a checkpoint, before the next one.
    wait_until(proc, lambda: complete(ckpts, 4) and last_logged_step(tmp_path) >= 6, "step 6 after checkpoint 4")
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    reached = latest_step(tmp_path)
    assert reached is not None and 4 <= reached < int(ITERATIONS)
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


def test_sigkill_mid_save_ignores_the_half_written_checkpoint(tmp_path, straight):
    cfg = fault_config(tmp_path)
    # The save of step 8 stalls inside orbax's temporary directory (test hook).
    proc = launch(cfg, {checkpoint.STALL_SAVE_ENV: "8:120"})
    ckpts = tmp_path / "checkpoints"
    wait_until(proc, lambda: any(ckpts.glob("8.orbax-checkpoint-tmp*")), "the temporary directory of step 8")
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    assert not (ckpts / "8").exists() and any(ckpts.glob("8.orbax-checkpoint-tmp*"))
    assert latest_step(tmp_path) == 4
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


def test_sigterm_saves_the_step_reached_and_resumes_exactly(tmp_path, straight):
    # No periodic checkpoints: the one found afterwards is SIGTERM's.
    cfg = fault_config(tmp_path, **{"run.checkpoint_every": "0"})
    proc = launch(cfg)
    wait_until(proc, lambda: last_logged_step(tmp_path) >= 3, "step 3")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == stop_signal.EXIT_SIGTERM == 143
    err = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    message = err[-1]
    assert message.startswith("stopped by SIGTERM at step "), err[-5:]
    reached = int(message.split("at step ")[1].split(";")[0])
    assert 3 <= reached < int(ITERATIONS)
    assert f"checkpoint of step {reached} saved in {tmp_path / 'checkpoints'}" in message
    assert not (tmp_path / "final_model").exists()
    assert latest_step(tmp_path) == reached
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


def test_ctrl_c_saves_the_step_reached_and_resumes_exactly(tmp_path, straight):
    """SIGINT as SIGTERM: a checkpoint at the next step boundary, one line on
    resuming, status 130; the resumed run ends where the uninterrupted one does."""
    cfg = fault_config(tmp_path, **{"run.checkpoint_every": "0"})
    proc = launch(cfg)
    wait_until(proc, lambda: last_logged_step(tmp_path) >= 3, "step 3")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == stop_signal.EXIT_SIGINT == 130
    err = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in err and "Ctrl-C: stopping at the next step boundary" in err
    message = err.strip().splitlines()[-1]
    assert message.startswith("stopped by SIGINT at step ") and message.endswith("continue with --resume")
    reached = int(message.split("at step ")[1].split(";")[0])
    assert latest_step(tmp_path) == reached and not (tmp_path / "final_model").exists()
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_earlier_checkpoints(tmp_path, straight):
    """The first Ctrl-C asks for a checkpoint; while that waits on a save that
    hangs (test hook: step 8's stalls inside orbax's temporary directory), a
    second one ends the process at once. Checkpoint 4 is intact, the half-written
    8 is never taken for complete, and resuming ends where the straight run does."""
    cfg = fault_config(tmp_path)  # checkpoints every 4 steps
    proc = launch(cfg, {checkpoint.STALL_SAVE_ENV: "8:120"})
    ckpts = tmp_path / "checkpoints"
    wait_until(proc, lambda: any(ckpts.glob("8.orbax-checkpoint-tmp*")), "the temporary directory of step 8")
    proc.send_signal(signal.SIGINT)
    # Two signals before Python runs the handler count as one: wait for the first's line.
    wait_until(proc, lambda: "Ctrl-C: stopping" in (tmp_path / "stderr.txt").read_text(), "the first Ctrl-C's line")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == stop_signal.EXIT_SIGINT
    err = (tmp_path / "stderr.txt").read_text()
    assert "second SIGINT: exiting now; earlier checkpoints are kept" in err and "Traceback" not in err
    assert latest_step(tmp_path) == 4 and not (ckpts / "8").exists()
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


# ----------------------------------------------------------------------------- half-written outputs

def test_half_written_checkpoints_are_never_taken_for_complete(tmp_path, straight):
    ckpts_dir = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", ckpts_dir)
    steps = sorted(int(p.name) for p in ckpts_dir.iterdir())
    assert steps == [16, 20]
    # A leftover temporary directory of a later step: not a step.
    shutil.copytree(ckpts_dir / "20", ckpts_dir / "24.orbax-checkpoint-tmp-1234")
    assert latest_step(tmp_path) == 20
    # A numbered directory without orbax's files: named, never restored.
    shutil.copytree(ckpts_dir / "20", ckpts_dir / "28")
    (ckpts_dir / "28" / "meta" / "metadata").unlink()
    with pytest.raises(CheckpointError, match=rf"{ckpts_dir / '28'}: incomplete checkpoint \(missing meta/metadata\); "
                                              r"remove it to resume from step 20"):
        latest_step(tmp_path)
    shutil.rmtree(ckpts_dir / "28")
    assert latest_step(tmp_path) == 20


def test_final_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    cfg = tiny_config(tmp_path)
    target = tmp_path / "final_model"
    checkpoint.save_params(target, params, cfg)

    def crash(*args, **kwargs):
        raise OSError(errno.EIO, "simulated crash mid-write")

    # A crash while the params of a second save are written: the first model
    # stays whole and loadable, and no half model is left under any name.
    import orbax.checkpoint as ocp
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save_params(target, {"w": np.zeros((2, 3), np.float32)}, cfg)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
    np.testing.assert_array_equal(checkpoint.load_params(target)[0]["w"], params["w"])
    # What a crash before the rename would leave, had it left the directory
    # in place (the pre-rename layout): params without config.json.
    shutil.copytree(target, tmp_path / "half")
    (tmp_path / "half" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="not a complete saved model"):
        checkpoint.load_params(tmp_path / "half")


# ----------------------------------------------------------------------------- output directory

def test_unwritable_output_directory_fails_before_training(tmp_path, monkeypatch, capsys):
    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before checking the output directory")

    monkeypatch.setattr(train_step, "make_train_step", no_compiling)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    targets = [blocker / "run"]  # unwritable for root as well
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "read_only"
        ro.mkdir()
        ro.chmod(0o500)
        targets.append(ro / "run")
    for out in targets:
        with pytest.raises(RunDirError, match=rf"{out}: output directory is not writable"):
            train.train(tiny_config(out), progress=False)
    with pytest.raises(SystemExit) as e:  # the command line: one line, status 2
        train.main(["--config", str(REPO / "configs/smoke.py"), f"--config.output_dir={blocker / 'run'}"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {blocker / 'run'}: output directory is not writable (Not a directory)"


def test_full_output_directory_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "make_train_step", lambda *a, **k: pytest.fail("compiled on a full disk"))
    real_write = os.write

    def write(fd, data):
        if ".write-probe-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    with monkeypatch.context() as m:
        m.setattr(os, "write", write)
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'a'}: output directory is not writable "
                                                  r"\(No space left on device\)"):
            train.train(tiny_config(tmp_path / "a"), progress=False)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'b'}: 0.1 MB free on its disk; the checkpoints and "
                                              r"final model need about \d+\.\d MB"):
        train.train(tiny_config(tmp_path / "b"), progress=False)


def test_failed_save_mid_run_names_the_directory_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, straight):
    cfg = fault_config(tmp_path)
    real = checkpoint._MetaHandler._save_fn

    async def disk_full_at_8(self, x, directory):
        if x.get("step") == 8:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        await real(self, x, directory)

    with monkeypatch.context() as m:
        m.setattr(checkpoint._MetaHandler, "_save_fn", disk_full_at_8)
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'checkpoints'}: saving checkpoint 8 failed \(the "
                                                  r"disk is full\): OSError: .*; the last complete checkpoint is "
                                                  r"step 4, untouched"):
            train.train(cfg, progress=False)
    assert latest_step(tmp_path) == 4
    # Untouched means exactly: the run continues from it to the uninterrupted end.
    train.train(cfg, resume=True, progress=False)
    assert_trees_equal(final_params(tmp_path), final_params(straight))


# ----------------------------------------------------------------------------- damaged input

def _state_template(cfg):
    mesh = train_step.make_mesh(cfg.run.num_devices)
    tx = optim.build_optimizer(cfg.optimizer, train_step.AXIS)
    return train_step.init_state(train.initial_params(cfg), tx, mesh, cfg.schedule.swa_enabled)


def _random_files(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "notes.txt").write_bytes(os.urandom(100))
    (d / "junk").mkdir()
    (d / "junk" / "blob").write_bytes(os.urandom(1000))
    (d / "params").write_bytes(os.urandom(100))  # a file where a directory belongs
    return d


def _corrupt_meta(src: Path, d: Path) -> Path:
    shutil.copytree(src / "checkpoints", d)
    for step in (16, 20):
        (d / str(step) / "meta" / "metadata").write_text('{"step": 20, "config": {tr')
    return d


def _corrupt_config(src: Path, d: Path) -> Path:
    shutil.copytree(src / "final_model", d)
    (d / "config.json").write_text("{ not json")
    return d


def _half_model(src: Path, d: Path) -> Path:
    shutil.copytree(src / "final_model", d)
    (d / "params" / "_METADATA").unlink()
    return d


CHECKPOINT_CASES = {
    # name: (make the directory from (straight run, tmp dir), template config, expected message)
    "missing": (lambda s, t: t / "nowhere", None, "no such checkpoint directory"),
    "empty": (lambda s, t: (t / "empty").mkdir() or t / "empty", None, "no complete checkpoint to resume from"),
    "random files": (lambda s, t: _random_files(t / "random"), None, "no complete checkpoint to resume from"),
    "corrupted meta": (lambda s, t: _corrupt_meta(s, t / "ck"), None,
                       r"20: unreadable metadata \(JSONDecodeError"),
    "another model": (lambda s, t: s / "checkpoints", {"model.model_dim": "32"},
                      r"20: checkpoint does not fit this run \("),
}


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_bad_checkpoints_raise_checkpoint_error(case, tmp_path, straight):
    make, other, expected = CHECKPOINT_CASES[case]
    directory = make(straight, tmp_path)
    ckpts = checkpoint.TrainCheckpoints(directory)
    try:
        with pytest.raises(CheckpointError, match=rf"^{directory}(/\d+)?: ") as e:
            template = _state_template(fault_config(tmp_path / "out", **(other or {})))
            if other is None:  # the metadata is read first, as a resume does
                ckpts.read_meta()
            ckpts.restore(template)
        assert e.match(expected)
    finally:
        ckpts.close()
    if case == "missing":
        assert not directory.exists()  # reading never creates


MODEL_CASES = {
    "missing": (lambda s, t: t / "nowhere", None, "no such saved model directory"),
    "empty": (lambda s, t: (t / "empty").mkdir() or t / "empty", None, "not a complete saved model"),
    "random files": (lambda s, t: _random_files(t / "random"), None, "not a complete saved model"),
    "half-written params": (lambda s, t: _half_model(s, t / "half"), None, "not a complete saved model"),
    "corrupted config": (lambda s, t: _corrupt_config(s, t / "cfg"), None,
                         r"config.json: not a model config \(JSONDecodeError"),
    "another model": (lambda s, t: s / "final_model", {"model.model_dim": "32"},
                      r"params: cannot be read into this model \("),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_saved_models_raise_checkpoint_error(case, tmp_path, straight):
    make, other, expected = MODEL_CASES[case]
    directory = make(straight, tmp_path)
    template = None
    if other is not None:
        cfg = fault_config(tmp_path, **other)
        template = model.init_params(cfg.model, jax.random.key(0))
    with pytest.raises(CheckpointError, match=rf"^{directory}") as e:
        checkpoint.load_params(directory, template)
    assert e.match(expected)


# ----------------------------------------------------------------------------- non-finite loss

def test_non_finite_parameters_are_named_with_the_step(tmp_path, monkeypatch):
    """A tensor goes bad in an update (poisoned, as an overflow would leave it):
    the error names the step and the tensor, and no checkpoint ever holds it."""
    real = train_step.make_train_step
    poison_after = []

    def poisoning(cfg, mesh, tx, template):
        step_fn, calls = real(cfg, mesh, tx, template), [0]

        def step(state, *args):
            state, loss = step_fn(state, *args)
            calls[0] += 1
            if calls[0] == poison_after[0]:
                state = state._replace(params={**state.params, "skip_weights": state.params["skip_weights"] * jnp.nan})
            return state, loss

        return step

    monkeypatch.setattr(train_step, "make_train_step", poisoning)
    # Bad after step 3: step 4's loss is NaN, and the tensor is named.
    poison_after[:] = [3]
    with pytest.raises(train.TrainingError, match=r"^loss is nan at step 4; non-finite parameters entering it: "
                                                  r"skip_weights; stopping \(the last good checkpoint, step 2, is kept\)"):
        train.train(tiny_config(tmp_path / "a", **{"run.checkpoint_every": "2"}), progress=False)
    assert latest_step(tmp_path / "a") == 2
    # Bad after step 4, a checkpoint step whose own loss (of the parameters
    # entering it) was finite: not saved, and step 5 names the tensor.
    poison_after[:] = [4]
    with pytest.raises(train.TrainingError, match=r"^loss is nan at step 5; non-finite parameters entering it: "
                                                  r"skip_weights; stopping \(the last good checkpoint, step 2, is kept\)"):
        train.train(tiny_config(tmp_path / "b", **{"run.checkpoint_every": "2"}), progress=False)
    assert "step 4: non-finite parameters (skip_weights); checkpoint not saved" in (tmp_path / "b/train.log").read_text()
    assert latest_step(tmp_path / "b") == 2


def test_saved_model_of_params_layout_1_is_refused_naming_the_layout(tmp_path):
    """Before the Flax model (params layout 1) a value embedding as wide as
    kv_dim had a projection; layout 2 has none there, as the reference."""
    cfg = fault_config(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ve_layers="1", ve_dim=cfg.model.kv_dim))
    assert param_tree.legacy_projections(cfg.model) == ("ve/proj",)
    params = model.init_params(cfg.model, jax.random.key(0))
    params["ve"]["proj"] = jnp.zeros((cfg.model.kv_dim, cfg.model.ve_dim))  # what layout 1 saved
    checkpoint.save_params(tmp_path / "final_model", params, cfg)
    with pytest.raises(CheckpointError, match=r"params: ve/proj: a projection between equal widths, saved by "
                                              r"golf_jax before 2026-11-30 \(params layout 1\)"):
        checkpoint.load_params(tmp_path / "final_model")
