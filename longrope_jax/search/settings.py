"""The search's settings: the paper's defaults, validation, and config-file resolution.

``SearchSettings`` holds the algorithm's knobs with the LongRoPE paper's values (REFERENCE.md
section 2); ``configs/search/default.py`` writes the same values out (a test keeps the two
equal). :func:`resolve` merges, in order of precedence: command-line flags, ``--config.key=value``
overrides, a ``--config`` file, and these defaults.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

from longrope_jax import parallel
from longrope_jax.search.genome import FACTOR_RANGES, PAPER_START_TOKENS, SearchError


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

    population: int = 64
    iterations: int = 40
    mutations: int = 16
    crossovers: int = 16
    parents: int = 32
    mutation_prob: float = 0.3
    crossover_prob: float = 0.3
    crossover_tries: int = 20
    mutation_tries: int = 1000
    step: float = 0.01
    factor_range: str = "paper"
    start_tokens: tuple[int, ...] = PAPER_START_TOKENS
    start_token_prob: float = 0.3
    seed_factors: tuple[str, ...] = ()
    mode: str = "longrope"
    critical_range: tuple[int, ...] = ()
    fitness: str = "ppl"
    needles: int = 4
    attention_factor_range: tuple[float, ...] = ()
    attention_factor_step: float = 0.01

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


# Job knobs (not the algorithm's): defaults of ``longrope-jax search``. samples = 5 is the paper's
# number of validation documents.
JOB_DEFAULTS: dict[str, Any] = dict(
    model=None, data=None, target_length=None, out=None, samples=5, seed=0, field="text", tokenizer=None,
    param_dtype="float32", no_sliding_window=False, attention="auto", q_chunk=None, loss_chunk=1024,
    memory_budget_gib=None, max_evals=None, time_budget=None, base_factors=None, readjust=None,
    **parallel.SETTINGS,
)
REQUIRED = ("model", "data", "target_length", "out")
JOB_KINDS = dict(model="str", data="strs", target_length="int", out="str", samples="int", seed="int0", field="str",
                 tokenizer="str?", param_dtype="float32|bfloat16", no_sliding_window="bool",
                 attention="auto|dense|blockwise|ring|ring_splash", q_chunk="int?", loss_chunk="int", memory_budget_gib="number?",
                 max_evals="int?", time_budget="number?", base_factors="str?", readjust="str?",
                 **parallel.SETTINGS_KINDS)
# Values that mean "unset" in a config file (ml_collections fields keep one type).
_UNSET_IF_FALSY = ("tokenizer", "q_chunk", "memory_budget_gib", "max_evals", "time_budget", "base_factors",
                   "readjust", "mesh")


def defaults() -> dict:
    """Every key ``longrope-jax search`` knows, with its default."""
    return {**JOB_DEFAULTS, **SearchSettings().to_dict()}


def resolve(config_path: str | None = None, overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
            ) -> dict:
    """Settings of one search: ``flags`` (None / False: not given) over ``--config.key=value``
    ``overrides`` over the ``config_path`` file over :func:`defaults` (``config_files.merge``,
    shared with every command).

    Returns the keyword arguments of :func:`longrope_jax.jobs.search.run` (the algorithm's knobs
    gathered into ``settings``). Unknown config keys and missing required values are errors.
    """
    from longrope_jax import config_files

    s = config_files.merge(defaults(), JOB_KINDS, config_path=config_path, overrides=overrides, flags=flags,
                           required=REQUIRED, listy=("data",), unset_if_falsy=_UNSET_IF_FALSY)
    algo = SearchSettings.from_mapping(s)
    job = {k: s[k] for k in JOB_DEFAULTS}
    job["settings"] = algo
    job["sliding_window"] = not job.pop("no_sliding_window")
    gib = job.pop("memory_budget_gib")
    job["memory_budget"] = int(gib * 2**30) if gib else None
    return job
