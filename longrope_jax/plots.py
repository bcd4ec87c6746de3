"""PNG plots of results (matplotlib, headless), written atomically; jobs call them."""

from __future__ import annotations

import math

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    """Writes ``fig`` as a PNG atomically (``atomic.file``)."""
    from longrope_jax import atomic

    with atomic.file(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, bbox_inches="tight")
    return path


def ppl_vs_length(records: list[dict], path: str, title: str | None = None) -> str:
    """Perplexity against length, one line per ``rope`` value; the original window marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rope in dict.fromkeys(r["rope"] for r in records):
        pts = sorted((r["length"], r["ppl"]) for r in records if r["rope"] == rope)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=rope)
    window = records[0].get("original_window") if records else None
    if window:
        ax.axvline(window, color="grey", linestyle=":", label=f"window {window}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title or (records[0]["model"] if records else "perplexity"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    out = _save(fig, path)
    plt.close(fig)
    return out


def passkey_heatmap(rows: list[dict], path: str, title: str) -> str:
    """A PNG heat map of passkey accuracy (``passkey.summarise`` rows): depth bins (rows) by length (columns)."""
    plt = _pyplot()
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    depths = sorted({(r["depth_lo"], r["depth_hi"]) for r in rows})
    grid = np.full((len(depths), len(lengths)), np.nan)
    for r in rows:
        grid[depths.index((r["depth_lo"], r["depth_hi"])), lengths.index(r["length"])] = r["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2.5))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{lo:.1f}-{hi:.1f}" for lo, hi in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="accuracy")
    ax.set_title(title)
    out = _save(fig, path)
    plt.close(fig)
    return out
