"""PNG plots of results (matplotlib, headless)."""

from __future__ import annotations

import os
import tempfile


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a plot is for reading
    os.replace(tmp, path)
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
