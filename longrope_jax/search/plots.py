"""PNGs of a search: best perplexity per generation, and the best factors against the baselines."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from longrope_jax.plots import _pyplot, _save


def progress(generations: Sequence[Mapping], path: str, baselines: Mapping[str, float] | None = None,
             title: str = "LongRoPE search") -> str:
    """Best-so-far and median perplexity per generation; baselines as horizontal lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    gens = [g for g in generations if g.get("best_ppl") is not None]
    ax.plot([g["generation"] for g in gens], [g["best_ppl"] for g in gens], marker="o", label="best so far")
    med = [g for g in gens if g.get("median_ppl") is not None]
    if med:
        ax.plot([g["generation"] for g in med], [g["median_ppl"] for g in med], linestyle="--", marker="x",
                color="grey", label="population median")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # Baselines far above the search's values (no scaling, PI at 4x) would squash its curve: they
    # are named in the legend, off scale, instead of drawn.
    searched = [g["best_ppl"] for g in gens] + [g["median_ppl"] for g in med]
    finite = [v for v in (baselines or {}).values() if v is not None and math.isfinite(v)]
    cap = 1.5 * max(searched + [min(finite)] * bool(finite)) if searched else math.inf  # best baseline drawn
    for i, (name, ppl) in enumerate((baselines or {}).items()):
        if ppl is not None and math.isfinite(ppl):
            colour = colours[(i + 1) % len(colours)]
            if ppl <= cap:
                ax.axhline(ppl, linestyle=":", color=colour, label=f"{name} ({ppl:.5g})")
            else:
                ax.plot([], [], linestyle=":", color=colour, label=f"{name} ({ppl:.5g}, off scale)")
    ys = [y for line in ax.get_lines() for y in np.atleast_1d(line.get_ydata()) if y > 0]
    if ys and max(ys) / min(ys) > 3:  # a log axis only where the values span a wide range
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    if gens:  # whole generations only, even for a search of one generation
        gx = [g["generation"] for g in gens]
        ax.set_xlim(min(gx) - 0.5, max(gx) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("generation")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def factors(best: Sequence[float], references: Mapping[str, Sequence[float]], path: str,
            title: str = "rescale factors", start_tokens: int | None = None) -> str:
    """The searched factors per RoPE pair against reference factor vectors (PI, NTK, YaRN)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = np.arange(len(best))
    for name, ref in references.items():
        ax.plot(x, ref, linestyle="--", label=name)
    label = "searched" + (f" (n_hat = {start_tokens})" if start_tokens is not None else "")
    ax.plot(x, best, marker=".", color="black", label=label)
    ax.set_xlabel("RoPE pair i (low i = high frequency)")
    ax.set_ylabel("factor lambda_i")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out
