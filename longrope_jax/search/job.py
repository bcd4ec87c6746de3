"""The ``search`` job: load a model and windows, run (or resume) the evolutionary search, write
``factors.json``, ``summary.json``, ``log.jsonl`` and PNGs under ``out``.

Every file but the log is written atomically (temporary file + rename) and rewritten after each
generation, so a killed search leaves a valid ``factors.json`` of its best candidate so far; running
the same command again resumes from ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import time
from typing import Any, Mapping

import numpy as np

from longrope_jax import factors as factors_lib
from longrope_jax import rope as rope_lib
from longrope_jax.search import evolve as evolve_lib
from longrope_jax.search import genome
from longrope_jax.search.genome import SearchError
from longrope_jax.search.settings import JOB_DEFAULTS, SearchSettings

FACTORS_FILE, SUMMARY_FILE, LOG_FILE = "factors.json", "summary.json", "log.jsonl"
PROGRESS_PNG, FACTORS_PNG = "search_progress.png", "search_factors.png"


def write_json(path: str, obj: Any) -> str:
    """Writes JSON atomically: a temporary file in the same directory, fsynced, renamed over ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def check_seed(seed) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SearchError(f"--seed: expected an integer >= 0, got {seed!r}")
    return int(seed)


def _check_positive_int(name, v, allow_none=False):
    if v is None and allow_none:
        return None
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise SearchError(f"--{name}: expected an integer >= 1, got {v!r}")
    return int(v)


def seed_candidates(space: genome.Space, cfg, scale: float, original_max: int,
                    seed_factors=()) -> list[tuple[str, genome.Candidate]]:
    """The initial seeds: PI, NTK and YaRN factors at ``scale`` rounded onto the grid, then the
    long factors of each ``seed_factors`` file (validated: format, length, range, monotone)."""
    p, rd = space.num_pairs, cfg.rotary_dim
    seeds = [
        ("pi", genome.from_factors(np.full(p, float(scale)), space, source="PI seed")),
        ("ntk", genome.from_factors(rope_lib.ntk_factors(rd, scale), space, source="NTK seed")),
        ("yarn", genome.from_factors(rope_lib.yarn_factors(cfg.rope_theta, rd, scale, original_max), space,
                                     source="YaRN seed")),
    ]
    for path in seed_factors:
        d = factors_lib.load(path, rotary_dim=rd)
        if abs(float(d["rope_theta"]) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
            raise factors_lib.FactorsError(f"{path}: field 'rope_theta': expected {cfg.rope_theta} (the model's), "
                                           f"got {d['rope_theta']}")
        seeds.append((f"file:{path}", genome.from_factors(d["long_factor"], space, int(d.get("start_tokens") or 0),
                                                          clip=False, source=path)))
    return seeds


def _previous_baselines(summary_path: str, context: Mapping[str, Any], scale: float) -> dict | None:
    """The baselines of an earlier run of this search (same context), so a resume does not rescore them."""
    from longrope_jax.search.fitness import baseline_names

    try:
        with open(summary_path) as fh:
            prev = json.load(fh)
    except (OSError, ValueError):
        return None
    base = prev.get("baselines_detail") if isinstance(prev, dict) else None
    if prev.get("context") != json.loads(json.dumps(context)) or not isinstance(base, dict):
        return None
    if list(base) != baseline_names(scale) or any(not isinstance(v, dict) or "ppl" not in v for v in base.values()):
        return None
    return {k: dict(v, ppl=math.inf if v["ppl"] is None else v["ppl"]) for k, v in base.items()}


def factors_document(fitness, best, *, model: str, model_sha256: str | None, seed: int, documents: list[str],
                     command: str, search: Mapping[str, Any]) -> dict:
    """The ``longrope-factors/1`` dict of the best candidate (REFERENCE.md section 8)."""
    from longrope_jax import __version__

    cfg = fitness.cfg
    p = cfg.rotary_dim // 2
    d = {
        "format": factors_lib.FORMAT, "rope_type": "longrope", "rope_theta": float(cfg.rope_theta),
        "rotary_dim": int(cfg.rotary_dim), "original_max_position_embeddings": fitness.original_max,
        "max_position_embeddings": fitness.length, "long_factor": fitness.long_factor(best.candidate).tolist(),
        "short_factor": [1.0] * p, "attention_factor": fitness.attention_factor,
        "start_tokens": int(best.candidate.start_tokens), "critical_dim": None,
        "provenance": {"model": model, "model_sha256": model_sha256, "seed": seed, "documents": documents,
                       "command": command, "version": __version__, "search": dict(search)},
    }
    factors_lib.validate(d, FACTORS_FILE, cfg.rotary_dim)  # the file must load
    return d


def canonical_command(model, data, target_length, out, *, settings: SearchSettings, samples, seed, extra: Mapping):
    """A command line that reproduces the search (non-default settings as ``--config.key=value``)."""
    argv = ["longrope-jax", "search", "--model", str(model), "--data", str(data), "--target-length",
            str(target_length), "--out", str(out), "--samples", str(samples), "--seed", str(seed)]
    for k, v in extra.items():
        if v is not None and v is not False and v != JOB_DEFAULTS.get(k):
            argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    ref = SearchSettings().to_dict()
    for k, v in settings.to_dict().items():
        if v != ref[k]:
            argv.append(f"--config.{k}={v!r}" if isinstance(v, list) else f"--config.{k}={v}")
    return shlex.join(argv)


def run_search(model: str, data: str, target_length: int, out: str, *, settings: SearchSettings | Mapping | None = None,
               samples: int = 5, seed: int = 0, field: str = "text", tokenizer: str | None = None,
               param_dtype: str = "float32", sliding_window: bool = True, attention: str = "auto",
               q_chunk: int | None = None, loss_chunk: int = 1024, memory_budget: int | None = None,
               max_evals: int | None = None, time_budget: float | None = None, base_factors=None,
               original_window: int | None = None, command: str | None = None, progress: bool = True,
               log=None) -> dict:
    """The ``search`` job; returns the result line (also what ``summary.json`` starts with).

    Args:
      model, data: as for ``ppl`` (a model path; a text file / .jsonl / directory / ``pydoc:``).
      target_length: tokens per search window; the scale is ``target_length / original window``.
      out: the output directory (created; a log already there is resumed).
      settings: the algorithm's knobs (a SearchSettings or a mapping of its fields).
      samples, seed, field: the windows (first ``target_length`` tokens of ``samples`` documents,
        chosen with ``seed``), as ``ppl`` chooses them; ``seed`` also seeds the search.
      max_evals: stop after this many evaluations in all (logged ones included).
      time_budget: stop (cleanly, between generations) after this many seconds of this call.
      base_factors: float[P] multiplied onto every candidate (progressive search; None: 1).
      original_window: the window the factors extend (default: the model's
        ``max_position_embeddings``).
      command: recorded in the provenance (default: a canonical command line).
    """
    from longrope_jax.data import read_documents, windows
    from longrope_jax.loading import load_model
    from longrope_jax.search import fitness as fitness_lib
    from longrope_jax.search import plots

    log = log or (lambda msg: None)
    t_start = time.time()
    seed = check_seed(seed)
    target_length = _check_positive_int("target-length", target_length)
    samples = _check_positive_int("samples", samples)
    max_evals = _check_positive_int("max-evals", max_evals, allow_none=True)
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise SearchError(f"--time-budget: expected a positive number of seconds, got {time_budget!r}")
    if settings is None:
        settings = SearchSettings()
    elif isinstance(settings, Mapping):
        settings = SearchSettings.from_mapping(settings)
    settings.validate()
    out = os.path.abspath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise SearchError(f"--out {out}: exists and is not a directory")

    m = load_model(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    if m.tokenizer is None:
        raise ValueError(f"{model}: the model has no tokenizer.json; pass --tokenizer PATH")
    cfg = m.cfg
    window = int(original_window or cfg.max_position_embeddings)
    if target_length <= window:
        raise SearchError(f"--target-length: expected more than the original window ({window} tokens), got "
                          f"{target_length}")
    scale = target_length / window
    w = windows(read_documents(data, field), m.tokenizer, target_length, samples, seed, source=data)
    log(f"search: {model} (window {window}) to {target_length} tokens (scale {scale:g}) on {len(w.documents)} "
        f"window(s); population {settings.population}, {settings.iterations} iterations, range "
        f"{settings.factor_range}")

    space = genome.space_for(cfg.rotary_dim // 2, scale, step=settings.step, factor_range=settings.factor_range,
                             start_tokens=settings.start_tokens)
    seeds = seed_candidates(space, cfg, scale, window, settings.seed_factors)
    fit = fitness_lib.PerplexityFitness(m.params, cfg, w.tokens, space, original_max=window,
                                        base_factors=base_factors, memory_budget=memory_budget,
                                        attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk)
    model_id = m.sha256 or (os.path.abspath(model) if os.path.exists(model) else model)
    context = {"model": model_id, "target_length": target_length, "original_window": window,
               "rope_theta": cfg.rope_theta, "rotary_dim": cfg.rotary_dim, "documents": w.documents,
               "samples": samples, "param_dtype": param_dtype, "sliding_window": sliding_window,
               "attention": fit.attention, "q_chunk": fit.q_chunk, "loss_chunk": loss_chunk,
               "base_factors": None if base_factors is None else [float(x) for x in fit.base]}
    if command is None:
        command = canonical_command(model, data, target_length, out, settings=settings, samples=samples, seed=seed,
                                    extra={"field": field, "tokenizer": tokenizer, "param_dtype": param_dtype,
                                           "no_sliding_window": not sliding_window, "attention": attention,
                                           "q_chunk": q_chunk, "loss_chunk": loss_chunk, "max_evals": max_evals,
                                           "time_budget": time_budget})
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in (("factors", FACTORS_FILE), ("summary", SUMMARY_FILE),
                                                  ("log", LOG_FILE))}
    # A log of another search is refused now, before any scoring.
    evolve_lib.check_log(paths["log"], evolve_lib.make_header(space, settings, seed, seeds, context))

    baselines = _previous_baselines(paths["summary"], context, scale)
    if baselines is not None:
        log("baselines: " + ", ".join(f"{k} {v['ppl']:.4f}" for k, v in baselines.items()) + " (from summary.json)")
    else:
        t1 = time.time()
        baselines = fitness_lib.score_baselines(fit, scale)
        log("baselines: " + ", ".join(f"{k} {v['ppl']:.4f}" for k, v in baselines.items())
            + f" ({time.time() - t1:.1f}s)")
    base_ppl = {k: v["ppl"] for k, v in baselines.items()}

    def summarise(res: evolve_lib.EvolveResult) -> tuple[dict, dict]:
        best = res.best
        line = {"command": "search", "model": model, "model_sha256": m.sha256, "data": data,
                "target_length": target_length, "original_window": window, "scale": scale, "seed": seed,
                "samples": samples, "documents": w.documents, "stopped": res.stopped,
                "evaluations": res.evaluations, "new_evaluations": res.new_evaluations,
                "replayed_evaluations": res.replayed,
                "generations": max((g["generation"] for g in res.generations), default=-1) + 1,
                "ppl": best.ppl if best and math.isfinite(best.ppl) else None,
                "start_tokens": best.candidate.start_tokens if best else None,
                "baselines": base_ppl, "out": out, **paths}
        summary = dict(line)
        summary.update({
            "result": None if best is None else {
                "ppl": line["ppl"], "nll": best.record.get("nll"), "nll_per_window": best.record.get("nll_per_window"),
                "start_tokens": best.candidate.start_tokens, "long_factor": fit.long_factor(best.candidate).tolist(),
                "searched_factors": space.factors(best.candidate).tolist(), "eval": best.record.get("eval"),
                "generation": best.record.get("generation"), "origin": best.record.get("origin")},
            "baselines_detail": baselines,
            "context": context,
            "best_per_generation": res.generations,
            "settings": settings.to_dict(),
            "space": space.describe(),
            "tokenizer": m.tokenizer.describe(),
            "attention": fit.attention,
            "param_dtype": param_dtype,
            "command": command,
            "seconds": round(time.time() - t_start, 2),
        })
        return line, summary

    def write(res: evolve_lib.EvolveResult) -> dict:
        line, summary = summarise(res)
        if res.best is not None:
            search_info = {"ppl": line["ppl"], "target_length": target_length, "samples": samples,
                           "evaluations": res.evaluations, "factor_range": settings.factor_range,
                           "step": settings.step, "baselines": base_ppl}
            write_json(paths["factors"], factors_document(fit, res.best, model=model, model_sha256=m.sha256,
                                                          seed=seed, documents=w.documents, command=command,
                                                          search=search_info))
        write_json(paths["summary"], summary)
        return line

    res = evolve_lib.evolve(space, seeds, fit, settings, seed=seed, log_path=paths["log"], context=context,
                            max_evals=max_evals,
                            time_budget=None if time_budget is None else time_budget - (time.time() - t_start),
                            progress=progress, on_generation=write, log=log)
    if res.best is None:
        write(res)
        raise SearchError(f"no candidate was evaluated ({res.stopped}): raise --max-evals / --time-budget")
    line = write(res)
    best_f = fit.long_factor(res.best.candidate)
    p = space.num_pairs
    refs = {f"PI {scale:g}": np.full(p, scale), f"NTK {scale:g}": rope_lib.ntk_factors(cfg.rotary_dim, scale),
            f"YaRN {scale:g}": rope_lib.yarn_factors(cfg.rope_theta, cfg.rotary_dim, scale, window)}
    title = f"{os.path.basename(str(model).rstrip('/'))}: {window} -> {target_length}"
    line["plots"] = [
        plots.progress(res.generations, os.path.join(out, PROGRESS_PNG), base_ppl, title=title),
        plots.factors(best_f, refs, os.path.join(out, FACTORS_PNG), title=title,
                      start_tokens=res.best.candidate.start_tokens),
    ]
    log(f"search {res.stopped}: best ppl {res.best.ppl:.4f} (start tokens {res.best.candidate.start_tokens}) after "
        f"{res.evaluations} evaluation(s); baselines " + ", ".join(f"{k} {v:.4f}" for k, v in base_ppl.items()))
    log(f"wrote {paths['factors']}, {paths['summary']}, {paths['log']}, {line['plots'][0]}, {line['plots'][1]}")
    return line
