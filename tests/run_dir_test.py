"""One run, one folder: refusal, --overwrite, --resume of a finished run, and
a failed launch that leaves nothing behind."""

from __future__ import annotations

import json

import pytest

from golf_jax import run_dir, train, train_step
from golf_jax.run_dir import RunDirError
from tests.conftest import REPO
from tests.train_test import tiny_config


def another_run(folder):
    """A folder as a finished run leaves it (the files only: nothing here reads them)."""
    (folder / "checkpoints" / "6").mkdir(parents=True)
    (folder / "final_model").mkdir()
    (folder / "final_model" / "config.json").write_text("{}")
    (folder / "train.log").write_text("step 6/6 train_loss 5.0\n")
    (folder / "summary.json").write_text(json.dumps({"steps": 6, "final_val_bpb": 3.25}))
    return folder


def test_outputs_in_a_folder(tmp_path):
    assert run_dir.outputs_in(tmp_path / "none") == []
    (tmp_path / "checkpoints").mkdir()  # empty: no run yet
    (tmp_path / "notes.txt").write_text("mine")  # not a run output
    assert run_dir.outputs_in(tmp_path) == []
    another_run(tmp_path)
    assert run_dir.outputs_in(tmp_path) == ["checkpoints", "final_model", "train.log", "summary.json"]


def test_a_fresh_run_into_another_runs_folder_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(train_step, "make_train_step", lambda *a, **k: pytest.fail("compiled in a refused folder"))
    folder = another_run(tmp_path / "run")
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(RunDirError) as e:
        train.train(tiny_config(folder), progress=False)
    message = str(e.value)
    assert message.startswith(f"{folder}: holds another run (checkpoints, final_model, train.log, summary.json)")
    assert "--resume" in message and "--config.run.output_dir=" in message and "--overwrite" in message
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before  # untouched


def test_overwrite_removes_the_old_run_once_the_inputs_are_checked(tmp_path):
    folder = another_run(tmp_path / "run")
    (folder / "notes.txt").write_text("mine")
    # Bad input: refused before anything is removed.
    with pytest.raises(Exception, match="data directory not found"):
        train.train(tiny_config(folder, **{"data.data_dir": str(tmp_path / "missing"),
                                           "data.tokenizer_path": "x.model"}), overwrite=True, progress=False)
    assert (folder / "final_model").is_dir()
    replaced = run_dir.check(folder, resume=False, overwrite=True)
    assert replaced == ["checkpoints", "final_model", "train.log", "summary.json"]
    assert run_dir.claim(folder, replaced) is None
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]  # only the run's outputs went
    with pytest.raises(RunDirError, match="choose one"):
        run_dir.check(folder, resume=True, overwrite=True)
    assert run_dir.check(another_run(tmp_path / "b"), resume=True, overwrite=False) == []


def test_a_failed_launch_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "runs" / "new"
    with pytest.raises(SystemExit) as e:  # bad data: found before the folder is made
        train.main(["--config", str(REPO / "configs/smoke.py"), f"--config.output_dir={out}",
                    f"--config.data_dir={tmp_path / 'missing'}", "--config.tokenizer_path=x.model"])
    assert e.value.code == 2 and "data directory not found" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # A failure after the folder is made (here the free-space check) takes it away again, parents included.
    created = run_dir.claim(out, run_dir.check(out, resume=False, overwrite=False))
    assert created == tmp_path / "runs" and out.is_dir()
    run_dir.discard(created)
    assert not (tmp_path / "runs").exists()


def test_resume_of_a_finished_run_does_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_step, "make_train_step", lambda *a, **k: pytest.fail("compiled for a finished run"))
    folder = another_run(tmp_path / "run")
    (folder / run_dir.ARTIFACT_NAME).write_bytes(b"the artifact")
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    train.main(["--config", str(REPO / "configs/smoke.py"), f"--config.output_dir={folder}", "--resume"])
    out = capsys.readouterr().out
    assert "this run finished (6 steps, final val_bpb 3.2500); nothing to do" in out
    assert f"python -m golf_jax.quantize --checkpoint {folder} --overwrite" in out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_resume_and_overwrite_together_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", str(REPO / "configs/smoke.py"), f"--config.output_dir={tmp_path / 'r'}",
                    "--resume", "--overwrite"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "choose one" in err
