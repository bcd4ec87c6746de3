"""The ``search`` job: load a model and windows, run (or resume) the evolutionary search, write
``factors.json``, ``summary.json``, ``log.jsonl`` and PNGs under ``out``.

Every file but the log is written atomically and rewritten after each generation, so a killed
search leaves a valid ``factors.json`` of its best candidate so far; running the same command
again resumes from ``log.jsonl``. The search itself is ``search.run.search_factors`` over params.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import time
from typing import Any, Mapping

import numpy as np

from longrope_jax import atomic, config_files, storage
from longrope_jax import factors as factors_lib
from longrope_jax import parallel
from longrope_jax.loading import LoadedModel, model_from
from longrope_jax.search import evolve as evolve_lib
from longrope_jax.search import setup as setup_lib
from longrope_jax.search import run as run_lib
from longrope_jax.search.genome import SearchError
from longrope_jax.search.settings import SearchSettings, resolve  # noqa: F401  (the command's settings)

FACTORS_FILE, SUMMARY_FILE, LOG_FILE = setup_lib.FACTORS_FILE, "summary.json", "log.jsonl"
BASELINES_FILE = "baselines.json"  # each baseline written as soon as it is scored, before generation 0
PROGRESS_PNG, FACTORS_PNG = "search_progress.png", "search_factors.png"


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


def _ppls(baselines: Mapping[str, Mapping]) -> str:
    return ", ".join(f"{k} {v['ppl']:.4f}" for k, v in baselines.items())


def previous_baselines(summary_path: str, context: Mapping[str, Any], names: list[str]) -> dict:
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


def canonical_command(model, data, target_length, out, *, settings: SearchSettings, samples, seed, extra: Mapping):
    """A command line that reproduces the search (non-default settings as ``--config.key=value``)."""
    argv = ["longrope-jax", "search", "--model", str(model)]
    for d in ([data] if isinstance(data, str) else data):
        argv += ["--data", str(d)]
    argv += ["--target-length", str(target_length), "--out", str(out), "--samples", str(samples), "--seed", str(seed)]
    defaults = config_files.defaults("search")
    for k, v in extra.items():
        if v is not None and v is not False and v != defaults.get(k):
            argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    ref = SearchSettings().to_dict()
    for k, v in settings.to_dict().items():
        if v != ref[k]:
            argv.append(f"--config.{k}={v!r}" if isinstance(v, list) else f"--config.{k}={v}")
    return shlex.join(argv)



def check_args(target_length, samples, seed, max_evals, time_budget, settings, out) -> dict:
    """The job's arguments checked and normalised (one-line ``SearchError`` each), before loading."""
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0):
        raise SearchError(f"--time-budget: expected a positive number of seconds, got {time_budget!r}")
    if settings is None:
        settings = SearchSettings()
    elif isinstance(settings, Mapping):
        settings = SearchSettings.from_mapping(settings)
    out_abs = storage.where(str(out))
    if os.path.exists(out_abs) and not os.path.isdir(out_abs):
        raise SearchError(f"--out {out_abs}: exists and is not a directory")
    return {"target_length": _check_positive_int("target-length", target_length),
            "samples": _check_positive_int("samples", samples), "seed": check_seed(seed),
            "max_evals": _check_positive_int("max-evals", max_evals, allow_none=True),
            "settings": settings.validate(), "out": out_abs}


def load_setup(cfg, settings: SearchSettings, target_length: int, *, original_window=None, base_factors=None,
               readjust: str | None = None, log=None) -> dict:
    """``setup.setup_search`` with its factors files loaded and checked against the model; the setup
    records their absolute paths (``base_factors_file``, ``readjust``)."""
    seeds = [(p, factors_lib.load_for(p, cfg, "config.seed_factors")) for p in settings.seed_factors]
    if base_factors == "model":  # the longrope block the model ships (Phi-3)
        base = factors_lib.from_model(cfg)
        if base is None:
            raise SearchError(f"base_factors: 'model' needs a model with a longrope rope block, this one's "
                                        f"is {(cfg.rope_parameters or {}).get('rope_type', 'default')!r}")
    else:
        base = factors_lib.load_for(base_factors, cfg, "base-factors") if isinstance(base_factors, str) else base_factors
    re = None if readjust is None else factors_lib.load_for(readjust, cfg, "readjust")
    setup = setup_lib.setup_search(cfg, settings, target_length, original_window=original_window, base_factors=base,
                                   readjust=re, names={"readjust": readjust}, seed_factors=seeds, log=log)
    if isinstance(base_factors, str):
        setup["base_factors_file"] = base_factors if base_factors == "model" else storage.where(base_factors)
    if readjust is not None:
        setup["readjust"] = storage.where(readjust)
    return setup


def search_windows(tok, data, field: str, target_length: int, samples: int, seed: int, settings: SearchSettings):
    """The search's windows: ``(windows, tokens, weights, needle_info)`` (weights and needle info
    for the needle fitness, else None)."""
    from longrope_jax.data import read_sources, windows_from

    w = windows_from(read_sources(data, field), tok, target_length, samples, seed)
    if settings.fitness != "needle":
        return w, w.tokens, None, None
    from longrope_jax.needle import needle_windows

    nw = needle_windows(tok, w.tokens, seed, settings.needles)
    info = {"needles": settings.needles, "depths": nw.depths, "scored_tokens": nw.weights.sum(1).tolist()}
    return w, nw.tokens, nw.weights, info


def search_context(m: LoadedModel, setup: dict, fit, w, needle_info, *, target_length, samples,
                   param_dtype, sliding_window, loss_chunk) -> dict:
    """What the log header records of the fitness: a log is resumed only by the same search."""
    model_id = m.sha256 or (os.path.abspath(m.source) if os.path.exists(m.source) else m.source)
    context = {"model": model_id, "target_length": target_length, "original_window": setup["window"],
               "rope_theta": m.cfg.rope_theta, "rotary_dim": m.cfg.rotary_dim, "documents": w.documents,
               "samples": samples, "param_dtype": param_dtype, "sliding_window": sliding_window,
               "attention": fit.attention, "q_chunk": fit.q_chunk, "loss_chunk": loss_chunk,
               "base_factors": None if setup["base"] is None else [float(x) for x in fit.base]}
    if setup["kind"] != "plain":  # keys added later, left out of plain searches' headers
        context["kind"] = setup["kind"]
        context["template"] = json.loads(json.dumps(setup["template"]))
    if needle_info is not None:
        context["needles"] = needle_info
    return context


def summarise(res: evolve_lib.EvolveResult, fit, setup: dict, settings: SearchSettings, baselines: dict, *,
              m: LoadedModel, data, w, context: dict, paths: dict, command: str, target_length: int, seed: int,
              samples: int, param_dtype: str, out: str, t_start: float) -> tuple[dict, dict]:
    """The result line (stdout) and ``summary.json`` of a search so far."""
    best, space = res.best, setup["space"]
    base_ppl = {k: v["ppl"] for k, v in baselines.items()}
    line = {"command": "search", "model": m.source, "model_sha256": m.sha256, "data": data,
            "target_length": target_length, "original_window": setup["window"], "scale": setup["scale"], "seed": seed,
            "samples": samples, "documents": w.documents, "stopped": res.stopped,
            "evaluations": res.evaluations, "new_evaluations": res.new_evaluations,
            "replayed_evaluations": res.replayed,
            "generations": max((g["generation"] for g in res.generations), default=-1) + 1,
            "ppl": best.ppl if best and math.isfinite(best.ppl) else None,
            "start_tokens": best.candidate.start_tokens if best else None,
            "critical_dim": best.candidate.critical_dim if best else None,
            "attention_factor": fit.document(best.candidate)["attention_factor"] if best else None,
            "kind": setup["kind"], "mode": settings.mode, "fitness": settings.fitness, "slot": setup["slot"],
            "baselines": base_ppl, "out": out, **paths}
    summary = dict(line)
    summary.update({
        "result": None if best is None else {
            "ppl": line["ppl"], "nll": best.record.get("nll"), "nll_per_window": best.record.get("nll_per_window"),
            "start_tokens": best.candidate.start_tokens, "long_factor": fit.long_factor(best.candidate).tolist(),
            "searched_factors": space.factors(best.candidate).tolist(), "eval": best.record.get("eval"),
            "generation": best.record.get("generation"), "origin": best.record.get("origin"),
            "origin_described": setup_lib.describe_origin(best.record.get("origin"), settings.step)},
        "warning": not_below_baselines(best, base_ppl),
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


def not_below_baselines(best, baselines: Mapping[str, float]) -> str | None:
    """The warning of a search whose best candidate is not below every baseline (None when it is)."""
    if best is None:
        return None
    worse = {k: v for k, v in baselines.items() if v is not None and not best.ppl < v}
    if not worse:
        return None
    name = min(worse, key=worse.get)
    return (f"the best candidate ({best.ppl:.4f}) is not below the {name} baseline ({worse[name]:.4f})"
            + (f" nor {len(worse) - 1} other(s)" if len(worse) > 1 else "") + ": more iterations, a larger population "
            "or other seeds may find better factors; the baseline itself may be the better choice")


def search_info(res: evolve_lib.EvolveResult, setup: dict, settings: SearchSettings, baselines: dict, *,
                target_length: int, samples: int) -> dict:
    """The ``provenance.search`` block of the factors file."""
    info = {"ppl": res.best.ppl if math.isfinite(res.best.ppl) else None, "target_length": target_length,
            "samples": samples, "evaluations": res.evaluations, "factor_range": settings.factor_range,
            "step": settings.step, "baselines": {k: v["ppl"] for k, v in baselines.items()}, "kind": setup["kind"],
            "mode": settings.mode, "fitness": settings.fitness, "slot": setup["slot"]}
    if settings.attention_factor_range:
        info["attention_factor_range"] = list(settings.attention_factor_range)
    for key in ("base_factors_file", "readjust", "theoretical_critical_dim"):
        if setup.get(key) is not None:
            info[key] = setup[key]
    if setup["kind"] == "progressive":
        info["lambda_2"] = setup["space"].factors(res.best.candidate).tolist()
    return info


def draw(res: evolve_lib.EvolveResult, fit, setup: dict, cfg, baselines: dict, *, model_name: str, out: str,
         target_length: int) -> list[str]:
    """The progress and factors PNGs of a finished search."""
    from longrope_jax.search import plots

    scale, window = setup["scale"], setup["window"]
    base = np.ones(setup["space"].num_pairs) if setup["base"] is None else setup["base"]
    refs = {f"{label} factors at {scale:g}": base * v for label, v in
            zip(("PI", "NTK", "YaRN"), setup_lib.reference_factors(cfg, scale, window).values())}
    if setup["base"] is not None:
        refs = {"base " + k: v for k, v in refs.items()}
        refs["base (lambda_1)"] = base
    name = os.path.basename(str(model_name).rstrip("/"))
    title = f"{name}: {window} -> {target_length}"
    if setup["kind"].startswith("readjust"):
        title = f"{name}: readjust at {target_length} ({setup['slot']})"
    elif res.best.candidate.critical_dim is not None:
        title += f", critical dim {res.best.candidate.critical_dim}"
    return [plots.progress(res.generations, os.path.join(out, PROGRESS_PNG), {k: v["ppl"] for k, v in baselines.items()},
                           title=title),
            plots.factors(fit.long_factor(res.best.candidate), refs, os.path.join(out, FACTORS_PNG), title=title,
                          start_tokens=res.best.candidate.start_tokens)]


def run(model: str | LoadedModel, data: str | list[str], target_length: int, out: str, *,
        settings: SearchSettings | Mapping | None = None, samples: int = 5, seed: int = 0, field: str = "text",
        tokenizer: str | None = None, param_dtype: str = "float32", sliding_window: bool = True,
        attention: str = "auto", q_chunk: int | None = None, loss_chunk: int = 1024,
        memory_budget: int | None = None, max_evals: int | None = None, time_budget: float | None = None,
        base_factors=None, readjust: str | None = None, original_window: int | None = None,
        command: str | None = None, progress: bool = True, on_generation=None, mesh=None, log=None) -> dict:
    """The ``search`` job; returns the result line (also what ``summary.json`` starts with).

    Args:
      model: a model path (as for ``ppl``), or a model already loaded (``loading.LoadedModel``).
      data: a text file / .jsonl / directory / ``pydoc:``, or a list of such sources (the windows
        are then split across them, see ``data.windows_from``).
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
      mesh: score on this device mesh (``parallel.build``; one process); None: the local devices.
    """
    from longrope_jax.data import source_label

    log = log or (lambda msg: None)
    t_start = time.time()
    a = check_args(target_length, samples, seed, max_evals, time_budget, settings, out)
    target_length, samples, seed, max_evals, settings = (a[k] for k in ("target_length", "samples", "seed",
                                                                        "max_evals", "settings"))
    out_arg, out = out, a["out"]  # the command records --out as given
    m = model_from(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    tok = m.need_tokenizer()
    setup = load_setup(m.cfg, settings, target_length, original_window=original_window, base_factors=base_factors,
                       readjust=readjust, log=log)
    window, scale, space = setup["window"], setup["scale"], setup["space"]
    w, tokens, weights, needle_info = search_windows(tok, data, field, target_length, samples, seed, settings)
    data = source_label(data)
    what = {"plain": "", "progressive": " (progressive: lambda_2 over the fine-tuned window)",
            "longrope2": f" (LongRoPE2 mode: critical dim in {list(space.critical or ())}, theoretical "
                         f"{setup.get('theoretical_critical_dim')})",
            "readjust-short": f" (readjust of {readjust}: short factors)",
            "readjust-per_length": f" (readjust of {readjust}: per_length entry)"}[setup["kind"]]
    log(f"search: {m.source} (window {window}) to {target_length} tokens (scale {scale:g}){what} on "
        f"{len(w.documents)} window(s), fitness {settings.fitness}; population {settings.population}, "
        f"{settings.iterations} iterations, range {settings.factor_range if settings.mode == 'longrope' else '[s, 2s]'}")

    if mesh is not None:
        parallel.check(mesh, cfg=m.cfg, length=target_length)
    fit = run_lib.make_fitness(m.params, m.cfg, tokens, setup, weights=weights, memory_budget=memory_budget,
                               attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk, mesh=mesh)
    if not parallel.is_main():  # several processes: score what process 0 sends; it alone decides and writes
        run_lib.follow(fit)
        return None
    with run_lib.leading(fit):
        context = search_context(m, setup, fit, w, needle_info, target_length=target_length, samples=samples,
                                 param_dtype=param_dtype, sliding_window=sliding_window, loss_chunk=loss_chunk)
        if command is None:
            extra = {"field": field, "tokenizer": tokenizer, "param_dtype": param_dtype,
                     "no_sliding_window": not sliding_window, "attention": attention, "q_chunk": q_chunk,
                     "loss_chunk": loss_chunk, "max_evals": max_evals, "time_budget": time_budget,
                     "base_factors": base_factors if isinstance(base_factors, str) else None, "readjust": readjust}
            command = canonical_command(m.source, data, target_length, out_arg, settings=settings, samples=samples,
                                        seed=seed, extra=extra)
        # On an object store the files are written in a local mirror (pulled now) and pushed whole
        # after each baseline and generation (an object cannot be appended to: log.jsonl is
        # rewritten whole; evaluations after the last push are redone on resume).
        rd = storage.RunDir(out, [LOG_FILE, SUMMARY_FILE, BASELINES_FILE, FACTORS_FILE], log=log)
        files = (("factors", FACTORS_FILE), ("summary", SUMMARY_FILE), ("log", LOG_FILE),
                 ("baselines_file", BASELINES_FILE))
        os.makedirs(rd.local, exist_ok=True)
        paths = {k: os.path.join(rd.local, f) for k, f in files}
        shown = {k: rd.show(f) for k, f in files}  # what results name
        # A log of another search is refused now, before any scoring.
        evolve_lib.check_log(paths["log"], evolve_lib.make_header(space, settings, seed, setup["seeds"], context))

        names = list(setup["baselines"])
        prev, prev_src = {}, None
        for src in ("baselines_file", "summary"):
            got = previous_baselines(paths[src], context, names)
            if len(got) > len(prev):
                prev, prev_src = got, os.path.basename(paths[src])
        complete = len(prev) == len(names)
        if complete:
            log(f"baselines: {_ppls(prev)} (from {prev_src})")
        elif prev:
            log(f"baselines: {len(prev)} of {len(names)} from {prev_src} ({_ppls(prev)}); scoring the rest")
        t1, scored = time.time(), dict(prev)

        def on_baseline(name, rec, seconds):  # each baseline kept as soon as it is scored
            scored[name] = rec
            atomic.write_json(paths["baselines_file"],
                              {"context": context, "baselines_detail": {n: scored[n] for n in names if n in scored}})
            rd.push([BASELINES_FILE])
            if fit.batch_size == 1:
                log(f"baseline {name}: ppl {rec['ppl']:.4f} ({len(scored)}/{len(names)}, {seconds:.0f}s)")

        def write(baselines, res: evolve_lib.EvolveResult) -> dict:
            line, summary = summarise(res, fit, setup, settings, baselines, m=m, data=data, w=w, context=context,
                                      paths=shown, command=command, target_length=target_length, seed=seed,
                                      samples=samples, param_dtype=param_dtype, out=out, t_start=t_start)
            if res.best is not None:
                info = search_info(res, setup, settings, baselines, target_length=target_length, samples=samples)
                atomic.write_json(paths["factors"], setup_lib.factors_document(
                    fit, res.best, model=m.source, model_sha256=m.sha256, seed=seed, documents=w.documents,
                    command=command, search=info, parent=setup["parent"]))
            atomic.write_json(paths["summary"], summary)
            rd.push([LOG_FILE, FACTORS_FILE, SUMMARY_FILE])  # the summary last
            if on_generation is not None:
                on_generation(summary)
            return line

        def on_baselines(baselines):
            if not complete:
                log(f"baselines: {_ppls(baselines)} ({time.time() - t1:.1f}s)")

        s = run_lib.search_factors(fit, setup, settings, seed=seed, log_path=paths["log"], context=context,
                                   known_baselines=prev, on_baseline=on_baseline, on_baselines=on_baselines,
                                   on_generation=write,
                                   max_evals=max_evals,
                                   time_budget=None if time_budget is None else time_budget - (time.time() - t_start),
                                   progress=progress, log=log)
        res, baselines = s.result, s.baselines
        if res.best is None:
            write(baselines, res)
            raise SearchError(f"no candidate was evaluated ({res.stopped}): raise --max-evals / --time-budget")
        line = write(baselines, res)
        plots = draw(res, fit, setup, m.cfg, baselines, model_name=m.source, out=rd.local, target_length=target_length)
        rd.push([os.path.basename(p) for p in plots])
        line["plots"] = [rd.show(os.path.basename(p)) for p in plots]
        base_ppl = {k: v["ppl"] for k, v in baselines.items()}
        best = res.best.candidate
        crit = "" if best.critical_dim is None else f", critical dim {best.critical_dim}"
        origin = setup_lib.describe_origin(res.best.record.get("origin"), settings.step)
        log(f"search {res.stopped}: best ppl {res.best.ppl:.4f} (start tokens {best.start_tokens}{crit}; {origin}) "
            f"after {res.evaluations} evaluation(s); baselines "
            + ", ".join(f"{k} {v:.4f}" for k, v in base_ppl.items()))
        warning = not_below_baselines(res.best, base_ppl)
        if warning:
            line["warning"] = warning
            log(f"WARNING: {warning}")
        log(f"wrote {shown['factors']}, {shown['summary']}, {shown['log']}, {line['plots'][0]}, {line['plots'][1]}")
        return line


def main(job: dict, log) -> int:
    """``longrope-jax search`` with resolved settings (``search.settings.resolve``). Over several
    processes every process scores its share; process 0 runs the search, writes and prints."""
    job = dict(job)
    mesh = parallel.from_settings({k: job.pop(k) for k in parallel.SETTINGS})
    line = run(**job, mesh=mesh, log=log if parallel.is_main() else None)
    if parallel.is_main():
        print(json.dumps(line), flush=True)
    return 0
