"""Run directories on an object store (``gs://BUCKET/run``): what a job writes there and how.

Orbax writes checkpoints to ``gs://`` itself (tensorstore's GCS driver), committing each whole.
Every other file of a run (settings, tokenizer, metrics, TensorBoard events, the row index,
``final/``, the summary) is written in a local mirror of the run directory, where the atomic-write
guarantees hold (write, then rename), and copied to the store as whole objects (an object is
replaced whole or not at all; it cannot be appended to, and a rename is a copy): ``push`` at each
checkpoint and at the end, ``pull`` when a run starts, so a run resumed on a fresh machine starts
from what the store holds. ``metrics.jsonl`` is thus rewritten whole at each checkpoint; its lines
after the last checkpoint are redone on resume, as the steps are.

Paths go through ``etils.epath`` (gcsfs behind ``gs://``; the ``gcs`` extra). The emulator the
tests use is reached with ``STORAGE_EMULATOR_HOST`` (gcsfs) and ``TENSORSTORE_GCS_HTTP_URL``
(tensorstore).
"""

from __future__ import annotations

import hashlib
import os
import shutil

SCHEMES = ("gs://",)


def is_remote(path: str | None) -> bool:
    return bool(path) and str(path).startswith(SCHEMES)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URL (``os.path.join`` would keep ``gs:/`` intact,
    but not on every platform)."""
    return "/".join([str(base).rstrip("/"), *parts]) if is_remote(base) else os.path.join(base, *parts)


def mirror(url: str) -> str:
    """The local mirror of the remote run directory ``url`` (``$LONGROPE_JAX_CACHE/runs/...``,
    default ``~/.cache/longrope-jax``): one per URL and machine."""
    root = os.environ.get("LONGROPE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "longrope-jax")
    name = hashlib.sha256(url.encode()).hexdigest()[:16]
    return os.path.join(root, "runs", f"{url.rstrip('/').rsplit('/', 1)[-1]}-{name}")


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
