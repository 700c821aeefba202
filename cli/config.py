"""YAML configuration files for the command line: ``--config FILE.yaml`` keyed by argparse destination names.

Precedence: parser defaults < YAML values < flags given explicitly on the command line. A file may name
``_base_: other.yaml`` (relative to itself); its values are read first and the file's own values win.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

BASE_KEY = "_base_"
# Namespace attribute holding the destinations the user set explicitly (command line or YAML).
EXPLICIT_ATTR = "_explicit"
# ... and those of them given on the command line (the rest came from the YAML file).
COMMAND_LINE_ATTR = "_command_line"
_UNSET = object()


class UsageError(ValueError):
    """Flags that cannot run together (or on this machine); shown to the user as one line."""


class ConfigError(UsageError):
    """A configuration file is missing, malformed, or names an unknown flag."""


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, merging its ``_base_`` chain (the base first, the file's own keys win)."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise ConfigError(f"config {path}: circular _base_ chain ({chain})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path}: not valid YAML ({exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: {BASE_KEY} must be a file name, got {base!r}")
    merged = load_config(path.parent / base, (*_seen, path))
    merged.update(data)
    return merged


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in (argparse.SUPPRESS, "help")}


def _coerce(key: str, value: Any, action: argparse.Action, path: str) -> Any:
    """Convert a YAML value the way argparse would convert it on the command line."""
    where = f"config {path}: {key}"
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    if action.type is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if action.type is not None and not isinstance(value, bool):
        try:
            # YAML reads 1e-4 as a string and 3 as an int; argparse's type gives the flag's real type.
            value = action.type(value) if isinstance(value, (str, int, float)) else value
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: cannot convert {value!r} to {action.type.__name__}") from None
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {list(action.choices)}")
    return value


def validate_config(config: dict[str, Any], parser: argparse.ArgumentParser, path: str | Path) -> dict[str, Any]:
    """Check every key names a parser destination and convert values; returns the converted dict.

    Raises:
        ConfigError: for an unknown key (with the closest known name suggested) or a bad value.
    """
    actions = _actions_by_dest(parser)
    converted = {}
    for key, value in config.items():
        if key == "config":
            raise ConfigError(f"config {path}: use {BASE_KEY} to include another file, not 'config'")
        if key not in actions:
            close = difflib.get_close_matches(str(key), list(actions), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else " (keys are the flag names without '--')"
            raise ConfigError(f"config {path}: unknown key '{key}'{hint}")
        converted[key] = _coerce(key, value, actions[key], str(path))
    return converted


def explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The destinations set by flags present in ``argv`` (whatever their value)."""
    probe = argparse.Namespace(**{dest: _UNSET for dest in _actions_by_dest(parser)})
    # argparse keeps attributes already present on the namespace instead of writing defaults.
    parsed, _ = parser.parse_known_args(list(argv), namespace=probe)
    return {dest for dest, value in vars(parsed).items() if value is not _UNSET}


def apply_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, explicit: set[str] | None = None
) -> argparse.Namespace:
    """Fill ``args`` from ``args.config`` for every destination not in ``explicit``; records what was explicit.

    Args:
        args: parsed namespace (modified in place and returned).
        parser: the parser that produced it.
        explicit: destinations given on the command line; None treats every value that differs from the
            parser default as explicit (for namespaces built in Python rather than parsed from argv).
    """
    if explicit is None:
        actions = _actions_by_dest(parser)
        explicit = {d for d, a in actions.items() if hasattr(args, d) and getattr(args, d) != a.default}
    explicit = set(explicit)
    setattr(args, COMMAND_LINE_ATTR, frozenset(explicit))
    if args.config:
        config = validate_config(load_config(args.config), parser, args.config)
        for key, value in config.items():
            if key not in explicit:
                setattr(args, key, value)
        explicit |= set(config)
        if "model" in config and hasattr(parser, "apply_family_defaults"):
            parser.apply_family_defaults(args, explicit)  # the YAML chose the family: its defaults below YAML
    setattr(args, EXPLICIT_ATTR, frozenset(explicit))
    return args


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` plus ``--config``: defaults < YAML < explicit command-line flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    return apply_config(args, parser, explicit_dests(parser, argv))


def is_explicit(args: argparse.Namespace, dest: str) -> bool:
    """Whether ``dest`` was set on the command line or in the config file (False when unknown)."""
    return dest in getattr(args, EXPLICIT_ATTR, ())


def explicit_of(args: argparse.Namespace) -> frozenset[str]:
    """The destinations set on the command line or in the config file (empty when not recorded)."""
    return frozenset(getattr(args, EXPLICIT_ATTR, ()))


def command_line_dests(args: argparse.Namespace) -> frozenset[str]:
    """The destinations given on the command line (all explicit ones when that was not recorded)."""
    return getattr(args, COMMAND_LINE_ATTR, getattr(args, EXPLICIT_ATTR, frozenset()))


def config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The resolved configuration as a plain dict (private attributes dropped), e.g. for checkpoints."""
    return {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}


def dump_config(
    args: argparse.Namespace, parser: argparse.ArgumentParser, path: str | Path, exclude: Sequence[str] = ()
) -> None:
    """Write the resolved flag values as YAML that ``--config`` reads back (derived attributes left out).

    ``exclude``: destinations left out (e.g. a resume's 'resume' and 'start_epoch', which are run state).
    """
    dests = _actions_by_dest(parser)
    skip = {"config", *exclude}
    values = {k: v for k, v in config_dict(args).items() if k in dests and k not in skip and _is_plain(v)}
    Path(path).write_text(yaml.safe_dump(values, sort_keys=True), encoding="utf-8")


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, list))
