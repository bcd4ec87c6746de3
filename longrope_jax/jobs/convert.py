"""``longrope-jax convert``: between HF directories, GGUF files, longrope-jax checkpoints and HF
exports with LongRoPE factors.

    HF dir / GGUF / smollm2 / Hub id  ->  checkpoint   (the default for a source that is not one)
    checkpoint (+ factors)             ->  HF directory (the default for a checkpoint source)

Weights are read without casting, so HF -> checkpoint -> HF is bit-identical (GGUF sources are
dequantised to float32 once, into the cache). Tokenizer files travel along: an HF directory's
``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``, ``tokenizer.model``; for
a GGUF file the tokenizer rebuilt from its metadata plus a ``tokenizer_config.json`` (with the
GGUF's chat template) that ``transformers.AutoTokenizer`` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from typing import Callable

import numpy as np

from longrope_jax import atomic, checkpoint, config_files, export, hf
from longrope_jax import factors as factors_lib
from longrope_jax import loading
from longrope_jax.model import ModelConfig

TARGETS = ("checkpoint", "hf")
# What each setting of ``longrope-jax convert`` must hold (its defaults: configs/convert/default.py).
KINDS = dict(model="str", out="str", factors="str?", to="|".join(TARGETS) + "?", overwrite="bool",
             allow_drop_start_tokens="bool", shard_bytes="int")


@dataclasses.dataclass
class Source:
    cfg: ModelConfig
    params: dict
    kind: str  # "checkpoint", "hf", "gguf" or "hub"
    info: dict  # path, kind, sha256 (what a checkpoint records as its source)
    tokenizer_files: list[str]
    factors: dict | None = None  # attached to a checkpoint source
    tmp: tempfile.TemporaryDirectory | None = None


def _dtype_name(params) -> str | None:
    names = {np.dtype(a.dtype).name for _, a in checkpoint._flatten(params)}
    return names.pop() if len(names) == 1 else None


def _hf_source(path: str, kind: str, info: dict) -> Source:
    cfg, params = hf.load(path)  # no cast: stored dtypes
    dt = _dtype_name(params)
    if dt:
        cfg = cfg.replace(param_dtype=dt)
    toks = [os.path.join(path, f) for f in checkpoint.TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    return Source(cfg, params, kind, info, toks)


def read_source(model: str) -> Source:
    """Reads a model path of any kind without casting its weights."""
    path = loading.resolve_path(model)
    if checkpoint.is_checkpoint(path):
        cfg, params, meta = checkpoint.restore(path)
        info = {"path": os.path.abspath(path), "kind": "checkpoint", "sha256": None,
                "original_source": meta.get("source")}
        return Source(cfg, params, "checkpoint", info, list(meta["tokenizer_paths"].values()),
                      meta["rope"].get("factors"))
    if os.path.isfile(path) and path.endswith(".gguf"):
        from longrope_jax import gguf_io

        cached, sha = loading.gguf_to_cache(path)
        info = {"path": os.path.abspath(path), "kind": "gguf", "sha256": sha, "given": model}
        src = _hf_source(cached, "gguf", info)
        src.tokenizer_files = [f for f in src.tokenizer_files if os.path.basename(f) == "tokenizer.json"]
        if src.tokenizer_files:  # a tokenizer_config.json that AutoTokenizer loads, with the chat template
            md = gguf_io.metadata(gguf_io._reader(path))
            src.tmp = tempfile.TemporaryDirectory(prefix="longrope-jax-convert-")
            tc = os.path.join(src.tmp.name, "tokenizer_config.json")
            with open(tc, "w") as fh:
                json.dump(export.tokenizer_config(src.tokenizer_files[0], src.cfg,
                                                  chat_template=md.get("tokenizer.chat_template")), fh, indent=2)
            src.tokenizer_files.append(tc)
        return src
    if os.path.isdir(path):
        return _hf_source(path, "hf", {"path": os.path.abspath(path), "kind": "hf", "sha256": None})
    if os.path.exists(path):
        raise hf.HFError(f"{path}: expected an HF model directory, a .gguf file or a longrope-jax checkpoint")
    d = loading._hub_download(path)
    return _hf_source(d, "hub", {"path": path, "kind": "hub", "sha256": None, "snapshot": d})


def run(model: str, out: str, *, factors: str | None = None, to: str | None = None, overwrite: bool = False,
        allow_drop_start_tokens: bool = False, shard_bytes: int = 2 * 2**30,
        log: Callable[[str], None] | None = None) -> dict:
    """Converts ``model`` into ``out``; returns a JSON-able result.

    Args:
      model: an HF directory, a ``.gguf`` file, ``smollm2``, a longrope-jax checkpoint or a Hub id.
      out: the output directory (refused when it exists, unless ``overwrite``).
      factors: a ``longrope-factors/1`` file: attached to a checkpoint, or written into the HF
        config (default for a checkpoint source: the factors attached to it).
      to: ``checkpoint`` or ``hf`` (default: ``hf`` for a checkpoint source, else ``checkpoint``).
      allow_drop_start_tokens: export factors with start tokens > 0 to HF without them.
      shard_bytes: HF export: the largest safetensors shard.
    """
    log = log or (lambda m: None)
    t0 = time.time()
    if to is not None and to not in TARGETS:
        raise ValueError(f"--to {to}: expected one of {TARGETS}")
    out_abs = atomic.check_dir(out, overwrite, "output")  # before any (slow) reading
    src_path = os.path.abspath(loading.resolve_path(model))
    if os.path.exists(src_path) and (os.path.realpath(src_path) == os.path.realpath(out_abs)
                                     or os.path.realpath(src_path).startswith(os.path.realpath(out_abs) + os.sep)):
        raise atomic.OutputError(f"{out_abs}: is the source model (or holds it); expected a different output path")
    target = to or ("hf" if checkpoint.is_checkpoint(src_path) else "checkpoint")
    fac = None
    if factors is not None:
        fac = factors_lib.load(factors)
        if target == "hf":  # before the (slow) read
            export.check_start_tokens(fac, allow_drop_start_tokens, factors)
    log(f"reading {model}")
    src = read_source(model)
    try:
        if fac is None and src.factors is not None:
            fac, factors = src.factors, f"{src.info['path']}:{checkpoint.METADATA}:rope.factors"
        if fac is not None:
            fac = dict(factors_lib.check_model(factors_lib.validate(fac, factors), src.cfg, factors))
        result = {"command": "convert", "source": model, "source_kind": src.kind, "to": target, "out": out_abs,
                  "factors": factors, "dtype": _dtype_name(src.params)}
        if target == "checkpoint":
            log(f"writing checkpoint {out_abs}")
            meta = checkpoint.save(out_abs, src.cfg, src.params, tokenizer_files=src.tokenizer_files, factors=fac,
                                   source=src.info, overwrite=overwrite)
            result.update(tensors=len(meta["params"]["leaves"]), params_sha256=meta["params"]["sha256"],
                          tokenizer_files=(meta["tokenizer"] or {}).get("files", []))
        else:
            log(f"writing HF directory {out_abs}")
            rep = export.save_hf(out_abs, src.cfg, src.params, factors=fac, factors_source=factors or "factors",
                                 tokenizer_files=src.tokenizer_files, allow_drop_start_tokens=allow_drop_start_tokens,
                                 overwrite=overwrite, shard_bytes=shard_bytes, log=log)
            result.update({k: v for k, v in rep.items() if k not in ("out", "format")})
    finally:
        if src.tmp is not None:
            src.tmp.cleanup()
    result["seconds"] = round(time.time() - t0, 3)
    return result


def resolve(config: str | None = None, overrides=(), flags=None):
    return config_files.resolve("convert", KINDS, config=config, overrides=overrides, flags=flags,
                                required=("model", "out"))


def main(s, log) -> int:
    """``longrope-jax convert`` with resolved settings ``s`` (:func:`resolve`)."""
    rec = run(s.model, s.out, factors=s.factors, to=s.to, overwrite=s.overwrite,
              allow_drop_start_tokens=s.allow_drop_start_tokens, shard_bytes=s.shard_bytes, log=log)
    print(json.dumps(rec), flush=True)
    return 0
