"""Run folders: one run, one folder.

A run writes its checkpoints, final model, logs, reports and artifact into
`run.output_dir`. Two runs never mix there:

- a fresh run into a folder that holds another run's outputs is refused, with
  the ways on named (`--resume`, another `--config.run.output_dir`,
  `--overwrite`, which removes the old run's outputs once the new run's inputs
  are checked);
- `--resume` continues the run that is there, and of a finished run does
  nothing (train.py says so);
- a launch that fails before training leaves no folder behind that it made.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

ARTIFACT_NAME = "final_model.int6.golf"
FINAL_MODEL = "final_model"
SUMMARY = "summary.json"
# Everything a run writes into its folder, by the stage that writes it.
TRAINING_OUTPUTS = ("checkpoints", FINAL_MODEL, "train.log", "train.jsonl", SUMMARY, "loss.png")
QUANTIZE_OUTPUTS = (ARTIFACT_NAME, "quantize.json")


class RunDirError(ValueError):
    """A run folder that cannot be used as asked; the message names it and the ways on."""


def outputs_in(directory: str | Path) -> list[str]:
    """The run outputs present in `directory` (an empty checkpoints/ is none)."""
    directory = Path(directory)
    found = []
    for name in TRAINING_OUTPUTS + QUANTIZE_OUTPUTS:
        path = directory / name
        if path.is_dir() and not any(path.iterdir()):
            continue
        if path.exists():
            found.append(name)
    return found


def finished_summary(directory: str | Path) -> dict | None:
    """The summary of a run whose training finished in `directory` (its final
    model and summary are written after the last step), else None."""
    directory = Path(directory)
    if not (directory / FINAL_MODEL).is_dir() or not (directory / SUMMARY).is_file():
        return None
    try:
        summary = json.loads((directory / SUMMARY).read_text())
    except ValueError:
        return None  # a damaged summary: resuming rewrites it
    return summary if isinstance(summary, dict) else None


def check_mode(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise RunDirError("--resume continues the run in the folder and --overwrite replaces it: choose one")


def check(directory: str | Path, *, resume: bool, overwrite: bool) -> list[str]:
    """The run outputs in `directory` that this run replaces (for `claim`).
    A fresh run is refused where another run's outputs are, unless `overwrite`;
    `resume` continues what is there. Reads only: with several processes,
    every one checks before any of them writes (train.py's barrier)."""
    check_mode(resume, overwrite)
    if resume:
        return []
    earlier = outputs_in(directory)
    if earlier and not overwrite:
        raise RunDirError(
            f"{Path(directory).absolute()}: holds another run ({', '.join(earlier)}); continue it with --resume, "
            f"write this run elsewhere with --config.run.output_dir=DIR, or replace it with --overwrite")
    return earlier


def claim(directory: str | Path, replaced: Sequence[str] = ()) -> Path | None:
    """Make `directory` ready for a run's outputs, once the run's inputs are
    checked: remove the outputs it replaces (`check`), create it. Returns the
    topmost folder this created (runs/ of runs/smoke, say), for `discard` if the
    launch then fails; None if the folder was there."""
    directory = Path(directory).absolute()
    created = next((p for p in reversed((directory, *directory.parents)) if not p.exists()), None)
    try:
        for name in replaced:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{directory}: output directory is not writable ({e.strerror or e})") from None
    return created


def discard(created: Path | None) -> None:
    """After a failed launch: remove the folder `claim` created, so nothing is left behind."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
