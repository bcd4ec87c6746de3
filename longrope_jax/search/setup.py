"""What a search looks for, from its settings and loaded factors (no paths): the space, the seeds,
the baselines, where a candidate goes in the factors document; and that document.

Plain, progressive (``lambda_2`` over a fine-tuned model's ``lambda_1``), readjust (short factors
or a ``per_length`` entry of an extended model) and LongRoPE2 mode (docs/method.md).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from longrope_jax import factors as factors_lib
from longrope_jax import rope as rope_lib
from longrope_jax.search import genome
from longrope_jax.search.genome import SearchError
from longrope_jax.search.settings import SearchSettings

FACTORS_FILE = "factors.json"


def reference_factors(cfg, scale: float, window: int) -> dict[str, np.ndarray]:
    """PI, NTK and YaRN as per-pair factors at ``scale`` over ``window``: ``{"pi", "ntk", "yarn"}``
    float64[P] each (the search's seeds and the references of its plots)."""
    rd = cfg.rotary_dim
    return {"pi": np.full(rd // 2, float(scale)), "ntk": rope_lib.ntk_factors(rd, scale),
            "yarn": rope_lib.yarn_factors(cfg.rope_theta, rd, scale, window)}


SEED_NAMES = {"pi": "PI", "ntk": "NTK", "yarn": "YaRN"}


def describe_origin(origin: str | None, step: float) -> str | None:
    """What a log record's ``origin`` is, for people: a seed is not the baseline of the same
    name (its factors are rounded onto the search grid, and it carries LongRoPE's attention
    factor where the baseline has its own)."""
    if not origin or not origin.startswith("seed:"):
        return origin
    name = origin[len("seed:"):]
    if name in SEED_NAMES:
        return (f"the {SEED_NAMES[name]} seed: {SEED_NAMES[name]}'s factors rounded onto the {step:g} grid, with "
                f"LongRoPE's attention factor (not the {name} baseline)")
    return f"the seed {name}"


def seed_candidates(space: genome.Space, cfg, scale: float, original_max: int,
                    seed_factors: Sequence[tuple[str, Mapping]] = ()) -> list[tuple[str, genome.Candidate]]:
    """The initial seeds: PI, NTK and YaRN factors at ``scale`` rounded onto the grid, then the
    long factors of each ``(name, factors dict)`` of ``seed_factors`` (checked: range, monotone)."""
    seeds = [(name, genome.from_factors(v, space, source=f"{name} seed"))
             for name, v in reference_factors(cfg, scale, original_max).items()]
    for name, d in seed_factors:
        seeds.append((f"file:{name}", genome.from_factors(d["long_factor"], space, int(d.get("start_tokens") or 0),
                                                          clip=False, source=name)))
    return seeds


def factors_document(fitness, best, *, model: str, model_sha256: str | None, seed: int, documents: list[str],
                     command: str, search: Mapping[str, Any], parent: Mapping[str, Any] | None = None) -> dict:
    """The ``longrope-factors/1`` dict of the best candidate (docs/formats.md): the
    fitness's document with the candidate in its slot, and provenance (``parent``: the provenance
    of the file a progressive search or a readjust started from)."""
    from longrope_jax import __version__

    d = fitness.document(best.candidate)
    d["provenance"] = {"model": model, "model_sha256": model_sha256, "seed": seed, "documents": documents,
                       "command": command, "version": __version__, "search": dict(search)}
    if parent is not None:
        d["provenance"]["parent"] = dict(parent)
    factors_lib.check_model(factors_lib.validate(d, FACTORS_FILE), fitness.cfg, FACTORS_FILE)  # the file must load
    return d


def _seed_or_skip(make, name, log):
    try:
        return [(name, make())]
    except SearchError as e:
        log(f"seed {name} skipped: {e}")
        return []


def setup_search(cfg, settings: SearchSettings, target_length: int, *, original_window: int | None = None,
                 base_factors=None, readjust: Mapping | None = None, names: Mapping[str, str] | None = None,
                 seed_factors: Sequence[tuple[str, Mapping]] = (), log=None) -> dict:
    """What a search looks for, from its flags: the space, the seeds, the baselines, and where a
    candidate goes (``template`` and ``slot`` of :class:`~longrope_jax.search.fitness.PerplexityFitness`).

    - plain: factors for ``target_length`` over the model's window (``original_window``).
    - progressive (``base_factors``: a factors dict, or float[P]): ``lambda_2`` at
      ``target_length`` over the file's ``max_position_embeddings`` (the fine-tuning length);
      range and monotonicity apply to ``lambda_2``, the file gets ``lambda_2 * lambda_1``.
    - readjust (a factors dict): its short factors (``target_length`` at or below its
      original window) or a ``per_length[target_length]`` entry (above it), on the extended model.
    - LongRoPE2 mode (``settings.mode``): plain, with the critical-dimension space.

    Factors come loaded and checked against the model (``factors.load_for``); ``names`` says
    what messages call them (``{"readjust": path}``); ``seed_factors``: ``(name, factors dict)``
    pairs added to the seeds.
    """
    names = {"readjust": "the readjusted factors", **(names or {})}
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
        f, readjust = readjust, names["readjust"]
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
                   template=template, baselines=baselines)
        return out

    window = int(original_window or cfg.max_position_embeddings)
    switch = window
    template_extra = {}
    if base_factors is not None:
        if isinstance(base_factors, Mapping):
            f = base_factors
            lam1 = np.asarray(f["long_factor"], np.float64)
            window = int(f["max_position_embeddings"])
            switch = int(f["original_max_position_embeddings"])
            template_extra = {"short_factor": f["short_factor"], "attention_factor": f.get("attention_factor")}
            out["parent"] = f.get("provenance")
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
        seeds = seed_candidates(space, cfg, scale, window, seed_factors)
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

