"""Training data: documents tokenised once into an index of fixed-length chunks, and a Grain
pipeline whose batch of step t is a pure function of ``(seed, t)``.

The paper's recipe: each document as BOS + doc + EOS (either left out when the tokenizer has
none), all concatenated and cut into chunks of ``length`` tokens (the tail that does not fill a
chunk is dropped); documents shorter than ``min_document_tokens`` are left out (long stages
want long documents). The index is ``int32[N, length]``, written once (``.npy``) and read by
memory map.

Order (Levanter's approach, with Grain's index shuffle): the chunk ids ``0..N-1`` are shuffled
by ``grain.MapDataset.shuffle(seed)`` and repeated, a fresh permutation per epoch (each epoch
covers every chunk once). Step t's global batch is elements ``[t B, (t + 1) B)`` of that order;
a process reads only the batch positions its devices hold (``positions``). Nothing but the step
needs checkpointing, and a run resumed on another device or process count sees the same examples.
"""

from __future__ import annotations

from typing import Iterable, Sequence

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


def batches(chunks: np.ndarray, *, batch: int, seed: int, start: int, stop: int,
            positions: Sequence[int] | None = None, prefetch: int = 2):
    """Grain iterator over steps ``start..stop-1``: the rows at ``positions`` (default all) of
    each step's batch, ``int32[len(positions), L]``, read ahead by a worker thread (``prefetch``
    batches)."""
    import grain

    if len(chunks) == 0:
        raise TrainDataError("data: no chunk of seq_len tokens (too few or too short documents)")
    n = len(chunks)
    ids = order(n, seed)

    def read(t):
        return np.asarray(chunks[step_rows(n, seed, t, batch, positions, ids)], np.int32)

    ds = grain.MapDataset.range(start, stop).map(read)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=prefetch)))
