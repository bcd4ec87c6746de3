"""Mutation, crossover and the constraints every candidate satisfies before it is evaluated.

Pure functions of ``(candidates, space, rng, seen)``; ``seen`` is the set of history keys (every
vector already scored or already proposed this generation), so an operator only ever returns a
new vector. The operators follow the official LongRoPE search code (docs/method.md):

- mutation: each pair with probability ``prob`` is redrawn uniformly on the grid between its
  neighbours' current values (the first pair down to its lower bound, the last up to its upper
  bound), so the vector stays monotone; the start-token count moves to another value of its set
  with probability ``start_prob``; redrawn (from the parent) until the vector is new.
- crossover: the child starts as parent A; each pair takes parent B's value with probability
  ``prob * 0.5``, the start-token count is either parent's; up to ``tries`` tries for a new valid
  child, else ``None`` (the caller then mutates A).
"""

from __future__ import annotations

import numpy as np

from longrope_jax.search.genome import Candidate, SearchError, Space


def violation(c: Candidate, space: Space) -> str | None:
    """Why ``c`` is not a valid candidate of ``space`` (None when it is)."""
    g = np.asarray(c.grid, np.int64)
    if g.shape != (space.num_pairs,):
        return f"expected {space.num_pairs} factors, got {g.shape[0] if g.ndim == 1 else g.shape}"
    out = np.flatnonzero((g < np.asarray(space.lo)) | (g > np.asarray(space.hi)))
    if out.size:
        i = int(out[0])
        return (f"pair {i}: factor {space.value(g[i]):g} outside [{space.value(space.lo[i]):g}, "
                f"{space.value(space.hi[i]):g}]")
    down = np.flatnonzero(np.diff(g) < 0)
    if down.size:
        i = int(down[0])
        return f"pair {i + 1}: not non-decreasing ({space.value(g[i]):g} then {space.value(g[i + 1]):g})"
    if c.start_tokens not in space.start_tokens:
        return f"start_tokens {c.start_tokens} not in {list(space.start_tokens)}"
    if (space.critical is None) != (c.critical_dim is None):
        return ("a critical dimension outside LongRoPE2 mode" if space.critical is None
                else "no critical dimension in LongRoPE2 mode")
    if space.critical is not None:
        lo, hi = space.critical
        if not lo <= c.critical_dim <= hi:
            return f"critical_dim {c.critical_dim} outside [{lo}, {hi}]"
        if space.canonical(c) != c:
            return f"pairs below critical_dim {c.critical_dim} not in canonical form"
    if (space.attention is None) != (c.attention is None):
        return ("an attention factor gene outside its search" if space.attention is None
                else "no attention factor while the gene is searched")
    if space.attention is not None and not space.attention[0] <= c.attention <= space.attention[1]:
        lo, hi = (round(k * space.attention_step, 10) for k in space.attention)
        return f"attention factor {space.attention_factor(c):g} outside [{lo:g}, {hi:g}]"
    return None


def is_valid(c: Candidate, space: Space) -> bool:
    return violation(c, space) is None


def check(c: Candidate, space: Space) -> Candidate:
    """Returns ``c``; raises SearchError when it breaks the range or the monotone constraint."""
    why = violation(c, space)
    if why:
        raise SearchError(f"candidate {c.key}: {why}")
    return c


def _mutate_once(parent: Candidate, space: Space, rng: np.random.Generator, prob: float,
                 start_prob: float) -> Candidate:
    g = np.asarray(parent.grid, np.int64).copy()
    p = g.shape[0]
    first = parent.critical_dim or 0  # LongRoPE2 mode: pairs below the critical one are derived
    for i in range(first, p):
        if rng.random() < prob:
            lo = space.lo[i] if i == first else max(space.lo[i], int(g[i - 1]))
            hi = space.hi[i] if i == p - 1 else min(space.hi[i], int(g[i + 1]))
            g[i] = rng.integers(lo, hi + 1)
    n = parent.start_tokens
    if len(space.start_tokens) > 1 and rng.random() < start_prob:
        others = [t for t in space.start_tokens if t != n]
        n = others[int(rng.integers(len(others)))]
    crit = parent.critical_dim
    if space.critical is not None:
        if first:
            g[:first] = g[first]
        lo, hi = space.critical
        if hi > lo and rng.random() < prob:  # the critical dimension moves like a pair does
            crit = int(rng.choice([k for k in range(lo, hi + 1) if k != crit]))
    att = parent.attention
    if space.attention is not None:  # drawn only when searched: searches without it draw as before
        lo, hi = space.attention
        if hi > lo and rng.random() < prob:  # the attention factor moves like a pair does
            att = int(rng.choice([k for k in range(lo, hi + 1) if k != att]))
    return space.canonical(Candidate(tuple(int(x) for x in g), int(n), crit, att))


def mutate(parent: Candidate, space: Space, rng: np.random.Generator, seen, *, prob: float = 0.3,
           start_prob: float = 0.3, tries: int = 1000) -> Candidate | None:
    """A new valid candidate near ``parent`` (its key not in ``seen``), or None after ``tries``
    draws that all landed on known vectors (a nearly exhausted neighbourhood)."""
    for _ in range(tries):
        child = _mutate_once(parent, space, rng, prob, start_prob)
        if child.key not in seen:
            return child
    return None


def crossover(a: Candidate, b: Candidate, space: Space, rng: np.random.Generator, seen, *, prob: float = 0.3,
              tries: int = 20) -> Candidate | None:
    """A new valid child of ``a`` (the better parent) taking pairs from ``b``; None when the
    parents are equal or ``tries`` tries gave no new monotone vector."""
    if a == b:
        return None
    ga, gb = np.asarray(a.grid, np.int64), np.asarray(b.grid, np.int64)
    for _ in range(tries):
        take = rng.random(ga.shape[0]) < prob * 0.5
        g = np.where(take, gb, ga)
        n = b.start_tokens if rng.random() < 0.5 else a.start_tokens
        crit = att = None
        if space.critical is not None:  # LongRoPE2 mode: the critical dimension from either parent
            crit = b.critical_dim if rng.random() < 0.5 else a.critical_dim
        if space.attention is not None:  # the attention factor from either parent
            att = b.attention if rng.random() < 0.5 else a.attention
        child = space.canonical(Candidate(tuple(int(x) for x in g), int(n), crit, att))
        g = np.asarray(child.grid)
        if np.all(np.diff(g) >= 0) and child.key not in seen:
            return child
    return None
