"""The ``demo`` job: the whole method on a model that trains here, as the ``extend`` pipeline of
``configs/extend/tiny.py`` (pretrain, search at 8x, three fine-tuning arms, a secondary search at
16x, a readjust, evaluation, an HF export), then ``DIR/report.md`` with a table per stage and arm,
which of the paper's claims hold at this scale, and PNGs. Resumable as ``extend`` is.

    longrope-jax demo --out runs/demo
"""

from __future__ import annotations

import json
import os

from longrope_jax import atomic
from longrope_jax.jobs import extend

KINDS = extend.KINDS


def resolve(config: str | None = None, overrides=(), flags=None):
    """The demo's pipeline: ``configs/extend/tiny.py`` unless ``--config`` names another."""
    return extend.resolve(config or "tiny", overrides, flags)


def _rows(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _ppl(rows, rope_prefix: str, length: int) -> float | None:
    for r in rows:
        if r["length"] == length and (r["rope"] == rope_prefix or r["rope"].endswith(rope_prefix)):
            return r["ppl"]
    return None


def report(s, run_dir: str, outputs: dict) -> dict:
    """``report.md``, ``ppl_vs_length.png`` and ``factors.png`` of a finished demo run; returns
    the claims with their numbers."""
    from longrope_jax import plots

    sh = s["shared"]
    w, lengths = sh["window"], list(sh["lengths"])
    long8, long16 = 8 * w, 16 * w
    ev = {k: _rows(outputs[k]["ppl"]) for k in ("eval_base", "eval_longrope", "eval_pi", "eval_yarn")}
    with open(os.path.join(run_dir, extend.MANIFEST)) as fh:
        manifest = json.load(fh)
    series = {  # name -> (rows, rope as scored)
        "base, no scaling": (ev["eval_base"], "none"), "base, PI 8x": (ev["eval_base"], "pi:8"),
        "base, YaRN 8x": (ev["eval_base"], "yarn:8"), "base, searched 8x": (ev["eval_base"], "factors.json"),
        "fine-tuned from the search (readjusted, 16x factors)": (ev["eval_longrope"], "factors.json"),
        "fine-tuned from the search (its 8x factors)": (ev["eval_longrope"], "model"),
        "fine-tuned from PI": (ev["eval_pi"], "model"), "fine-tuned from YaRN": (ev["eval_yarn"], "model"),
    }
    table = {name: [_ppl(rows, rope, n) for n in lengths] for name, (rows, rope) in series.items()}

    def pct(a, b):  # how much lower a is than b, in percent
        return None if a is None or b is None else 100 * (b - a) / b

    c = {
        "search beats PI and YaRN without fine-tuning (at 8x)": (
            table["base, searched 8x"][lengths.index(long8)],
            min(table["base, PI 8x"][lengths.index(long8)], table["base, YaRN 8x"][lengths.index(long8)])),
        "fine-tuning from the search ends at least as well as from PI or YaRN (at 8x)": (
            table["fine-tuned from the search (its 8x factors)"][lengths.index(long8)],
            min(table["fine-tuned from PI"][lengths.index(long8)], table["fine-tuned from YaRN"][lengths.index(long8)])),
        "the secondary search extends the fine-tuned model further (at 16x)": (
            table["fine-tuned from the search (readjusted, 16x factors)"][lengths.index(long16)],
            table["fine-tuned from the search (its 8x factors)"][lengths.index(long16)]),
    }
    claims = {k: {"ours": a, "against": b, "margin_percent": pct(a, b), "holds": a is not None and b is not None
                  and a <= b} for k, (a, b) in c.items()}
    short, base_short = table["fine-tuned from the search (readjusted, 16x factors)"][0], table["base, no scaling"][0]
    claims["the readjusted short factors keep the original window within 2% of the base model"] = {
        "ours": short, "against": base_short, "margin_percent": pct(short, base_short),
        "holds": short is not None and base_short is not None and short <= 1.02 * base_short}
    records = [{"rope": name, "length": n, "ppl": p} for name, ps in table.items() for n, p in zip(lengths, ps)
               if p is not None]
    plots.ppl_vs_length(records, os.path.join(run_dir, "ppl_vs_length.png"),
                        title=f"tiny LLaMA, window {w}: held-out prose perplexity")
    factors = {name: json.load(open(outputs[stage]["factors"])) for name, stage in
               (("searched 8x", "search8x"), ("secondary 16x", "search16x"), ("readjusted", "readjust"))}
    _factors_png(factors, os.path.join(run_dir, "factors.png"))
    lines = [f"# The LongRoPE demo: a tiny LLaMA from a {w}-token window to {long16}", "",
             f"Pipeline `configs/extend/tiny.py` (`{run_dir}`); every stage's settings and time in "
             "`pipeline.json`. Held out: prose (pydoc); the model was trained on code (`stdlib:`).", "",
             "## Stages", "", "| stage | kind | seconds | result |", "|---|---|---|---|"]
    for name, rec in manifest["stages"].items():
        out = outputs[name]
        result = (f"best ppl {out['ppl']:.3f}" if out.get("ppl") is not None and not isinstance(out.get("ppl"), str)
                  else "")
        lines.append(f"| {name} | {rec['kind']} | {rec.get('seconds', '')} | {result} |")
    lines += ["", "## Held-out perplexity by length", "",
              "| model and RoPE | " + " | ".join(str(n) for n in lengths) + " |",
              "|---|" + "---|" * len(lengths)]
    for name, ps in table.items():
        lines.append(f"| {name} | " + " | ".join("" if p is None else f"{p:.3f}" for p in ps) + " |")
    lines += ["", "## The paper's claims at this scale", "", "| claim | ours | against | margin | holds |",
              "|---|---|---|---|---|"]
    def fmt(x, spec=".3f", suffix=""):
        return "" if x is None else f"{x:{spec}}{suffix}"

    for k, v in claims.items():
        lines.append(f"| {k} | {fmt(v['ours'])} | {fmt(v['against'])} | {fmt(v['margin_percent'], '+.2f', '%')} | "
                     f"{'yes' if v['holds'] else '**no**'} |")
    lines += ["", "![perplexity against length](ppl_vs_length.png)", "", "![factors](factors.png)", "",
              f"The export (`export/`, the fine-tuned LongRoPE arm with the readjusted short and the secondary "
              f"search's long factors, `max_position_embeddings` {long16}) loads in "
              "`transformers.AutoModelForCausalLM`."]
    with atomic.file(os.path.join(run_dir, "report.md")) as fh:
        fh.write("\n".join(lines) + "\n")
    atomic.write_json(os.path.join(run_dir, "report.json"), {"lengths": lengths, "table": table, "claims": claims})
    return claims


def _factors_png(factors: dict, path: str) -> str:
    from longrope_jax.plots import _pyplot, _save

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in factors.items():
        ax.plot(d["long_factor"], label=f"{name}: long")
    ax.plot(factors["readjusted"]["short_factor"], linestyle="--", label="readjusted: short")
    ax.set_xlabel("RoPE pair i (low i = high frequency)")
    ax.set_ylabel("factor lambda_i")
    ax.legend(fontsize=8)
    return _save(fig, path)


def main(s, log) -> int:
    """``longrope-jax demo``: the pipeline, then the report."""
    from longrope_jax import parallel

    mesh = parallel.from_settings(s)
    outputs = extend.run(s, mesh=mesh, log=log)
    if parallel.is_main():
        run_dir = os.path.abspath(s["out"])
        link = os.path.join(run_dir, "export")
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(outputs["export"]["hf"], run_dir), link)
        claims = report(s, run_dir, outputs)
        for k, v in claims.items():
            log(f"{'holds' if v['holds'] else 'DOES NOT HOLD'}: {k} ({v['ours']:.3f} against {v['against']:.3f})")
        log(f"wrote {os.path.join(run_dir, 'report.md')}")
        print(json.dumps({"out": run_dir, "claims": claims}))
    return 0
