"""Zigzag (dual-chunk) token order: load balance for causal attention over a sequence axis.

A row of L tokens is cut into 2n chunks; device i holds chunks i and 2n - 1 - i, so every device
has one early and one late chunk and the causal work per ring step is even. Applied once where
the batch is made, to tokens, targets, positions, segment ids and weights alike (the model masks
by position, so nothing else changes); :func:`restore` is the exact inverse for outputs.

    order(16, 2) -> [0 1 2 3 12 13 14 15 | 4 5 6 7 8 9 10 11]
"""

from __future__ import annotations

import numpy as np


def order(length: int, n: int) -> np.ndarray:
    """int32[L]: the original index of each position in zigzag order over ``n`` devices."""
    if length % (2 * n):
        raise ValueError(f"zigzag: the length ({length}) must be divisible by 2 x the sequence axis ({2 * n})")
    c = length // (2 * n)
    chunks = np.arange(length, dtype=np.int32).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]]) for i in range(n)])


def apply(x, n: int, axis: int = 1):
    """``x`` (numpy or jax) reordered along ``axis`` (the sequence) into zigzag order."""
    return x.take(order(x.shape[axis], n), axis=axis)


def restore(x, n: int, axis: int = 1):
    """The inverse of :func:`apply`: zigzag order back to the original."""
    return x.take(np.argsort(order(x.shape[axis], n)), axis=axis)
