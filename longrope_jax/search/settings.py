"""The search's settings: the algorithm's knobs, their validation, and the command's resolution.

``SearchSettings`` holds the algorithm's knobs; their defaults, the LongRoPE paper's values, are
stated once, in ``configs/search/default.py``, with the job's. :func:`resolve` merges, in order
of precedence: command-line flags, ``--config.key=value`` overrides, a ``--config`` file, and
those defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from longrope_jax import config_files, parallel
from longrope_jax.config_files import MODEL_KINDS
from longrope_jax.search.genome import FACTOR_RANGES, PAPER as _PAPER, SearchError


MODES = ("longrope", "longrope2")
FITNESSES = ("ppl", "needle")
# Settings added after the first release of the log format: a log header leaves them out while
# they hold these defaults, so logs written before they existed still resume.
ADDED_LATER = {"mode": "longrope", "critical_range": [], "fitness": "ppl", "needles": 4,
               "attention_factor_range": [], "attention_factor_step": 0.01}


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The evolutionary search's knobs (defaults: the LongRoPE paper).

    population: candidates in the initial population (P).
    iterations: generations after the initial population (T).
    mutations / crossovers: new candidates per generation (N1 / N2).
    parents: the top-k of the population kept as parents each generation.
    mutation_prob: per-pair probability of a redraw in a mutation; the crossover takes each pair
      from the second parent with half of ``crossover_prob``.
    crossover_tries: tries for a new valid crossover child before mutating the first parent.
    mutation_tries: draws for a new mutated vector before giving up on that child.
    step: the factor grid step.
    factor_range: ``paper`` ([1, 1.25 s]) or ``official`` ([1, 1 + s]).
    start_tokens: the ``n_hat`` search set (one value: not searched).
    start_token_prob: probability that a mutation moves ``n_hat`` to another value of the set.
    seed_factors: factors files (longrope-factors/1) added to the initial population after PI,
      NTK and YaRN (their long factors, rounded onto the grid; they must lie in the range and be
      non-decreasing).
    mode: ``longrope`` (every pair searched in the factor range) or ``longrope2`` (LongRoPE2's
      critical-dimension search: pairs from the critical dimension up in ``[s, 2 s]``, the ones
      below NTK-style from it, the critical dimension a gene).
    critical_range: LongRoPE2 mode: ``[lo, hi]`` of the critical-dimension gene; empty: from a
      quarter of the pairs below the theoretical critical dimension up to it (LongRoPE2 found the
      real one lower than the theory's).
    fitness: ``ppl`` (perplexity over every token of the windows) or ``needle`` (LongRoPE2's
      needle-driven perplexity: only the answer tokens of ``needles`` numbers planted at random
      depths in each window, asked for at its end).
    needles: needles per window for the ``needle`` fitness.
    attention_factor_range: ``[lo, hi]``: search the attention factor (the cos/sin multiplier) as a
      gene on that range; empty (the default): the paper's rule ``sqrt(1 + ln s / ln L_orig)``.
      Seeds start at the paper's value (YaRN's seed also at YaRN's ``0.1 ln s + 1``); it mutates
      and crosses over like a pair, is logged with each candidate and written to the factors file
      (HF's ``attention_factor``).
    attention_factor_step: the grid step of that gene.
    """

    population: int = _PAPER.population
    iterations: int = _PAPER.iterations
    mutations: int = _PAPER.mutations
    crossovers: int = _PAPER.crossovers
    parents: int = _PAPER.parents
    mutation_prob: float = _PAPER.mutation_prob
    crossover_prob: float = _PAPER.crossover_prob
    crossover_tries: int = _PAPER.crossover_tries
    mutation_tries: int = _PAPER.mutation_tries
    step: float = _PAPER.step
    factor_range: str = _PAPER.factor_range
    start_tokens: tuple[int, ...] = tuple(_PAPER.start_tokens)
    start_token_prob: float = _PAPER.start_token_prob
    seed_factors: tuple[str, ...] = tuple(_PAPER.seed_factors)
    mode: str = _PAPER.mode
    critical_range: tuple[int, ...] = tuple(_PAPER.critical_range)
    fitness: str = _PAPER.fitness
    needles: int = _PAPER.needles
    attention_factor_range: tuple[float, ...] = tuple(_PAPER.attention_factor_range)
    attention_factor_step: float = _PAPER.attention_factor_step

    def __post_init__(self):
        for name in ("start_tokens", "seed_factors", "critical_range", "attention_factor_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def validate(self) -> "SearchSettings":
        def integer(name, lo):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise SearchError(f"{name}: expected an integer >= {lo}, got {v!r}")

        def prob(name):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (0.0 <= v <= 1.0):
                raise SearchError(f"{name}: expected a probability in [0, 1], got {v!r}")

        for name, lo in (("population", 1), ("iterations", 0), ("mutations", 0), ("crossovers", 0),
                         ("parents", 1), ("crossover_tries", 1), ("mutation_tries", 1)):
            integer(name, lo)
        if self.parents > self.population:
            raise SearchError(f"parents: expected at most population ({self.population}), got {self.parents}")
        for name in ("mutation_prob", "crossover_prob", "start_token_prob"):
            prob(name)
        if not isinstance(self.step, (int, float)) or not (math.isfinite(self.step) and self.step > 0):
            raise SearchError(f"step: expected a positive number, got {self.step!r}")
        if self.factor_range not in FACTOR_RANGES:
            raise SearchError(f"factor_range: expected one of {sorted(FACTOR_RANGES)}, got {self.factor_range!r}")
        st = self.start_tokens
        if not st or any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in st) or len(set(st)) != len(st):
            raise SearchError(f"start_tokens: expected distinct integers >= 0, got {list(st)!r}")
        if any(not isinstance(p, str) or not p for p in self.seed_factors):
            raise SearchError(f"seed_factors: expected a list of factors file paths, got {list(self.seed_factors)!r}")
        if self.mode not in MODES:
            raise SearchError(f"mode: expected one of {list(MODES)}, got {self.mode!r}")
        cr = self.critical_range
        if cr and (len(cr) != 2 or any(not isinstance(x, int) or isinstance(x, bool) or x < 1 for x in cr)
                   or cr[0] > cr[1]):
            raise SearchError(f"critical_range: expected [] (automatic) or [lo, hi] with 1 <= lo <= hi, got {list(cr)!r}")
        if self.fitness not in FITNESSES:
            raise SearchError(f"fitness: expected one of {list(FITNESSES)}, got {self.fitness!r}")
        integer("needles", 1)
        ar = self.attention_factor_range
        if ar and (len(ar) != 2 or any(not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x)
                                       or x <= 0 for x in ar) or ar[0] > ar[1]):
            raise SearchError(f"attention_factor_range: expected [] (the paper's rule) or [lo, hi] with 0 < lo <= hi, "
                              f"got {list(ar)!r}")
        st = self.attention_factor_step
        if not isinstance(st, (int, float)) or isinstance(st, bool) or not (math.isfinite(st) and st > 0):
            raise SearchError(f"attention_factor_step: expected a positive number, got {st!r}")
        if ar and math.floor(ar[1] / st + 1e-9) < math.ceil(ar[0] / st - 1e-9):
            raise SearchError(f"attention_factor_range: {list(ar)} holds no point of the step-{st} grid")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["start_tokens"] = list(self.start_tokens)
        d["seed_factors"] = list(self.seed_factors)
        d["critical_range"] = list(self.critical_range)
        d["attention_factor_range"] = list(self.attention_factor_range)
        return d

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> "SearchSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in m.items() if k in names}).validate()


# What each job setting of ``longrope-jax search`` must hold (the algorithm's: ``validate``).
JOB_KINDS = dict(**MODEL_KINDS, data="strs", target_length="int", out="str", samples="int", seed="int0",
                 field="str", attention="auto|dense|blockwise|ring|ring_splash", q_chunk="int?", loss_chunk="int",
                 memory_budget_gib="number?", max_evals="int?", time_budget="number?", base_factors="str?",
                 readjust="str?", **parallel.SETTINGS_KINDS)
REQUIRED = ("model", "data", "target_length", "out")
ALGORITHM = tuple(f.name for f in dataclasses.fields(SearchSettings))


def job_settings(s: Mapping[str, Any]) -> dict:
    """Resolved settings ``s`` as the keyword arguments of :func:`longrope_jax.jobs.search.run`
    (the algorithm's knobs gathered into ``settings``)."""
    job = {k: s[k] for k in s if k not in ALGORITHM}
    job["settings"] = SearchSettings.from_mapping(s)
    job["sliding_window"] = not job.pop("no_sliding_window")
    gib = job.pop("memory_budget_gib")
    job["memory_budget"] = int(gib * 2**30) if gib else None
    return job


def resolve(config: str | None = None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
            ) -> dict:
    """Settings of one search: ``flags`` (None / False: not given) over ``--config.key=value``
    ``overrides`` over the ``config`` file over the defaults (``config_files.resolve``, shared
    with every command), as :func:`job_settings`. Unknown config keys and missing required values
    are errors."""
    return job_settings(config_files.resolve("search", JOB_KINDS, config=config, overrides=overrides, flags=flags,
                                             required=REQUIRED, listy=("data",)))


def section(given: Mapping[str, Any], where: str) -> dict:
    """A ``search`` section in memory (a pipeline stage's), merged onto the defaults and checked."""
    return job_settings(config_files.section("search", JOB_KINDS, given, where, listy=("data",)))
