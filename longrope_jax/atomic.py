"""Atomic writes, the one helper every output goes through: files and directories are written
under a temporary name in the same parent, then renamed into place.

``directory``: an existing output is refused unless ``overwrite`` (and a path that is a file is
never replaced); an unwritable parent is a clear error; on any failure the temporary directory
(and any parent directories this call created) are removed, so the output path is as it was.
``file`` / ``write_json``: a temporary file, fsynced, renamed over the path (readers see the old
file or the new one, never a part).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from typing import IO, Any, Iterator


class OutputError(ValueError):
    """The output path cannot be written; the message names it and says why."""


def check_dir(path: str, overwrite: bool = False, what: str = "output") -> str:
    """Refuses an existing output (unless ``overwrite``) before any work is done; returns the
    absolute path."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise OutputError(f"{path}: exists and is not a directory (expected a new {what} directory); "
                              f"not replaced")
        if not overwrite:
            raise OutputError(f"{path}: exists (expected a new {what} directory); pass --overwrite "
                              f"(overwrite=True) to replace it")
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputError(f"{path}: cannot write the {what}: {ancestor} is not a directory, so the parent "
                          f"directory {os.path.dirname(path)} cannot exist")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot write the {what}: directory {ancestor} is not writable")
    return path


@contextlib.contextmanager
def directory(path: str, *, overwrite: bool = False, what: str = "output") -> Iterator[str]:
    """Yields a fresh temporary directory next to ``path``; on success it becomes ``path``."""
    path = check_dir(path, overwrite, what)
    parent = os.path.dirname(path)
    created = parent  # the top-most parent this call creates, removed again on failure
    while not os.path.lexists(os.path.dirname(created)) and os.path.dirname(created) != created:
        created = os.path.dirname(created)
    created = None if os.path.lexists(parent) else created
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    except OSError as e:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise OutputError(f"{path}: cannot write the {what}: parent directory {parent} is not writable "
                          f"({type(e).__name__}: {e.strerror or e})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        check_dir(path, overwrite, what)  # again: something may have appeared meanwhile
        if os.path.lexists(path):
            old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise


@contextlib.contextmanager
def file(path: str, mode: str = "w") -> Iterator[IO]:
    """Yields a temporary file next to ``path`` (parents created); on success it is fsynced, made
    world-readable and renamed over ``path``; on failure removed."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are for reading
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(path: str, obj: Any, indent: int | None = 1) -> str:
    """Writes ``obj`` as JSON (one trailing newline) atomically; returns ``path``."""
    with file(path) as fh:
        json.dump(obj, fh, indent=indent)
        fh.write("\n")
    return path
