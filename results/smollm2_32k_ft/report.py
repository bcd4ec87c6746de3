#!/usr/bin/env python
"""The study's tables and plots from what ``run_all.sh`` wrote: for each length, every arm's
held-out perplexity after fine-tuning and before (the base model with the arm's starting
factors), per document, per domain (Vim help, Node.js API) and mean, with the margin over the
YaRN arm after fine-tuning (1 - ppl / YaRN's: positive is better); the paired per-document
difference of the two fine-tuned arms against the spread between documents; passkey accuracy.
Writes ``report.md`` and ``ppl_L.png`` (each document's perplexity relative to the fine-tuned
YaRN arm's) beside this file. Missing pieces are reported as missing.

    python results/smollm2_32k_ft/report.py
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))  # documents are named relative to it
sys.path.insert(0, os.path.dirname(HERE))
from report import margin_plot, margin_table  # noqa: E402  (results/report.py)

ARMS = {"longrope": "LongRoPE factors (32k search)", "yarn4": "YaRN s=4"}
STAGES = {"after": "after 300 steps", "before": "before fine-tuning"}
REFERENCE = "yarn4 after"
STEPS = 300


def _domain(doc: str) -> str:
    path, _, n = doc.rpartition(":")
    with open(os.path.join(ROOT, path)) as fh:
        source = json.loads(fh.readlines()[int(n) - 1])["source"]
    return "Vim help" if "/vim" in source else "Node.js API"


def _read(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.loads(fh.readline())


def ppl_section(length: int) -> str:
    rows = {f"{arm} {stage}": _read(os.path.join(HERE, stage, f"{arm}_{length}.jsonl"))
            for stage in STAGES for arm in ARMS}
    missing = [k for k, v in rows.items() if v is None]
    rows = {k: v for k, v in rows.items() if v is not None}
    out = [f"## Held-out perplexity at {length} tokens\n"]
    if REFERENCE not in rows:
        return out[0] + f"\nNot scored yet: {', '.join(missing)}.\n"
    describe = lambda name: f"{ARMS[name.split()[0]]}, {STAGES[name.split()[1]]}"  # noqa: E731
    out.append(margin_table(rows, REFERENCE, describe, _domain, ref_name="fine-tuned YaRN"))
    if missing:
        out.append(f"\nNot scored yet: {', '.join(missing)}.")
    png = os.path.join(HERE, f"ppl_{length}.png")
    margin_plot({describe(k): v for k, v in rows.items()}, describe(REFERENCE), png,
                title=f"SmolLM2-135M, 8k -> {length}: held-out documents (mean perplexity in brackets)",
                ref_label="the fine-tuned YaRN arm")
    out.append(f"\n![perplexity relative to the fine-tuned YaRN arm]({os.path.basename(png)})")
    a, b = rows.get("longrope after"), rows.get("yarn4 after")
    if a is not None and b is not None:
        gap = np.asarray(b["nll_per_window"]) - np.asarray(a["nll_per_window"])  # > 0: LongRoPE better
        spread = [float(np.ptp(r["nll_per_window"])) for r in (a, b)]
        out.append(
            f"\nFine-tuned arms, document by document (NLL per token, YaRN minus LongRoPE; positive: "
            f"LongRoPE better): {', '.join(f'{x:+.4f}' for x in gap)}; mean {gap.mean():+.4f}, spread "
            f"(max - min) {np.ptp(gap):.4f}, sign the same on {int(max((gap > 0).sum(), (gap < 0).sum()))} of "
            f"{len(gap)}. The spread between documents of each arm's NLL is {spread[0]:.3f} (LongRoPE) and "
            f"{spread[1]:.3f} (YaRN): the arms' gap is {'smaller' if abs(gap.mean()) < min(spread) else 'larger'} "
            f"than the spread between documents, and {'larger' if abs(gap.mean()) > np.ptp(gap) else 'not larger'} "
            f"than the spread of the paired differences.")
    return "\n".join(out) + "\n"


def passkey_section() -> str:
    lines = ["## Passkey retrieval at 16384 tokens (5 trials)\n", "| arm | stage | accuracy |", "|---|---|---|"]
    for stage in STAGES:
        for arm in ARMS:
            path = os.path.join(HERE, stage, f"passkey_{arm}.jsonl")
            acc = "not run yet"
            if os.path.exists(path):
                with open(path) as fh:
                    last = json.loads(fh.read().splitlines()[-1])
                acc = ", ".join(f"{n}: {100 * v:.0f}%" for n, v in last["accuracy"].items())
            lines.append(f"| {ARMS[arm]} | {STAGES[stage]} | {acc} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    os.chdir(ROOT)
    text = "\n".join([f"# Fine-tuning from the searched factors against YaRN ({STEPS} steps): tables\n",
                      "Written by `python results/smollm2_32k_ft/report.py` from `before/` and `after/`.\n",
                      ppl_section(32768), ppl_section(16384), passkey_section()])
    tmp = os.path.join(HERE, "report.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(HERE, "report.md"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
