"""Command-line plumbing shared by every entry point: config files and
`--config.<field>=<value>` overrides (the Flax examples / big_vision convention).

A field is named by its section and name (`--config.model.num_layers=4`) or by
its name alone when only one section has it (`--config.num_layers=4`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Sequence

from golf_jax.config import Config, ConfigError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def load_config_file(path: str | Path) -> Config:
    """Run a config file and return its `get_config()`; errors name the file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file, expected a Python config file")
    spec = importlib.util.spec_from_file_location(f"_golf_config_{path.stem}", path)
    if spec is None:  # importlib only knows how to run .py (and compiled) files
        raise ConfigError(f"{path}: not a Python file; a config file is a .py defining get_config()")
    module = importlib.util.module_from_spec(spec)
    # A config file is the user's own code: whatever it raises (a typo, an
    # unknown dataclass field, an import that fails) is reported as the file's
    # error with its line, and the original stays attached as __cause__.
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        line = f" line {e.lineno}:" if e.lineno else ""
        raise ConfigError(f"{path}:{line} syntax error: {e.msg}") from e
    except Exception as e:
        raise _user_code_error(path, e, "running the config file") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path}: defines no get_config()")
    try:
        cfg = module.get_config()
    except Exception as e:
        raise _user_code_error(path, e, "calling get_config()") from e
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not golf_jax.config.Config")
    _check_field_types(cfg, path)
    return cfg


# What a field of each annotated type accepts; an int is a fine float, a bool is no int.
_ACCEPTS = {"bool": (bool,), "int": (int,), "float": (int, float), "str": (str,)}


def _check_field_types(cfg: Config, path: Path) -> None:
    """Dataclasses do not check types, and a config file's `num_layers="4"`
    would otherwise surface as a TypeError deep inside validation or jit."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            accepts = _ACCEPTS.get(str(f.type))
            value = getattr(sub, f.name)
            if accepts and (not isinstance(value, accepts) or (bool not in accepts and isinstance(value, bool))):
                raise ConfigError(f"{path}: {section.name}.{f.name} = {value!r} is a {type(value).__name__}, "
                                  f"expected {f.type}")


def _user_code_error(path: Path, e: Exception, doing: str) -> ConfigError:
    """`path: line N: ...` with the deepest line of the traceback that is in
    the config file itself (the user's line, not the dataclass machinery's)."""
    import traceback

    here = path.resolve()
    lines = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if Path(fr.filename).resolve() == here]
    where = f"{path}: line {lines[-1]}" if lines else str(path)
    if isinstance(e, ConfigError):
        return ConfigError(f"{where}: {e}")
    return ConfigError(f"{where}: error {doing}: {type(e).__name__}: {e}")


def _parse_value(text: str, type_name: str, where: str):
    try:
        if type_name == "bool":
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if type_name == "int":
            return int(text.replace("_", ""))
        if type_name == "float":
            return float(text)
        if type_name == "str":
            return text
    except ValueError:
        pass
    raise ConfigError(f"--config.{where}: {text!r} is not a valid {type_name}")


def _resolve(cfg: Config, dotted: str) -> tuple[str, dataclasses.Field]:
    parts = dotted.split(".")
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    if len(parts) == 2 and parts[0] in sections:
        sub = sections[parts[0]]
        for f in dataclasses.fields(sub):
            if f.name == parts[1]:
                return parts[0], f
        raise ConfigError(f"--config.{dotted}: section '{parts[0]}' has no field '{parts[1]}'")
    if len(parts) == 1:
        hits = [(s, f) for s, sub in sections.items() for f in dataclasses.fields(sub) if f.name == parts[0]]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise ConfigError(f"--config.{dotted}: ambiguous, say one of "
                              + ", ".join(f"{s}.{f.name}" for s, f in hits))
    raise ConfigError(f"--config.{dotted}: unknown config field")


def apply_overrides(cfg: Config, overrides: Sequence[tuple[str, str]]) -> Config:
    """Return `cfg` with each (dotted field, text value) applied, validated."""
    for dotted, text in overrides:
        section, f = _resolve(cfg, dotted)
        value = _parse_value(text, str(f.type), f"{section}.{f.name}")
        sub = dataclasses.replace(getattr(cfg, section), **{f.name: value})
        cfg = dataclasses.replace(cfg, **{section: sub})
    return cfg


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Pull `--config.a.b=v` and `--config.a.b v` out of argv."""
    overrides, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg}: missing value")
                value = argv[i + 1]
                i += 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


OVERRIDES_HELP = ("Any config field can be overridden: --config.<section>.<field>=<value>, or "
                  "--config.<field>=<value> where the name is unique, e.g. --config.schedule.iterations=200 "
                  "--config.model_dim=256 (sections: model, data, optimizer, schedule, quant, eval, ttt, run).")


def quiet_library_logs() -> None:
    """orbax logs through absl at WARNING level (deprecations, notes on its
    internals) into the user's terminal, where a command's own lines are what
    matter; errors still show."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
                         ) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    """(the parser's arguments, the `--config.<field>` overrides) of argv
    (default sys.argv[1:]); for commands whose config comes from elsewhere.
    Every command parses through here, so library warnings are quieted here."""
    quiet_library_logs()
    if parser.epilog is None:  # --help shows the override syntax
        parser.epilog = OVERRIDES_HELP
    overrides, rest = split_overrides(list(sys.argv[1:] if argv is None else argv))
    return parser.parse_args(rest), overrides


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None,
          default_config: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse a command line with `--config FILE` plus overrides.

    Returns the validated config and the remaining arguments. Configuration
    errors exit with a one-line message instead of a traceback.
    """
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="config file (a Python file defining get_config())")
    try:
        args, overrides = parse_with_overrides(parser, argv)
        cfg = apply_overrides(load_config_file(args.config), overrides).validate()
    except ConfigError as e:
        exit_on_error(parser, e)
    return cfg, args


def config_for_model(saved: Config, overrides: Sequence[tuple[str, str]], config_file: str | None = None) -> Config:
    """The config for a command on a model made earlier: the model's own
    (`saved`), or `config_file`, plus overrides. The model section is the
    weights' shape and meaning, so neither may change it."""
    cfg = load_config_file(config_file) if config_file else saved
    if cfg.model != saved.model:
        raise ConfigError(f"{config_file}: its model section differs from the model's")
    cfg = apply_overrides(cfg, overrides)
    if cfg.model != saved.model:
        changed = [k for k, v in dataclasses.asdict(cfg.model).items() if getattr(saved.model, k) != v]
        raise ConfigError(f"--config.model.{changed[0]}: the model section comes with the model and cannot change")
    return cfg.validate()


def exit_on_error(parser: argparse.ArgumentParser, e: Exception) -> None:
    """The one-line, status-2 end of a command given bad input (a config error
    worded as `parse` words it)."""
    if isinstance(e, ConfigError):
        parser.exit(2, f"{parser.prog}: config error: {e}\n")
    parser.exit(2, f"error: {e}\n")


def require_at_least(parser: argparse.ArgumentParser, *checks: tuple[str, float | None, float]) -> None:
    """(flag, value, least) each: a value below its least is a one-line, status-2 error."""
    for flag, value, least in checks:
        if value is not None and value < least:
            parser.exit(2, f"error: {flag} {value}: must be at least {least}\n")
