"""The LongRoPE evolutionary search over per-pair rescale factors and start tokens.

    genome     candidates on the factor grid, the search space, history keys
    operators  mutation, crossover, the range and monotone constraints
    evolve     the loop: generations, JSONL log, resume, budgets, progress
    settings   the paper's defaults, validation, config-file resolution
    fitness    perplexity of candidates through the vectorised evaluator; baselines
    plots      PNGs of the search
    job        ``run_search``: the ``longrope-jax search`` command
"""

from longrope_jax.search import evolve  # the module (its loop: evolve.evolve)
from longrope_jax.search.evolve import EvolveResult
from longrope_jax.search.genome import Candidate, SearchError, Space, from_factors, space_for
from longrope_jax.search.operators import check, crossover, is_valid, mutate
from longrope_jax.search.settings import SearchSettings


def run_search(*args, **kwargs):
    """See :func:`longrope_jax.search.job.run_search` (imported lazily: it pulls in JAX)."""
    from longrope_jax.search.job import run_search as run

    return run(*args, **kwargs)


__all__ = ["Candidate", "EvolveResult", "SearchError", "SearchSettings", "Space", "check", "crossover", "evolve",
           "from_factors", "is_valid", "mutate", "run_search", "space_for"]
