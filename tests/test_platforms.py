"""The process a command runs in: glibc's malloc settings for XLA on the CPU
(``platforms.restart_with_malloc_tunables``)."""

import os
import subprocess
import sys

import pytest

from longrope_jax import platforms

pytestmark = pytest.mark.skipif(not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
                                or platforms.has_tpu_chip() or platforms.has_gpu(),
                                reason="glibc on a machine whose programs run on the CPU")

# What a command started from a shell runs: main() without arguments, here on --version.
COMMAND = ("import os, sys; print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
           "sys.argv = ['longrope-jax', '--version']; from longrope_jax.cli import main; main()")

# A freed 256 MiB block allocated again and written, as XLA's temporaries are on every call
# (``malloc``, as XLA's CPU client allocates them; numpy's arrays would ask for huge pages): the
# page faults of the second allocation.
REUSE = ("import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
         "libc.free.argtypes = [ctypes.c_void_p]; n = 2**28; p = libc.malloc(n); ctypes.memset(p, 1, n); "
         "libc.free(p); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; p = libc.malloc(n); "
         "ctypes.memset(p, 1, n); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)")


def _run(code, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LONGROPE_JAX_MALLOC")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**base, "JAX_PLATFORMS": "cpu", **env})
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.splitlines()


def test_a_command_restarts_once_in_the_same_process_with_the_malloc_tunables():
    first, second, version = _run(COMMAND)
    assert first.split()[2] == "None"
    assert second.split()[:2] == first.split()[:2]  # the same PID: exec, not a child
    assert second.split()[2] == platforms.MALLOC_TUNABLES
    assert version.startswith("longrope-jax ")


def test_tunables_given_or_opted_out_leave_the_process_as_started():
    mine = "glibc.malloc.arena_max=2"
    assert _run(COMMAND, GLIBC_TUNABLES=mine)[0].split()[2] == mine
    added = _run(COMMAND, GLIBC_TUNABLES="glibc.rtld.nns=4")[1].split()[2]
    assert added == f"glibc.rtld.nns=4:{platforms.MALLOC_TUNABLES}"
    out = _run(COMMAND, LONGROPE_JAX_MALLOC="system")
    assert len(out) == 2 and out[0].split()[2] == "None"
    assert len(_run(COMMAND, JAX_PLATFORMS="tpu")) == 2


def test_with_the_tunables_a_freed_block_is_reused_without_faulting_its_pages_again():
    """Why the restart: without it the block comes back from the kernel zeroed, page by page."""
    pages = 2**28 // os.sysconf("SC_PAGE_SIZE")
    assert int(_run(REUSE)[0]) > pages // 2
    assert int(_run(REUSE, GLIBC_TUNABLES=platforms.MALLOC_TUNABLES)[0]) < pages // 100
