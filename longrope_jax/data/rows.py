"""Training rows stored once as ArrayRecord shards (``longrope-jax prepare-data``), read back by
random access: every process of a pod reads only the rows of its batch positions, instead of
tokenising the whole corpus at start-up.

A prepared directory holds ``prepared.json`` (what the rows are: the settings they were built
with, the tokenizer's digest, the row count, the shards; written last, so its presence marks the
directory complete), ``tokenizer.json``, and shards ``rows-00000-of-00004.array_record`` whose
record ``i`` is row ``i`` (global order across the shards): ``int32[F, L]`` in little-endian
bytes, its ``F`` fields (``tokens``; with packing also ``segment_ids``, ``positions``) stacked.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import numpy as np

FORMAT = "longrope-prepared/1"
MANIFEST = "prepared.json"
TOKENIZER = "tokenizer.json"
FIELDS = ("tokens", "segment_ids", "positions")


class PreparedError(ValueError):
    """A prepared directory that cannot serve: names the file, the field and what was expected."""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write(directory: str, rows: Mapping[str, np.ndarray], rows_per_shard: int) -> list[str]:
    """The index ``rows`` (``{"tokens": int32[N, L]}``, with packing also segment ids and
    positions) as shards of at most ``rows_per_shard`` rows in ``directory``; their names."""
    from array_record.python.array_record_module import ArrayRecordWriter

    names = [f for f in FIELDS if f in rows]
    n = len(rows["tokens"])
    count = max(1, -(-n // rows_per_shard))
    shards = []
    for k in range(count):
        name = f"rows-{k:05d}-of-{count:05d}.array_record"
        w = ArrayRecordWriter(os.path.join(directory, name), "group_size:1")
        for i in range(k * rows_per_shard, min(n, (k + 1) * rows_per_shard)):
            w.write(np.stack([np.asarray(rows[f][i], "<i4") for f in names]).tobytes())
        w.close()
        shards.append(name)
    return shards


def read_manifest(directory: str) -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise PreparedError(f"{path}: not found (expected a directory written by longrope-jax prepare-data)")
    with open(path) as fh:
        m = json.load(fh)
    if m.get("format") != FORMAT:
        raise PreparedError(f"{path}: format {m.get('format')!r}, expected {FORMAT}")
    return m


class Rows:
    """The rows of a prepared directory: ``fields[name][ids]`` is ``int32[len(ids), L]``, read by
    random access (the fields of the same ids read once)."""

    def __init__(self, directory: str):
        import grain

        self.manifest = read_manifest(directory)
        self.source = grain.sources.ArrayRecordDataSource(
            [os.path.join(directory, s) for s in self.manifest["shards"]])
        self.names = list(self.manifest["fields"])
        self.shape = (len(self.source), self.manifest["seq_len"])
        if self.shape[0] != self.manifest["rows"]:
            raise PreparedError(f"{os.path.join(directory, MANIFEST)}: rows: the shards hold {self.shape[0]}, "
                                f"expected {self.manifest['rows']}")
        self._last: tuple = ((), None)

    def read(self, ids) -> np.ndarray:
        """``int32[len(ids), F, L]``."""
        key = tuple(int(i) for i in np.asarray(ids).reshape(-1))
        if self._last[0] != key or self._last[1] is None:
            recs = [np.frombuffer(self.source[i], "<i4").reshape(len(self.names), self.shape[1]) for i in key]
            self._last = (key, np.stack(recs) if recs else np.zeros((0, len(self.names), self.shape[1]), np.int32))
        return self._last[1]

    @property
    def fields(self) -> dict[str, "Field"]:
        """Each field as an array-like of rows (what the trainer indexes)."""
        return {name: Field(self, j) for j, name in enumerate(self.names)}


class Field:
    """One field of :class:`Rows`: ``len``, ``shape`` and ``[ids] -> int32[len(ids), L]``."""

    def __init__(self, rows: Rows, j: int):
        self.rows, self.j = rows, j
        self.shape = rows.shape

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids) -> np.ndarray:
        return np.asarray(self.rows.read(ids)[:, self.j], np.int32)
