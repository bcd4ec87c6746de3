"""What runs on a slice's workers: the code of one git revision, the environment ``setup`` makes,
the command ``run`` starts on each worker, and the check that every worker sees its devices.

Layout on each worker (under the home directory)::

    longrope-jax/venv/          Python environment: the pinned jax[tpu], libtpu and the dependencies
    longrope-jax/<revision>/    the project's files at that git revision (what runs)
    longrope-jax/run.pid        the running command's process (``stop`` signals it)

A command runs as ``python -m longrope_jax`` from ``longrope-jax/<revision>``, so the code that runs
is the revision shipped, whatever revision ``setup`` installed the dependencies from.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess

from .slices import LaunchError

HOME = "longrope-jax"
VENV = f"~/{HOME}/venv"
PID = f"~/{HOME}/run.pid"
# What a worker needs of the repository to install and run the package.
SHIPPED = ["longrope_jax", "configs", "setup.py", "pyproject.toml", "constraints.txt", "README.md"]
PORT = 8476  # the coordinator's port with explicit processes (jax's default on Cloud TPU)


def _git(root: str, *args: str) -> str:
    r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
    if r.returncode:
        raise LaunchError(f"git {' '.join(args)}: {(r.stderr.strip().splitlines() or ['failed'])[-1]}")
    return r.stdout.strip()


def revision(root: str, asked: str | None, allow_dirty: bool) -> str:
    """The commit to ship: ``asked`` (any name git knows), else HEAD; a work tree with uncommitted
    changes to tracked files is refused unless ``allow_dirty``, which ships a commit of them
    (``git stash create``: nothing in the work tree or the stash changes)."""
    if asked:
        return _git(root, "rev-parse", "--verify", f"{asked}^{{commit}}")
    dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    if dirty and not allow_dirty:
        raise LaunchError(f"{root}: the work tree has uncommitted changes ({len(dirty.splitlines())} files); commit "
                          "them, name a --revision, or ship them with --allow-dirty")
    return (_git(root, "stash", "create") if dirty else "") or _git(root, "rev-parse", "HEAD")


def archive(root: str, rev: str, path: str) -> list[str]:
    """The command that writes the shipped files at ``rev`` to the tarball ``path``."""
    return ["git", "-C", root, "archive", "--format=tar.gz", f"--output={path}", rev, "--", *SHIPPED]


def tarball(rev: str) -> str:
    """The tarball's name in a worker's home directory."""
    return f"{HOME}-{rev}.tar.gz"


def unpack(rev: str) -> str:
    """On a worker: the tarball unpacked into ``~/longrope-jax/<rev>`` once (unpacked beside it,
    then renamed, so a half-unpacked tree is never taken for the revision)."""
    d = f"~/{HOME}/{rev}"
    return (f"set -e; mkdir -p ~/{HOME}; if [ ! -d {d} ]; then rm -rf {d}.part; mkdir {d}.part; "
            f"tar -xzf ~/{tarball(rev)} -C {d}.part; mv {d}.part {d}; fi")


def install(rev: str, extras: str = "tpu") -> str:
    """On a worker: the environment, with the dependencies pinned as ``constraints.txt`` of the
    revision pins them (jax, jaxlib and libtpu move together); ``extras`` of the package (``tpu``,
    and ``tfds`` for ``tfds:`` data sources)."""
    return (f"set -e; cd ~/{HOME}/{rev}; if [ ! -x {VENV}/bin/python ]; then python3 -m venv {VENV} || "
            f"(sudo apt-get -qq update && sudo apt-get -qq install -y python3-venv && python3 -m venv {VENV}); fi; "
            f"{VENV}/bin/pip install -q --upgrade pip; {VENV}/bin/pip install -q -c constraints.txt '.[{extras}]'")


def processes(addresses: tuple[str, ...] | None, worker: int, port: int) -> list[str]:
    """The start-up flags of worker ``worker``: none where the workers find each other through
    the TPU environment (``addresses`` None), else the coordinator (worker 0) and this worker's
    place, from the slice's addresses."""
    if addresses is None:
        return []
    return ["--coordinator", f"{addresses[0]}:{port}", "--num-processes", str(len(addresses)),
            "--process-id", str(worker)]


CHECK = "longrope-jax-devices"


def check(rev: str, flags: list[str]) -> str:
    """On a worker: start the runtime as the commands do and print one line of what it sees:
    the marker, the process index, local and global device counts, the platform."""
    code = ("import sys, jax; from longrope_jax.parallel import mesh; a = sys.argv[2:]; "
            "mesh.initialize(a[1], int(a[3]), int(a[5])) if a else mesh.initialize(); "
            "print(sys.argv[1], jax.process_index(), jax.local_device_count(), jax.device_count(), "
            "jax.default_backend(), flush=True)")
    return f"cd ~/{HOME}/{rev} && {VENV}/bin/python -c {shlex.quote(code)} {shlex.join([CHECK, *flags])}"


def read_check(worker: int, out: str) -> tuple[int, int, str]:
    """(local devices, global devices, platform) from a worker's :func:`check` output."""
    for line in out.splitlines():
        if line.startswith(CHECK):
            _, local, total, platform = line[len(CHECK):].split()
            return int(local), int(total), platform
    last = (out.strip().splitlines() or ["(nothing)"])[-1]
    raise LaunchError(f"worker {worker}: the device check printed no devices; its last line: {last}")


def command(argv: list[str]) -> list[str]:
    """A ``longrope-jax ...`` command as a worker runs it (``python -m longrope_jax ...``)."""
    if not argv or argv[0] != "longrope-jax":
        raise LaunchError(f"the command: expected longrope-jax COMMAND ..., got {shlex.join(argv) or 'nothing'}")
    if len(argv) < 2 or argv[1].startswith("-"):
        raise LaunchError(f"the command: expected a longrope-jax command (extend, train, search, ...) after "
                          f"longrope-jax, got {shlex.join(argv)}")
    return argv[1:]


def _exports(env: tuple[str, ...]) -> str:
    for kv in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", kv):
            raise LaunchError(f"--env: expected KEY=VALUE, got {kv!r}")
    return "".join(f"export {shlex.quote(kv)} && " for kv in env)


def start(rev: str, argv: list[str], flags: list[str], env: tuple[str, ...] = ()) -> str:
    """On a worker: the command, from the revision's tree, with ``env`` (``KEY=VALUE`` each)
    exported, its process id kept for ``stop``."""
    args = shlex.join([*command(argv), *flags])
    return f"cd ~/{HOME}/{rev} && {_exports(env)}echo $$ > {PID} && exec {VENV}/bin/python -m longrope_jax {args}"


def start_in_image(argv: list[str], extras: str = "tpu", env: tuple[str, ...] = ()) -> str:
    """In a container whose working directory is the revision's tree (xpk's script directory):
    the environment installed under the constraints, then the command."""
    return (f"{_exports(env)}pip install -q -c constraints.txt '.[{extras}]' && exec python -m longrope_jax "
            f"{shlex.join(command(argv))}")


def stop(signal: str = "TERM") -> str:
    """On a worker: the running command signalled (SIGTERM: a training run saves the step it is
    at and exits; the same command resumes)."""
    return f"if [ -f {PID} ]; then kill -{signal} $(cat {PID}) 2>/dev/null || true; rm -f {PID}; fi"


def local_dir(root: str | None, name: str) -> str:
    """The launcher's directory for slice ``name``: its description, the last command, each
    worker's log, the tarballs (``--launch-dir``, default ``~/.longrope-jax/launch``)."""
    return os.path.join(os.path.expanduser(root or os.path.join("~", ".longrope-jax", "launch")), name)
