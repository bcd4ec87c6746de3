"""Candidates of the LongRoPE search: per-pair factors on a step grid, plus a start-token count.

A factor is stored as an integer ``k`` on a grid anchored at zero, ``lambda = k * step`` (so
``1.0`` is ``k = 100`` at step 0.01): equality, history keys and the monotone constraint are then
exact integer comparisons, and every value written to a file is ``round(k * step, 10)``, which
reads back to the same ``k``.

The search space (:class:`Space`) holds an inclusive grid range per pair (``lo[i] <= k_i <=
hi[i]``; LongRoPE2-style searches can narrow or pin single dims) and the allowed start-token
values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from longrope_jax import config_files

# The paper's settings (configs/search/default.py, where every default of the search is stated).
PAPER = config_files.defaults("search")
# Factor ranges by name: upper bound as a function of the scale s (lower bound 1.0).
FACTOR_RANGES = {
    "paper": lambda s: 1.25 * s,  # the paper: [1, 1.25 s]
    "official": lambda s: 1.0 + s,  # the official code: [1, 1 + s]
}


class SearchError(ValueError):
    """A malformed search input (settings, seed factors, log); the message names the source."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One point of the search space.

    grid: int[P] factor grid indices (``lambda_i = grid[i] * step``), non-decreasing when valid.
    start_tokens: ``n_hat``, positions below it keep the unscaled angles.
    """

    grid: tuple[int, ...]
    start_tokens: int = 0
    critical_dim: int | None = None  # LongRoPE2 mode: pairs below it follow from it (see Space)
    attention: int | None = None  # the attention-factor gene's grid index (Space.attention), or None

    @property
    def key(self) -> str:
        """The history key: identical for identical vectors, distinct otherwise."""
        key = f"{self.start_tokens}|" + ",".join(map(str, self.grid))
        key = key if self.critical_dim is None else f"{key}|c{self.critical_dim}"
        return key if self.attention is None else f"{key}|a{self.attention}"


@dataclasses.dataclass(frozen=True)
class Space:
    """Where candidates live.

    lo, hi: int[P] inclusive grid bounds per pair.
    step: grid step of the factors (the paper's 0.01).
    start_tokens: allowed ``n_hat`` values (one value: start tokens are not searched).
    critical: LongRoPE2 mode: the inclusive range ``(lo, hi)`` of the critical-dimension gene
      ``c``; pairs ``i >= c`` are searched on the grid, pairs below follow NTK-style from pair
      ``c``: ``lambda_i = lambda_c ** (i / c)``. Their grid entries are kept equal to pair ``c``'s
      (the canonical form), so equal factor vectors have equal keys. None: every pair is searched.
    attention: the attention-factor gene: the inclusive grid range ``(lo, hi)`` of the cos/sin
      multiplier, ``attention_factor = k * attention_step``. None: the paper's rule
      ``sqrt(1 + ln s / ln L_orig)``, not searched.
    """

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    step: float = 0.01
    start_tokens: tuple[int, ...] = (0,)
    critical: tuple[int, int] | None = None
    attention: tuple[int, int] | None = None
    attention_step: float = 0.01

    def __post_init__(self):
        if len(self.lo) != len(self.hi) or not self.lo:
            raise SearchError(f"search space: lo and hi need one bound per pair, got {len(self.lo)} and "
                              f"{len(self.hi)}")
        bad = [i for i, (a, b) in enumerate(zip(self.lo, self.hi)) if a > b]
        if bad:
            raise SearchError(f"search space: pair {bad[0]}: empty factor range "
                              f"[{self.value(self.lo[bad[0]])}, {self.value(self.hi[bad[0]])}]")
        if not (self.step > 0 and math.isfinite(self.step)):
            raise SearchError(f"search space: step: expected a positive number, got {self.step!r}")
        if not self.start_tokens or any(not isinstance(t, int) or t < 0 for t in self.start_tokens):
            raise SearchError(f"search space: start_tokens: expected integers >= 0, got {self.start_tokens!r}")
        if self.critical is not None:
            c = tuple(int(x) for x in self.critical)
            if len(c) != 2 or not (1 <= c[0] <= c[1] <= len(self.lo) - 1):
                raise SearchError(f"search space: critical_dim range: expected 1 <= lo <= hi <= "
                                  f"{len(self.lo) - 1} (pairs - 1), got {self.critical!r}")
            object.__setattr__(self, "critical", c)
        if self.attention is not None:
            a = tuple(int(x) for x in self.attention)
            if len(a) != 2 or not 1 <= a[0] <= a[1] or not (self.attention_step > 0 and math.isfinite(self.attention_step)):
                raise SearchError(f"search space: attention factor range: expected 0 < lo <= hi on a positive step, "
                                  f"got {self.attention!r} x {self.attention_step!r}")
            object.__setattr__(self, "attention", a)

    def attention_factor(self, c: Candidate) -> float | None:
        """The candidate's attention factor (None: the paper's default rule)."""
        return None if c.attention is None else float(np.round(c.attention * self.attention_step, 10))

    @property
    def num_pairs(self) -> int:
        return len(self.lo)

    def value(self, k) -> float | np.ndarray:
        """Grid index (or indices) -> factor value(s), rounded to 10 decimals."""
        v = np.round(np.asarray(k, np.float64) * self.step, 10)
        return float(v) if v.ndim == 0 else v

    def factors(self, c: Candidate) -> np.ndarray:
        """The candidate's factors: float64[P] (LongRoPE2 mode: pairs below the critical
        dimension ``c`` are ``lambda_c ** (i / c)``, rounded to 10 decimals)."""
        v = self.value(c.grid)
        if c.critical_dim is not None:
            k = int(c.critical_dim)
            v[:k] = np.round(v[k] ** (np.arange(k) / k), 10)
        return v

    def canonical(self, c: Candidate) -> Candidate:
        """``c`` with the grid entries below its critical dimension set to the critical pair's
        (no-op outside LongRoPE2 mode)."""
        if c.critical_dim is None:
            return c
        g = list(c.grid)
        k = int(c.critical_dim)
        g[:k] = [g[k]] * k
        return Candidate(tuple(g), c.start_tokens, k, c.attention)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) factor bounds per pair: float64[P] each."""
        return self.value(self.lo), self.value(self.hi)

    def describe(self) -> dict:
        """A JSON-able description (used in the log header and the summary)."""
        lo, hi = self.bounds()
        d = {"step": self.step, "factor_min": lo.tolist(), "factor_max": hi.tolist(),
             "start_tokens": list(self.start_tokens)}
        if self.critical is not None:
            d["critical_dim"] = list(self.critical)
        if self.attention is not None:
            d["attention_factor"] = [round(k * self.attention_step, 10) for k in self.attention]
            d["attention_step"] = self.attention_step
        return d

    def with_attention_gene(self, factor_range, step: float) -> "Space":
        """This space with the attention-factor gene over ``[lo, hi]`` (values, snapped inwards
        onto the ``step`` grid)."""
        lo, hi = (float(x) for x in factor_range)
        return dataclasses.replace(self, attention=(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)),
                                   attention_step=float(step))

    def attention_index(self, value: float) -> int:
        """An attention factor -> its grid index, clipped into the gene's range."""
        lo, hi = self.attention
        return int(min(max(round(float(value) / self.attention_step), lo), hi))


def space_for(num_pairs: int, scale: float, *, step: float = PAPER.step, factor_range: str = PAPER.factor_range,
              start_tokens: Sequence[int] = tuple(PAPER.start_tokens)) -> Space:
    """The search space for ``num_pairs`` factors at scale ``s = target / original window``.

    ``factor_range``: ``"paper"`` ([1, 1.25 s]) or ``"official"`` ([1, 1 + s]), the same for every
    pair. Bounds are snapped inwards onto the grid.
    """
    if factor_range not in FACTOR_RANGES:
        raise SearchError(f"factor_range: expected one of {sorted(FACTOR_RANGES)}, got {factor_range!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 1):
        raise SearchError(f"scale: expected a number > 1 (target length over the original window), got {scale!r}")
    if not (isinstance(step, (int, float)) and math.isfinite(step) and step > 0):
        raise SearchError(f"step: expected a positive number, got {step!r}")
    lo = math.ceil(1.0 / step - 1e-9)
    hi = math.floor(FACTOR_RANGES[factor_range](scale) / step + 1e-9)
    return Space((lo,) * num_pairs, (hi,) * num_pairs, float(step), tuple(int(t) for t in start_tokens))


def theoretical_critical_dim(rotary_dim: int, theta: float, train_length: int) -> int:
    """LongRoPE2's theoretical critical dimension ``ceil((d/2) log_base(L_train / 2 pi))``: the
    first pair whose period exceeds the training length (a pair index in [0, d/2])."""
    return int(math.ceil((rotary_dim / 2) * math.log(train_length / (2 * math.pi)) / math.log(theta)))


def longrope2_space_for(num_pairs: int, scale: float, critical: tuple[int, int], *, step: float = PAPER.step,
                        start_tokens: Sequence[int] = (0,)) -> Space:
    """LongRoPE2 mode: pairs at or above the critical dimension in ``[s, 2 s]``, the critical
    dimension itself a gene in ``critical`` (inclusive)."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 1):
        raise SearchError(f"scale: expected a number > 1 (target length over the original window), got {scale!r}")
    lo = math.ceil(scale / step - 1e-9)
    hi = math.floor(2 * scale / step + 1e-9)
    return Space((lo,) * num_pairs, (hi,) * num_pairs, float(step), tuple(int(t) for t in start_tokens),
                 tuple(int(x) for x in critical))


def to_grid(values, space: Space) -> np.ndarray:
    """Factor values -> nearest grid indices: int64[P] (not clipped)."""
    return np.rint(np.asarray(values, np.float64) / space.step).astype(np.int64)


def from_factors(values, space: Space, start_tokens: int | None = None, *, clip: bool = True,
                 source: str = "factors") -> Candidate:
    """A candidate from factor values: rounded onto the grid (clipped into range when ``clip``).

    Raises SearchError naming ``source`` and the pair when the values are not ``P`` finite
    numbers, not non-decreasing after rounding, or (``clip=False``) outside the range; a start
    token count outside the space's set is an error as well.
    """
    try:
        arr = np.asarray(values, np.float64)
    except (TypeError, ValueError):
        raise SearchError(f"{source}: expected {space.num_pairs} factors, got {values!r:.80}") from None
    if arr.ndim != 1 or arr.shape[0] != space.num_pairs:
        raise SearchError(f"{source}: expected {space.num_pairs} factors (rotary_dim / 2), got "
                          f"{arr.shape[0] if arr.ndim == 1 else 'shape ' + str(arr.shape)}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise SearchError(f"{source}: pair {int(bad[0])}: expected a finite factor, got {arr[bad[0]]!r}")
    k = to_grid(arr, space)
    lo, hi = np.asarray(space.lo), np.asarray(space.hi)
    if clip:
        k = np.clip(k, lo, hi)
    else:
        out = np.flatnonzero((k < lo) | (k > hi))
        if out.size:
            i = int(out[0])
            raise SearchError(f"{source}: pair {i}: factor {arr[i]:g} is outside the search range "
                              f"[{space.value(lo[i]):g}, {space.value(hi[i]):g}]")
    down = np.flatnonzero(np.diff(k) < 0)
    if down.size:
        i = int(down[0])
        raise SearchError(f"{source}: pair {i + 1}: factors must be non-decreasing, got {arr[i]:g} then "
                          f"{arr[i + 1]:g}")
    n = (0 if 0 in space.start_tokens else min(space.start_tokens)) if start_tokens is None else start_tokens
    if n not in space.start_tokens:
        raise SearchError(f"{source}: start_tokens: {n!r} is not in the search set {list(space.start_tokens)}")
    return Candidate(tuple(int(x) for x in k), int(n))


def from_record(record: dict, space: Space) -> Candidate:
    """The candidate of a log record (``factors``, ``start_tokens``, ``critical_dim``,
    ``attention_factor``), exactly as logged."""
    grid = to_grid(record["factors"], space)
    crit = record.get("critical_dim")
    if crit is not None:
        grid[:int(crit)] = grid[int(crit)]
    af = record.get("attention_factor")
    att = None if af is None else int(round(float(af) / space.attention_step))
    return Candidate(tuple(int(x) for x in grid), int(record["start_tokens"]), None if crit is None else int(crit), att)


def critical_from_factors(values, space: Space, critical_dim: int, start_tokens: int | None = None, *,
                          source: str = "factors") -> Candidate:
    """A LongRoPE2 candidate: the pairs from ``critical_dim`` up taken from ``values`` (rounded,
    clipped into ``[s, 2 s]``, made non-decreasing), the ones below derived."""
    arr = np.asarray(values, np.float64)
    if arr.shape != (space.num_pairs,):
        raise SearchError(f"{source}: expected {space.num_pairs} factors, got shape {arr.shape}")
    k = np.clip(to_grid(arr, space), np.asarray(space.lo), np.asarray(space.hi))
    k = np.maximum.accumulate(k)
    n = (0 if 0 in space.start_tokens else min(space.start_tokens)) if start_tokens is None else start_tokens
    return space.canonical(Candidate(tuple(int(x) for x in k), int(n), int(critical_dim)))
