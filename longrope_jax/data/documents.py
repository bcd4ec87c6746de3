"""Documents for evaluation, following the perplexity protocol (docs/formats.md).

A text file is one document, a JSONL line is one document (field ``text``), an ArrayRecord file
(``*.array_record``, or TFDS-style shards ``*.array_record-00000-of-00004``) holds one document per
record (UTF-8 text, or a JSON object with field ``text``), a directory holds the documents of its
files (any of these may be a ``gs://`` URL: copied to the machine once, see ``storage.local``),
``pydoc:`` is a long English text every Python installation has (the
standard library's pydoc topics, joined in sorted order), ``stdlib:`` a fixed list of the
standard library's modules (the built-in training corpus), and ``tfds:NAME[:SPLIT]`` reads a
TensorFlow Datasets split (optional extra ``tfds``; e.g. ``tfds:pg19:validation``). Each document
contributes its first N tokens; shorter ones are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Callable, Iterable, Sequence

import numpy as np

from longrope_jax import storage

BUILTIN_PYDOC = "pydoc:"
BUILTIN_STDLIB = "stdlib:"
# The built-in training corpus: these modules of the running Python's standard library, one
# document each (a fixed list, so a run's data depends only on the Python version).
STDLIB_MODULES = ("argparse", "ast", "calendar", "collections", "configparser", "csv", "dataclasses", "datetime",
                  "difflib", "enum", "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress",
                  "json.decoder", "json.encoder", "locale", "logging", "pathlib", "pickle", "pprint", "random", "shlex",
                  "shutil", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize",
                  "typing", "uuid", "zipfile")
TFDS_PREFIX = "tfds:"
# Documents read from a TFDS split unless ``max_documents`` says otherwise: all of PG19's
# validation (50 books) and test (100 books) splits, without reading all of a large corpus.
TFDS_MAX_DOCUMENTS = 100
TFDS_SPLITS = ("validation", "test", "train")  # the default split: the first of these there is
# The text feature when ``field`` is the default "text" and the dataset has no feature of that name.
TFDS_TEXT_FIELDS = {
    "pg19": "book_text",
    "scientific_papers": "article",
    "big_patent": "description",
    "multi_news": "document",
    "booksum": "document",
}
TFDS_INSTALL_HINT = "pip install -c constraints.txt 'longrope-jax[tfds]'"

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """Unusable evaluation data; names the file, the field and what was expected."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str  # file path, ``path:line`` for JSONL, ``pydoc:topics``, or ``tfds:NAME:SPLIT:INDEX``
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


def is_array_record(path: str) -> bool:
    return bool(re.search(r"\.array_record(-\d+-of-\d+)?$", path))


def _record_text(record: bytes, field: str, where: str) -> str:
    """One ArrayRecord record as a document: a JSON object's ``field``, else the record's UTF-8 text."""
    try:
        text = bytes(record).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: expected UTF-8 text or a JSON object with a string field {field!r} "
                        f"({e})") from None
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(obj, dict):
            if not isinstance(obj.get(field), str):
                raise DataError(f"{where}: expected a JSON object with a string field {field!r}")
            return obj[field]
    return text


def _array_record(path: str, field: str) -> Iterable[Document]:
    """An ArrayRecord file's records in order, read through Grain's random-access source."""
    import grain

    try:
        source = grain.sources.ArrayRecordDataSource([path])
        n = len(source)
    except Exception as e:  # noqa: BLE001 - the reader raises bare RuntimeErrors on a bad file
        raise DataError(f"{path}: not a readable ArrayRecord file ({type(e).__name__}: {e})") from None
    for i in range(n):
        yield Document(f"{path}:{i}", _record_text(source[i], field, f"{path}: record {i}"))


def _file(path: str, field: str) -> Iterable[Document]:
    if path.endswith((".jsonl", ".jsonl.txt")):
        yield from _jsonl(path, field)
        return
    if is_array_record(path):
        yield from _array_record(path, field)
        return
    try:
        with open(path, encoding="utf-8") as fh:
            yield Document(path, fh.read())
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


_TFDS_VERSION = re.compile(r"\d+\.(\d+|\*)\.(\d+|\*)")


def parse_tfds(source: str) -> tuple[str, str | None]:
    """``tfds:NAME[/CONFIG][:VERSION][:SPLIT]`` -> (TFDS name, split or None).

    SPLIT may use TFDS's split syntax (``validation[:10]``, ``train+test``).
    """
    rest = source[len(TFDS_PREFIX):]
    name, _, split = rest.partition(":")
    head, _, tail = split.partition(":")
    if _TFDS_VERSION.fullmatch(head):
        name, split = f"{name}:{head}", tail
    if not name or not re.fullmatch(r"[\w.\-/:*]+", name):
        raise DataError(f"{source}: expected tfds:NAME[:SPLIT], e.g. tfds:pg19:validation")
    return name, split or None


def _is_string_feature(f) -> bool:
    try:
        return tuple(f.shape) == () and np.dtype(f.np_dtype) == np.dtype(object)
    except (AttributeError, TypeError):
        return False


def _describe_features(features) -> str:
    parts = []
    for k, f in features.items():
        if _is_string_feature(f):
            kind = type(f).__name__ if type(f).__name__ != "Tensor" else "string"
        else:
            try:
                kind = f"{type(f).__name__} {np.dtype(f.np_dtype).name}{list(f.shape) if f.shape else ''}"
            except (AttributeError, TypeError):
                kind = type(f).__name__
        parts.append(f"{k} ({kind})")
    return ", ".join(parts)


def _tfds_field(tfds, features, field: str, name: str, source: str, log) -> str:
    """The feature holding the text: ``field``, else (for the default "text") a per-dataset default
    or the only Text / string feature."""
    strings = [k for k, f in features.items() if _is_string_feature(f)]
    if field in strings:
        return field
    if field in features.keys():
        raise DataError(f"{source}: feature {field!r} is not text; string features: {', '.join(strings) or 'none'} "
                        f"(features: {_describe_features(features)}); pick one with --field")
    if field == "text":
        base = name.split(":")[0].split("/")[0]
        texts = [k for k in strings if isinstance(features[k], tfds.features.Text)]
        choice = TFDS_TEXT_FIELDS.get(base) if TFDS_TEXT_FIELDS.get(base) in strings else None
        choice = choice or (texts[0] if len(texts) == 1 else strings[0] if len(strings) == 1 else None)
        if choice:
            log(f"{source}: reading feature {choice!r} ({name} has no 'text' feature)")
            return choice
    raise DataError(f"{source}: no string feature {field!r}; pass --field with one of: {', '.join(strings) or 'none'} "
                    f"(features: {_describe_features(features)})")


def _tfds_split(builder, name: str, split: str | None, source: str, notice) -> str:
    known = list(builder.info.splits)  # empty until prepared (and under tfds.testing.mock_data)
    if split is None:
        if not known:
            return TFDS_SPLITS[0]
        split = next((s for s in TFDS_SPLITS if s in known), sorted(known)[0])
        if split != TFDS_SPLITS[0]:
            notice(f"{source}: {name} has no {TFDS_SPLITS[0]!r} split; reading {split!r} (splits: "
                   f"{', '.join(sorted(known))}; choose one with tfds:{name}:SPLIT)")
        return split
    if known:
        for base in re.findall(r"(?:^|\+)\s*([^\[+\s]+)", split):
            if base not in known:
                raise DataError(f"{source}: {name} has no split {base!r} (splits: {', '.join(sorted(known))})")
    return split


def _tfds_text(value, where: str) -> str:
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text ({e})") from None
    if isinstance(value, str):
        return str(value)
    raise DataError(f"{where}: expected a string, got {type(value).__name__}")


def _tfds(source: str, field: str, max_documents: int | None, info, notice) -> list[Document]:
    """A TFDS split's first ``max_documents`` examples (default TFDS_MAX_DOCUMENTS).

    Reads through ``builder.as_data_source`` (ArrayRecord, random access, no TensorFlow needed),
    so only the examples used are read. A dataset that is not prepared yet is downloaded and
    prepared as ArrayRecord under the TFDS data dir (``TFDS_DATA_DIR``, default
    ~/tensorflow_datasets); datasets already prepared as TFRecord are read with ``tfds.as_numpy``,
    which needs TensorFlow.
    """
    name, split = parse_tfds(source)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{source}: TensorFlow Datasets is not installed ({e}); {TFDS_INSTALL_HINT}") from None
    limit = TFDS_MAX_DOCUMENTS if max_documents is None else max_documents
    try:
        builder = tfds.builder(name)
    except ValueError as e:  # DatasetNotFoundError, unknown config or version
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{source}: {first} (see https://www.tensorflow.org/datasets/catalog; some builders "
                        f"need TensorFlow: pip install tensorflow)") from None
    if not builder.is_prepared():
        builder = tfds.builder(name, file_format="array_record")
        info(f"{source}: {name} is not prepared under {builder.data_dir}; downloading and preparing it "
             f"(once; set TFDS_DATA_DIR to use a prepared copy)")
        try:
            builder.download_and_prepare()
        except ImportError as e:
            if (e.name or "").split(".")[0] == "tensorflow":
                raise DataError(f"{source}: preparing {name} needs TensorFlow (its TFDS builder reads with tf.io): "
                                f"pip install tensorflow, or set TFDS_DATA_DIR to a copy prepared with "
                                f"file_format='array_record'") from e
            raise DataError(f"{source}: preparing {name} needs a package that is missing ({e}); "
                            f"{TFDS_INSTALL_HINT}") from e
        except Exception as e:  # noqa: BLE001 - network, disk, manual downloads: say which dataset failed
            raise DataError(f"{source}: could not download and prepare {name}: {type(e).__name__}: {e}") from e
    split = _tfds_split(builder, name, split, source, notice)
    field = _tfds_field(tfds, builder.info.features, field, name, source, info)
    prefix = f"{TFDS_PREFIX}{name}:{split}"
    try:
        ds = builder.as_data_source(split=split)
    except NotImplementedError:  # prepared as TFRecord: no random access
        ds = None
    except (ValueError, KeyError) as e:
        raise DataError(f"{source}: cannot read split {split!r} of {name}: {e}") from None
    docs = []
    if ds is not None:
        total = len(ds)
        for i in range(min(total, limit)):
            docs.append(Document(f"{prefix}:{i}", _tfds_text(ds[i][field], f"{prefix}:{i}: {field}")))
    else:
        try:
            import tensorflow  # noqa: F401
        except ImportError:
            raise DataError(f"{source}: {name} is prepared under {builder.data_dir} as {builder.info.file_format}, "
                            "which only TensorFlow reads: pip install tensorflow, or prepare it again with "
                            "file_format='array_record' in another TFDS_DATA_DIR") from None
        total = None
        ds = builder.as_dataset(split=split, shuffle_files=False).take(limit)
        for i, ex in enumerate(tfds.as_numpy(ds)):
            docs.append(Document(f"{prefix}:{i}", _tfds_text(ex[field], f"{prefix}:{i}: {field}")))
    if not docs:
        raise DataError(f"{source}: split {split!r} of {name} holds no documents")
    if total is not None and total > len(docs):
        info(f"{source}: read the first {len(docs)} of {total} documents (max_documents={limit})")
    return docs


def read_documents(source: str, field: str = "text", *, max_documents: int | None = None,
                   log: Callable[[str], None] | None = None) -> list[Document]:
    """Documents from a text file, a JSONL file, an ArrayRecord file, a directory (sorted,
    recursive), ``pydoc:``, ``stdlib:`` or ``tfds:NAME[:SPLIT]``.

    ``max_documents`` keeps the first ones (in the source's order); for ``tfds:`` it defaults to
    TFDS_MAX_DOCUMENTS, as corpora like PG19 are large. ``log`` receives notices (which split or
    feature was chosen, how many documents were read); by default they go to this module's logger.
    """
    if max_documents is not None and max_documents < 1:
        raise DataError(f"max_documents: expected at least 1, got {max_documents}")
    if source.startswith(TFDS_PREFIX):
        return _tfds(source, field, max_documents, log or logger.info, log or logger.warning)
    if storage.is_remote(source):  # copied once per machine (again when the store's copy changes)
        local = storage.local(source, log=log or logger.info)
        docs = [Document(source + d.name[len(local):], d.text) for d in _read(local, field, max_documents)]
        return docs if max_documents is None else docs[:max_documents]
    docs = _read(source, field, max_documents)
    return docs if max_documents is None else docs[:max_documents]


def _stdlib() -> list[Document]:
    import importlib.util

    out = []
    for name in STDLIB_MODULES:
        with open(importlib.util.find_spec(name).origin, encoding="utf-8") as fh:
            out.append(Document(f"stdlib:{name}", fh.read()))
    return out


def _read(source: str, field: str, max_documents: int | None) -> list[Document]:
    if source == BUILTIN_PYDOC or source == "pydoc":
        return [Document("pydoc:topics", _pydoc_text())]
    if source == BUILTIN_STDLIB:
        return _stdlib()
    if os.path.isdir(source):
        docs = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for f in sorted(files):
                if not f.startswith("."):
                    docs.extend(_file(os.path.join(root, f), field))
                    if max_documents is not None and len(docs) >= max_documents:
                        return docs
        if not docs:
            raise DataError(f"{source}: directory holds no documents")
        return docs
    if not os.path.exists(source):
        raise DataError(f"{source}: not found (expected a text file, a .jsonl or .array_record file, a directory, "
                        f"'pydoc:', 'stdlib:' or 'tfds:NAME[:SPLIT]')")
    if max_documents is None:
        return list(_file(source, field))
    docs = []
    for d in _file(source, field):
        docs.append(d)
        if len(docs) >= max_documents:
            break
    return docs


@dataclasses.dataclass
class Windows:
    tokens: np.ndarray  # int32[S, N]: the first N tokens of each chosen document
    documents: list[str]  # names, one per row
    skipped_short: int  # documents shorter than N
    available: int  # documents with at least N tokens


def windows(docs: list[Document], tokenizer, length: int, samples: int, seed: int | Sequence[int] = 0,
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


def source_list(data: str | Sequence[str]) -> list[str]:
    """``--data`` as a list of sources (one string, or several: repeated ``--data`` or a config list)."""
    sources = [data] if isinstance(data, str) else list(data or [])
    if not sources or any(not isinstance(s, str) or not s for s in sources):
        raise DataError(f"--data: expected a source (text file, .jsonl, directory, 'pydoc:' or 'tfds:NAME') or a "
                        f"list of them, got {data!r}")
    return sources


def source_label(data: str | Sequence[str]) -> str | list[str]:
    """How results name ``data``: the source itself when there is one (as before sources could
    repeat), else the list."""
    sources = source_list(data)
    return sources[0] if len(sources) == 1 else sources


def read_sources(data: str | Sequence[str], field: str = "text", *, log: Callable[[str], None] | None = None
                 ) -> list[tuple[str, list[Document]]]:
    """``[(source, documents)]`` for each source of ``data`` (see :func:`source_list`)."""
    return [(s, read_documents(s, field, log=log)) for s in source_list(data)]


def windows_from(sources: Sequence[tuple[str, list[Document]]], tokenizer, length: int, samples: int,
                 seed: int = 0) -> Windows:
    """Windows from one source (exactly :func:`windows`) or several: ``samples`` is split across
    the sources as evenly as possible (the first ones take the remainder), source ``i`` choosing
    its documents with seed ``[seed, i]``; rows come source by source. Each source needs at least
    one window (``samples >= len(sources)``), so every domain given is in the windows."""
    if len(sources) == 1:
        name, docs = sources[0]
        return windows(docs, tokenizer, length, samples, seed, source=name)
    if samples < len(sources):
        raise DataError(f"--samples: expected at least one window per --data source ({len(sources)}), got {samples}")
    parts = []
    for i, (name, docs) in enumerate(sources):
        n = samples // len(sources) + (1 if i < samples % len(sources) else 0)
        parts.append(windows(docs, tokenizer, length, n, [seed, i], source=name))
    return Windows(np.concatenate([w.tokens for w in parts]), [d for w in parts for d in w.documents],
                   sum(w.skipped_short for w in parts), sum(w.available for w in parts))

