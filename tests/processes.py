"""Multi-process runs on localhost for the tests: a free port, and two processes started together."""

import os
import socket
import subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def two_processes(argv_of, cwd, timeout=300, env=None):
    """Runs ``argv_of(process_id)`` for processes 0 and 1 together, 4 CPU devices each; returns
    their (rc, out, err)."""
    env = {**os.environ, **(env or {}), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(argv_of(i), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def command_argv(*args):
    """``python -m longrope_jax ARGS`` with Ctrl-C as an interactive shell delivers it: a
    non-interactive shell starts background jobs with SIGINT ignored, and a child inherits that
    (restored here in the child's own code, not in a fork-time hook of a threaded parent)."""
    import sys

    code = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('longrope_jax', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code, *args]
