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

# What a command started from a shell runs: main() without arguments. The commands stop at once
# (a config that does not exist: exit 2, one line), after the restart where there is one.
COMMAND = ("import os, sys; print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True); "
           "sys.argv = ['longrope-jax', '{}', '--config', 'no-such-config']; from longrope_jax.cli import main; "
           "sys.exit(main())")


# A freed 256 MiB block allocated again and written, as XLA's temporaries are on every call
# (``malloc``, as XLA's CPU client allocates them; numpy's arrays would ask for huge pages): the
# page faults of the second allocation.
REUSE = ("import ctypes, resource; libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; "
         "libc.free.argtypes = [ctypes.c_void_p]; n = 2**28; p = libc.malloc(n); ctypes.memset(p, 1, n); "
         "libc.free(p); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; p = libc.malloc(n); "
         "ctypes.memset(p, 1, n); print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)")


def _run(code, rc=0, **env):
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LONGROPE_JAX_MALLOC")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**base, "JAX_PLATFORMS": "cpu", **env})
    assert r.returncode == rc, r.stderr[-2000:]
    return r.stdout.splitlines()


def _starts(command, **env):
    """The ``start PID GLIBC_TUNABLES`` lines the command printed: two when it restarted."""
    return [line.split()[1:] for line in _run(COMMAND.format(command), rc=2, **env)]


def test_a_training_command_restarts_once_in_the_same_process_with_the_malloc_tunables():
    for command in ("train", "extend"):
        (pid, before), (same_pid, after) = _starts(command)
        assert before == "None" and same_pid == pid  # exec, not a child
        assert after == platforms.MALLOC_TUNABLES


def test_other_commands_and_tunables_given_or_opted_out_leave_the_process_as_started():
    assert len(_starts("ppl")) == 1 and len(_starts("search")) == 1  # no gain, more memory (platforms)
    mine = "glibc.malloc.arena_max=2"
    assert [x[1] for x in _starts("train", GLIBC_TUNABLES=mine)] == [mine]
    assert [x[1] for x in _starts("train", GLIBC_TUNABLES="glibc.rtld.nns=4")] == \
        ["glibc.rtld.nns=4", f"glibc.rtld.nns=4:{platforms.MALLOC_TUNABLES}"]  # others kept, malloc's added
    assert [x[1] for x in _starts("train", LONGROPE_JAX_MALLOC="system")] == ["None"]
    assert [x[1] for x in _starts("train", JAX_PLATFORMS="tpu")] == ["None"]


def test_with_the_tunables_a_freed_block_is_reused_without_faulting_its_pages_again():
    """Why the restart: without it the block comes back from the kernel zeroed, page by page."""
    pages = 2**28 // os.sysconf("SC_PAGE_SIZE")
    assert int(_run(REUSE)[0]) > pages // 2
    assert int(_run(REUSE, GLIBC_TUNABLES=platforms.MALLOC_TUNABLES)[0]) < pages // 100
