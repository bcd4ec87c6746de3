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


READJUST = {"base": "base model (8k window, no scaling)",
            "longrope_ft": "LongRoPE arm after 300 steps, short factors 1.0",
            "longrope_ft_readjusted": "LongRoPE arm after 300 steps, short factors readjusted at 8k",
            "longrope_ft_none": "LongRoPE arm after 300 steps, no scaling (no attention factor)",
            "yarn4_ft": "YaRN arm after 300 steps (YaRN s=4 at every length)"}


def readjust_section() -> str:
    """Within the original window: each fine-tuned variant against the base model (the goal of the
    short-context readjust: within 2% of it), per length."""
    d = os.path.join(HERE, "readjust")
    lines = {k: {r["length"]: r for r in map(json.loads, open(os.path.join(d, f"{k}.jsonl")))}
             for k in READJUST if os.path.exists(os.path.join(d, f"{k}.jsonl"))}
    out = ["## Within the original window: the short-context readjust\n"]
    if "base" not in lines:
        return out[0] + "\nNot scored yet.\n"
    for length in sorted(lines["base"]):
        rows = {k: v[length] for k, v in lines.items() if length in v}
        out.append(f"### {length} tokens\n")
        out.append(margin_table(rows, "base", READJUST.get, _domain, ref_name="the base model"))
        png = os.path.join(d, f"ppl_{length}.png")
        margin_plot({READJUST[k]: v for k, v in rows.items()}, READJUST["base"], png,
                    title=f"SmolLM2-135M at {length} tokens: held-out documents (mean perplexity in brackets)",
                    ref_label="the base model")
        out.append(f"\n![perplexity relative to the base model](readjust/{os.path.basename(png)})\n")
    missing = [READJUST[k] for k in READJUST if k not in lines]
    if missing:
        out.append(f"Not scored yet: {', '.join(missing)}.\n")
    return "\n".join(out)


def passkey_section(prefix: str, length: int) -> str:
    """Accuracy of each arm before and after, with each trial's depth and whether it was retrieved."""
    lines = [f"## Passkey retrieval at {length} tokens (5 trials)\n",
             "| arm | stage | accuracy | trials (depth: retrieved) |", "|---|---|---|---|"]
    for stage in STAGES:
        for arm in ARMS:
            path = os.path.join(HERE, stage, f"{prefix}_{arm}.jsonl")
            trials = os.path.join(HERE, stage, f"{prefix}_{arm}", "trials.jsonl")
            acc, detail = "not run yet", ""
            if os.path.exists(path):
                with open(path) as fh:
                    last = json.loads(fh.read().splitlines()[-1])
                acc = ", ".join(f"{100 * v:.0f}%" for v in last["accuracy"].values())
            if os.path.exists(trials):
                with open(trials) as fh:
                    done = [json.loads(x) for x in fh.read().splitlines()[1:]]
                detail = ", ".join(f"{t['depth']:.2f}: {'yes' if t['correct'] else 'no'}" for t in done)
                if not os.path.exists(path):
                    acc = f"running ({len(done)} of 5)"
            lines.append(f"| {ARMS[arm]} | {STAGES[stage]} | {acc} | {detail} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    os.chdir(ROOT)
    text = "\n".join([f"# Fine-tuning from the searched factors against YaRN ({STEPS} steps): tables\n",
                      "Written by `python results/smollm2_32k_ft/report.py` from `before/` and `after/`.\n",
                      ppl_section(32768), ppl_section(16384), passkey_section("passkey", 16384),
                      passkey_section("passkey32k", 32768), readjust_section()])
    tmp = os.path.join(HERE, "report.md.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, os.path.join(HERE, "report.md"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
