"""orbax checkpoints: the training state for `--resume`, and the final weights
where the quantisation stage finds them.

What a crash can leave behind, and why none of it is taken for complete:

- A training checkpoint is written by orbax into `<step>.orbax-checkpoint-tmp*`
  and renamed to `<step>/` only when every item is on disk; orbax never lists
  the temporary directory as a step, so a run killed mid-save resumes from the
  previous checkpoint.
- A numbered directory that lacks orbax's files (copied in part, damaged by
  hand or by a filesystem without atomic rename) is not silently skipped: if it
  is the latest, `TrainCheckpoints` raises `CheckpointError` naming it and the
  previous complete step. Resuming from an older step than the user believes is
  a silent loss of work; an error lets them decide (remove the directory).
- `save_params` writes the whole `final_model/` under a temporary name beside
  it and renames it into place, so a final_model directory is either complete
  or absent.

Every failure to read or write becomes a `CheckpointError` naming the
directory, never an orbax/tensorstore traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from golf_jax import artifact, artifact_pergroup, atomic, compat, data, model, param_tree, quant, quant_frontier
from golf_jax import config as config_lib
from golf_jax.config import Config, ConfigError

# Test hook (tests/faults_test.py): "STEP:SECONDS" makes the metadata write of
# the checkpoint of STEP wait that long inside orbax's temporary directory, so
# a test can kill the process while a save is certainly half-written.
STALL_SAVE_ENV = "GOLF_JAX_TEST_STALL_SAVE"

# The files orbax writes last into a step directory and its two items; a step
# directory without them was not written completely by orbax.
_STEP_FILES = ("_CHECKPOINT_METADATA", "state/_METADATA", "meta/metadata")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the directory."""


def _abstract(tree):
    """Shape/dtype/sharding of every leaf: what orbax restores into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class _MetaHandler(ocp.JsonCheckpointHandler):
    """orbax's JSON handler, plus the test hook `STALL_SAVE_ENV`."""

    async def _save_fn(self, x, directory):
        stall = os.environ.get(STALL_SAVE_ENV)
        if stall:
            step, seconds = stall.split(":")
            if x.get("step") == int(step):
                time.sleep(float(seconds))  # a background thread of orbax's; training goes on
        await super()._save_fn(x, directory)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


class TrainCheckpoints:
    """Training state (any pytree of arrays) plus JSON metadata, every N steps.

    Saves are asynchronous (training continues while orbax writes); a failed
    save surfaces as `CheckpointError` at the next `save` or `wait`.
    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory, self.keep = Path(directory).absolute(), keep
        # create=False: reading a directory must not create it (a typo in a
        # path would otherwise read as "no checkpoint yet"); save() creates it.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=False, enable_async_checkpointing=True)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler())
        registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
        meta = _MetaHandler()
        registry.add("meta", ocp.args.JsonSave, meta)
        registry.add("meta", ocp.args.JsonRestore, meta)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)
        self._in_flight: int | None = None

    def save(self, step: int, state: Any, meta: dict) -> None:
        self.wait()  # a failure of the previous save is reported before a new one starts
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._in_flight = step
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            self._in_flight = None
            raise self._save_failed(step, e) from e

    def wait(self) -> None:
        """Block until the save in flight is on disk; raise if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            step, self._in_flight = self._in_flight, None
            raise self._save_failed(step, e) from e
        self._in_flight = None

    def _save_failed(self, step: int | None, e: BaseException) -> CheckpointError:
        try:
            kept = self._complete_steps()
        except OSError:
            kept = []
        full = " (the disk is full)" if isinstance(e, OSError) and e.errno == errno.ENOSPC else ""
        previous = f"the last complete checkpoint is step {kept[-1]}" if kept else "there is no complete checkpoint"
        return CheckpointError(f"{self.directory}: saving checkpoint {step} failed{full}: {_describe(e)}; "
                               f"{previous}, untouched")

    def _steps_on_disk(self) -> list[int]:
        """The steps in the directory now, not orbax's cached list."""
        if hasattr(self.manager, "reload"):  # all_steps(read=True) is deprecated where reload() exists
            self.manager.reload()
            return list(self.manager.all_steps())
        return list(self.manager.all_steps(read=True))

    def _complete_steps(self) -> list[int]:
        return [s for s in self._steps_on_disk() if not self._missing(s)]

    def _missing(self, step: int) -> list[str]:
        root = self.directory / str(step)
        return [f for f in _STEP_FILES if not (root / f).is_file()]

    def latest_step(self) -> int | None:
        """The latest complete step; None if there is none; CheckpointError if
        the latest numbered directory is incomplete (see the module docstring)."""
        if not self.directory.is_dir():
            return None
        steps = sorted(self._steps_on_disk())
        if not steps:
            return None
        missing = self._missing(steps[-1])
        if missing:
            older = [s for s in steps[:-1] if not self._missing(s)]
            hint = (f"remove it to resume from step {older[-1]}" if older else "and no older complete checkpoint")
            raise CheckpointError(f"{self.directory / str(steps[-1])}: incomplete checkpoint (missing "
                                  f"{', '.join(missing)}); {hint}")
        return steps[-1]

    def _step_to_read(self, step: int | None) -> int:
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint directory")
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no complete checkpoint to resume from")
        if self._missing(step):
            raise CheckpointError(f"{self.directory / str(step)}: no complete checkpoint of step {step}")
        return step

    def read_meta(self, step: int | None = None) -> dict:
        step = self._step_to_read(step)
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:
            raise CheckpointError(f"{self.directory / str(step)}: unreadable metadata ({_describe(e)})") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{self.directory / str(step)}: metadata is not a JSON object")
        return meta

    def restore(self, template_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restore into the shapes, dtypes and shardings of `template_state`."""
        step = self._step_to_read(step)
        meta = self.read_meta(step)  # damaged metadata is the clearer error, so it comes first
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template_state))))
        except Exception as e:
            raise CheckpointError(f"{self.directory / str(step)}: checkpoint does not fit this run "
                                  f"({_describe(e)}){_legacy_note(meta.get('config'))}") from None
        return out["state"], meta

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def run_meta(step: int, training_s: float, cursor: dict, qat_on: bool, stop_after: int | None, cfg: Config,
             history: dict, budget: dict | None = None, dataset: dict | None = None,
             looping: dict | None = None) -> dict:
    """A training checkpoint's metadata: where the run is, the config that
    made it and its dataset's identity (`datasets.Dataset.record`); looping:
    the layer loop's switch (`layer_loop.LoopSwitch.state`)."""
    # The run's PRNG key is the seed's; training itself draws no random numbers
    # (no dropout), so the key is recorded for what comes after, not consumed.
    key = np.asarray(jax.random.key_data(jax.random.key(cfg.run.seed))).tolist()
    return {"step": step, "training_s": training_s, "cursor": cursor, "qat_on": qat_on, "stop_after_step": stop_after,
            "rng_key": key, "config": config_lib.to_dict(cfg), "history": history, "budget": budget,
            "data": dataset, "looping": looping}


def check_resume_config(saved: dict, cfg: Config, where: Path) -> None:
    """Refuse to resume with another model, data or optimizer config, naming the field."""
    now = config_lib.to_dict(cfg)
    for section in ("model", "data", "optimizer"):
        for key, value in now[section].items():
            if saved.get(section, {}).get(key) != value:
                raise CheckpointError(
                    f"{where}: checkpoint was made with {section}.{key}={saved.get(section, {}).get(key)!r}, "
                    f"this run has {value!r}")


def tree_bytes(tree: Any) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def check_writable(directory: str | Path) -> None:
    """Fail now, naming the directory, if outputs cannot be written there:
    before hours of training rather than at the first checkpoint."""
    directory = Path(directory).absolute()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        try:
            os.write(fd, b"x")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise CheckpointError(f"{directory}: output directory is not writable ({e.strerror or e})") from None


def check_free_space(directory: str | Path, need_bytes: int) -> None:
    """Raise, naming the directory, when its disk has less room than `need_bytes`
    (a rough estimate: orbax's files are about the arrays' size)."""
    directory = Path(directory).absolute()
    free = shutil.disk_usage(directory).free
    if free < need_bytes:
        raise CheckpointError(f"{directory}: {free / 1e6:,.1f} MB free on its disk; the checkpoints and final "
                              f"model need about {need_bytes / 1e6:,.1f} MB")


def _this_process_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer for host arrays that this process alone reads or writes
    (the final model, by process 0 of a multi-process run): orbax would
    otherwise wait at barriers for every process."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


DATASET_FILE = "dataset.json"  # in a saved model: its dataset's identity, the tokenizer's above all


def save_params(directory: str | Path, params: Any, cfg: Config, dataset: dict | None = None) -> Path:
    """The final weights (params pytree), the config that made them and the
    identity of their dataset (`datasets.Dataset.record`), written beside
    `directory` under a temporary name and renamed into place."""
    directory = Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        with _this_process_checkpointer() as ckptr:
            ckptr.save(tmp / "params", params, force=True)
        atomic.write_text(tmp / "config.json", json.dumps(config_lib.to_dict(cfg), indent=1))
        if dataset is not None:
            atomic.write_text(tmp / DATASET_FILE, json.dumps(dataset, indent=1))
        old = None
        if directory.exists():  # a re-run: the old model goes only once the new one is whole
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent)) / "m"
            os.replace(directory, old)
        os.replace(tmp, directory)
        atomic.fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def write_json(path: str | Path, obj: Any) -> None:
    """A JSON report written whole or not at all (golf_jax.atomic);
    non-JSON numbers (numpy scalars) are written as floats."""
    atomic.write_text(path, json.dumps(obj, indent=1, default=float))


def load_params(directory: str | Path, template: Any | None = None) -> tuple[Any, Config]:
    """Read weights saved by `save_params`; their config comes with them."""
    directory = Path(directory).absolute()
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such saved model directory")
    if not (directory / "config.json").is_file() or not (directory / "params" / "_METADATA").is_file():
        raise CheckpointError(f"{directory}: not a complete saved model (expected config.json and params/)")
    try:
        cfg = config_lib.from_dict(json.loads((directory / "config.json").read_text()))
    except (ValueError, TypeError, AttributeError, ConfigError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: not a model config ({_describe(e)})") from None
    try:
        with _this_process_checkpointer() as ckptr:
            params = ckptr.restore(directory / "params", _abstract(template) if template is not None else None)
    except Exception as e:
        raise CheckpointError(f"{directory / 'params'}: cannot be read"
                              f"{' into this model' if template is not None else ''} ({_describe(e)})") from None
    _check_no_legacy_params(params, cfg, directory / "params")
    return params, cfg


def _legacy_note(config: dict | None) -> str:
    """Why a checkpoint of this config may not fit: saved under params layout 1."""
    try:
        legacy = param_tree.legacy_projections(config_lib.from_dict(config).model) if config else ()
    except (ValueError, TypeError, AttributeError, ConfigError):
        return ""
    return f"; if it holds {' or '.join(legacy)}: {param_tree.LEGACY_LAYOUT}" if legacy else ""


def _check_no_legacy_params(params: Any, cfg: Config, where: Path) -> None:
    names = {param_tree.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
    for name in param_tree.legacy_projections(cfg.model):
        if name in names:
            raise CheckpointError(f"{where}: {name}: {param_tree.LEGACY_LAYOUT}")


# ----------------------------------------------------------------------------- loading a model

LOAD_ERRORS = (ConfigError, data.DataError, CheckpointError, artifact.ArtifactError, compat.CompatError,
               quant.QuantError)


def _ema_from_training_checkpoint(directory: Path) -> tuple[param_tree.Params, Config, dict | None]:
    ckpts = TrainCheckpoints(directory)
    try:
        state, meta = ckpts.restore(None)  # as saved: its layout depends on the device count
    finally:
        ckpts.close()
    cfg = config_lib.from_dict(meta["config"])
    ema = state["ema"] if isinstance(state, dict) else state.ema
    _check_no_legacy_params(ema, cfg, directory)
    ema_by_name = {param_tree.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(ema)}

    def to_param(path, like):
        # Banks are zero-padded to a multiple of the device count in training.
        x = np.asarray(ema_by_name[param_tree.path_name(path)])
        return jnp.asarray(x[tuple(slice(0, n) for n in like.shape)], like.dtype)

    template = jax.eval_shape(lambda: model.init_params(cfg.model, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(to_param, template), cfg, meta.get("data")


class LoadedModel(NamedTuple):
    params: param_tree.Params
    cfg: Config  # the config the weights were made with
    source: str  # a description of where they came from
    dataset: dict | None  # their dataset's identity (None: saved before it was recorded)


def load_model(artifact_path: str | Path | None = None, checkpoint_path: str | Path | None = None) -> LoadedModel:
    """The weights of an artifact, a saved model or a run's latest training checkpoint (its EMA)."""
    if artifact_path and artifact_pergroup.is_pergroup(artifact_path):
        arrays, meta = artifact_pergroup.read_artifact(artifact_path)
        cfg = config_lib.from_dict(meta["config"])
        try:
            params = quant_frontier.dequantize_params(quant_frontier.FrontierQuantized(arrays, meta["scheme_meta"]),
                                                      cfg.model)
        except quant.QuantError as e:
            raise quant.QuantError(f"{artifact_path}: {e}") from None
        return LoadedModel(params, cfg, f"artifact {artifact_path}", meta.get("data"))
    if artifact_path:
        qmodel, meta = artifact.read_artifact(artifact_path)
        cfg = config_lib.from_dict(meta["config"])
        try:
            params = quant.dequantize_params(qmodel, cfg.model)
        except quant.QuantError as e:
            raise quant.QuantError(f"{artifact_path}: {e}") from None
        return LoadedModel(params, cfg, f"artifact {artifact_path}", meta.get("data"))
    path = Path(checkpoint_path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if (path / "final_model").is_dir():
        path = path / "final_model"
    if (path / "config.json").is_file():
        params, cfg = load_params(path)
        return LoadedModel(params, cfg, f"saved model {path}", read_dataset_record(path))
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    params, cfg, dataset = _ema_from_training_checkpoint(path)
    return LoadedModel(params, cfg, f"EMA weights of the latest training checkpoint in {path}", dataset)


def read_dataset_record(directory: str | Path) -> dict | None:
    """A saved model's dataset identity; None if it was saved without one."""
    path = Path(directory) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not JSON ({_describe(e)})") from None


def add_model_source(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--artifact | --checkpoint: what `load_model` reads; and --tokenizer."""
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--artifact", help="an int6 artifact written by golf_jax.quantize")
    src.add_argument("--checkpoint", help="a run directory, its final_model/ or its checkpoints/")
    add_tokenizer_override(parser)


def add_tokenizer_override(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", help="SentencePiece model to use instead of the one recorded with the model "
                                            "(by default a different tokenizer is an error)")
