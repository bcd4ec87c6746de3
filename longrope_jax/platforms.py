"""Which JAX platforms a command uses on this machine.

With ``libtpu`` installed (the test extra installs it to compile TPU programs here), JAX tries the
TPU backend first on every start: on a machine without a TPU that prints discovery warnings and
takes libtpu's lock file, so a second process that compiles for a TPU topology then fails. A
command on a machine with no TPU chip therefore asks JAX for the GPU (where one is) and the CPU
only; compiling for a TPU topology (``parallel.aot``) needs no TPU backend. An explicit
``JAX_PLATFORMS`` always wins.

On the CPU, XLA allocates each program's temporaries afresh on every call. glibc's ``malloc`` serves an
allocation above 32 MiB with its own ``mmap`` and unmaps it when freed, so every train step faults
its temporaries' pages in again (the tiny config's step: 200 MiB, 51k page faults, a third of its
time). The training commands (``cli.TRAINING``) on a machine whose programs run on the CPU
therefore restart themselves once, before any work, with :data:`MALLOC_TUNABLES`: one arena grown
with ``brk``, no ``mmap`` for large blocks, and freed memory kept, so the next step reuses the same
pages. The price is memory where a process runs programs of different sizes (freed blocks stay
and fragment): a train run with held-out evaluation peaked 10% higher, a ``ppl`` over three
lengths 25% higher, which is why the other commands (one call per window, no gain measured) keep
glibc's defaults. ``GLIBC_TUNABLES`` naming any ``glibc.malloc`` setting, or
``LONGROPE_JAX_MALLOC=system``, leaves the process as started.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

MALLOC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"


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


def malloc_tunables() -> str | None:
    """The ``GLIBC_TUNABLES`` this process should run with (:data:`MALLOC_TUNABLES` added to the
    ones it has), or None to leave it as it is: not glibc, programs not run on the CPU (a TPU chip,
    a GPU, ``JAX_PLATFORMS`` naming another), malloc settings already given, or opted out."""
    given = os.environ.get("GLIBC_TUNABLES", "")
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        libc = ""
    platforms = os.environ.get("JAX_PLATFORMS", "cpu").split(",")[0].strip() or "cpu"
    if (not libc.startswith("glibc") or "glibc.malloc." in given or os.environ.get("LONGROPE_JAX_MALLOC") == "system"
            or platforms != "cpu" or has_tpu_chip() or has_gpu()):
        return None
    return f"{given}:{MALLOC_TUNABLES}" if given else MALLOC_TUNABLES


def restart_with_malloc_tunables() -> None:
    """Re-executes this process (same interpreter, same command line, same PID) with
    :func:`malloc_tunables` when it returns a value; glibc reads them only at start-up. Call it
    first thing in a command's process, before JAX allocates anything."""
    value = malloc_tunables()
    if value is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "GLIBC_TUNABLES": value})
