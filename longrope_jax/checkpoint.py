"""longrope-jax checkpoints: Orbax params plus a JSON metadata file, restorable without the source.

Layout of a checkpoint directory:

    longrope_checkpoint.json   format, ModelConfig, RoPE (the model's block, attached factors),
                               source (path, kind, sha256), params (leaf shapes / dtypes, sha256)
    params/                    Orbax PyTree checkpoint of the params (plain nested dict, layers
                               stacked; dtypes exactly as given: bf16 stays bf16)
    tokenizer/                 tokenizer.json and, when the source had them, tokenizer_config.json,
                               special_tokens_map.json, tokenizer.model

Writes are atomic (:mod:`longrope_jax.atomic`). Restoring checks the format version, the params'
structure, shapes and dtypes against the config, and a sha256 over every param byte.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from typing import Any, Iterator, Mapping

import numpy as np

from longrope_jax import factors as factors_lib
from longrope_jax import atomic, hf
from longrope_jax.model import ModelConfig, param_shapes

FORMAT = "longrope-jax-checkpoint/1"
METADATA = "longrope_checkpoint.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A corrupt, partial or unknown checkpoint; names the path and what was expected."""


def is_checkpoint(path: str) -> bool:
    """A directory holding our metadata file, or one that looks like a partial checkpoint of ours
    (no ``config.json``, but a ``params/`` directory): restoring it then says what is missing."""
    if not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, METADATA)):
        return True
    return not os.path.exists(os.path.join(path, hf.CONFIG)) and os.path.isdir(os.path.join(path, PARAMS))


# --------------------------------------------------------------------------------------------
# Params trees.


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k in sorted(tree):
        v = tree[k]
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            yield from _flatten(v, name)
        else:
            yield name, v


def _unflatten(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for name, v in flat.items():
        node = out
        *head, last = name.split("/")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = v
    return out


def params_digest(params: Mapping) -> str:
    """sha256 over every leaf's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name, leaf in _flatten(params):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{name}|{a.dtype.name}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _check_params(params: Mapping, cfg: ModelConfig, source: str) -> dict[str, dict]:
    expected = param_shapes(cfg)
    flat = dict(_flatten(params))
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{source}: params do not match the config: "
            + (f"missing {missing[:3]}" if missing else "")
            + (" " if missing and extra else "")
            + (f"unexpected {extra[:3]}" if extra else "")
        )
    leaves = {}
    for name, shape in expected.items():
        a = flat[name]
        if tuple(a.shape) != shape:
            raise CheckpointError(f"{source}: param {name!r}: expected shape {shape}, got {tuple(a.shape)}")
        leaves[name] = {"shape": list(shape), "dtype": np.dtype(a.dtype).name}
    return leaves


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --------------------------------------------------------------------------------------------
# Save / restore.


def save(path: str, cfg: ModelConfig, params: Mapping, *, tokenizer_file: str | None = None,
         tokenizer_files: list[str] | tuple[str, ...] = (), factors: Mapping | None = None,
         source: Mapping | None = None, overwrite: bool = False) -> dict:
    """Writes a checkpoint atomically; returns its metadata.

    Args:
      tokenizer_file: a ``tokenizer.json`` to copy in.
      tokenizer_files: further tokenizer files to copy in (only the names in ``TOKENIZER_FILES``).
      factors: a ``longrope-factors/1`` dict attached to the model (validated against its rotary
        dim and rope_theta).
      source: where the model came from, e.g. ``{"path": ..., "kind": "gguf", "sha256": ...}``.
      overwrite: replace an existing checkpoint directory.
    """
    import ml_dtypes  # noqa: F401

    path = atomic.check_dir(path, overwrite, "checkpoint")
    leaves = _check_params(params, cfg, "params")
    if factors is not None:
        factors = dict(factors_lib.check_model(factors_lib.validate(factors, "factors"), cfg, "factors"))
    files = []
    for f in ([tokenizer_file] if tokenizer_file else []) + list(tokenizer_files):
        base = os.path.basename(f)
        if base not in TOKENIZER_FILES:
            raise CheckpointError(f"{f}: not a tokenizer file (expected one of {TOKENIZER_FILES})")
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: not found (expected a tokenizer file to copy into the checkpoint)")
        if base not in [os.path.basename(x) for x in files]:
            files.append(f)
    meta = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "rope": {
            "rope_parameters": dict(cfg.rope_parameters or {"rope_type": "default"}),
            "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings,
            "factors": _factors_json(factors),
        },
        "params": {"dir": PARAMS, "sha256": params_digest(params), "leaves": leaves},
        "tokenizer": {"dir": TOKENIZER, "files": sorted(os.path.basename(f) for f in files)} if files else None,
        "source": dict(source) if source else None,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    text = json.dumps(meta, indent=2, default=_json_default)
    with atomic.directory(path, overwrite=overwrite, what="checkpoint") as tmp:
        _orbax_save(os.path.join(tmp, PARAMS), params)
        if files:
            os.makedirs(os.path.join(tmp, TOKENIZER))
            for f in files:
                shutil.copyfile(f, os.path.join(tmp, TOKENIZER, os.path.basename(f)))
        with open(os.path.join(tmp, METADATA), "w") as fh:  # written last: its presence marks completion
            fh.write(text)
    return json.loads(text)


def _factors_json(factors):
    if factors is None:
        return None
    d = dict(factors)
    if d.get("per_length"):
        d["per_length"] = {str(k): v for k, v in d["per_length"].items()}
    return d


def _orbax_save(path: str, params: Mapping) -> None:
    """Host arrays, saved by this process alone (under several processes, only process 0 writes)."""
    import jax
    import orbax.checkpoint as ocp

    alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                          multiprocessing_options=alone) as ckptr:
        ckptr.save(os.path.abspath(path), args=ocp.args.PyTreeSave(_plain(params)))


def _plain(tree):
    return {k: _plain(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def read_metadata(path: str) -> dict:
    """The checkpoint's metadata, checked for our format version and required fields."""
    f = os.path.join(path, METADATA)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not found (expected a longrope-jax checkpoint directory)")
    if not os.path.exists(f):
        raise CheckpointError(f"{f}: missing (expected the metadata file of a longrope-jax checkpoint, "
                              f"format {FORMAT!r}; the checkpoint is partial or not ours)")
    try:
        with open(f) as fh:
            meta = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e}); the metadata file is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{f}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{f}: field 'format': expected {FORMAT!r} (the version this longrope-jax "
                              f"reads), got {meta.get('format')!r}")
    for key, kind in (("config", dict), ("params", dict), ("rope", dict)):
        if not isinstance(meta.get(key), kind):
            raise CheckpointError(f"{f}: field {key!r}: expected an object, got {meta.get(key)!r:.80}")
    if not isinstance(meta["params"].get("leaves"), dict) or not meta["params"].get("sha256"):
        raise CheckpointError(f"{f}: field 'params': expected 'leaves' and 'sha256'")
    return meta


def restore(path: str, *, verify: bool = True) -> tuple[ModelConfig, dict, dict]:
    """Restores ``(cfg, params, meta)``; params are numpy arrays in their saved dtypes.

    ``meta["rope"]["factors"]`` is the attached factors dict (validated) or None;
    ``meta["tokenizer_paths"]`` maps tokenizer file names to their paths inside the checkpoint.
    """
    import ml_dtypes  # noqa: F401

    path = os.path.abspath(path)
    meta = read_metadata(path)
    f = os.path.join(path, METADATA)
    try:
        cfg_d = dict(meta["config"])
        if isinstance(cfg_d.get("eos_token_id"), list):
            cfg_d["eos_token_id"] = tuple(cfg_d["eos_token_id"])
        cfg = ModelConfig.from_dict(cfg_d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{f}: field 'config': expected a ModelConfig ({e})") from None
    expected = param_shapes(cfg)
    recorded = meta["params"]["leaves"]
    if set(recorded) != set(expected):
        raise CheckpointError(f"{f}: field 'params.leaves': does not match the config's params "
                              f"(expected {sorted(expected)[:3]}..., got {sorted(recorded)[:3]}...)")
    pdir = os.path.join(path, meta["params"].get("dir", PARAMS))
    if not os.path.isdir(pdir):
        raise CheckpointError(f"{pdir}: missing (expected the Orbax params data of the checkpoint)")
    params = _orbax_restore(pdir, expected, recorded)
    for name, leaf in _flatten(params):
        want = recorded[name]
        if list(leaf.shape) != list(want["shape"]) or np.dtype(leaf.dtype).name != want["dtype"]:
            raise CheckpointError(f"{pdir}: param {name!r}: expected {want['dtype']}{tuple(want['shape'])}, "
                                  f"got {np.dtype(leaf.dtype).name}{tuple(leaf.shape)}; the data is corrupt")
    if verify and params_digest(params) != meta["params"]["sha256"]:
        raise CheckpointError(f"{pdir}: params sha256 does not match {METADATA} (expected "
                              f"{meta['params']['sha256'][:16]}...); the Orbax data is corrupt")
    fac = meta["rope"].get("factors")
    if fac is not None:
        try:
            meta["rope"]["factors"] = dict(factors_lib.check_model(
                factors_lib.validate(fac, f + ":rope.factors"), cfg, f + ":rope.factors"))
        except factors_lib.FactorsError as e:
            raise CheckpointError(str(e)) from None
    tok = meta.get("tokenizer") or {}
    paths = {}
    for name in tok.get("files", []):
        p = os.path.join(path, tok.get("dir", TOKENIZER), name)
        if not os.path.isfile(p):
            raise CheckpointError(f"{p}: missing (listed in {METADATA} field 'tokenizer.files')")
        paths[name] = p
    meta["tokenizer_paths"] = paths
    meta["path"] = path
    return cfg, params, meta


def _orbax_restore(pdir: str, expected: Mapping[str, tuple], recorded: Mapping[str, dict]) -> dict:
    import jax
    import orbax.checkpoint as ocp

    restore_args = _unflatten({n: ocp.RestoreArgs(restore_type=np.ndarray) for n in expected})
    # Host arrays, read whole by each process on its own: no barrier with the other processes, so
    # one process may read a checkpoint alone (an export on the main process).
    me = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=me),
                              multiprocessing_options=me) as ckptr:
            out = ckptr.restore(pdir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    except Exception as e:  # orbax / tensorstore raise many kinds on missing or damaged files
        _quiet_orbax_aftermath()
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{pdir}: cannot restore the Orbax params ({type(e).__name__}: {msg:.300}); "
                              f"expected a complete Orbax PyTree checkpoint with leaves {sorted(expected)[:2]}..."
                              ) from None
    flat = dict(_flatten(out))
    if set(flat) != set(expected):
        raise CheckpointError(f"{pdir}: Orbax params hold {sorted(flat)[:3]}..., expected {sorted(expected)[:3]}...")
    return _unflatten({k: np.asarray(v) for k, v in flat.items()})


_QUIETED = False


def _quiet_orbax_aftermath() -> None:
    """After a failed Orbax restore, tensorstore's pending reads finish on an event loop that is
    already closed and print a screenful of ``RuntimeError: Event loop is closed`` (unraisable)
    and "Future exception was never retrieved" logs. The error we raise says what happened, so
    drop exactly those (every other unraisable exception and log record passes through)."""
    global _QUIETED
    if _QUIETED:
        return
    _QUIETED = True
    import logging
    import sys

    previous = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    sys.unraisablehook = hook

    class _Filter(logging.Filter):
        def filter(self, record):
            if str(record.msg).endswith("exception was never retrieved"):
                return "tensorstore" not in record.getMessage() and "zarr" not in record.getMessage()
            return True

    logging.getLogger("asyncio").addFilter(_Filter())
