#!/usr/bin/env python
"""Tables and a plot for a results directory (results/smollm2_16k, results/smollm2_32k).

Reads what the directory's ``run_all.sh`` wrote: ``heldout_ppl*.jsonl`` (``ppl`` lines),
``heldout_domains/*.jsonl`` (``ppl`` lines on documents of other domains, compared with the YaRN
row document by document), ``search*/summary.json`` and ``passkey_*/result.jsonl`` (``passkey``
lines; a run still in progress from its ``trials.jsonl``), prints markdown tables on stdout and
writes ``heldout_ppl.png`` and ``heldout_domains.png`` (each method's perplexity relative to
YaRN's, document by document) into the directory. Missing pieces are reported as missing, not guessed. ``margin_table`` and
``margin_plot`` also serve ``results/smollm2_16k_domains/report.py``.

    python results/report.py results/smollm2_16k
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys
from typing import Callable

import numpy as np


def label(rope: str) -> str:
    names = {"none": "no scaling", "pi": "PI", "ntk": "static NTK", "dynamic": "dynamic NTK", "yarn": "YaRN"}
    kind, _, arg = rope.partition(":")
    if kind in names and (arg or kind == "none"):
        return names[kind] + (f" (s={arg})" if arg else "")
    parts = os.path.normpath(rope).split(os.sep)
    if "controls" in parts and os.path.exists(rope):  # a control's factors file says what it is
        with open(rope) as fh:
            return json.load(fh).get("provenance", {}).get("control", rope)
    sub = next((p for p in parts if p.startswith("search")), None)  # search/, search_gen1/, search_longrope2/
    if sub == "search_longrope2":
        return "LongRoPE2-mode search"
    if sub:
        return "LongRoPE search" + ("" if len(parts) < 3 else f" ({parts[-3]}{'' if sub == 'search' else ', ' + sub})")
    return rope


def read_lines(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(x) for x in fh if x.strip()]


def heldout(d: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(d, "heldout_ppl*.jsonl"))):
        rows += read_lines(path)
    return rows


def doc_label(doc: str) -> str:
    """``path.jsonl:N`` (a ``ppl`` line's document, N from 1) as its file's name and, where the JSONL
    line names its ``source``, that source's file name: ``heldout_domains_32k.jsonl:1 (eval.txt)``."""
    path, _, n = doc.rpartition(":")
    name = os.path.basename(doc)
    try:
        with open(path) as fh:
            line = next(x for i, x in enumerate(fh, 1) if i == int(n))
        source = json.loads(line).get("source")
    except (OSError, ValueError, StopIteration):
        return name
    return f"{name} ({os.path.basename(source)})" if source else name


def margin_table(rows: dict[str, dict], ref: str, describe: Callable[[str], str],
                 domain_of: Callable[[str], str] | None = None, ref_name: str = "YaRN") -> str:
    """A markdown table of ``ppl`` lines scored on the same documents: per-document perplexity, per
    domain (``domain_of(document)``, when given) and mean, and the margin over ``rows[ref]``
    (1 - ppl / ref's: positive is better), mean and per document; rows sorted by perplexity."""
    base = rows[ref]
    docs = base["documents"]
    for name, r in rows.items():
        if r["documents"] != docs:
            raise SystemExit(f"{name}: documents {r['documents']} differ from {ref}'s {docs}")
    domains = sorted({domain_of(d) for d in docs}) if domain_of else []

    def dom_ppl(r, dom):
        return math.exp(np.mean([n for n, d in zip(r["nll_per_window"], docs) if domain_of(d) == dom]))

    head = (["method", *[doc_label(d) for d in docs], *[f"{d} ppl" for d in domains], "mean ppl",
             *[f"margin over {ref_name}, {d}" for d in domains], f"margin over {ref_name}, mean",
             "per-document margin (min / max)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["ppl"]):
        per = np.exp(r["nll_per_window"])
        margins = 1 - per / np.exp(base["nll_per_window"])
        cells = [describe(name), *[f"{p:.3f}" for p in per], *[f"{dom_ppl(r, d):.3f}" for d in domains],
                 f"**{r['ppl']:.3f}**", *[f"{100 * (1 - dom_ppl(r, d) / dom_ppl(base, d)):+.2f}%" for d in domains],
                 f"{100 * (1 - r['ppl'] / base['ppl']):+.2f}%",
                 f"{100 * margins.min():+.2f}% / {100 * margins.max():+.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def margin_plot(rows: dict[str, dict], ref: str, path: str, *, title: str, ref_label: str) -> None:
    """Each document's perplexity relative to ``rows[ref]``'s on it, a bar per (method, document);
    bars beyond +-8% (PI, no scaling) are cut there and labelled. Written atomically to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = np.exp(rows[ref]["nll_per_window"])
    docs = [doc_label(d) for d in rows[ref]["documents"]]
    names = sorted(rows, key=lambda n: rows[n]["ppl"])
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(names) + 1.5))
    height, clip, lowest = 0.8 / len(docs), 8.0, 0.0
    for j, doc in enumerate(docs):
        vals = np.array([100 * (np.exp(rows[n]["nll_per_window"][j]) / base[j] - 1) for n in names])
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
    ax.set_xlabel(f"perplexity relative to {ref_label} on the same document (%; left of 0 is better)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def yarn_row(rows: dict[str, dict]) -> str | None:
    """The name of the YaRN row, the reference every margin is taken against (None: none yet)."""
    return next((n for n, r in rows.items() if r["rope"].startswith("yarn:")), None)


def domains_section(d: str) -> None:
    """``heldout_domains/NAME.jsonl``: documents of other domains, each method against the YaRN row."""
    rows = {os.path.basename(p)[:-len(".jsonl")]: read_lines(p)[0]
            for p in sorted(glob.glob(os.path.join(d, "heldout_domains", "*.jsonl")))}
    print("\n### Held-out perplexity on other domains\n")
    ref = yarn_row(rows)
    if ref is None:
        print("missing: no heldout_domains/*.jsonl with a YaRN row yet")
        return
    length = rows[ref]["length"]
    print(f"{length} tokens, documents {', '.join(rows[ref]['documents'])}\n")
    print(margin_table(rows, ref, lambda n: f"{n}: {label(rows[n]['rope'])}"))
    margin_plot(rows, ref, os.path.join(d, "heldout_domains.png"), ref_label=label(rows[ref]["rope"]),
                title=f"SmolLM2-135M at {length} tokens, held-out documents of other domains (mean perplexity in brackets)")
    print("\n![held-out perplexity on other domains](heldout_domains.png)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not os.path.isdir(argv[0]):
        print(__doc__, file=sys.stderr)
        return 2
    d = argv[0]
    rows = heldout(d)
    print("### Held-out perplexity\n")
    if rows:
        docs = {tuple(r["documents"]) for r in rows}
        print(f"{rows[0]['length']} tokens, {len(rows[0]['documents'])} document(s): "
              f"{', '.join(rows[0]['documents'])}" + ("" if len(docs) == 1 else " (DIFFERENT documents per row!)"))
        print()
        print("| method | perplexity | per document |\n|---|---|---|")
        for r in sorted(rows, key=lambda r: r["ppl"]):
            per = ", ".join(f"{math.exp(x):.3f}" for x in r["nll_per_window"])
            print(f"| {label(r['rope'])} | {r['ppl']:.4f} | {per} |")
        named = {label(r["rope"]): r for r in rows}
        ref = yarn_row(named)
        if ref is not None and len(docs) == 1:
            margin_plot(named, ref, os.path.join(d, "heldout_ppl.png"), ref_label=ref,
                        title=f"SmolLM2-135M at {rows[0]['length']} tokens, held-out documents (mean perplexity in brackets)")
        print("\n![held-out perplexity](heldout_ppl.png)")
    else:
        print("missing: no heldout_ppl*.jsonl yet")
    if os.path.isdir(os.path.join(d, "heldout_domains")):
        domains_section(d)
    print("\n### Searches (on the search window)\n")
    for path in sorted(glob.glob(os.path.join(d, "search*", "summary.json"))):
        s = json.load(open(path))
        base = s.get("baselines") or {}
        best_name = min((k for k, v in base.items() if v is not None), key=lambda k: base[k], default=None)
        crit = "" if s.get("critical_dim") is None else f", critical dim {s['critical_dim']}"
        print(f"- `{os.path.relpath(os.path.dirname(path), d)}` ({s.get('kind', 'plain')}, fitness "
              f"{s.get('fitness', 'ppl')}): {s['stopped']} after {s['evaluations']} evaluations in "
              f"{s['generations']} generation(s); best {s['ppl']:.4f} "
              f"(start tokens {s['start_tokens']}{crit}); best baseline {best_name} {base.get(best_name, float('nan')):.4f}; "
              "baselines " + ", ".join(f"{k} {v:.4f}" for k, v in base.items() if v is not None))
    print("\n### Passkey retrieval\n")
    found = False
    for sub in sorted(glob.glob(os.path.join(d, "passkey_*"))):
        path, log = os.path.join(sub, "result.jsonl"), os.path.join(sub, "trials.jsonl")
        if os.path.isfile(path) and os.path.getsize(path):
            last = read_lines(path)[-1]
            found = True
            for n, acc in last["accuracy"].items():
                k = sum(t["correct"] for t in last["trials"] if t["length"] == int(n))
                print(f"- {label(last['rope'])}: {n} tokens, {k}/{last['trials_per_length']} retrieved ({acc:.0%}); "
                      f"heat map `{os.path.relpath(sub, d)}/passkey.png`")
        elif os.path.isfile(log):  # a run in progress (or cut short): its trials log so far
            head, *trials = read_lines(log)
            found = True
            for n in head["lengths"]:
                ts = [t for t in trials if t["length"] == n]
                print(f"- {label(head['rope'])}: {n} tokens, IN PROGRESS: {sum(t['correct'] for t in ts)}/{len(ts)} "
                      f"retrieved of the {len(ts)} trial(s) run so far (of {head['trials']}); "
                      f"`{os.path.relpath(log, d)}`")
    if not found:
        print("missing: no passkey_*/result.jsonl yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
