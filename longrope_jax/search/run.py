"""The search over loaded params: a search set up (``setup.setup_search``) on windows, its
baselines scored, then the evolution (``evolve.evolve``). Weights fine-tuned in memory are searched
as they are; the job (``jobs/search.py``) adds paths, files, plots and resumption.

Over several processes process 0 runs the search (reads and writes the log, decides each
generation) inside :func:`leading`; the others :func:`follow`, scoring their share of what it sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from longrope_jax import parallel
from longrope_jax.search import evolve as evolve_lib
from longrope_jax.search import fitness as fitness_lib
from longrope_jax.search.genome import SearchError
from longrope_jax.search.settings import SearchSettings


@dataclasses.dataclass
class Searched:
    fitness: fitness_lib.PerplexityFitness  # candidates -> factors documents (``fitness.document``)
    baselines: dict[str, dict]  # name -> {"ppl", "nll", "nll_per_window"}
    result: evolve_lib.EvolveResult


def make_fitness(params, cfg, tokens, setup: Mapping[str, Any], *, weights=None, memory_budget: int | None = None,
                 attention: str = "auto", q_chunk: int | None = None, loss_chunk: int = 1024, mesh=None
                 ) -> fitness_lib.PerplexityFitness:
    """The fitness of a search set up on windows ``tokens: int32[S, L]`` (``weights``:
    float32[S, L - 1] per prediction, the needle fitness; None: every prediction) on ``mesh``
    (``parallel.build``; None: the local devices)."""
    return fitness_lib.PerplexityFitness(params, cfg, tokens, setup["space"], original_max=setup["switch"],
                                         base_factors=setup["base"], template=setup["template"], slot=setup["slot"],
                                         weights=weights, memory_budget=memory_budget, attention=attention,
                                         q_chunk=q_chunk, loss_chunk=loss_chunk, mesh=mesh)


def search_factors(fit: fitness_lib.PerplexityFitness, setup: Mapping[str, Any], settings: SearchSettings, *,
                   seed: int = 0, log_path: str | None = None, context: Mapping[str, Any] | None = None,
                   known_baselines: Mapping[str, dict] | None = None,
                   on_baseline: Callable[[str, dict, float], None] | None = None,
                   on_baselines: Callable[[dict], None] | None = None,
                   on_generation: Callable[[dict, evolve_lib.EvolveResult], None] | None = None,
                   max_evals: int | None = None, time_budget: float | None = None, progress: bool = False,
                   log: Callable[[str], None] | None = None) -> Searched:
    """Scores the setup's baselines (``known_baselines`` are taken, not rescored; ``on_baseline``
    sees each one scored), then evolves from the setup's seeds.

    Every baseline goes through the fitness, so a candidate with a baseline's exact spec takes its
    score. ``on_baselines(baselines)``: once all are known, before the evolution;
    ``on_generation(baselines, result)``: after each generation. ``log_path``: the
    evolution's JSONL log (resumed when it exists; None: in memory).
    """
    t0 = time.monotonic()
    baselines = fitness_lib.score_named(fit, setup["baselines"], done=dict(known_baselines or {}),
                                        on_scored=on_baseline)
    if on_baselines is not None:
        on_baselines(baselines)
    left = None if time_budget is None else time_budget - (time.monotonic() - t0)
    res = evolve_lib.evolve(setup["space"], setup["seeds"], fit, settings, seed=seed, log_path=log_path,
                            context=context, max_evals=max_evals, time_budget=left, progress=progress,
                            on_generation=None if on_generation is None else (lambda r: on_generation(baselines, r)),
                            log=log)
    return Searched(fit, baselines, res)


@contextlib.contextmanager
def leading(fit: fitness_lib.PerplexityFitness):
    """Process 0 of several: every scoring call of ``fit`` is first sent to the other processes
    (:func:`follow`), which score their share with it; on leaving, they are told the search is
    done, or the error that ended it (so every process fails with the same line). One process:
    nothing changes."""
    if jax.process_count() == 1:
        yield fit
        return
    fit.channel = lambda specs: parallel.broadcast(("score", [jax.tree.map(np.asarray, sp) for sp in specs]))
    try:
        yield fit
    except BaseException as e:
        parallel.broadcast(("error", str(e) if isinstance(e, ValueError) else f"process 0: {type(e).__name__}: {e}"))
        raise
    else:
        parallel.broadcast(("done", None))
    finally:
        fit.channel = None


def follow(fit: fitness_lib.PerplexityFitness) -> None:
    """The other processes of a search: score what process 0 sends (:func:`leading`) until it is
    done; its error is raised here too."""
    while True:
        kind, value = parallel.broadcast()
        if kind == "score":
            fit.score_specs(value)
        elif kind == "done":
            return
        else:
            raise SearchError(value)
