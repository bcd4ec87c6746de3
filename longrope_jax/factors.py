"""The factors file (``factors.json``, format ``longrope-factors/1``; REFERENCE.md section 8).

Loading checks the format, the length, finiteness and positivity of every factor list; range and
monotonicity are the search's rules, not the loader's (published factors exceed any search range).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from longrope_jax import rope as rope_lib

FORMAT = "longrope-factors/1"


class FactorsError(ValueError):
    """A malformed factors file; names the file, the field and what was expected."""


def _err(path, field, msg):
    return FactorsError(f"{path}: field {field!r}: {msg}")


def validate(d: Mapping[str, Any], path: str = "factors.json", rotary_dim: int | None = None) -> dict:
    """Checks a factors dict; returns it with factor lists as float lists."""
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
    if rotary_dim is not None and rd != rotary_dim:
        raise _err(path, "rotary_dim", f"expected {rotary_dim} (the model's rotary dim), got {rd}")
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


def load(path: str, rotary_dim: int | None = None) -> dict:
    """Reads and validates a factors file."""
    if not os.path.exists(path):
        raise FactorsError(f"{path}: not found (expected a {FORMAT} factors file)")
    try:
        with open(path) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise FactorsError(f"{path}: not valid JSON ({e})") from None
    return validate(d, path, rotary_dim)


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


def resolve_rope(value: str, cfg, length: int | None = None, model_factors: Mapping | None = None) -> rope_lib.RopeSpec:
    """A ``--rope`` value -> RopeSpec for model config ``cfg`` (section 8 of REFERENCE.md).

    ``model`` (alias ``longrope``: the factors attached to a checkpoint, ``model_factors``, else
    the model's own config, as transformers computes it; every command's default), ``none`` (no
    scaling), ``pi:S``, ``ntk:S``, ``dynamic:S``, ``yarn:S``, ``llama3:S`` (S over the model's
    ``max_position_embeddings``) or a factors file path.
    """
    from longrope_jax.model import rope_spec

    theta, rd, lmax = cfg.rope_theta, cfg.rotary_dim, cfg.max_position_embeddings
    if value in MODEL_ROPE:
        return to_spec(model_factors, length, "checkpoint factors") if model_factors else rope_spec(cfg)
    if value == "none":
        return rope_lib.default(theta, rd)
    kind, sep, arg = value.partition(":")
    if sep and kind in ROPE_KINDS[1:]:
        try:
            s = float(arg)
        except ValueError:
            raise FactorsError(f"--rope {value}: expected {kind}:S with S a number, got {arg!r}") from None
        if not (math.isfinite(s) and s > 0):
            raise FactorsError(f"--rope {value}: expected a positive scale, got {arg!r}")
        if kind == "pi":
            return rope_lib.pi(theta, rd, s)
        if kind == "ntk":
            return rope_lib.ntk(theta, rd, s)
        if kind == "dynamic":
            return rope_lib.dynamic_ntk(theta, rd, s, lmax)
        if kind == "yarn":
            return rope_lib.yarn(theta, rd, s, lmax)
        return rope_lib.llama3(theta, rd, s, lmax)
    if os.path.exists(value):
        d = load(value, rotary_dim=rd)
        if abs(float(d["rope_theta"]) - theta) > 1e-6 * theta:
            raise _err(value, "rope_theta", f"expected {theta} (the model's), got {d['rope_theta']}")
        return to_spec(d, length, value)
    raise FactorsError(
        f"--rope {value}: expected model, none, pi:S, ntk:S, dynamic:S, yarn:S, llama3:S or an existing "
        f"factors file"
    )
