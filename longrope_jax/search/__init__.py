"""The LongRoPE evolutionary search over per-pair rescale factors and start tokens.

    genome     candidates on the factor grid, the search space, history keys
    operators  mutation, crossover, the range and monotone constraints
    evolve     the loop: generations, JSONL log, resume, budgets, progress
    settings   the paper's defaults, validation, config-file resolution
    setup      a search's space, seeds and baselines from the model and loaded factors
    fitness    perplexity of candidates through the vectorised evaluator; baselines
    run        a search over params in memory (``search_factors``)
    plots      PNGs of the search

The ``longrope-jax search`` command (paths, files, resumption) is ``longrope_jax.jobs.search``.
"""

from longrope_jax.search import evolve  # the module (its loop: evolve.evolve)
from longrope_jax.search.evolve import EvolveResult
from longrope_jax.search.genome import Candidate, SearchError, Space, from_factors, space_for
from longrope_jax.search.operators import check, crossover, is_valid, mutate
from longrope_jax.search.settings import SearchSettings

__all__ = ["Candidate", "EvolveResult", "SearchError", "SearchSettings", "Space", "check", "crossover", "evolve",
           "from_factors", "is_valid", "mutate", "space_for"]
