"""ml_collections config files with dotted command-line overrides.

A config file is a Python file defining ``get_config()`` that returns a ``ConfigDict``;
``--config.a.b=value`` overrides a field, the value parsed to the field's existing type.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections


class ConfigError(ValueError):
    pass


def load(path: str) -> ml_collections.ConfigDict:
    if not os.path.exists(path):
        raise ConfigError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_longrope_config_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        if not callable(getattr(mod, "get_config", None)):
            raise ConfigError(f"{path}: expected a function get_config() returning a ConfigDict")
        cfg = mod.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid Python ({e.msg})") from None
    except Exception as e:  # the config file's own code failed: say where, not a traceback
        tb = e.__traceback__
        line = None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == spec.origin:
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f" line {line}:" if line else ""
        raise ConfigError(f"{path}:{where} get_config() failed ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected an ml_collections.ConfigDict")
    return cfg


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


# Kinds of setting values (``merge``'s ``kinds``): what a job's settings must hold once merged.
KINDS = {
    "int": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "int0": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "number": ("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v) and v > 0),
    "number0": ("a number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0),
    "dict": ("a mapping", lambda v: isinstance(v, dict)),
    "str": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "ints": ("a non-empty list of integers >= 1", lambda v: isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)),
    "strs": ("a non-empty list of strings", lambda v: isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(x, str) and x for x in v)),
}
# Values a config file uses for "unset" (an ml_collections field keeps one type, so None is awkward).
_UNSET = ("", 0, 0.0)


def merge(defaults: Mapping[str, Any], kinds: Mapping[str, str], *, config_path: str | None = None,
          overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None, required: Sequence[str] = (),
          listy: Sequence[str] = (), unset_if_falsy: Sequence[str] = ()) -> dict:
    """One job's settings: ``flags`` (None / False: not given) over ``--config.key=value``
    ``overrides`` over the ``config_path`` file over ``defaults``; every CLI command merges here.

    Checked when read, each error naming its source and key: unknown config keys, overrides of
    another type, missing ``required`` keys, and each value against its kind in ``kinds`` (see
    ``KINDS``; ``"X?"``: None allowed, ``"a|b"``: one of those strings). ``listy`` keys take a
    single value as a one-element list; ``unset_if_falsy`` keys read ``""`` / ``0`` as None.
    """
    merged = dict(defaults)
    origin = {k: "the defaults" for k in defaults}  # where each value came from, for the errors
    source = "the default settings"
    if config_path:
        source = config_path
        loaded = load(config_path).to_dict()
        unknown = sorted(set(loaded) - set(defaults))
        if unknown:
            raise ConfigError(f"{config_path}: unknown setting {unknown[0]!r} (known: {sorted(defaults)})")
        merged.update(loaded)  # the file's types stand; the kinds below check them
        origin.update({k: f"{config_path}: setting {k!r}" for k in loaded})
    cfg = ml_collections.ConfigDict(merged)
    apply_overrides(cfg, list(overrides), source)
    origin.update({o[len("--config."):].split("=", 1)[0]: o.split("=", 1)[0] for o in overrides})
    s = cfg.to_dict()
    for k in unset_if_falsy:
        if s.get(k) in _UNSET and not isinstance(s.get(k), bool):
            s[k] = None
    for k, v in (flags or {}).items():
        if k in s and v is not None and v is not False:
            s[k] = v
            origin[k] = f"--{k.replace('_', '-')}"
    for k in listy:
        if s.get(k) is not None and not isinstance(s[k], (list, tuple)):
            s[k] = [s[k]]
    missing = [k for k in required if s.get(k) in (None, "", [])]
    if missing:
        raise ConfigError(f"missing --{missing[0].replace('_', '-')} (or a --config file that sets it)")
    for k, kind in kinds.items():
        v = s.get(k)
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if v is None and optional:
            continue
        what, ok = (f"one of {kind.split('|')}", lambda x: x in kind.split("|")) if "|" in kind else KINDS[kind]
        if not ok(v):
            raise ConfigError(f"{origin.get(k, k)}: expected {what}, got {v!r:.80}")
    return s
