"""Atomic output directories: written under a temporary name in the same parent, renamed into place.

An existing output is refused unless ``overwrite`` (and a path that is a file is never replaced);
an unwritable parent is a clear error; on any failure the temporary directory (and any parent
directories this call created) are removed, so the output path is as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator


class OutputError(ValueError):
    """The output path cannot be written; the message names it and says why."""


def check(path: str, overwrite: bool = False, what: str = "output") -> str:
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
def atomic_dir(path: str, *, overwrite: bool = False, what: str = "output") -> Iterator[str]:
    """Yields a fresh temporary directory next to ``path``; on success it becomes ``path``."""
    path = check(path, overwrite, what)
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
        check(path, overwrite, what)  # again: something may have appeared meanwhile
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
