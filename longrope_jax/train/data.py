"""Training data: documents tokenised once into an index of rows, and a Grain pipeline whose batch
of step t is a pure function of ``(seed, t)``.

The paper's recipe (:func:`chunk_index`): each document as BOS + doc + EOS (either left out when
the tokenizer has none), all concatenated and cut into rows of ``length`` tokens (the tail that
does not fill a row is dropped); documents shorter than ``min_document_tokens`` are left out (long
stages want long documents). Packed (:func:`pack_index`): each row holds whole documents (a
longer one cut into pieces of a row each), each with its own segment id and positions from 0, so
a document never attends to another; the rest of a row is padding (segment 0). An index is
``{"tokens": int32[N, L]}`` (and ``segment_ids``, ``positions`` when packed), written once
(``.npy``) and read by memory map.

Order (Levanter's approach, with Grain's index shuffle): the row ids ``0..N-1`` are shuffled by
``grain.MapDataset.shuffle(seed)`` and repeated, a fresh permutation per epoch (each epoch covers
every row once). Step t's global batch is elements ``[t B, (t + 1) B)`` of that order; a process
reads only the batch positions its devices hold (``positions``). Nothing but the step needs
checkpointing, and a run resumed on another device or process count sees the same examples.

Positional skips (PoSE, :func:`skip_positions`): a row of W tokens is cut into chunks whose
positions are offset by sorted random skips, so its positions span a window L > W; the skips
depend only on ``(seed, step, batch position)``.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np


class TrainDataError(ValueError):
    """Unusable training data or settings; names the source, the field and what was expected."""


def chunk_index(token_lists: Iterable[Sequence[int]], length: int, *, bos: int | None = None, eos: int | None = None,
                min_document_tokens: int = 0) -> np.ndarray:
    """``int32[N, length]``: BOS + doc + EOS of every document long enough, concatenated and
    chunked. ``token_lists``: each document's ids without special tokens."""
    if length < 2:
        raise TrainDataError(f"seq_len: expected at least 2 tokens, got {length}")
    pieces = []
    for ids in token_lists:
        if len(ids) < min_document_tokens:
            continue
        pieces.append(np.asarray(([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []),
                                 np.int32))
    flat = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    n = flat.size // length
    return flat[:n * length].reshape(n, length)


def pack_index(token_lists: Iterable[Sequence[int]], length: int, *, bos: int | None = None, eos: int | None = None,
               min_document_tokens: int = 0, pad: int = 0) -> dict[str, np.ndarray]:
    """``{"tokens", "segment_ids", "positions"}``, each ``int32[N, length]``: BOS + doc + EOS of
    every document long enough, cut into pieces of at most ``length`` tokens, placed in order into
    rows (a piece that does not fit the rest of a row starts the next one). Segment ids count the
    pieces of a row from 1, positions count each piece's tokens from 0; padding is ``pad`` with
    segment 0 and position 0."""
    if length < 2:
        raise TrainDataError(f"seq_len: expected at least 2 tokens, got {length}")
    rows, row = [], []

    def close():
        if row:
            rows.append(list(row))
            row.clear()

    for ids in token_lists:
        if len(ids) < min_document_tokens:
            continue
        doc = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        for i in range(0, len(doc), length):
            piece = doc[i:i + length]
            if len(piece) < 2:  # a lone token predicts nothing
                continue
            if sum(len(p) for p in row) + len(piece) > length:
                close()
            row.append(piece)
    close()
    out = {k: np.zeros((len(rows), length), np.int32) for k in ("tokens", "segment_ids", "positions")}
    out["tokens"][:] = pad
    for r, pieces in enumerate(rows):
        at = 0
        for seg, piece in enumerate(pieces, 1):
            n = len(piece)
            out["tokens"][r, at:at + n] = piece
            out["segment_ids"][r, at:at + n] = seg
            out["positions"][r, at:at + n] = np.arange(n)
            at += n
    return out


def skip_positions(positions: np.ndarray, span: int, chunks: int, seed: int, step: int,
                   batch_positions: Sequence[int]) -> np.ndarray:
    """``positions: int32[R, W]`` (row ``i`` at ``batch_positions[i]`` of step ``step``'s batch)
    with PoSE's skips: the row is cut into ``chunks`` equal chunks and chunk ``j`` is moved by the
    ``j``-th of ``chunks - 1`` sorted skips drawn uniformly from ``[0, span - W]`` with
    ``default_rng([seed, step, batch position])``, so positions stay in ``[0, span)`` and keep
    their order. ``span == W``: no skip."""
    r, w = positions.shape
    if span < w:
        raise TrainDataError(f"skip_to: expected at least seq_len ({w}), got {span}")
    if not 1 <= chunks <= w:
        raise TrainDataError(f"skip_chunks: expected 1 to seq_len ({w}), got {chunks}")
    bounds = np.linspace(0, w, chunks + 1).astype(np.int64)
    out = np.array(positions, np.int32, copy=True)
    for i, pos in enumerate(batch_positions):
        skips = np.sort(np.random.default_rng([seed, step, int(pos)]).integers(0, span - w + 1, chunks - 1))
        for j in range(1, chunks):
            out[i, bounds[j]:bounds[j + 1]] += int(skips[j - 1])
    return out


def order(num_chunks: int, seed: int):
    """Grain's random-access order of chunk ids: epoch after epoch, each a seeded permutation."""
    import grain

    return grain.MapDataset.range(num_chunks).shuffle(seed=seed).repeat()


def step_rows(num_chunks: int, seed: int, step: int, batch: int, positions: Sequence[int] | None = None,
              ids=None) -> np.ndarray:
    """int64[len(positions)]: the chunk ids at ``positions`` (default all ``B``) of step ``step``'s
    batch. ``ids``: :func:`order` of these chunks and seed, when the caller holds one."""
    positions = np.arange(batch) if positions is None else np.asarray(positions)
    if positions.size and not (0 <= positions.min() and positions.max() < batch):
        raise TrainDataError(f"positions: expected batch positions in [0, {batch}), got {positions.tolist()}")
    ids = order(num_chunks, seed) if ids is None else ids
    return np.array([ids[step * batch + int(i)] for i in positions], np.int64)


def batches(rows, *, batch: int, seed: int, start: int, stop: int, positions: Sequence[int] | None = None,
            transform=None, prefetch: int = 2):
    """Grain iterator over steps ``start..stop-1``: the rows at ``positions`` (default all) of each
    step's batch from an index (:func:`chunk_index`'s array, or a mapping of arrays like
    :func:`pack_index`'s), as ``{name: int32[len(positions), L]}`` (``transform(step, rows)``
    applied, e.g. positional skips), read ahead by a worker thread (``prefetch`` batches)."""
    import grain

    rows = {"tokens": rows} if not isinstance(rows, Mapping) else rows
    n = len(rows["tokens"])
    if n == 0:
        raise TrainDataError("data: no row of seq_len tokens (too few or too short documents)")
    ids = order(n, seed)

    def read(t):
        at = step_rows(n, seed, t, batch, positions, ids)
        out = {k: np.asarray(v[at], np.int32) for k, v in rows.items()}
        return out if transform is None else transform(t, out)

    ds = grain.MapDataset.range(start, stop).map(read)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
