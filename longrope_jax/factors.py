"""The factors file (``factors.json``, format ``longrope-factors/1``; docs/formats.md).

Loading checks the format, the length, finiteness and positivity of every factor list; range and
monotonicity are the search's rules, not the loader's (published factors exceed any search range).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

from longrope_jax import rope as rope_lib
from longrope_jax import storage

FORMAT = "longrope-factors/1"


class FactorsError(ValueError):
    """A malformed factors file; names the file, the field and what was expected."""


def _err(path, field, msg):
    return FactorsError(f"{path}: field {field!r}: {msg}")


def validate(d: Mapping[str, Any], path: str = "factors.json") -> dict:
    """Checks a factors dict on its own (``check_model``: against a model); returns it with factor
    lists as float lists."""
    if not isinstance(d, Mapping):
        raise FactorsError(f"{path}: expected a JSON object")
    if d.get("format") != FORMAT:
        raise _err(path, "format", f"expected {FORMAT!r}, got {d.get('format')!r}")
    for key in ("rope_theta", "rotary_dim", "original_max_position_embeddings", "max_position_embeddings",
                "long_factor"):
        if d.get(key) is None:
            raise _err(path, key, "missing")
    rd = d["rotary_dim"]
    if not isinstance(rd, int) or rd <= 0 or rd % 2:
        raise _err(path, "rotary_dim", f"expected a positive even integer, got {rd!r}")
    out = dict(d)
    n = rd // 2

    def factors(obj, key, field):
        try:
            return [float(x) for x in rope_lib.check_factors(obj[key], n, source=path, field=field)]
        except rope_lib.RopeError as e:
            raise FactorsError(str(e)) from None

    out["long_factor"] = factors(d, "long_factor", "long_factor")
    out["short_factor"] = factors(d, "short_factor", "short_factor") if d.get("short_factor") is not None else [1.0] * n
    for key in ("start_tokens",):
        v = d.get(key, 0) or 0
        if not isinstance(v, int) or v < 0:
            raise _err(path, key, f"expected an integer >= 0, got {v!r}")
    af = d.get("attention_factor")
    if af is not None and (not isinstance(af, (int, float)) or not math.isfinite(af) or af <= 0):
        raise _err(path, "attention_factor", f"expected null or a positive number, got {af!r}")
    per = d.get("per_length") or {}
    if not isinstance(per, Mapping):
        raise _err(path, "per_length", "expected an object keyed by length")
    clean = {}
    for k, entry in per.items():
        field = f"per_length.{k}"
        if not str(k).isdigit():
            raise _err(path, field, "expected an integer length as key")
        if not isinstance(entry, Mapping) or "long_factor" not in entry:
            raise _err(path, field, "expected an object with 'long_factor'")
        e = dict(entry)
        e["long_factor"] = factors(entry, "long_factor", field + ".long_factor")
        clean[int(k)] = e
    out["per_length"] = clean
    return out


def load(path: str) -> dict:
    """Reads and validates a factors file (a local path or a ``gs://`` URL)."""
    try:
        if storage.is_remote(path):
            text = storage.read_text(path)
        else:
            with open(path) as fh:
                text = fh.read()
    except (FileNotFoundError, IsADirectoryError):
        raise FactorsError(f"{path}: not found (expected a {FORMAT} factors file)") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise FactorsError(f"{path}: not valid JSON ({e})") from None
    return validate(d, path)


def to_spec(d: Mapping[str, Any], length: int | None = None, path: str = "factors.json") -> rope_lib.RopeSpec:
    """The RoPE spec a call of ``length`` tokens uses: the smallest ``per_length`` entry >= length,
    beyond the largest the top-level long set; the short set below the original window."""
    long_f, start, attn = d["long_factor"], d.get("start_tokens", 0) or 0, d.get("attention_factor")
    per = d.get("per_length") or {}
    if length is not None:
        fits = sorted(k for k in per if k >= length)
        if fits:
            e = per[fits[0]]
            long_f = e["long_factor"]
            start = e.get("start_tokens", start) or 0
            attn = e.get("attention_factor", attn)
    return rope_lib.longrope(
        float(d["rope_theta"]),
        int(d["rotary_dim"]),
        long_f,
        d.get("short_factor"),
        original_max=int(d["original_max_position_embeddings"]),
        max_position_embeddings=int(d["max_position_embeddings"]),
        attention_factor=attn,
        start_tokens=int(start),
        source=path,
    )


ROPE_KINDS = ("none", "pi", "ntk", "dynamic", "yarn", "llama3")


MODEL_ROPE = ("model", "longrope")  # the model as configured (``longrope``: the older name)
ROPE_HELP = "model | none | pi:S | ntk:S | dynamic:S | yarn:S | llama3:S | FACTORS.json"


def check_model(d: Mapping[str, Any], cfg, source: str) -> Mapping[str, Any]:
    """The one agreement check of a factors dict with a model (every command, export, checkpoint
    and search go through it): the same rotary dim and ``rope_theta`` (within 1e-6)."""
    if int(d["rotary_dim"]) != cfg.rotary_dim:
        raise _err(source, "rotary_dim", f"expected {cfg.rotary_dim} (the model's rotary dim), got {d['rotary_dim']}")
    if abs(float(d["rope_theta"]) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
        raise _err(source, "rope_theta", f"expected {cfg.rope_theta} (the model's), got {d['rope_theta']}")
    return d


@dataclasses.dataclass(frozen=True)
class Rope:
    """A parsed ``--rope`` value, checked before any model is loaded.

    kind: ``model``, one of ``ROPE_KINDS`` or ``file``; scale: S of ``kind:S``; factors: the
    validated factors file of ``file``.
    """

    value: str
    kind: str
    scale: float | None = None
    factors: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False)


def parse_rope(value: str) -> Rope:
    """A ``--rope`` value -> :class:`Rope` (docs/formats.md), or a one-line FactorsError."""
    if value in MODEL_ROPE:
        return Rope(value, "model")
    if value == "none":
        return Rope(value, "none")
    kind, sep, arg = value.partition(":")
    if sep and kind in ROPE_KINDS[1:]:
        try:
            s = float(arg)
        except ValueError:
            raise FactorsError(f"--rope {value}: expected {kind}:S with S a number, got {arg!r}") from None
        if not (math.isfinite(s) and s > 0):
            raise FactorsError(f"--rope {value}: expected a positive scale, got {arg!r}")
        return Rope(value, kind, s)
    if os.path.exists(value) or storage.is_remote(value):
        return Rope(value, "file", factors=load(value))
    raise FactorsError(
        f"--rope {value}: expected model, none, pi:S, ntk:S, dynamic:S, yarn:S, llama3:S or an existing "
        f"factors file"
    )


def rope_label(rope: Rope | str, cfg, model_factors: Mapping | None = None) -> str:
    """The method a ``--rope`` value names for ``cfg``: ``none``, ``pi:2``, ``yarn:4``, ``longrope`` ...
    (what results record as ``method``; ``model`` resolves to the model's own)."""
    rope = parse_rope(rope) if isinstance(rope, str) else rope
    if rope.kind == "file" or (rope.kind == "model" and model_factors):
        return "longrope"
    if rope.kind != "model":
        return rope.kind if rope.scale is None else f"{rope.kind}:{rope.scale:g}"
    block = dict(cfg.rope_parameters or {})
    kind = {"su": "longrope", "linear": "pi"}.get(block.get("rope_type") or "default", block.get("rope_type"))
    if kind in ("default", "longrope"):
        return "none" if kind == "default" else kind
    factor = block.get("factor")
    if factor is None:  # yarn without a factor: the window over the original one (rope.from_hf)
        factor = cfg.max_position_embeddings / (block.get("original_max_position_embeddings")
                                                or cfg.max_position_embeddings)
    return f"{kind}:{float(factor):g}"


def resolve_rope(value: Rope | str, cfg, length: int | None = None,
                 model_factors: Mapping | None = None) -> rope_lib.RopeSpec:
    """A ``--rope`` value (or its :class:`Rope`) -> RopeSpec for model config ``cfg``.

    ``model`` (alias ``longrope``: the factors attached to a checkpoint, ``model_factors``, else
    the model's own config, as transformers computes it; every command's default), ``none`` (no
    scaling), ``pi:S``, ``ntk:S``, ``dynamic:S``, ``yarn:S``, ``llama3:S`` (S over the model's
    ``max_position_embeddings``) or a factors file path (checked against the model).
    """
    from longrope_jax.model import rope_spec

    rope = parse_rope(value) if isinstance(value, str) else value
    theta, rd, lmax = cfg.rope_theta, cfg.rotary_dim, cfg.max_position_embeddings
    if rope.kind == "model":
        return to_spec(model_factors, length, "checkpoint factors") if model_factors else rope_spec(cfg)
    if rope.kind == "file":
        return to_spec(check_model(rope.factors, cfg, rope.value), length, rope.value)
    s = rope.scale
    return {"none": lambda: rope_lib.default(theta, rd), "pi": lambda: rope_lib.pi(theta, rd, s),
            "ntk": lambda: rope_lib.ntk(theta, rd, s), "dynamic": lambda: rope_lib.dynamic_ntk(theta, rd, s, lmax),
            "yarn": lambda: rope_lib.yarn(theta, rd, s, lmax), "llama3": lambda: rope_lib.llama3(theta, rd, s, lmax),
            }[rope.kind]()


def as_config(rope: Rope, cfg) -> dict:
    """The model-config fields that make a built-in method the model's own RoPE (``--rope model``
    then gives what ``rope`` gives on ``cfg``, whatever window the model is given next): the HF
    block of PI (``linear``), YaRN and Llama 3 over ``cfg``'s window, static NTK as its base.
    ``{}`` for what the config cannot state (``model``, ``none``, a factors file: attached
    instead; dynamic NTK, which recomputes from the window)."""
    s, window = rope.scale, cfg.max_position_embeddings
    if rope.kind == "pi":
        return {"rope_parameters": {"rope_type": "linear", "factor": s}}
    if rope.kind == "yarn":
        return {"rope_parameters": {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": window}}
    if rope.kind == "llama3":
        return {"rope_parameters": {"rope_type": "llama3", "factor": s, "original_max_position_embeddings": window,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    if rope.kind == "ntk":  # NTK-aware scaling is a larger base: theta s^(d / (d - 2))
        return {"rope_parameters": {"rope_type": "default"},
                "rope_theta": cfg.rope_theta * s ** (cfg.rotary_dim / (cfg.rotary_dim - 2))}
    return {}


def from_model(cfg) -> dict | None:
    """The model's own ``longrope`` rope block (a Phi-3 model ships one) as a factors dict; None
    when its rope is of another type."""
    block = dict(cfg.rope_parameters or {})
    if block.get("rope_type") != "longrope":
        return None
    return validate({"format": FORMAT, "rope_type": "longrope", "rope_theta": cfg.rope_theta,
                     "rotary_dim": cfg.rotary_dim, "original_max_position_embeddings": int(
                         block["original_max_position_embeddings"]),
                     "max_position_embeddings": cfg.max_position_embeddings, "long_factor": block["long_factor"],
                     "short_factor": block["short_factor"], "attention_factor": block.get("attention_factor")},
                    "the model's rope block")


def load_for(path: str, cfg, flag: str | None = None) -> dict:
    """Reads a factors file and checks it against the model (``flag``: the option that named it)."""
    return dict(check_model(load(path), cfg, path if flag is None else f"{path} (--{flag})"))
