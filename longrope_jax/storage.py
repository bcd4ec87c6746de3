"""Run directories and inputs on an object store (``gs://BUCKET/...``): what a job writes there
and how it reads from there.

Orbax writes checkpoints to ``gs://`` itself (tensorstore's GCS driver), committing each whole.
Every other file of a run is written in a local mirror (:class:`RunDir`; :func:`mirror` lays it out
like the URL, so a pipeline stage's directory is where that stage's job mirrors it), where the
atomic-write guarantees hold (write, then rename), and copied to the store as whole objects (an
object is replaced whole or not at all; it cannot be appended to, and a rename is a copy): logs
and metrics are thus rewritten whole at each push, and what was done after the last push is
redone on resume. A run starting empties its mirror and pulls its files back, so a run resumed
on a fresh machine starts from what the store holds. A finished directory goes up with its
manifest last (:func:`publish`). Inputs on the store (data sources, prepared rows, a finished
stage's weights) are read from a local copy made once per machine (:func:`local`).

Paths go through ``etils.epath`` (gcsfs behind ``gs://``; the ``gcs`` extra). The emulator the
tests use is reached with ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

SCHEMES = ("gs://",)


def is_remote(path: str | None) -> bool:
    return bool(path) and str(path).startswith(SCHEMES)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (``os.path.join`` would keep ``gs:/`` intact,
    but not on every platform)."""
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def _process(process: int | None) -> int:
    """``process``, or this JAX process's index (0 before JAX is imported): processes on one
    machine keep mirrors of their own, so one emptying its mirror never removes another's files."""
    if process is not None:
        return process
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None else 0


def mirror(url: str, process: int | None = None) -> str:
    """The local mirror of ``url`` for this machine and process: ``$LONGROPE_JAX_CACHE/p<process>/``
    followed by the URL's bucket and path (default cache ``~/.cache/longrope-jax``). The layout follows
    the URL's, so the mirror of ``url/child`` is ``mirror(url)/child``: a pipeline's stage directory
    is where that stage's own job mirrors it."""
    from longrope_jax.cache import cache_dir

    scheme, rest = str(url).split("://", 1)
    return os.path.join(cache_dir(f"p{_process(process)}"), scheme, *[p for p in rest.split("/") if p])


def local(path: str, process: int | None = None, log=None) -> str:
    """A local path to read ``path`` (a file or a folder) from: itself when it is local; for a URL,
    its mirror, copied down when absent or when the store's listing (names, sizes, times) differs
    from the one copied (an input rewritten on the store is fetched again). The copy lands whole:
    written beside the mirror, then renamed."""
    if not is_remote(path):
        return path
    dst = mirror(path, process)
    src = _epath(path)
    if not src.exists():
        raise FileNotFoundError(f"{path}: no such object or folder")
    listing = _listing(src)
    stamp = dst.rstrip("/") + ".listing.json"
    try:
        with open(stamp) as fh:
            if json.load(fh) == listing and os.path.exists(dst):
                return dst
    except (OSError, ValueError):
        pass
    tmp = f"{dst}.part{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.time()
    _copy_down(src, tmp)
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    with open(stamp + ".tmp", "w") as fh:
        json.dump(listing, fh)
    os.replace(stamp + ".tmp", stamp)
    if log is not None:
        log(f"{path}: copied to {dst} ({sum(n for _, n, _ in listing) / 2**20:.1f} MiB, {time.time() - t:.1f}s)")
    return dst


def _listing(src, prefix: str = "") -> list:
    """``[[relative name, size, mtime]]`` of a file or a folder's files, sorted (by ``iterdir``:
    epath's ``walk`` drops the scheme of gs:// paths)."""
    if not src.is_dir():
        st = src.stat()
        return [[prefix, st.length, st.mtime]]
    return sorted(x for child in src.iterdir() for x in _listing(child, f"{prefix}{child.name}/"
                                                                 if child.is_dir() else prefix + child.name))


class RunDir:
    """A job's output directory, local or on an object store. ``local`` is where the job writes
    (the directory itself, created by the job, or its mirror); ``show(name)`` is how results name a file (the URL on a
    store); ``push(names)`` copies files of the mirror to the store (nothing when local). On a
    store the mirror is emptied and ``names`` pulled into it when the run starts, so a run resumed
    on a fresh machine starts from what the store holds."""

    def __init__(self, out: str, names=(), process: int | None = None, log=None):
        self.url, self.remote = str(out), is_remote(out)
        self.local = mirror(out, process) if self.remote else os.path.abspath(out)
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
            os.makedirs(self.local)
            got = pull(out, self.local, list(names))
            if got and log is not None:
                log(f"{out}: pulled {', '.join(got)} into {self.local}")

    def show(self, *parts: str) -> str:
        return join(self.url if self.remote else self.local, *parts)

    def push(self, names) -> None:
        if self.remote:
            push(self.local, self.url, list(names))


def _epath(url: str):
    try:
        from etils import epath
    except ImportError:  # pragma: no cover - etils comes with orbax
        raise RuntimeError("gs:// run directories need etils (pip install etils[epath])") from None
    if is_remote(url):
        try:
            import gcsfs  # noqa: F401
        except ImportError:
            raise RuntimeError(f"{url}: gs:// paths need gcsfs (pip install 'longrope-jax[gcs]')") from None
    return epath.Path(url)


def pull(url: str, local: str, names: list[str]) -> list[str]:
    """Copies each of ``names`` (files or folders) under ``url`` that exists into ``local``
    (replacing the local copy); returns the names copied."""
    got = []
    for name in names:
        src = _epath(join(url, name))
        if not src.exists():
            continue
        dst = os.path.join(local, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        _copy_down(src, dst)
        got.append(name)
    return got


def _copy_down(src, dst: str) -> None:
    if src.is_dir():
        os.makedirs(dst, exist_ok=True)
        for child in src.iterdir():
            _copy_down(child, os.path.join(dst, child.name))
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        tmp = dst + ".part"
        with src.open("rb") as fi, open(tmp, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
        os.replace(tmp, dst)


def push(local: str, url: str, names: list[str]) -> None:
    """Copies each of ``names`` under ``local`` that exists to ``url``, file by file, each object
    written whole (a folder's files in sorted order)."""
    for name in names:
        src = os.path.join(local, name)
        if os.path.isdir(src):
            for root, _, files in sorted(os.walk(src)):
                for f in sorted(files):
                    rel = os.path.relpath(os.path.join(root, f), local)
                    _put(os.path.join(root, f), join(url, *rel.split(os.sep)))
        elif os.path.isfile(src):
            _put(src, join(url, name))


def publish(local: str, url: str, *, last: str, overwrite: bool = False, what: str = "output") -> None:
    """A finished local directory to the new folder ``url``, ``last`` (its manifest) written after
    every other file: a reader that finds ``last`` finds the whole. An existing folder is refused
    unless ``overwrite``, which removes it first."""
    if check_new(url, overwrite, what):
        _epath(url).rmtree()
    names = sorted(n for n in os.listdir(local) if n != last)
    push(local, url, names + [last])


def check_new(url: str, overwrite: bool = False, what: str = "output") -> bool:
    """Refuses an existing folder ``url`` unless ``overwrite`` (one line naming it); returns
    whether it exists."""
    there = _epath(url).exists()
    if there and not overwrite:
        raise FileExistsError(f"{url}: exists (expected a new {what} directory); pass --overwrite "
                              "(overwrite=True) to replace it")
    return there


def where(path: str) -> str:
    """How results name a path: a URL as given, a local path made absolute."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def remove(url: str) -> None:
    """Removes a folder or object on the store, if there."""
    p = _epath(url)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def read_text(url: str) -> str:
    """A small object's text (a factors file, a manifest); FileNotFoundError when absent."""
    p = _epath(url)
    if not p.exists():
        raise FileNotFoundError(f"{url}: not found")
    return p.read_text()


def drop_uncommitted(url: str, committed) -> list[str]:
    """Removes the step folders under the checkpoint folder ``url`` that are not among Orbax's
    ``committed`` steps (a killed save's partial step, which a new save would otherwise write
    over stale objects); returns them."""
    root = _epath(url)
    if not root.exists():
        return []
    keep = {int(x) for x in committed}
    dropped = [p for p in root.iterdir() if p.name.isdigit() and int(p.name) not in keep]
    for p in dropped:
        p.rmtree()
    return sorted((p.name for p in dropped), key=int)


def _put(src: str, dst: str) -> None:
    with open(src, "rb") as fi, _epath(dst).open("wb") as fo:
        shutil.copyfileobj(fi, fo, 1 << 20)
