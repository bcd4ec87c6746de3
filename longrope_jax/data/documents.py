"""Documents for evaluation, following the perplexity protocol (REFERENCE.md section 8).

A text file is one document, a JSONL line is one document (field ``text``), a directory holds one
document per file, and ``pydoc:`` is a long English text every Python installation has (the
standard library's pydoc topics, joined in sorted order). Each document contributes its first N
tokens; shorter ones are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable

import numpy as np

BUILTIN_PYDOC = "pydoc:"


class DataError(ValueError):
    """Unusable evaluation data; names the file, the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # file path, ``path:line`` for JSONL, or ``pydoc:topics``
    text: str


def _pydoc_text() -> str:
    from pydoc_data import topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _jsonl(path: str, field: str) -> Iterable[Document]:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                raise DataError(f"{path}:{i}: expected an object with a string field {field!r}")
            yield Document(f"{path}:{i}", obj[field])


def _file(path: str, field: str) -> Iterable[Document]:
    if path.endswith((".jsonl", ".jsonl.txt")):
        yield from _jsonl(path, field)
        return
    try:
        with open(path, encoding="utf-8") as fh:
            yield Document(path, fh.read())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def read_documents(source: str, field: str = "text") -> list[Document]:
    """Documents from a text file, a JSONL file, a directory (sorted, recursive) or ``pydoc:``."""
    if source == BUILTIN_PYDOC or source == "pydoc":
        return [Document("pydoc:topics", _pydoc_text())]
    if os.path.isdir(source):
        docs = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for f in sorted(files):
                if not f.startswith("."):
                    docs.extend(_file(os.path.join(root, f), field))
        if not docs:
            raise DataError(f"{source}: directory holds no documents")
        return docs
    if not os.path.exists(source):
        raise DataError(f"{source}: not found (expected a text file, a .jsonl file, a directory or 'pydoc:')")
    return list(_file(source, field))


@dataclasses.dataclass
class Windows:
    tokens: np.ndarray  # int32[S, N]: the first N tokens of each chosen document
    documents: list[str]  # names, one per row
    skipped_short: int  # documents shorter than N
    available: int  # documents with at least N tokens


def windows(docs: list[Document], tokenizer, length: int, samples: int, seed: int = 0,
            source: str = "data") -> Windows:
    """Tokenises documents and takes the first ``length`` tokens of ``samples`` of them.

    When more documents qualify than ``samples``, the choice is seeded and the rows come in the
    documents' order. Raises DataError when fewer than ``samples`` documents have ``length``
    tokens.
    """
    if length < 2:
        raise DataError(f"--length: expected at least 2 tokens, got {length}")
    if samples < 1:
        raise DataError(f"--samples: expected at least 1, got {samples}")
    ok, short, longest = [], 0, 0
    for d in docs:
        ids = tokenizer.encode(d.text)
        longest = max(longest, len(ids))
        if len(ids) >= length:
            ok.append((d.name, np.asarray(ids[:length], np.int32)))
        else:
            short += 1
    if len(ok) < samples:
        raise DataError(
            f"{source}: expected {samples} document(s) of at least {length} tokens, found {len(ok)} "
            f"({short} shorter; the longest has {longest} tokens)"
        )
    available = len(ok)
    if available > samples:
        pick = np.sort(np.random.default_rng(seed).choice(available, samples, replace=False))
        ok = [ok[i] for i in pick]
    return Windows(np.stack([t for _, t in ok]), [n for n, _ in ok], short, available)
