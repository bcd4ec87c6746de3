"""The project's cache directory and JAX's persistent compilation cache.

``$LONGROPE_JAX_CACHE`` (default ``~/.cache/longrope-jax``) holds dequantised models and
compiled XLA executables, so a second run of a command skips both.
"""

from __future__ import annotations

import hashlib
import os


def cache_dir(*parts: str) -> str:
    root = os.environ.get("LONGROPE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "longrope-jax")
    path = os.path.join(root, *parts)
    os.makedirs(path, exist_ok=True)
    return path


def enable_compilation_cache() -> str:
    """Turns on JAX's persistent compilation cache under the cache directory."""
    import jax

    path = cache_dir("jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def file_sha256(path: str, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
