"""orbax checkpoints: the training state for `--resume`, and the final weights
where the quantisation stage finds them.

Both are written through orbax, which writes to a temporary directory and
renames it when complete, so a half-written checkpoint is never taken for a
complete one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from golf_jax import config as config_lib
from golf_jax.config import Config


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory."""


def _abstract(tree):
    """Shape/dtype/sharding of every leaf: what orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class TrainCheckpoints:
    """Training state (any pytree of arrays) plus JSON metadata, every N steps."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the shapes, dtypes and shardings of `template_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template_state)), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"{self.directory}: checkpoint {step} does not fit this run ({e})") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_params(directory: str | Path, params: Any, cfg: Config) -> Path:
    """The final weights (params pytree) and the config that made them."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "params"
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(target, params, force=True)
    _write_text_atomic(directory / "config.json", json.dumps(config_lib.to_dict(cfg), indent=1))
    return directory


def load_params(directory: str | Path, template: Any | None = None) -> tuple[Any, Config]:
    """Read weights saved by `save_params`; their config comes with them."""
    directory = Path(directory).absolute()
    if not (directory / "config.json").is_file() or not (directory / "params").is_dir():
        raise CheckpointError(f"{directory}: not a saved model (expected config.json and params/)")
    cfg = config_lib.from_dict(json.loads((directory / "config.json").read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(directory / "params", _abstract(template) if template is not None else None)
    return params, cfg
