"""Which JAX platforms a command uses on this machine.

With ``libtpu`` installed (the test extra installs it to compile TPU programs here), JAX tries the
TPU backend first on every start: on a machine without a TPU that prints discovery warnings and
takes libtpu's lock file, so a second process that compiles for a TPU topology then fails. A
command on a machine with no TPU chip therefore asks JAX for the GPU (where one is) and the CPU
only; compiling for a TPU topology (``parallel.aot``) needs no TPU backend. An explicit
``JAX_PLATFORMS`` always wins.
"""

from __future__ import annotations

import glob
import importlib.util
import os


def has_tpu_chip() -> bool:
    """TPU VMs expose their chips as ``/dev/accel*`` (v2-v4) or VFIO groups (v5e, v5p, v6e)."""
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def has_gpu() -> bool:
    """An NVIDIA device and JAX's CUDA plugin to drive it."""
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin")
    return bool(glob.glob("/dev/nvidia[0-9]*")) and any(importlib.util.find_spec(p) is not None for p in plugins)


def choose() -> str | None:
    """The ``jax_platforms`` value for this machine, or None to leave JAX's default."""
    if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or has_tpu_chip():
        return None
    return "cuda,cpu" if has_gpu() else "cpu"


def configure() -> None:
    """Applies :func:`choose` before any backend starts (the first thing a command does)."""
    value = choose()
    if value is not None:
        import jax

        if jax.config.jax_platforms != value:  # a second command in the same process: already so
            jax.config.update("jax_platforms", value)
