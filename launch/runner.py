"""Running the Cloud CLI: one command at a time (or printed, on ``--dry-run``), and a command on
every worker at once, each worker's output to its own log, the first failure stopping the rest."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time

from .slices import LaunchError


class Runner:
    """Runs argv lists, or with ``dry_run`` prints each (shell-quoted, one a line on stdout) and
    runs nothing; queries (``ask``) then answer None."""

    def __init__(self, dry_run: bool = False, log=None):
        self.dry_run = dry_run
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    def do(self, argv: list[str]) -> None:
        """A command that changes something; its failure is a one-line error with its last line."""
        if self.dry_run:
            print(shlex.join(argv), flush=True)
            return
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode:
            last = ((r.stderr or r.stdout).strip().splitlines() or [f"exit {r.returncode}"])[-1]
            raise LaunchError(f"{shlex.join(argv[:6])} ...: {last}")

    def ask(self, argv: list[str]) -> str | None:
        """A query's stdout; None where it fails (a describe of something absent) or on dry-run."""
        if self.dry_run:
            return None
        r = subprocess.run(argv, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else None


class Workers:
    """One process a worker, started together (``argv_of(worker)``), each one's stdout and stderr
    appended to ``log_dir/worker-<i>.log``."""

    def __init__(self, argv_of, n: int, log_dir: str, header: str):
        os.makedirs(log_dir, exist_ok=True)
        self.paths = [os.path.join(log_dir, f"worker-{i}.log") for i in range(n)]
        self.procs, self.starts = [], []
        for i, path in enumerate(self.paths):
            with open(path, "a") as fh:
                fh.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {header}\n")
                fh.flush()
                self.starts.append(fh.tell())
                self.procs.append(subprocess.Popen(argv_of(i), stdout=fh, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, start_new_session=True))

    def poll(self) -> tuple[bool, int | None, int | None]:
        """(all finished with 0, the first failed worker or None, its exit code)."""
        codes = [p.poll() for p in self.procs]
        for i, c in enumerate(codes):
            if c not in (None, 0):
                return False, i, c
        return all(c == 0 for c in codes), None, None

    def kill(self) -> None:
        """Ends the local clients (on a real slice the commands go on: ``remote.stop`` ends them)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def last_lines(self, worker: int, n: int = 8) -> str:
        """The last ``n`` lines this run wrote to the worker's log."""
        return tail(self.paths[worker], n, self.starts[worker])


def tail(path: str, n: int, start: int = 0) -> str:
    """The last ``n`` lines of a log from byte ``start`` (progress bars' carriage returns read as
    line ends)."""
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as fh:
        fh.seek(start)
        text = fh.read().decode(errors="replace")
    lines = [seg for line in text.splitlines() for seg in line.split("\r") if seg.strip()]
    return "\n".join(lines[-n:])


def each(runner: Runner, argv_of, n: int) -> list[str]:
    """``argv_of(worker)`` on every worker at once, waiting for all; their outputs. A failing one
    is a one-line error naming the worker (on dry-run: printed, outputs empty)."""
    if runner.dry_run:
        for i in range(n):
            runner.do(argv_of(i))
        return [""] * n
    procs = [subprocess.Popen(argv_of(i), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              stdin=subprocess.DEVNULL) for i in range(n)]
    outs = [p.communicate()[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode:
            last = (out.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            raise LaunchError(f"worker {i}: {last}")
    return outs


def raise_if_missing(tool: str) -> None:
    from shutil import which

    if which(tool) is None:
        raise LaunchError(f"{tool}: not found on PATH (install the Google Cloud CLI: "
                          "https://cloud.google.com/sdk/docs/install)" if tool == "gcloud" else
                          f"{tool}: not found on PATH (pip install xpk)")
