"""Settings: ml_collections configs, the one merge every command's settings go through.

The built-in configs (the top-level ``configs/`` folder, installed as ``longrope_jax.configs``)
are the defaults: ``configs/<command>/default.py`` states every setting of a command once, with
``placeholder(type)`` for what is unset; other configs build on it by import. A command's
settings are, in order of precedence: its flags, ``--config.a.b=value`` overrides, a ``--config``
file (a built-in NAME or a PATH whose ``get_config()`` returns a ``ConfigDict``), the defaults.
Every value is checked when read, each error one line naming its source and dotted key.

    s = resolve("train", KINDS, config="tiny", overrides=["--config.steps=10"], flags={"out": "runs/a"})
    s.lr, s["steps"]                       # a locked ConfigDict: the command's typed settings

In-memory sections (a pipeline stage's ``train`` section, say) go through :func:`section`.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

BUILTIN = "longrope_jax.configs"


class ConfigError(ValueError):
    pass


def builtin_dir() -> str:
    """The folder of the built-in configs (``configs/`` of a checkout; the installed copy otherwise)."""
    return os.path.dirname(importlib.import_module(BUILTIN).__file__)


def builtin_names(command: str) -> list[str]:
    """The built-in configs of ``command`` (``default`` first)."""
    d = os.path.join(builtin_dir(), command)
    names = sorted(f[:-3] for f in os.listdir(d) if f.endswith(".py") and f != "__init__.py") if os.path.isdir(d) \
        else []
    return sorted(names, key=lambda n: n != "default")


def _module_name(path: str) -> str | None:
    """The module name of a file inside the built-in configs (so its relative imports work)."""
    root, real = os.path.realpath(builtin_dir()), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root or not real.endswith(".py"):
        return None
    rel = os.path.relpath(real, root)[:-3].split(os.sep)
    return ".".join([BUILTIN, *rel])


def load(config: str, command: str | None = None) -> ml_collections.ConfigDict:
    """The ``ConfigDict`` of a config: a path to a Python file defining ``get_config()``, or the
    name of a built-in config (``tiny`` for ``command``'s ``configs/<command>/tiny.py``, or
    ``train/tiny``)."""
    if os.path.isfile(config):
        module = _module_name(config)
        if module is None:
            spec = importlib.util.spec_from_file_location(f"_longrope_config_{abs(hash(config))}", config)
            return _call(config, lambda: _exec(spec), spec.origin)
        return _call(config, lambda: importlib.import_module(module), os.path.realpath(config))
    name = config[:-3] if config.endswith(".py") else config
    for candidate in ([f"{command}/{name}"] if command and "/" not in name else []) + [name]:
        path = os.path.join(builtin_dir(), *candidate.split("/")) + ".py"
        if "." not in candidate and os.path.isfile(path):
            return load(path)
    if os.path.sep in config or config.endswith(".py"):
        raise ConfigError(f"{config}: config file not found")
    known = ", ".join(builtin_names(command)) if command else "configs/<command>/"
    raise ConfigError(f"--config {config}: no such file, and no built-in config of that name (built-in: {known})")


def _exec(spec):
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _call(path: str, module, origin: str) -> ml_collections.ConfigDict:
    """``get_config()`` of the module ``module()`` returns; its failures as one line naming the line."""
    try:
        mod = module()
        if not callable(getattr(mod, "get_config", None)):
            raise ConfigError(f"{path}: expected a function get_config() returning a ConfigDict")
        cfg = mod.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"{path}: line {e.lineno}: invalid Python ({e.msg})") from None
    except Exception as e:  # the config file's own code failed: say where, not a traceback
        tb, line = e.__traceback__, None
        while tb is not None:
            if os.path.realpath(tb.tb_frame.f_code.co_filename) == os.path.realpath(origin):
                line = tb.tb_lineno
            tb = tb.tb_next
        where = f" line {line}:" if line else ""
        raise ConfigError(f"{path}:{where} get_config() failed ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, expected an ml_collections.ConfigDict")
    return cfg


def defaults(command: str) -> ml_collections.ConfigDict:
    """Every setting of ``command`` with its default (``configs/<command>/default.py``)."""
    return load(os.path.join(builtin_dir(), command, "default.py"))


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def _set(node: ml_collections.ConfigDict, key: str, value, where: str, listy: bool, kind: str | None) -> None:
    """``node[key] = value`` under the field's type (a one-line error naming ``where`` and what
    the setting's ``kind`` expects)."""
    if listy and value is not None and not isinstance(value, (list, tuple)):
        value = [value]
    try:
        node[key] = list(value) if isinstance(value, tuple) else value
    except (TypeError, ValueError):
        what = describe(kind)[0] if kind else f"a {_type_name(node.get_type(key))}"
        raise ConfigError(f"{where}: expected {what}, got {value!r:.80}") from None


def merge(base: ml_collections.ConfigDict, given: Mapping[str, Any], source: str, *, prefix: str = "",
          listy: Sequence[str] = (), kinds: Mapping[str, str] | None = None, origin: dict | None = None
          ) -> ml_collections.ConfigDict:
    """``given`` (a mapping or ``ConfigDict``, nested sections included) merged onto ``base`` in
    place: every key must be one of ``base``'s at its depth (an empty section, like a model's
    ``model_config``, takes any keys), values take the field's type. ``origin`` records where
    each dotted key's value came from."""
    for key, value in given.items():
        dotted = f"{prefix}{key}"
        if key not in base:
            known = ", ".join(sorted(base.keys()))
            raise ConfigError(f"{source}: unknown setting {dotted!r} (known{f' in {prefix[:-1]}' if prefix else ''}: "
                              f"{known})")
        current = base[key]
        if isinstance(current, ml_collections.ConfigDict) and len(current) and isinstance(value, Mapping):
            merge(current, value, source, prefix=dotted + ".", listy=listy, kinds=kinds, origin=origin)
            continue
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        _set(base, key, value, f"{source}: setting {dotted!r}", dotted in listy, (kinds or {}).get(dotted))
        if origin is not None:
            origin[dotted] = f"{source}: setting {dotted!r}"
    return base


def _parse(raw: str, kind, key: str):
    """A ``--config.KEY=VALUE`` string as a value of the field's type ``kind`` (``None``: unset)."""
    if raw == "None":
        return None
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}: expected true or false, got {raw!r}")
    if kind in (int, float):
        try:
            return float(raw) if kind is float else int(raw)
        except ValueError:
            raise ConfigError(f"--config.{key}: expected a {kind.__name__}, got {raw!r}") from None
    if kind is str:
        return raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config", *,
                    listy: Sequence[str] = (), kinds: Mapping[str, str] | None = None, origin: dict | None = None
                    ) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=v`` strings (also ``--config.a.b v`` pairs already joined), each
    parsed to its field's type."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ConfigError(f"unrecognised argument {item!r} (expected --config.KEY=VALUE)")
        key, raw = item[len("--config."):].split("=", 1)
        node, parts = cfg, key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise ConfigError(f"--config.{key}: {source} has no field {p!r}")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--config.{key}: {source} has no field {parts[-1]!r} (fields: {sorted(node.keys())})")
        kind = node.get_type(parts[-1])
        _set(node, parts[-1], _parse(raw, kind, key), f"--config.{key}", key in listy, (kinds or {}).get(key))
        if origin is not None:
            origin[key] = f"--config.{key}"
    return cfg


# Kinds of setting values (``KINDS`` of each command): what its settings must hold once merged.
KINDS = {
    "int": ("an integer >= 1", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "int0": ("an integer >= 0", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0),
    "number": ("a positive number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v) and v > 0),
    "number0": ("a number >= 0", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and math.isfinite(v) and v >= 0),
    "dict": ("a mapping", lambda v: isinstance(v, (Mapping, ml_collections.ConfigDict))),
    "str": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "ints": ("a non-empty list of integers >= 1", lambda v: isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v)),
    "strs": ("a non-empty list of strings", lambda v: isinstance(v, (list, tuple)) and bool(v) and all(
        isinstance(x, str) and x for x in v)),
}

def describe(kind: str):
    """(what a value of ``kind`` is, in words; its test) for a kind of :data:`KINDS`, ``"a|b"``
    (one of those strings) or either with ``?`` (unset allowed; the test is of a set value)."""
    kind = kind.rstrip("?")
    if "|" in kind:
        return f"one of {kind.split('|')}", lambda x: x in kind.split("|")
    return KINDS[kind]


# The kinds of the model settings every model-loading command shares (``configs/common.py``).
MODEL_KINDS = dict(model="str", tokenizer="str?", param_dtype="float32|bfloat16", no_sliding_window="bool")


def check(s: ml_collections.ConfigDict, kinds: Mapping[str, str], *, required: Sequence[str] = (),
          origin: Mapping[str, str] | None = None, where: str | None = None) -> None:
    """Each value of ``s`` against its kind in ``kinds`` (``"X?"``: unset allowed, ``"a|b"``: one
    of those strings); ``required`` keys must be set (``where``: the section they are missing
    from; None: the command line)."""
    origin = origin or {}
    missing = [k for k in required if s.get(k) in (None, "", [])]
    if missing and where is None:
        raise ConfigError(f"missing --{missing[0].replace('_', '-')} (or a --config file that sets it)")
    if missing:
        raise ConfigError(f"{where}: missing setting {missing[0]!r}")
    for k, kind in kinds.items():
        v = s.get(k)
        if v is None and kind.endswith("?"):
            continue
        what, ok = describe(kind)
        if not ok(v):
            raise ConfigError(f"{origin.get(k, k)}: expected {what}, got {v!r:.80}")


def resolve(command: str, kinds: Mapping[str, str], *, config: str | None = None, overrides: Sequence[str] = (),
            flags: Mapping[str, Any] | None = None, required: Sequence[str] = (), listy: Sequence[str] = ()
            ) -> ml_collections.ConfigDict:
    """One run's settings of ``command``: ``flags`` (None / False: not given; keys that are no
    setting are ignored) over ``overrides`` over the ``config`` file over :func:`defaults`,
    checked (:func:`check`), locked. ``listy`` keys take a single value as a one-element list."""
    s = defaults(command)
    origin = {k: "the defaults" for k in s.keys()}
    source = f"the {command} defaults"
    overrides = list(overrides)
    if config:
        given = load(config, command)
        source = config
        # Overrides of the config's own fields go to it first, so values it derives from them (a
        # FieldReference: one length every stage scales) follow; the rest to the merged settings.
        mine = [o for o in overrides if _has(given, o[len("--config."):].split("=", 1)[0])]
        apply_overrides(given, mine, source, listy=listy, kinds=kinds, origin=origin)
        overrides = [o for o in overrides if o not in mine]
        merge(s, given, config, listy=listy, kinds=kinds, origin=origin)
    apply_overrides(s, overrides, source, listy=listy, kinds=kinds, origin=origin)
    for k, v in (flags or {}).items():
        if k in s and v is not None and v is not False:
            flag = f"--{k.replace('_', '-')}"
            _set(s, k, v, flag, k in listy, kinds.get(k))
            origin[k] = flag
    check(s, kinds, required=required, origin=origin)
    s.lock()
    return s


def _has(cfg: ml_collections.ConfigDict, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def section(command: str, kinds: Mapping[str, str], given: Mapping[str, Any], where: str, *,
            required: Sequence[str] = (), listy: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """An in-memory section (a mapping or ``ConfigDict``) merged onto ``command``'s defaults and
    checked by its rules: a pipeline stage's settings. Errors name ``where`` and the dotted key."""
    s = defaults(command)
    origin = {}
    merge(s, given, where, listy=listy, kinds=kinds, origin=origin)
    check(s, kinds, required=required, origin=origin, where=where)
    s.lock()
    return s
