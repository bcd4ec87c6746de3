#!/usr/bin/env python
"""The held-out table and plot of issue 17's re-run: every ``heldout/NAME.jsonl`` (one ``ppl``
line each, 4 windows of 16384 tokens from two domains no search saw) as per-document perplexity,
per-domain and overall perplexity, and the margin over YaRN (s = 2) on each (1 - ppl / YaRN's: positive is better); writes
``heldout.md`` and ``heldout.png`` (each document's perplexity relative to YaRN's) beside this
file. Methods not scored yet are listed as missing.

    python results/smollm2_16k_domains/report.py
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
# name -> what it is (the controls separate the factors from the attention factor, issue 17 section 1).
METHODS = {
    "yarn2": "YaRN s=2 (attention factor 1.069)",
    "ntk2": "static NTK s=2",
    "dynamic2": "dynamic NTK s=2",
    "pi2": "PI s=2",
    "yarn_longrope_attention": "YaRN's factors, LongRoPE attention factor 1.038",
    "search16k": "committed 16k search (1 pydoc window), attention 1.038",
    "search16k_yarn_attention": "committed 16k search's factors, YaRN attention 1.069",
    "search16k_lr2": "committed LongRoPE2-mode search, attention 1.038",
    "search16k_lr2_yarn_attention": "committed LongRoPE2-mode factors, YaRN attention 1.069",
    "search": "re-run search (3 windows, code + prose), attention 1.038",
    "search_yarn_attention": "re-run search's factors, YaRN attention 1.069",
    "search_gene": "re-run search with the attention-factor gene (found 1.04), 256 start tokens",
    "search_gene_yarn_attention": "gene search's factors, YaRN attention 1.069",
}
REFERENCE = "yarn2"


def _domain(doc: str) -> str:
    return os.path.basename(doc).split(":")[0].removeprefix("heldout_").removesuffix(".jsonl")


def load() -> dict[str, dict]:
    out = {}
    for name in METHODS:
        path = os.path.join(HERE, "heldout", f"{name}.jsonl")
        if os.path.exists(path):
            with open(path) as fh:
                out[name] = json.loads(fh.readline())
    return out


def table(rows: dict[str, dict]) -> tuple[str, list[str]]:
    ref = rows[REFERENCE]
    docs = ref["documents"]
    domains = sorted({_domain(d) for d in docs})
    for name, r in rows.items():
        if r["documents"] != docs:
            raise SystemExit(f"heldout/{name}.jsonl: documents {r['documents']} differ from {REFERENCE}'s {docs}")

    def dom_ppl(r, dom):
        return math.exp(np.mean([n for n, d in zip(r["nll_per_window"], docs) if _domain(d) == dom]))

    head = (["method", *[os.path.basename(d) for d in docs], *[f"{d} ppl" for d in domains], "mean ppl",
             *[f"margin over YaRN, {d}" for d in domains], "margin over YaRN, mean", "per-document margin (min / max)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["ppl"]):
        per = np.exp(r["nll_per_window"])
        margins = 1 - per / np.exp(ref["nll_per_window"])
        cells = [f"{name}: {METHODS[name]}", *[f"{p:.3f}" for p in per], *[f"{dom_ppl(r, d):.3f}" for d in domains],
                 f"**{r['ppl']:.3f}**", *[f"{100 * (1 - dom_ppl(r, d) / dom_ppl(ref, d)):+.2f}%" for d in domains],
                 f"{100 * (1 - r['ppl'] / ref['ppl']):+.2f}%",
                 f"{100 * margins.min():+.2f}% / {100 * margins.max():+.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    missing = [n for n in METHODS if n not in rows]
    return "\n".join(lines), missing


def plot(rows: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = np.exp(rows[REFERENCE]["nll_per_window"])
    docs = [os.path.basename(d) for d in rows[REFERENCE]["documents"]]
    names = sorted(rows, key=lambda n: rows[n]["ppl"])
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(names) + 1.5))
    height, clip, lowest = 0.8 / len(docs), 8.0, 0.0  # bars beyond +-clip % (PI) are cut there and labelled
    for j, doc in enumerate(docs):
        vals = np.array([100 * (np.exp(rows[n]["nll_per_window"][j]) / ref[j] - 1) for n in names])
        y = np.arange(len(names)) + (j - (len(docs) - 1) / 2) * height
        ax.barh(y, np.clip(vals, -clip, clip), height, label=doc)
        lowest = min(lowest, vals.min())
        for yi, v in zip(y, vals):
            if abs(v) > clip:
                ax.text(np.sign(v) * clip, yi, f" {v:+.0f}% ", va="center", fontsize=7,
                        ha="right" if v > 0 else "left", color="white")
    ax.set_xlim(max(-clip, lowest - 0.5), clip)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(np.arange(len(names)), [f"{n} ({rows[n]['ppl']:.3f})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity relative to YaRN s=2 on the same document (%; left of 0 is better)")
    ax.set_title("SmolLM2-135M at 16384 tokens, held-out Vim help and Node.js docs (mean perplexity in brackets)")
    ax.legend(fontsize=8, loc="upper right")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def needles_table() -> str:
    """``heldout_needles/needles.jsonl`` (``ppl --needles``): plain and needle perplexity per method."""
    path = os.path.join(HERE, "heldout_needles", "needles.jsonl")
    if not os.path.exists(path):
        return "\n\nNeedle perplexity on held-out windows (`needles.sh`): not scored yet.\n"
    with open(path) as fh:
        recs = [json.loads(line) for line in fh if line.strip()]
    docs = [os.path.basename(d) for d in recs[0]["documents"]]
    lines = [f"\n\nNeedle perplexity ({recs[0]['needles']} needles per window, the answers' digits only) and "
             f"plain perplexity of the same {len(docs)} windows ({', '.join(docs)}):\n",
             "| rope | needle ppl | per window | plain ppl |", "|---|---|---|---|"]
    for r in sorted(recs, key=lambda r: r["needle_ppl"]):
        per = " / ".join(f"{math.exp(x):.3f}" for x in r["needle_nll_per_window"])
        lines.append(f"| {r['rope']} | **{r['needle_ppl']:.3f}** | {per} | {r['ppl']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    rows = load()
    if REFERENCE not in rows:
        raise SystemExit(f"heldout/{REFERENCE}.jsonl missing: nothing to compare with")
    md, missing = table(rows)
    text = md + ("\n\nNot scored yet: " + ", ".join(missing) if missing else "") + needles_table()
    tmp = os.path.join(HERE, "heldout.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(HERE, "heldout.md"))
    plot(rows, os.path.join(HERE, "heldout.png"))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
