"""Passkey retrieval: a random 5-digit key hidden at a depth in repeated filler, asked for at the end.

The standard test of the position-interpolation / LongRoPE papers: the prompt is an instruction,
filler sentences up to the target length with the key sentence inserted at a fractional depth,
and the question; the answer is decoded greedily and counts as retrieved when the key's digits
appear in it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class Trial:
    length: int
    depth: float  # requested fraction of the filler before the needle
    key: str
    prompt_tokens: int
    answer: str
    correct: bool


def prompt_text(units: int, depth: float, key: str) -> str:
    """The passkey prompt as text: ``units`` filler sentences, the needle after ``int(depth * units)``."""
    cut = int(depth * units)
    return INTRO + FILLER * cut + NEEDLE.format(key=key) + FILLER * (units - cut) + QUESTION


def build_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens: the most filler sentences that
    fit. The prompt is encoded once, as text (pieces encoded one by one would each get the
    tokenizer's BOS, and SentencePiece's leading "▁")."""
    unit = max(1, len(tokenizer.encode_plain(FILLER)))
    units = max(0, (length - len(tokenizer.encode(prompt_text(0, depth, key)))) // unit)
    while True:
        ids = tokenizer.encode(prompt_text(units, depth, key))
        if len(ids) <= length or units == 0:
            break
        units = max(0, units - max(1, (len(ids) - length) // unit))
    if len(ids) > length:
        raise ValueError(f"--lengths: {length} tokens cannot hold the passkey prompt (needs at least {len(ids)} tokens)")
    return ids


def run_trials(params, cfg, tokenizer, spec_for_length, lengths: list[int], trials: int, seed: int = 0,
               log=None, done: dict | None = None, on_trial=None) -> list[Trial]:
    """``trials`` trials per length at stratified random depths, each with a fresh random key.

    ``done`` maps ``(length, index)`` to a trial already run (from a log): it is taken instead of
    decoding again, after checking that its depth and key are the ones drawn now. ``on_trial(index,
    trial)`` is called after each newly decoded trial (to log it).
    """
    from longrope_jax.generate import greedy

    log = log or (lambda msg: None)
    done = done or {}
    rng = np.random.default_rng(seed)
    out = []
    t0, decoded = time.perf_counter(), 0
    for length in lengths:
        spec = None
        ok = 0
        for t in range(trials):
            depth = float((t + rng.uniform()) / trials)
            key = str(int(rng.integers(10000, 100000)))
            prev = done.get((length, t))
            if prev is not None:
                if prev.key != key or abs(prev.depth - depth) > 1e-12:
                    raise ValueError(f"passkey log: trial {t + 1} at length {length} has key {prev.key} at depth "
                                     f"{prev.depth}, but this run draws key {key} at depth {depth}: the log was "
                                     f"written by a different run")
                trial = prev
            else:
                if spec is None:
                    spec = spec_for_length(length)
                ids = build_prompt(tokenizer, length, depth, key)
                g = greedy(params, cfg, ids, 8, spec)
                answer = tokenizer.decode(g.tokens)
                trial = Trial(length, depth, key, len(ids), answer, bool(key in answer.replace(" ", "")))
                if on_trial is not None:
                    on_trial(t, trial)
            ok += trial.correct
            out.append(trial)
            if prev is None:
                decoded += 1
                rate = (time.perf_counter() - t0) / decoded
                left = sum(1 for n in lengths for i in range(trials) if (n, i) not in done) - decoded
                timing = f" [{rate:.0f} s/trial, about {left * rate / 60:.0f} min left]"
            else:
                timing = " (from the log)"
            log(f"length {length} trial {t + 1}/{trials} depth {depth:.2f}: "
                f"{'ok' if trial.correct else 'miss'} (key {key}, answer {trial.answer!r}); {ok}/{t + 1} so far"
                + timing)
    return out


def summarise(trials: list[Trial], bins: int = 5) -> list[dict]:
    """Accuracy per (length, depth bin)."""
    rows = []
    for length in dict.fromkeys(t.length for t in trials):
        ts = [t for t in trials if t.length == length]
        nb = min(bins, len(ts))
        for b in range(nb):
            lo, hi = b / nb, (b + 1) / nb
            sel = [t for t in ts if lo <= t.depth < hi or (b == nb - 1 and t.depth == 1.0)]
            if sel:
                rows.append({"length": length, "depth_lo": lo, "depth_hi": hi, "trials": len(sel),
                             "accuracy": sum(t.correct for t in sel) / len(sel)})
    return rows
