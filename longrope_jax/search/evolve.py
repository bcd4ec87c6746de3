"""The evolutionary loop: generations, the JSONL log, resume, budgets, progress.

The algorithm is deterministic given ``seed``: generation ``g`` draws from
``np.random.default_rng([seed, g])`` and its parents are the previous population sorted by
perplexity (a stable sort, ties in population order). So a search is a fixed sequence of
candidates, and its log is a prefix of that sequence:

- every evaluated candidate is appended to the log as one JSON line (flushed and fsynced);
- resuming replays the algorithm from generation 0, taking the logged score of each candidate
  instead of evaluating it (and checking that the log's candidates are the ones the replay
  proposes), then evaluates from the first unlogged one;
- so a search killed at any point (an exception, a budget, a signal) loses at most the batch in
  flight, and a resumed search ends exactly where an uninterrupted one does, with the same log.

Each generation's new candidates go to ``fitness`` in one call, or ``fitness.batch_size`` at a
time where it has one (the search's fitness: one candidate per device, each call logged; on one
device a progress line with the rate as each finishes); a vector already
scored is never proposed again. ``fitness(candidates)`` returns, per
candidate, a perplexity (lower is better) or a mapping with ``"ppl"`` and extra JSON-able fields
that are logged with it. Non-finite perplexities rank last (logged as null).

``max_evals`` counts every evaluation of the search, logged ones included (a resumed search with
the same flag stops at the same candidate); it may end the search inside a generation.
``time_budget`` is this call's wall-clock seconds, checked before each call to ``fitness``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from longrope_jax import runlog
from longrope_jax.search import operators
from longrope_jax.search.genome import Candidate, SearchError, Space, from_record
from longrope_jax.search.settings import ADDED_LATER, SearchSettings

LOG_FORMAT = "longrope-search-log/1"
ALGORITHM = "longrope-evolution/1"

Fitness = Callable[[Sequence[Candidate]], Sequence[Any]]


@dataclasses.dataclass
class Scored:
    candidate: Candidate
    ppl: float  # inf when the fitness was not finite
    record: dict  # the log record


@dataclasses.dataclass
class EvolveResult:
    best: Scored | None  # None when nothing was evaluated
    history: list[Scored]  # every evaluated candidate, in evaluation order
    generations: list[dict]  # per completed (or cut) generation: best so far, median, evaluations
    stopped: str  # "completed", "max_evals", "time_budget" or "interrupted"
    evaluations: int  # all evaluations of the search (logged ones included)
    new_evaluations: int  # evaluated by this call
    replayed: int  # taken from the log
    seconds: float


# --------------------------------------------------------------------------------------------
# The log.


class SearchLog(runlog.RunLog):
    """The search's log (``runlog.RunLog``): a header line, then one record per evaluated candidate."""

    def __init__(self, path: str | None, header: Mapping[str, Any]):
        super().__init__(path, header, is_record=lambda r: "factors" in r and "start_tokens" in r,
                         what="search", record_name="candidate record", error=SearchError)


def check_log(path: str, header: Mapping[str, Any]) -> None:
    """Raises SearchError when ``path`` holds the log of another search (checks the header only)."""
    runlog.check_file(path, header, "search", SearchError)


def make_header(space: Space, settings: SearchSettings, seed: int, seeds: Sequence[tuple[str, Candidate]],
                context: Mapping[str, Any] | None = None) -> dict:
    """The log's first line: everything that determines the sequence of candidates and scores."""
    s = settings.to_dict()
    s.pop("seed_factors", None)  # their values are in "seeds"
    s.pop("iterations", None)  # generation g never depends on it: a finished search can be extended
    for k, v in ADDED_LATER.items():  # logs from before these settings existed still resume
        if s.get(k) == v:
            s.pop(k)
    return {"format": LOG_FORMAT, "algorithm": ALGORITHM, "seed": seed, "settings": s,
            "space": space.describe(), "seeds": {name: c.key for name, c in seeds},
            "context": dict(context or {})}


# --------------------------------------------------------------------------------------------
# The loop.


class _Stop(Exception):
    def __init__(self, reason):
        self.reason = reason


def _ppl_of(value) -> tuple[float, dict]:
    extra = {}
    if isinstance(value, Mapping):
        extra = {k: v for k, v in value.items() if k != "ppl"}
        value = value["ppl"]
    v = float(value)
    return (v if math.isfinite(v) else math.inf), extra


def _rank(x: Scored) -> float:
    return x.ppl


def evolve(space: Space, seeds: Sequence[tuple[str, Candidate]], fitness: Fitness, settings: SearchSettings, *,
           seed: int = 0, log_path: str | None = None, context: Mapping[str, Any] | None = None,
           max_evals: int | None = None, time_budget: float | None = None, progress: bool = True,
           on_generation: Callable[[EvolveResult], None] | None = None, clock: Callable[[], float] = time.monotonic,
           log: Callable[[str], None] | None = None) -> EvolveResult:
    """Runs (or resumes) the search; returns the best candidate and the history.

    Args:
      space: the search space; every candidate is checked against it before evaluation.
      seeds: named initial candidates (PI, NTK, YaRN, ...); the rest of the initial population
        are mutations of them, in turn.
      fitness: scores a list of candidates (one call per generation, or per ``fitness.batch_size``).
      settings: the algorithm's knobs.
      seed: the search seed (generation g draws from ``default_rng([seed, g])``).
      log_path: the JSONL log (created, or resumed when it exists); None keeps it in memory.
      context: JSON-able facts of the fitness (model, windows, ...) written into the log header,
        so a log is only ever resumed by the same search.
      max_evals / time_budget: budgets (see the module docstring).
      on_generation: called with the result so far after each generation.
      clock: seconds, for the time budget.
    """
    settings.validate()
    log = log or (lambda msg: None)
    t0 = clock()
    wall0 = time.time()
    seeds = [(name, operators.check(c, space)) for name, c in seeds]
    if not seeds:
        raise SearchError("the search needs at least one seed candidate")
    journal = SearchLog(log_path, make_header(space, settings, seed, seeds, context))
    logged = list(journal.records)  # the replay's source (the journal's list grows as we append)
    if logged:
        log(f"resuming from {log_path}: {len(logged)} evaluation(s) logged")
    state = {"evals": 0, "new": 0, "replayed": 0}
    history: list[Scored] = []
    generations: list[dict] = []
    seen: set[str] = set()

    def result(stopped: str) -> EvolveResult:
        best = min(history, key=_rank) if history else None
        return EvolveResult(best, list(history), list(generations), stopped, state["evals"], state["new"],
                            state["replayed"], time.time() - wall0)

    def evaluate(batch: list[tuple[Candidate, dict]], generation: int) -> list[Scored]:
        """Scores a generation's candidates: logged ones from the log, the rest in one call."""
        out: list[Scored] = []
        i = 0
        while i < len(batch) and state["evals"] < len(logged):  # replay
            c, meta = batch[i]
            rec = logged[state["evals"]]
            got = from_record(rec, space)
            if got != c or rec.get("generation") != generation:
                raise SearchError(f"{log_path}: record {state['evals'] + 1}: expected candidate {c.key} of "
                                  f"generation {generation}, found {got.key} of generation "
                                  f"{rec.get('generation')}: the log was written by a different search")
            ppl = rec.get("ppl")
            out.append(Scored(c, math.inf if ppl is None else float(ppl), rec))
            state["evals"] += 1
            state["replayed"] += 1
            i += 1
        todo = batch[i:]
        if not todo:
            return out
        stop = None
        if max_evals is not None and state["evals"] + len(todo) > max_evals:
            todo, stop = todo[:max(0, max_evals - state["evals"])], "max_evals"
        if todo and time_budget is not None and clock() - t0 >= time_budget:
            todo, stop = [], "time_budget"
        step = getattr(fitness, "batch_size", None) or len(todo) or 1
        for j in range(0, len(todo), step):
            if j and time_budget is not None and clock() - t0 >= time_budget:
                stop = "time_budget"
                break
            part = todo[j:j + step]
            cands = [c for c, _ in part]
            t = time.monotonic()
            try:
                values = list(fitness(cands))
            except KeyboardInterrupt:
                history.extend(out)
                raise _Stop("interrupted") from None
            if len(values) != len(cands):
                raise SearchError(f"fitness returned {len(values)} values for {len(cands)} candidates")
            for (c, meta), v in zip(part, values):
                ppl, extra = _ppl_of(v)
                rec = {"eval": state["evals"], "generation": generation, **meta,
                       "start_tokens": c.start_tokens, "factors": space.factors(c).tolist(),
                       "ppl": ppl if math.isfinite(ppl) else None}
                if c.critical_dim is not None:
                    rec["critical_dim"] = c.critical_dim
                if c.attention is not None:
                    rec["attention_factor"] = space.attention_factor(c)
                rec.update({k: v for k, v in extra.items() if k not in rec})
                journal.append(rec)
                out.append(Scored(c, ppl, rec))
                state["evals"] += 1
                state["new"] += 1
            if step < len(todo):  # a generation in several calls: a line per call, with the rate
                same = [x.record.get("same_as") for x in out[-len(part):]]
                if all(same):  # no forward: the fitness knew these specs (baselines)
                    how = "the score of baseline " + ", ".join(map(str, same))
                else:
                    per = (time.monotonic() - t) / len(part)
                    left = (len(todo) - j - len(part)) * per
                    how = f"{per:.0f}s per candidate, ~{left / 60:.0f} min left in this generation"
                log(f"generation {generation}: {len(out)}/{len(batch)} scored (best of them "
                    f"{min(x.ppl for x in out):.4g}); {how}")
        if stop:
            history.extend(out)
            raise _Stop(stop)
        return out

    def propose(c: Candidate | None, meta: dict, batch: list):
        if c is None:
            return
        operators.check(c, space)  # the constraint, enforced before any evaluation
        seen.add(c.key)
        batch.append((c, meta))

    def note_generation(g: int, population: list[Scored]):
        finite = [x.ppl for x in population if math.isfinite(x.ppl)]
        best = min(history, key=_rank).ppl if history else math.inf
        row = {"generation": g, "best_ppl": best if math.isfinite(best) else None,
               "median_ppl": float(np.median(finite)) if finite else None, "evaluations": state["evals"]}
        generations.append(row)
        if bar is not None:
            med = row["median_ppl"]
            bar.set_postfix({"best": f"{best:.4g}", "median": f"{math.inf if med is None else med:.4g}",
                             "evals": state["evals"]})
            bar.update(1)
        if on_generation is not None:
            on_generation(result("running"))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=settings.iterations + 1, desc="search", unit="gen", file=sys.stderr, dynamic_ncols=True)
    stopped = "completed"
    try:
        # Generation 0: the seeds, then mutations of them in turn.
        rng = np.random.default_rng([seed, 0])
        batch: list = []
        for name, c in seeds:
            if c.key not in seen:
                propose(c, {"origin": f"seed:{name}"}, batch)
        j = 0
        while len(batch) < settings.population:
            name, parent = seeds[j % len(seeds)]
            propose(operators.mutate(parent, space, rng, seen, prob=settings.mutation_prob,
                                     start_prob=settings.start_token_prob, tries=settings.mutation_tries),
                    {"origin": "mutation", "parents": [f"seed:{name}"]}, batch)
            j += 1
            if j >= settings.population * 4:  # the space is (nearly) exhausted around the seeds
                break
        population = evaluate(batch, 0)
        history.extend(population)
        note_generation(0, population)

        for g in range(1, settings.iterations + 1):
            parents = sorted(population, key=_rank)[:settings.parents]
            rng = np.random.default_rng([seed, g])
            batch = []
            for _ in range(settings.mutations):
                i = int(rng.integers(len(parents)))
                c = operators.mutate(parents[i].candidate, space, rng, seen, prob=settings.mutation_prob,
                                     start_prob=settings.start_token_prob, tries=settings.mutation_tries)
                propose(c, {"origin": "mutation", "parents": [parents[i].record["eval"]]}, batch)
            for _ in range(settings.crossovers):
                if len(parents) < 2:
                    i1 = i2 = 0
                    c = None
                else:
                    i1, i2 = sorted(int(x) for x in rng.choice(len(parents), 2, replace=False))
                    c = operators.crossover(parents[i1].candidate, parents[i2].candidate, space, rng, seen,
                                            prob=settings.crossover_prob, tries=settings.crossover_tries)
                if c is not None:
                    propose(c, {"origin": "crossover",
                                "parents": [parents[i1].record["eval"], parents[i2].record["eval"]]}, batch)
                else:
                    c = operators.mutate(parents[i1].candidate, space, rng, seen, prob=settings.mutation_prob,
                                         start_prob=settings.start_token_prob, tries=settings.mutation_tries)
                    propose(c, {"origin": "crossover->mutation", "parents": [parents[i1].record["eval"]]}, batch)
            children = evaluate(batch, g)
            history.extend(children)
            population = parents + children
            note_generation(g, population)
    except _Stop as e:
        stopped = e.reason
        if history and (not generations or generations[-1]["evaluations"] != state["evals"]):
            best = min(history, key=_rank).ppl
            generations.append({"generation": len(generations), "best_ppl": best if math.isfinite(best) else None,
                                "median_ppl": None, "evaluations": state["evals"], "partial": True})
    finally:
        if bar is not None:
            bar.close()
        journal.close()
    res = result(stopped)
    log(f"search {stopped}: {res.evaluations} evaluation(s) ({res.new_evaluations} new, {res.replayed} from "
        f"the log)" + (f", best ppl {res.best.ppl:.4f}" if res.best else ""))
    return res
