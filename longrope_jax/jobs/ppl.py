"""The ``ppl`` job: perplexity of a model under RoPE scalings at given lengths (the protocol of
docs/formats.md). JSON lines on stdout, the table and progress on stderr, a plot on request.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Iterator

from longrope_jax import config_files, evaluate
from longrope_jax import factors as factors_lib
from longrope_jax import parallel
from longrope_jax.attention import select
from longrope_jax.data import read_sources, source_label, windows_from
from longrope_jax.config_files import MODEL_KINDS
from longrope_jax.loading import LoadedModel, model_from

# What each setting of ``longrope-jax ppl`` must hold (its defaults: ``configs/ppl/default.py``).
KINDS = dict(**parallel.SETTINGS_KINDS, **MODEL_KINDS, data="strs", length="ints", rope="strs", samples="int",
             seed="int0", field="str", needles="int0", attention="auto|dense|blockwise|fused|ring|ring_splash",
             q_chunk="int?", loss_chunk="int", memory_budget_gib="number?", plot="bool", out="str?")
REQUIRED = ("model", "data", "length")


def resolve(config: str | None = None, overrides=(), flags=None):
    """The settings of one ``ppl`` run: flags over overrides over the config over the defaults
    (``config_files.resolve``, every command's one merge)."""
    return config_files.resolve("ppl", KINDS, config=config, overrides=overrides, flags=flags, required=REQUIRED,
                                listy=("data", "length", "rope"))


def run(model: str | LoadedModel, data: str | list[str], lengths: list[int], ropes: list[str], *, samples: int = 1,
        seed: int = 0, param_dtype: str = "float32", attention: str = "auto", q_chunk: int | None = None,
        loss_chunk: int = 1024, tokenizer: str | None = None, sliding_window: bool = True, field: str = "text",
        memory_budget: int | None = None, mesh=None, needles: int = 0, log=None) -> Iterator[dict]:
    """Yields one result dict per (length, rope), in the order given.

    ``needles`` > 0 also scores the LongRoPE2 fitness on the same windows: ``needles`` key
    sentences planted in each (``needle.needle_windows``, seeded by ``seed``), the NLL of the
    answers' digit tokens only (``needle_ppl``, ``needle_nll_per_window``). The planted windows
    are other token sequences, so this doubles the forwards (``seconds`` counts both).

    Every input is checked before the model loads (data sources, ``--rope`` values and their
    factors files, the lengths against ``mesh``). At each length the ropes that share a spec
    structure are scored together (``evaluate.score_named``) on ``mesh`` (``parallel.build``;
    None: the local devices). ``model``: a path, or a model already loaded.
    """
    log = log or (lambda msg: None)
    parsed = {r: factors_lib.parse_rope(r) for r in ropes}
    for length in lengths if mesh is not None else ():
        parallel.check(mesh, length=length)
    sources = read_sources(data, field, log=log)
    t0 = time.time()
    m = model_from(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    tok = m.need_tokenizer()
    for p in parsed.values():  # factors files against this model, before any scoring
        if p.kind == "file":
            factors_lib.check_model(p.factors, m.cfg, p.value)
    if mesh is not None:
        parallel.check(mesh, cfg=m.cfg)
    name = m.source
    if not isinstance(model, LoadedModel):
        log(f"loaded {name} in {time.time() - t0:.1f}s: {m.cfg.num_hidden_layers} layers, window "
            f"{m.cfg.max_position_embeddings}")
    label = source_label(data)
    tok_info = tok.describe()
    for length in lengths:
        w = windows_from(sources, tok, length, samples, seed)
        if w.skipped_short:
            log(f"length {length}: skipped {w.skipped_short} document(s) shorter than {length} tokens")
        attn = select.pick(attention, length, cfg=m.cfg, mesh=mesh, memory_budget=memory_budget,
                           windows=w.tokens.shape[0])
        specs = {r: factors_lib.resolve_rope(p, m.cfg, length, m.factors) for r, p in parsed.items()}
        kw = dict(log=log, memory_budget=memory_budget, attention=attn, q_chunk=select.default_block(length, q_chunk),
                  loss_chunk=loss_chunk, mesh=mesh)
        scores = evaluate.score_named(m.params, m.cfg, w.tokens, specs, **kw)
        if needles:
            from longrope_jax.needle import needle_windows

            nw = needle_windows(tok, w.tokens, seed, needles)
            needle_scores = evaluate.score_named(m.params, m.cfg, nw.tokens, specs, weights=nw.weights, **kw)
        for r in ropes:
            per, secs = scores[r]
            mean = float(per.mean())
            method = factors_lib.rope_label(parsed[r], m.cfg, m.factors)
            rec = {
                "model": name,
                "model_sha256": m.sha256,
                "data": label,
                "length": length,
                "rope": r,
                "method": method,
                "ppl": math.exp(mean),
                "nll": mean,
                "nll_per_window": per.tolist(),
                "predictions": int(w.tokens.shape[0] * (length - 1)),
                "documents": w.documents,
                "documents_skipped_short": w.skipped_short,
                "documents_available": w.available,
                "seed": seed,
                "tokenizer": tok_info,
                "beyond_window": length > m.cfg.max_position_embeddings and method == "none",
                "original_window": m.cfg.max_position_embeddings,
                "param_dtype": param_dtype,
                "attention": attn,
                "mesh": None if mesh is None else parallel.describe(parallel.axis_sizes(mesh)),
                "seconds": round(secs, 2),
            }
            if needles:
                nper, nsecs = needle_scores[r]
                rec.update(needles=needles, needle_ppl=math.exp(float(nper.mean())),
                           needle_nll_per_window=nper.tolist(), needle_scored_tokens=nw.weights.sum(1).tolist(),
                           needle_depths=nw.depths, seconds=round(secs + nsecs, 2))
            yield rec


def table(rows: list[dict]) -> str:
    """The human table of ``run``'s records."""
    needles = any("needle_ppl" in r for r in rows)
    head = (f"{'length':>8} {'rope':<24} {'ppl':>12}" + (f" {'needle ppl':>12}" if needles else "")
            + f" {'predictions':>12} {'seconds':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " (beyond window, unscaled)" if r.get("beyond_window") else ""
        lines.append(f"{r['length']:>8} {r['rope']:<24} {r['ppl']:>12.4f}"
                     + (f" {r['needle_ppl']:>12.4f}" if needles else "")
                     + f" {r['predictions']:>12} {r['seconds']:>8.1f}{mark}")
    return "\n".join(lines)


def main(s: dict, log) -> int:
    """``longrope-jax ppl`` with resolved settings ``s`` (:func:`resolve`)."""
    rows = []
    gib = s["memory_budget_gib"]
    mesh = parallel.from_settings(s)
    if not parallel.is_main():  # process 0 alone writes stdout and files
        log = lambda msg: None  # noqa: E731
    for rec in run(s["model"], s["data"], list(s["length"]), list(s["rope"]), samples=s["samples"], seed=s["seed"],
                   param_dtype=s["param_dtype"], attention=s["attention"], q_chunk=s["q_chunk"],
                   loss_chunk=s["loss_chunk"], tokenizer=s["tokenizer"], sliding_window=not s["no_sliding_window"],
                   field=s["field"], memory_budget=int(gib * 2**30) if gib else None, mesh=mesh,
                   needles=s["needles"], log=log):
        if parallel.is_main():
            print(json.dumps(rec), flush=True)
        rows.append(rec)
    log(table(rows))
    if s["plot"] and parallel.is_main():
        from longrope_jax.plots import ppl_vs_length

        log(f"wrote {ppl_vs_length(rows, os.path.join(s['out'] or '.', 'ppl_vs_length.png'))}")
    return 0
