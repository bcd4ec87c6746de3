"""Hugging Face directories <-> (ModelConfig, params).

One place for HF key names; what differs between model families (architecture, defaults, fused
tensors, sliding window) is data in ``longrope_jax.families``. Reads ``config.json`` in the
transformers 4.x schema
(``rope_scaling`` + ``rope_theta``) and the 5.x schema (``rope_parameters``) with transformers
5.x's precedence (docs/formats.md), and safetensors weights single or sharded, shard by
shard, in float32 / bfloat16 / float16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterator, Mapping

import numpy as np

from longrope_jax import families
from longrope_jax import rope as rope_lib
from longrope_jax.model import ModelConfig, has_bias, linear_features, param_shapes, rope_spec

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
SCALED_ROPE_TYPES = ("llama3", "yarn", "longrope")


class HFError(ValueError):
    """Malformed HF input; the message names the file, the field and what was expected."""


def _require(d: Mapping[str, Any], key: str, source: str, kind=int):
    if d.get(key) is None:
        raise HFError(f"{source}: field {key!r} is missing (expected {kind.__name__})")
    return _typed(d, key, source, {int: "int", float: "number"}[kind], prefix="")


# Optional fields of config.json and of its rope block: name -> kind (checked when present and not null).
_TOP_FIELDS = {"rope_theta": "number", "num_key_value_heads": "int", "head_dim": "int", "max_position_embeddings": "int",
               "rms_norm_eps": "number", "partial_rotary_factor": "fraction", "sliding_window": "int",
               "original_max_position_embeddings": "int", "tie_word_embeddings": "bool",
               "attention_bias": "bool", "mlp_bias": "bool", "use_sliding_window": "bool",
               "bos_token_id": "ids", "eos_token_id": "ids", "pad_token_id": "ids"}
_ROPE_FIELDS = {"rope_theta": "number", "partial_rotary_factor": "fraction", "factor": "number",
                "original_max_position_embeddings": "int", "beta_fast": "number", "beta_slow": "number",
                "mscale": "number", "mscale_all_dim": "number", "attention_factor": "number",
                "low_freq_factor": "number", "high_freq_factor": "number", "truncate": "bool"}
_EXPECTED = {"int": "a positive integer", "number": "a positive finite number", "fraction": "a number in (0, 1]",
             "bool": "true or false", "ids": "a token id >= 0 or a list of them"}


def _typed(d: Mapping[str, Any], key: str, source: str, kind: str, prefix: str = ""):
    """``d[key]`` checked against ``kind`` (see ``_EXPECTED``); an ``HFError`` naming file and field."""
    v = d[key]
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = {"int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
          "number": num and math.isfinite(v) and v > 0,
          "fraction": num and 0 < v <= 1,
          "bool": isinstance(v, bool),
          "ids": all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                     for x in (v if isinstance(v, list) and v else [v]))}[kind]
    if not ok:
        raise HFError(f"{source}: field {prefix + key!r}: expected {_EXPECTED[kind]}, got {v!r:.80}")
    return v


def check_fields(d: Mapping[str, Any], source: str = CONFIG) -> None:
    """Type checks of the optional fields of an HF config dict and its rope block
    (docs/formats.md): a wrong type fails here, naming the file and field, not later in a jitted
    call."""
    for key, kind in _TOP_FIELDS.items():
        if d.get(key) is not None:
            _typed(d, key, source, kind)
    for name in ("rope_scaling", "rope_parameters"):
        block = d.get(name)
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise HFError(f"{source}: field {name!r}: expected an object, got {block!r:.80}")
        for key, kind in _ROPE_FIELDS.items():
            if block.get(key) is not None:
                _typed(block, key, source, kind, prefix=f"{name}.")


def rope_parameters(d: Mapping[str, Any], source: str = CONFIG,
                    aliases: Mapping[str, str] | None = None) -> tuple[dict, float, float]:
    """The standardised rope block, ``rope_theta`` and ``partial_rotary_factor`` of a config dict.

    transformers 5.x precedence: ``rope_scaling`` over ``rope_parameters``; inside the block,
    ``rope_theta`` / ``partial_rotary_factor`` win over the top-level keys; the old key ``type``
    and old names (``aliases``, default the ``su`` of ``longrope``) are read as the new one; for
    llama3 / yarn / longrope a top-level
    ``original_max_position_embeddings`` overrides the block's, and the block defaults to
    ``max_position_embeddings``.
    """
    raw = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(raw, Mapping):
        raise HFError(f"{source}: field 'rope_scaling': expected an object, got {raw!r:.80}")
    block = dict(raw)
    theta = block.get("rope_theta", d.get("rope_theta", 10000.0))
    partial = block.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    kind = block.get("rope_type", block.get("type", "default")) or "default"
    kind = (aliases if aliases is not None else {"su": "longrope"}).get(kind, kind)
    block["rope_type"] = kind
    block.pop("type", None)
    block["rope_theta"] = theta
    if kind in SCALED_ROPE_TYPES:
        if "original_max_position_embeddings" in d:
            block["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        else:
            block.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
        raise HFError(f"{source}: field 'rope_theta': expected a positive finite number, got {theta!r:.80}")
    return block, float(theta), float(partial or 1.0)


def family_of(d: Mapping[str, Any], source: str = CONFIG) -> families.Family:
    """The family of an HF config dict: by ``architectures[0]``, else by ``model_type``."""
    archs = d.get("architectures") or []
    if archs:
        fam = families.BY_ARCHITECTURE.get(archs[0])
        if fam is None:
            raise HFError(f"{source}: field 'architectures': unsupported architecture {archs[0]!r} "
                          f"(expected one of {sorted(families.BY_ARCHITECTURE)})")
        return fam
    fam = families.FAMILIES.get(d.get("model_type"))
    if fam is None:
        raise HFError(f"{source}: field 'architectures' is missing and model_type is {d.get('model_type')!r} "
                      f"(expected architectures {sorted(families.BY_ARCHITECTURE)} or model_type one of "
                      f"{sorted(families.FAMILIES)})")
    return fam


def config_from_hf(d: Mapping[str, Any], source: str = CONFIG, **overrides) -> ModelConfig:
    """A ``ModelConfig`` from an HF ``config.json`` dict of any family in ``longrope_jax.families``.

    Every field is checked here, the rope block included (its spec is built once), so a malformed
    config fails when it is read, with the file and field named. Fields left out take the defaults
    of the family's transformers config class.
    """
    if not isinstance(d, Mapping):
        raise HFError(f"{source}: expected a JSON object, got {type(d).__name__}")
    check_fields(d, source)
    fam = family_of(d, source)
    d = {**fam.defaults, **d}
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFError(f"{source}: field 'hidden_act': expected 'silu', got {act!r}")
    hidden = _require(d, "hidden_size", source)
    heads = _require(d, "num_attention_heads", source)
    kv = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or hidden // heads
    block, theta, partial = rope_parameters(d, source, fam.rope_aliases)
    if fam.rope_types is not None and block["rope_type"] not in fam.rope_types:
        raise HFError(f"{source}: field 'rope_scaling.rope_type': a {fam.name} model takes one of "
                      f"{list(fam.rope_types)} in transformers, got {block['rope_type']!r}")
    if heads % kv:
        raise HFError(f"{source}: field 'num_key_value_heads': {kv} does not divide num_attention_heads {heads}")
    kw = dict(
        vocab_size=_require(d, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_require(d, "intermediate_size", source),
        num_hidden_layers=_require(d, "num_hidden_layers", source),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=_require(d, "max_position_embeddings", source),
        rope_theta=theta,
        rms_norm_eps=float(_require(d, "rms_norm_eps", source, float)),
        partial_rotary_factor=partial,
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        sliding_window=fam.sliding_window(d),
        attention_bias=fam.biases and bool(d.get("attention_bias", False)),
        mlp_bias=fam.biases and bool(d.get("mlp_bias", False)),
        architecture=fam.name,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
        pad_token_id=d.get("pad_token_id"),
        rope_parameters=block,
    )
    kw.update(overrides)
    cfg = ModelConfig(**kw)
    try:
        rope_spec(cfg, source)  # the rope block's own keys (factor lists, required keys)
    except rope_lib.RopeError as e:
        raise HFError(str(e)) from None
    return cfg


def read_config(path: str, **overrides) -> ModelConfig:
    """Reads ``path/config.json``."""
    f = os.path.join(path, CONFIG)
    if not os.path.exists(f):
        raise HFError(f"{f}: not found (expected an HF model directory with config.json)")
    try:
        with open(f) as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise HFError(f"{f}: not valid JSON ({e})") from None
    return config_from_hf(d, f, **overrides)


# --------------------------------------------------------------------------------------------
# Weights.

@dataclasses.dataclass(frozen=True)
class _Tensor:
    """Where an HF tensor goes: the model's leaves ``paths`` (at ``layer`` of the stacked axis),
    ``transpose`` for linear kernels (HF stores ``[out, in]``), and for a linear its family entry
    with the parts' output features (``sizes``), which split and fuse it."""

    paths: tuple[str, ...]
    shape: tuple[int, ...]
    layer: int | None = None
    transpose: bool = False
    linear: families.Linear | None = None
    sizes: tuple[int, ...] = ()


def tensor_table(cfg: ModelConfig) -> dict[str, _Tensor]:
    """HF tensor name -> :class:`_Tensor`, every layer expanded, for ``cfg``'s family."""
    fam = families.get(cfg.architecture)
    D, V = cfg.hidden_size, cfg.vocab_size
    out = {"model.embed_tokens.weight": _Tensor(("embed_tokens/embedding",), (V, D)),
           "model.norm.weight": _Tensor(("norm/weight",), (D,))}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = _Tensor(("lm_head/kernel",), (V, D), transpose=True)
    features = linear_features(cfg)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, lin in fam.linears.items():
            sizes = tuple(features[part][1] for part in lin.parts)
            base = tuple("layers/" + part.replace(".", "/") for part in lin.parts)
            n_in = features[lin.parts[0]][0]
            out[p + name + ".weight"] = _Tensor(tuple(b + "/kernel" for b in base), (sum(sizes), n_in), i, True,
                                                lin, sizes)
            if has_bias(cfg, lin.parts[0]):
                out[p + name + ".bias"] = _Tensor(tuple(b + "/bias" for b in base), (sum(sizes),), i, False, lin,
                                                  sizes)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[p + norm + ".weight"] = _Tensor((f"layers/{norm}/weight",), (D,), i)
    return out


def _pieces(t: _Tensor, arr: np.ndarray) -> list[np.ndarray]:
    """An HF tensor as the model's pieces (one per path), split and transposed."""
    parts = t.linear.split(arr, t.sizes) if len(t.paths) > 1 else [arr]
    return [p.T if t.transpose else p for p in parts]


def _node(params: dict, path: str, create: bool = False):
    *keys, leaf = path.split("/")
    for k in keys:
        params = params.setdefault(k, {}) if create else params[k]
    return params, leaf


def params_from_tensors(
    tensors: Iterator[tuple[str, np.ndarray, str]], cfg: ModelConfig, dtype=None, source: str = ""
) -> dict:
    """Assembles params (plain nested dict of numpy arrays, layers stacked) from HF tensors.

    ``tensors`` yields ``(hf_name, array, file)``; ``dtype`` casts (default: keep the stored
    dtype). Every expected tensor must appear once with its HF shape; fused tensors are split by
    the family's hooks.
    """
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)

    table = tensor_table(cfg)
    shapes = param_shapes(cfg)
    params: dict = {}
    seen: set[str] = set()
    for name, arr, file in tensors:
        t = table.get(name)
        if t is None:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise HFError(f"{file}: tensor {name!r} is not part of a {cfg.architecture} model with this config")
        if tuple(arr.shape) != t.shape:
            raise HFError(f"{file}: tensor {name!r}: expected shape {t.shape}, got {tuple(arr.shape)}")
        if dtype is not None:
            arr = arr.astype(dtype)
        for path, piece in zip(t.paths, _pieces(t, arr)):
            node, leaf = _node(params, path, create=True)
            if t.layer is None:
                node[leaf] = np.ascontiguousarray(piece)
            else:
                if leaf not in node:
                    node[leaf] = np.empty(shapes[path], piece.dtype)
                node[leaf][t.layer] = piece
        seen.add(name)
    missing = [n for n in table if n not in seen]
    if missing:
        raise HFError(f"{source}: {len(missing)} tensor(s) missing, e.g. {missing[0]!r} (expected by config.json)")
    return params


def tensors_from_params(params: Mapping, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """HF tensor names and arrays (HF orientation, fused where the family fuses) from params."""
    for name, t in tensor_table(cfg).items():
        pieces = []
        for path in t.paths:
            node, leaf = _node(params, path)
            arr = np.asarray(node[leaf] if t.layer is None else node[leaf][t.layer])
            pieces.append(arr.T if t.transpose else arr)
        yield name, (t.linear.fuse(pieces) if len(pieces) > 1 else pieces[0])


def safetensors_files(path: str) -> list[str]:
    """The safetensors files of an HF directory, checked to exist (index first, else single)."""
    index = os.path.join(path, INDEX)
    if os.path.exists(index):
        try:
            with open(index) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFError(f"{index}: expected a JSON object with a 'weight_map' ({e!r})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not os.path.exists(os.path.join(path, f)):
                raise HFError(f"{index}: field 'weight_map' names shard {f!r}, which is missing from {path}")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, SINGLE)
    if os.path.exists(single):
        return [single]
    raise HFError(f"{path}: no {SINGLE} or {INDEX} (only safetensors weights are supported)")


def iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields ``(name, array, file)`` one shard at a time (bf16 comes back as ml_dtypes.bfloat16)."""
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(f, framework="numpy") as fh:
                keys = list(fh.keys())
                for k in keys:
                    try:
                        yield k, fh.get_tensor(k), f
                    except TypeError:  # bfloat16: numpy has no native dtype, read through flax
                        yield k, _read_bf16(f, k), f
        except SafetensorError as e:
            raise HFError(f"{f}: cannot read safetensors ({e}); the file is truncated or corrupt") from None
        except OSError as e:
            raise HFError(f"{f}: cannot read safetensors ({e})") from None


def _read_bf16(f: str, key: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(f, framework="flax") as fh:
        return np.asarray(fh.get_tensor(key))


def load(path: str, dtype=None, **overrides) -> tuple[ModelConfig, dict]:
    """Loads an HF directory of any family: ``(ModelConfig, params)`` with numpy leaves."""
    cfg = read_config(path, **overrides)
    files = safetensors_files(path)
    params = params_from_tensors(iter_safetensors(files), cfg, dtype, source=path)
    return cfg, params


# --------------------------------------------------------------------------------------------
# Writing.


def config_to_hf(cfg: ModelConfig) -> dict:
    """An HF ``config.json`` dict; the rope block is written in both schemas, identical."""
    fam = families.get(cfg.architecture)
    block = dict(cfg.rope_parameters or {"rope_type": "default"})
    block["rope_theta"] = cfg.rope_theta
    if cfg.partial_rotary_factor != 1.0:
        block["partial_rotary_factor"] = cfg.partial_rotary_factor
    d = {
        "architectures": [fam.architecture],
        "model_type": fam.name,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias,
        "hidden_act": "silu",
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "rope_parameters": block,
    }
    if block.get("rope_type", "default") != "default":
        d["rope_scaling"] = dict(block)
        if "original_max_position_embeddings" in block:
            d["original_max_position_embeddings"] = block["original_max_position_embeddings"]
    d.update(fam.config_fields(cfg))
    if cfg.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = cfg.partial_rotary_factor
    return d


def write_weights(out_dir: str, cfg: ModelConfig, params: Mapping, *, dtype=None,
                  shard_bytes: int = 2 * 2**30) -> list[str]:
    """Writes the weights into an existing directory: ``model.safetensors``, or shards of at most
    ``shard_bytes`` with an index. ``dtype`` casts (default: keep each tensor's dtype). Returns the
    file names written."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors_from_params(params, cfg):
        arr = np.ascontiguousarray(arr if dtype is None else arr.astype(dtype))
        if size and size + arr.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE), metadata={"format": "pt"})
        return [SINGLE]
    weight_map = {}
    files = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        files.append(fname)
    total = sum(a.nbytes for s in shards for a in s.values())
    with open(os.path.join(out_dir, INDEX), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
    return files + [INDEX]


def save(path: str, cfg: ModelConfig, params: Mapping, *, tokenizer_file: str | None = None,
         dtype=None, shard_bytes: int = 2 * 2**30) -> None:
    """Writes an HF directory atomically (temporary directory renamed into place).

    Weights go to ``model.safetensors`` or to shards of at most ``shard_bytes`` with an index.
    """
    import shutil

    from longrope_jax import atomic

    with atomic.directory(path, overwrite=True, what="HF directory") as tmp:
        with open(os.path.join(tmp, CONFIG), "w") as fh:
            json.dump(config_to_hf(cfg), fh, indent=2)
        write_weights(tmp, cfg, params, dtype=dtype, shard_bytes=shard_bytes)
        if tokenizer_file:
            shutil.copy(tokenizer_file, os.path.join(tmp, "tokenizer.json"))
        for f in os.listdir(tmp):
            os.chmod(os.path.join(tmp, f), 0o644)
