"""ml_collections config files with dotted command-line overrides.

A config file is a Python file defining ``get_config()`` that returns a ``ConfigDict``;
``--config.a.b=value`` overrides a field, the value parsed to the field's existing type.
"""

from __future__ import annotations

import ast
import importlib.util
import os

import ml_collections


class ConfigError(ValueError):
    pass


def load(path: str) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_longrope_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path}: expected a function get_config() returning a ConfigDict")
    return mod.get_config()


def _parse(raw: str, current, key: str):
    if isinstance(current, bool):
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true or false, got {raw!r}")
    if isinstance(current, (int, float)) and not isinstance(current, bool):
        try:
            return float(raw) if isinstance(current, float) else int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a {type(current).__name__}, got {raw!r}") from None
    if isinstance(current, str):
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str], path: str = "config"):
    """Applies ``--config.a.b=v`` strings (also ``--config.a.b v`` pairs already joined)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"unrecognised argument {item!r} (expected --config.KEY=VALUE)")
        key, raw = item[len("--config."):].split("=", 1)
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise ConfigError(f"--config.{key}: {path} has no field {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--config.{key}: {path} has no field {parts[-1]!r} (fields: {sorted(node.keys())})")
        current = node[parts[-1]]
        value = _parse(raw, current, key) if current is not None else _parse(raw, [], key)
        try:
            node[parts[-1]] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{key}: expected a {type(current).__name__} like {current!r}, "
                              f"got {raw!r} ({e})") from None
    return cfg
