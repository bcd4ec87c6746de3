"""Append-only JSONL run logs that long jobs resume from (the search, passkey trials).

Line 1 is a header holding everything that determines the run; every later line is one finished
unit of work, flushed and fsynced as it is written. Reopening a log reads its records; a last line
cut short by a crash is dropped (and truncated away before appending); a header that differs from
this run's is an error naming the fields that differ, so a log is never resumed by another run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping


class RunLog:
    """``RunLog(path, header, is_record=..., what="search")``; ``path=None`` keeps records in memory.

    ``header`` must carry a ``"format"`` key. ``is_record(obj)`` says whether a later line is a
    valid record; ``error`` is the exception class raised (with the path and line in the message).
    """

    def __init__(self, path: str | None, header: Mapping[str, Any], *, is_record: Callable[[Any], bool],
                 what: str, record_name: str = "record", error: type[Exception] = ValueError):
        self.path = path
        self.header = json.loads(json.dumps(header))
        self.records: list[dict] = []
        self._fh = None
        self._what = what
        self._error = error
        if path is None:
            return
        good = 0  # bytes of complete, valid lines
        if os.path.exists(path):
            with open(path, "rb") as fh:
                data = fh.read()
            lines = data.split(b"\n")[:-1]  # the last piece has no newline: torn by a crash, dropped
            for i, raw in enumerate(lines):
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError:
                    raise error(f"{path}: line {i + 1}: not valid JSON (the log is corrupt)") from None
                if i == 0:
                    check_header(path, obj, self.header, what, error)
                elif not isinstance(obj, dict) or not is_record(obj):
                    raise error(f"{path}: line {i + 1}: expected a {record_name}")
                else:
                    self.records.append(obj)
                good += len(raw) + 1
        if good == 0:
            self._fh = open(path, "wb")
            self._write(self.header)
        else:
            self._fh = open(path, "r+b")
            self._fh.truncate(good)
            self._fh.seek(good)

    def _write(self, obj):
        self._fh.write(json.dumps(obj).encode() + b"\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def append(self, record: dict):
        self.records.append(record)
        if self._fh is not None:
            self._write(record)

    def close(self):
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_file(path: str, header: Mapping[str, Any], what: str, error: type[Exception] = ValueError) -> None:
    """Raises ``error`` when ``path`` holds the log of another run (reads the header only)."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as fh:
        first = fh.readline()
    if not first.endswith(b"\n"):
        return  # empty, or a header torn by a crash: rewritten
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        raise error(f"{path}: line 1: not valid JSON (the log is corrupt)") from None
    check_header(path, obj, json.loads(json.dumps(header)), what, error)


def check_header(path: str, obj: Any, header: Mapping[str, Any], what: str, error: type[Exception]) -> None:
    fmt = header["format"]
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{path}: line 1: expected a {fmt} header, got {str(obj)[:120]}")
    if obj != header:
        diffs = _diff(obj, header, what)
        raise error(f"{path}: the log belongs to a different {what} ({'; '.join(diffs[:3])}); "
                    f"use another --out directory or the same settings")


def _diff(a, b, what, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out += _diff(a.get(k), b.get(k), what, f"{prefix}{k}.")
        return out
    return [f"{prefix.rstrip('.')}: log has {json.dumps(a)[:60]}, this {what} {json.dumps(b)[:60]}"]
