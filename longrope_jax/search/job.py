"""The ``search`` job: load a model and windows, run (or resume) the evolutionary search, write
``factors.json``, ``summary.json``, ``log.jsonl`` and PNGs under ``out``.

Every file but the log is written atomically (temporary file + rename) and rewritten after each
generation, so a killed search leaves a valid ``factors.json`` of its best candidate so far; running
the same command again resumes from ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
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
BASELINES_FILE = "baselines.json"  # each baseline written as soon as it is scored, before generation 0
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
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for reading
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


def reference_factors(cfg, scale: float, window: int) -> dict[str, np.ndarray]:
    """PI, NTK and YaRN as per-pair factors at ``scale`` over ``window``: ``{"pi", "ntk", "yarn"}``
    float64[P] each (the search's seeds and the references of its plots)."""
    rd = cfg.rotary_dim
    return {"pi": np.full(rd // 2, float(scale)), "ntk": rope_lib.ntk_factors(rd, scale),
            "yarn": rope_lib.yarn_factors(cfg.rope_theta, rd, scale, window)}


def seed_candidates(space: genome.Space, cfg, scale: float, original_max: int,
                    seed_factors=()) -> list[tuple[str, genome.Candidate]]:
    """The initial seeds: PI, NTK and YaRN factors at ``scale`` rounded onto the grid, then the
    long factors of each ``seed_factors`` file (validated: format, length, range, monotone)."""
    seeds = [(name, genome.from_factors(v, space, source=f"{name} seed"))
             for name, v in reference_factors(cfg, scale, original_max).items()]
    for path in seed_factors:
        d = _load_factors_arg(path, "config.seed_factors", cfg)
        seeds.append((f"file:{path}", genome.from_factors(d["long_factor"], space, int(d.get("start_tokens") or 0),
                                                          clip=False, source=path)))
    return seeds


def _ppls(baselines: Mapping[str, Mapping]) -> str:
    return ", ".join(f"{k} {v['ppl']:.4f}" for k, v in baselines.items())


def _previous_baselines(summary_path: str, context: Mapping[str, Any], names: list[str]) -> dict:
    """The baselines an earlier run of this search (same context) scored, so a resume does not rescore
    them: from ``baselines.json`` (all of them, or those scored before a crash) or ``summary.json``
    (both hold ``context`` and ``baselines_detail``). Empty when there are none."""
    try:
        with open(summary_path) as fh:
            prev = json.load(fh)
    except (OSError, ValueError):
        return {}
    base = prev.get("baselines_detail") if isinstance(prev, dict) else None
    if prev.get("context") != json.loads(json.dumps(context)) or not isinstance(base, dict):
        return {}
    if list(base) != [n for n in names if n in base] or any(not isinstance(v, dict) or "ppl" not in v
                                                           for v in base.values()):
        return {}
    return {k: dict(v, ppl=math.inf if v["ppl"] is None else v["ppl"]) for k, v in base.items()}


def factors_document(fitness, best, *, model: str, model_sha256: str | None, seed: int, documents: list[str],
                     command: str, search: Mapping[str, Any], parent: Mapping[str, Any] | None = None) -> dict:
    """The ``longrope-factors/1`` dict of the best candidate (REFERENCE.md section 8): the
    fitness's document with the candidate in its slot, and provenance (``parent``: the provenance
    of the file a progressive search or a readjust started from)."""
    from longrope_jax import __version__

    d = fitness.document(best.candidate)
    d["provenance"] = {"model": model, "model_sha256": model_sha256, "seed": seed, "documents": documents,
                       "command": command, "version": __version__, "search": dict(search)}
    if parent is not None:
        d["provenance"]["parent"] = dict(parent)
    factors_lib.validate(d, FACTORS_FILE, fitness.cfg.rotary_dim)  # the file must load
    return d


def _load_factors_arg(path: str, flag: str, cfg) -> dict:
    d = factors_lib.load(path, rotary_dim=cfg.rotary_dim)
    if abs(float(d["rope_theta"]) - cfg.rope_theta) > 1e-6 * cfg.rope_theta:
        raise factors_lib.FactorsError(f"{path} (--{flag}): field 'rope_theta': expected {cfg.rope_theta} (the "
                                       f"model's), got {d['rope_theta']}")
    return d


def _seed_or_skip(make, name, log):
    try:
        return [(name, make())]
    except SearchError as e:
        log(f"seed {name} skipped: {e}")
        return []


def plan_search(cfg, settings: SearchSettings, target_length: int, *, original_window: int | None = None,
                base_factors=None, readjust: str | None = None, log=None) -> dict:
    """What a search looks for, from its flags: the space, the seeds, the baselines, and where a
    candidate goes (``template`` and ``slot`` of :class:`~longrope_jax.search.fitness.PerplexityFitness`).

    - plain: factors for ``target_length`` over the model's window (``original_window``).
    - progressive (``base_factors``: a factors file, or float[P]): ``lambda_2`` at
      ``target_length`` over the file's ``max_position_embeddings`` (the fine-tuning length);
      range and monotonicity apply to ``lambda_2``, the file gets ``lambda_2 * lambda_1``.
    - readjust (a factors file): that file's short factors (``target_length`` at or below its
      original window) or a ``per_length[target_length]`` entry (above it), on the extended model.
    - LongRoPE2 mode (``settings.mode``): plain, with the critical-dimension space.
    """
    from longrope_jax.search import fitness as fitness_lib

    log = log or (lambda msg: None)
    p = cfg.rotary_dim // 2
    theta, rd = cfg.rope_theta, cfg.rotary_dim
    if base_factors is not None and readjust is not None:
        raise SearchError("--base-factors and --readjust: give one (a progressive search or a readjust)")
    if settings.attention_factor_range and readjust is not None:
        raise SearchError("attention_factor_range: a readjust keeps the extended model's attention factor (short and "
                          "long factors share it); search it in the extension's own search")
    if settings.mode == "longrope2" and (base_factors is not None or readjust is not None):
        raise SearchError("mode 'longrope2' searches a plain extension; it does not take --base-factors or "
                          "--readjust")
    out = {"base": None, "slot": "long", "parent": None, "kind": "plain"}
    if readjust is not None:
        f = _load_factors_arg(readjust, "readjust", cfg)
        switch, ext = int(f["original_max_position_embeddings"]), int(f["max_position_embeddings"])
        if not 2 <= target_length <= ext:
            raise SearchError(f"--target-length: a readjust of {readjust} searches at or below its "
                              f"max_position_embeddings ({ext}), got {target_length}")
        scale = ext / switch
        short = target_length <= switch
        starts = (int(f.get("start_tokens") or 0),) if short else settings.start_tokens
        space = genome.space_for(p, scale, step=settings.step, factor_range=settings.factor_range, start_tokens=starts)
        template = {k: v for k, v in f.items() if k != "provenance"}
        n0 = int(f.get("start_tokens") or 0)
        n0 = n0 if n0 in starts else None
        seeds = [("original", genome.from_factors(np.ones(p), space, n0, source="original RoPE"))]
        seeds += _seed_or_skip(lambda: genome.from_factors(f["short_factor"], space, n0, source=f"{readjust} "
                                                           "short_factor"), "file-short", log)
        seeds += _seed_or_skip(lambda: genome.from_factors(f["long_factor"], space, n0, source=f"{readjust} "
                                                           "long_factor"), "file-long", log)
        if not short:
            seeds += [(n, genome.from_factors(v, space, n0, source=n))
                      for n, v in reference_factors(cfg, target_length / switch, switch).items()]
        baselines = {"none": rope_lib.default(theta, rd), "file": factors_lib.to_spec(f, target_length, readjust)}
        out.update(kind="readjust-short" if short else "readjust-per_length", slot="short" if short else "per_length",
                   parent=f.get("provenance"), window=switch, switch=switch, scale=scale, space=space, seeds=seeds,
                   template=template, baselines=baselines, readjust=os.path.abspath(readjust))
        return out

    window = int(original_window or cfg.max_position_embeddings)
    switch = window
    template_extra = {}
    if base_factors is not None:
        if isinstance(base_factors, str):
            f = _load_factors_arg(base_factors, "base-factors", cfg)
            lam1 = np.asarray(f["long_factor"], np.float64)
            window = int(f["max_position_embeddings"])
            switch = int(f["original_max_position_embeddings"])
            template_extra = {"short_factor": f["short_factor"], "attention_factor": f.get("attention_factor")}
            out.update(parent=f.get("provenance"), base_factors_file=os.path.abspath(base_factors))
        else:
            lam1 = np.asarray(base_factors, np.float64)
        if lam1.shape != (p,) or not np.all(np.isfinite(lam1)) or np.any(lam1 <= 0):
            raise SearchError(f"--base-factors: expected {p} positive finite factors, got {lam1.tolist()!r:.80}")
        out.update(kind="progressive", base=lam1)
    if target_length <= window:
        raise SearchError(f"--target-length: expected more than the {'fine-tuned' if base_factors is not None else 'original'}"
                          f" window ({window} tokens), got {target_length}")
    scale = target_length / window
    template = fitness_lib.base_document(cfg, original_max=switch, length=target_length)
    template.update(template_extra)
    if settings.mode == "longrope2":
        tcd = genome.theoretical_critical_dim(rd, theta, window)
        lo, hi = settings.critical_range or (max(1, tcd - p // 4), min(p - 1, tcd))
        if hi > p - 1 or lo > hi:
            raise SearchError(f"critical_range: expected within [1, {p - 1}] (pairs - 1), got {[lo, hi]}")
        space = genome.longrope2_space_for(p, scale, (lo, hi), step=settings.step, start_tokens=settings.start_tokens)
        c0 = min(max(tcd, lo), hi)
        seeds = [(f"lr2-{n}", genome.critical_from_factors(v, space, c0, source=f"lr2-{n}"))
                 for n, v in reference_factors(cfg, scale, window).items()]
        out.update(kind="longrope2", theoretical_critical_dim=tcd)
    else:
        space = genome.space_for(p, scale, step=settings.step, factor_range=settings.factor_range,
                                 start_tokens=settings.start_tokens)
        seeds = seed_candidates(space, cfg, scale, window, settings.seed_factors)
        if base_factors is not None:  # lambda_2 = 1: the fine-tuned model as it is
            seeds.insert(0, ("base", genome.from_factors(np.ones(p), space, source="base factors")))
    if base_factors is None:
        baselines = fitness_lib.baseline_specs(cfg, scale, window)
    else:
        def with_base(lam2, name):
            d = dict(template, long_factor=np.round(lam1 * lam2, 10).tolist())
            return factors_lib.to_spec(d, target_length, name)

        baselines = {"none": rope_lib.default(theta, rd), "base": with_base(np.ones(p), "base")}
        for n, v in reference_factors(cfg, scale, window).items():
            baselines[f"base*{n}:{scale:g}"] = with_base(v, f"base*{n}:{scale:g}")
    if settings.attention_factor_range:
        space, seeds = attention_gene(space, seeds, settings, template, scale)
    out.update(window=window, switch=switch, scale=scale, space=space, seeds=seeds, template=template,
               baselines=baselines)
    return out


def attention_gene(space: genome.Space, seeds, settings: SearchSettings, template: Mapping, scale: float):
    """The space and seeds with the attention-factor gene: every seed at the factor its factors file
    would get otherwise (the template's, else the paper's ``sqrt(1 + ln s / ln L_orig)``), rounded
    into the gene's range, and each YaRN seed once more at YaRN's ``0.1 ln s + 1``."""
    space = space.with_attention_gene(settings.attention_factor_range, settings.attention_factor_step)
    af = template.get("attention_factor")
    if af is None:
        af = rope_lib.longrope_attention_factor(int(template["max_position_embeddings"]),
                                                int(template["original_max_position_embeddings"]))
    out = [(n, dataclasses.replace(c, attention=space.attention_index(af))) for n, c in seeds]
    yarn = space.attention_index(rope_lib.yarn_attention_factor(scale))
    out += [(f"{n}+yarn-attention", dataclasses.replace(c, attention=yarn)) for n, c in seeds
            if "yarn" in n and yarn != space.attention_index(af)]
    return space, out


def canonical_command(model, data, target_length, out, *, settings: SearchSettings, samples, seed, extra: Mapping):
    """A command line that reproduces the search (non-default settings as ``--config.key=value``)."""
    argv = ["longrope-jax", "search", "--model", str(model)]
    for d in ([data] if isinstance(data, str) else data):
        argv += ["--data", str(d)]
    argv += ["--target-length", str(target_length), "--out", str(out), "--samples", str(samples), "--seed", str(seed)]
    for k, v in extra.items():
        if v is not None and v is not False and v != JOB_DEFAULTS.get(k):
            argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    ref = SearchSettings().to_dict()
    for k, v in settings.to_dict().items():
        if v != ref[k]:
            argv.append(f"--config.{k}={v!r}" if isinstance(v, list) else f"--config.{k}={v}")
    return shlex.join(argv)


def run_search(model: str, data: str | list[str], target_length: int, out: str, *, settings: SearchSettings | Mapping | None = None,
               samples: int = 5, seed: int = 0, field: str = "text", tokenizer: str | None = None,
               param_dtype: str = "float32", sliding_window: bool = True, attention: str = "auto",
               q_chunk: int | None = None, loss_chunk: int = 1024, memory_budget: int | None = None,
               max_evals: int | None = None, time_budget: float | None = None, base_factors=None,
               readjust: str | None = None, original_window: int | None = None, command: str | None = None,
               progress: bool = True, on_generation=None, log=None) -> dict:
    """The ``search`` job; returns the result line (also what ``summary.json`` starts with).

    Args:
      model, data: as for ``ppl`` (a model path; a text file / .jsonl / directory / ``pydoc:``, or
        a list of such sources: the windows are then split across them, see ``data.windows_from``).
      target_length: tokens per search window; the scale is ``target_length / original window``.
      out: the output directory (created; a log already there is resumed).
      settings: the algorithm's knobs (a SearchSettings or a mapping of its fields).
      samples, seed, field: the windows (first ``target_length`` tokens of ``samples`` documents,
        chosen with ``seed``), as ``ppl`` chooses them; ``seed`` also seeds the search.
      max_evals: stop after this many evaluations in all (logged ones included).
      time_budget: stop (cleanly, between generations) after this many seconds of this call.
      base_factors: progressive search: a factors file whose ``lambda_1`` the model was fine-tuned
        with (or float[P]); the search looks for ``lambda_2`` over that file's length and writes
        ``lambda_2 * lambda_1``.
      readjust: short-context readjust: an extended model's factors file; the search re-tunes its
        short factors (``target_length`` at or below the original window) or adds a
        ``per_length[target_length]`` entry, and writes that file so amended.
      original_window: the window the factors extend (default: the model's
        ``max_position_embeddings``).
      command: recorded in the provenance (default: a canonical command line).
      on_generation: called with the summary dict (what ``summary.json`` holds) after each
        generation, e.g. to redraw a live plot in a notebook.
    """
    from longrope_jax.data import read_sources, source_label, windows_from
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
    out_arg, out = out, os.path.abspath(out)  # the command records --out as given
    if os.path.exists(out) and not os.path.isdir(out):
        raise SearchError(f"--out {out}: exists and is not a directory")

    m = load_model(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    if m.tokenizer is None:
        raise ValueError(f"{model}: the model has no tokenizer.json; pass --tokenizer PATH")
    cfg = m.cfg
    plan = plan_search(cfg, settings, target_length, original_window=original_window, base_factors=base_factors,
                       readjust=readjust, log=log)
    window, scale, space = plan["window"], plan["scale"], plan["space"]
    sources = read_sources(data, field)
    data = source_label(data)
    w = windows_from(sources, m.tokenizer, target_length, samples, seed)
    tokens, weights, needle_info = w.tokens, None, None
    if settings.fitness == "needle":
        from longrope_jax.needle import needle_windows

        nw = needle_windows(m.tokenizer, w.tokens, seed, settings.needles)
        tokens, weights = nw.tokens, nw.weights
        needle_info = {"needles": settings.needles, "depths": nw.depths, "scored_tokens": nw.weights.sum(1).tolist()}
    what = {"plain": "", "progressive": " (progressive: lambda_2 over the fine-tuned window)",
            "longrope2": f" (LongRoPE2 mode: critical dim in {list(space.critical or ())}, theoretical "
                         f"{plan.get('theoretical_critical_dim')})",
            "readjust-short": f" (readjust of {readjust}: short factors)",
            "readjust-per_length": f" (readjust of {readjust}: per_length entry)"}[plan["kind"]]
    log(f"search: {model} (window {window}) to {target_length} tokens (scale {scale:g}){what} on "
        f"{len(w.documents)} window(s), fitness {settings.fitness}; population {settings.population}, "
        f"{settings.iterations} iterations, range {settings.factor_range if settings.mode == 'longrope' else '[s, 2s]'}")

    seeds = plan["seeds"]
    fit = fitness_lib.PerplexityFitness(m.params, cfg, tokens, space, original_max=plan["switch"],
                                        base_factors=plan["base"], template=plan["template"], slot=plan["slot"],
                                        weights=weights, memory_budget=memory_budget, attention=attention,
                                        q_chunk=q_chunk, loss_chunk=loss_chunk)
    model_id = m.sha256 or (os.path.abspath(model) if os.path.exists(model) else model)
    context = {"model": model_id, "target_length": target_length, "original_window": window,
               "rope_theta": cfg.rope_theta, "rotary_dim": cfg.rotary_dim, "documents": w.documents,
               "samples": samples, "param_dtype": param_dtype, "sliding_window": sliding_window,
               "attention": fit.attention, "q_chunk": fit.q_chunk, "loss_chunk": loss_chunk,
               "base_factors": None if plan["base"] is None else [float(x) for x in fit.base]}
    if plan["kind"] != "plain":  # keys added later, left out of plain searches' headers
        context["kind"] = plan["kind"]
        context["template"] = json.loads(json.dumps(plan["template"]))
    if needle_info is not None:
        context["needles"] = needle_info
    if command is None:
        command = canonical_command(model, data, target_length, out_arg, settings=settings, samples=samples, seed=seed,
                                    extra={"field": field, "tokenizer": tokenizer, "param_dtype": param_dtype,
                                           "no_sliding_window": not sliding_window, "attention": attention,
                                           "q_chunk": q_chunk, "loss_chunk": loss_chunk, "max_evals": max_evals,
                                           "time_budget": time_budget,
                                           "base_factors": base_factors if isinstance(base_factors, str) else None,
                                           "readjust": readjust})
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in (("factors", FACTORS_FILE), ("summary", SUMMARY_FILE),
                                                  ("log", LOG_FILE), ("baselines_file", BASELINES_FILE))}
    # A log of another search is refused now, before any scoring.
    evolve_lib.check_log(paths["log"], evolve_lib.make_header(space, settings, seed, seeds, context))

    names = list(plan["baselines"])
    prev, prev_src = {}, None
    for src in ("baselines_file", "summary"):
        got = _previous_baselines(paths[src], context, names)
        if len(got) > len(prev):
            prev, prev_src = got, os.path.basename(paths[src])
    complete = len(prev) == len(names)
    if complete:
        log(f"baselines: {_ppls(prev)} (from {prev_src})")
    elif prev:
        log(f"baselines: {len(prev)} of {len(names)} from {prev_src} ({_ppls(prev)}); scoring the rest")
    t1, scored = time.time(), dict(prev)

    def on_scored(name, rec, seconds):  # each baseline kept as soon as it is scored
        scored[name] = rec
        write_json(paths["baselines_file"],
                   {"context": context, "baselines_detail": {n: scored[n] for n in names if n in scored}})
        if fit.batch_size == 1:
            log(f"baseline {name}: ppl {rec['ppl']:.4f} ({len(scored)}/{len(names)}, {seconds:.0f}s)")

    # Through score_named even when every baseline is known: the fitness remembers them all, so a
    # candidate with a baseline's exact spec takes its score (resumed or not).
    baselines = fitness_lib.score_named(fit, plan["baselines"], done=prev, on_scored=on_scored)
    if not complete:
        log(f"baselines: {_ppls(baselines)} ({time.time() - t1:.1f}s)")
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
                "critical_dim": best.candidate.critical_dim if best else None,
                "attention_factor": fit.document(best.candidate)["attention_factor"] if best else None,
                "kind": plan["kind"], "mode": settings.mode, "fitness": settings.fitness, "slot": plan["slot"],
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
                           "step": settings.step, "baselines": base_ppl, "kind": plan["kind"],
                           "mode": settings.mode, "fitness": settings.fitness, "slot": plan["slot"]}
            if settings.attention_factor_range:
                search_info["attention_factor_range"] = list(settings.attention_factor_range)
            for key in ("base_factors_file", "readjust", "theoretical_critical_dim"):
                if plan.get(key) is not None:
                    search_info[key] = plan[key]
            if plan["kind"] == "progressive":
                search_info["lambda_2"] = space.factors(res.best.candidate).tolist()
            write_json(paths["factors"], factors_document(fit, res.best, model=model, model_sha256=m.sha256,
                                                          seed=seed, documents=w.documents, command=command,
                                                          search=search_info, parent=plan["parent"]))
        write_json(paths["summary"], summary)
        if on_generation is not None:
            on_generation(summary)
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
    base = np.ones(p) if plan["base"] is None else plan["base"]
    refs = {f"{label} {scale:g}": base * v for label, v in
            zip(("PI", "NTK", "YaRN"), reference_factors(cfg, scale, window).values())}
    if plan["base"] is not None:
        refs = {"base " + k: v for k, v in refs.items()}
        refs["base (lambda_1)"] = base
    title = f"{os.path.basename(str(model).rstrip('/'))}: {window} -> {target_length}"
    if plan["kind"].startswith("readjust"):
        title = f"{os.path.basename(str(model).rstrip('/'))}: readjust at {target_length} ({plan['slot']})"
    elif res.best.candidate.critical_dim is not None:
        title += f", critical dim {res.best.candidate.critical_dim}"
    line["plots"] = [
        plots.progress(res.generations, os.path.join(out, PROGRESS_PNG), base_ppl, title=title),
        plots.factors(best_f, refs, os.path.join(out, FACTORS_PNG), title=title,
                      start_tokens=res.best.candidate.start_tokens),
    ]
    crit = "" if res.best.candidate.critical_dim is None else f", critical dim {res.best.candidate.critical_dim}"
    log(f"search {res.stopped}: best ppl {res.best.ppl:.4f} (start tokens {res.best.candidate.start_tokens}{crit}) after "
        f"{res.evaluations} evaluation(s); baselines " + ", ".join(f"{k} {v:.4f}" for k, v in base_ppl.items()))
    log(f"wrote {paths['factors']}, {paths['summary']}, {paths['log']}, {line['plots'][0]}, {line['plots'][1]}")
    return line
