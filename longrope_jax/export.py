"""HF export with LongRoPE factors (docs/formats.md).

Given a model and optionally a ``longrope-factors/1`` dict, writes an HF directory that the
installed transformers loads: ``config.json`` with ``rope_scaling`` and ``rope_parameters``
identical (``rope_type: longrope``, short / long factors, ``original_max_position_embeddings``,
``rope_theta``; ``attention_factor`` only when it is not the sqrt default; no ``factor``), the
top-level ``max_position_embeddings`` (the factors' target) and
``original_max_position_embeddings``; safetensors in the params' own dtypes (single file or shards
with an index); the tokenizer files; ``generation_config.json``.

HF has no start tokens (``n_hat``): factors with ``start_tokens > 0`` (top level or any
``per_length`` entry) are refused unless ``allow_drop_start_tokens``, and the report then says
what was dropped. ``per_length`` sets cannot be expressed either: the top-level sets are written
and the report lists the lengths left out.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Mapping, Sequence

from longrope_jax import factors as factors_lib
from longrope_jax import atomic, families, hf
from longrope_jax import rope as rope_lib
from longrope_jax.model import ModelConfig

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class ExportError(ValueError):
    """An export that cannot be written faithfully; names the field and what was expected."""


def start_tokens_used(factors: Mapping) -> dict:
    """``{"start_tokens": n, "per_length": {L: n}}`` for every non-zero start-token count."""
    out = {}
    if int(factors.get("start_tokens") or 0) > 0:
        out["start_tokens"] = int(factors["start_tokens"])
    per = {int(k): int(e.get("start_tokens") or 0) for k, e in (factors.get("per_length") or {}).items()}
    per = {k: v for k, v in sorted(per.items()) if v > 0}
    if per:
        out["per_length"] = per
    return out


def check_start_tokens(factors: Mapping, allow_drop_start_tokens: bool = False, source: str = "factors") -> dict:
    """Refuses start tokens > 0 (HF cannot express them) unless allowed; returns what would be dropped."""
    starts = start_tokens_used(factors)
    if starts and not allow_drop_start_tokens:
        where = ", ".join([f"start_tokens = {starts['start_tokens']}"] if "start_tokens" in starts else []
                          + [f"per_length.{k}.start_tokens = {v}" for k, v in starts.get("per_length", {}).items()])
        raise ExportError(
            f"{source}: field 'start_tokens': expected 0 for an HF export, got {where}. HF configs cannot express "
            f"start tokens (n_hat): positions below n_hat would be rescaled in transformers. Pass "
            f"--allow-drop-start-tokens (allow_drop_start_tokens=True) to export without them")
    return starts


def longrope_config(cfg: ModelConfig, factors: Mapping, *, allow_drop_start_tokens: bool = False,
                    source: str = "factors") -> tuple[ModelConfig, dict]:
    """The model config with the factors' LongRoPE block; returns ``(cfg, notes)``.

    ``factors`` is validated (rotary dim, rope_theta). ``notes`` reports what HF cannot express:
    ``dropped_start_tokens`` and ``per_length_not_exported``.
    """
    f = factors_lib.check_model(factors_lib.validate(factors, source), cfg, source)
    theta = float(f["rope_theta"])
    starts = check_start_tokens(f, allow_drop_start_tokens, source)
    orig, lmax = int(f["original_max_position_embeddings"]), int(f["max_position_embeddings"])
    for key, v in (("original_max_position_embeddings", orig), ("max_position_embeddings", lmax)):
        if v <= 0:
            raise factors_lib.FactorsError(f"{source}: field {key!r}: expected a positive integer, got {v}")
    block = {
        "rope_type": "longrope",
        "short_factor": [float(x) for x in f["short_factor"]],
        "long_factor": [float(x) for x in f["long_factor"]],
        "original_max_position_embeddings": orig,
    }
    attn = f.get("attention_factor")
    default = rope_lib.longrope_attention_factor(lmax, orig)
    if attn is not None and not math.isclose(float(attn), default, rel_tol=1e-12, abs_tol=0.0):
        block["attention_factor"] = float(attn)
    notes = {
        "dropped_start_tokens": starts or None,
        "per_length_not_exported": sorted(int(k) for k in (f.get("per_length") or {})) or None,
        "attention_factor": float(attn) if "attention_factor" in block else default,
        "attention_factor_written": "attention_factor" in block,
    }
    out = cfg.replace(max_position_embeddings=lmax, rope_theta=theta, rope_parameters=block)
    return out, notes


def hf_config(cfg: ModelConfig) -> dict:
    """``config.json`` for ``cfg``: both rope blocks identical (``hf.config_to_hf``). A block built
    from factors has no ``factor``; a model's own block is written as it was read (an explicit
    ``factor`` there is part of its meaning in transformers 5.x)."""
    return hf.config_to_hf(cfg)


def tokenizer_config(tokenizer_json: str, cfg: ModelConfig, *, chat_template: str | None = None) -> dict:
    """A ``tokenizer_config.json`` with which ``transformers.AutoTokenizer`` loads ``tokenizer.json``
    as it is (the generic fast tokenizer, so no model-specific class rebuilds it)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    d = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "model_max_length": cfg.max_position_embeddings}
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) and cfg.eos_token_id else cfg.eos_token_id
    for key, i in (("bos_token", cfg.bos_token_id), ("eos_token", eos)):
        if isinstance(i, int) and tok.id_to_token(i) is not None:
            d[key] = tok.id_to_token(i)
    if chat_template:
        d["chat_template"] = chat_template
    return d


def generation_config(cfg: ModelConfig) -> dict:
    d = {}
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        d["eos_token_id"] = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
    return d


def save_hf(path: str, cfg: ModelConfig, params: Mapping, *, factors: Mapping | None = None,
            factors_source: str = "factors", tokenizer_files: Sequence[str] = (),
            allow_drop_start_tokens: bool = False, overwrite: bool = False,
            shard_bytes: int = 2 * 2**30, log=None) -> dict:
    """Writes an HF directory atomically; returns a report (files, rope block, what was dropped).

    Args:
      factors: a ``longrope-factors/1`` dict; without it the model's own rope block is written.
      tokenizer_files: paths of tokenizer files to copy (names in ``TOKENIZER_FILES``); a
        ``tokenizer_config.json`` is generated when only ``tokenizer.json`` is given.
      allow_drop_start_tokens: export factors with start tokens > 0 without them (reported).
      shard_bytes: the largest safetensors shard; more weights than this are sharded with an index.
      log: a callable for warnings (default: none; the report carries them).
    """
    path = atomic.check_dir(path, overwrite, "HF export")
    notes: dict = {}
    if factors is not None:
        cfg, notes = longrope_config(cfg, factors, allow_drop_start_tokens=allow_drop_start_tokens,
                                     source=factors_source)
    config = hf_config(cfg)
    fam = families.get(cfg.architecture)
    kind = (cfg.rope_parameters or {}).get("rope_type", "default")
    if fam.rope_types is not None and kind not in fam.rope_types:
        raise ExportError(f"rope_type: {fam.architecture} takes one of {list(fam.rope_types)} in transformers, "
                          f"got {kind!r}; export this model with LongRoPE factors (--factors)")
    hf.config_from_hf(config, "config.json (to be written)")  # what we write must read back
    toks = {}
    for f in tokenizer_files:
        base = os.path.basename(f)
        if base not in TOKENIZER_FILES:
            raise ExportError(f"{f}: not a tokenizer file (expected one of {TOKENIZER_FILES})")
        if not os.path.isfile(f):
            raise ExportError(f"{f}: not found (expected a tokenizer file to copy)")
        toks.setdefault(base, f)
    warnings = []
    if notes.get("dropped_start_tokens"):
        warnings.append(f"start tokens dropped ({notes['dropped_start_tokens']}): HF cannot express n_hat, so "
                        f"transformers rescales every position")
    if notes.get("per_length_not_exported"):
        warnings.append(f"per_length factor sets {notes['per_length_not_exported']} not exported: HF holds one "
                        f"long set (the top-level one was written)")
    for w in warnings:
        if log:
            log(f"warning: {w}")
    with atomic.directory(path, overwrite=overwrite, what="HF export") as tmp:
        with open(os.path.join(tmp, hf.CONFIG), "w") as fh:
            json.dump(config, fh, indent=2)
        weights = hf.write_weights(tmp, cfg, params, shard_bytes=shard_bytes)
        with open(os.path.join(tmp, GENERATION_CONFIG), "w") as fh:
            json.dump(generation_config(cfg), fh, indent=2)
        for base, f in toks.items():
            shutil.copyfile(f, os.path.join(tmp, base))
        if "tokenizer.json" in toks and "tokenizer_config.json" not in toks:
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as fh:
                json.dump(tokenizer_config(toks["tokenizer.json"], cfg), fh, indent=2)
        files = sorted(os.listdir(tmp))
        for f in files:
            os.chmod(os.path.join(tmp, f), 0o644)
    rope = config.get("rope_scaling") or config.get("rope_parameters")
    return {
        "out": path,
        "format": "hf",
        "files": files,
        "weights": weights,
        "rope_type": rope.get("rope_type", "default"),
        "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": config.get("original_max_position_embeddings"),
        "attention_factor": notes.get("attention_factor"),
        "attention_factor_written": notes.get("attention_factor_written", False),
        "dropped_start_tokens": notes.get("dropped_start_tokens"),
        "per_length_not_exported": notes.get("per_length_not_exported"),
        "tokenizer_files": sorted(f for f in files if f in TOKENIZER_FILES),
        "warnings": warnings,
    }
