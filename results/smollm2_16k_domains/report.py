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
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from report import margin_plot, margin_table  # noqa: E402  (results/report.py)

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
    md = margin_table(rows, REFERENCE, lambda n: f"{n}: {METHODS[n]}", _domain)
    missing = [n for n in METHODS if n not in rows]
    text = md + ("\n\nNot scored yet: " + ", ".join(missing) if missing else "") + needles_table()
    tmp = os.path.join(HERE, "heldout.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(HERE, "heldout.md"))
    margin_plot(rows, REFERENCE, os.path.join(HERE, "heldout.png"), ref_label="YaRN s=2",
                title="SmolLM2-135M at 16384 tokens, held-out Vim help and Node.js docs (mean perplexity in brackets)")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
