"""Needle-driven windows (LongRoPE2): perplexity on the answer tokens of needles planted in text.

A window is a document's text with ``needles`` key sentences ("The secret number of apple is
41867.") planted at seeded random depths, ending with a question and the answers. Only the
answers' digit tokens are scored, so the fitness measures whether the model can *use* the far
context (retrieve across the whole window), not just whether its local predictions stay sane.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KEYS = ("apple", "river", "lantern", "violet", "harbor", "copper", "meadow", "falcon", "pebble", "orchid",
        "thunder", "saddle")
NEEDLE = " The secret number of {key} is {value}. "
QUESTION = "\nWhat are the secret numbers mentioned in the text above?"
ANSWER = "\nThe secret number of {key} is"


@dataclasses.dataclass(frozen=True)
class NeedleWindows:
    tokens: np.ndarray  # int32[S, L]
    weights: np.ndarray  # float32[S, L - 1]: 1 on the predictions of answer digits, else 0
    depths: list[list[float]]  # per window, the needles' fractional depths in the text
    values: list[list[str]]  # per window, the planted numbers


def _next_space(text: str, i: int) -> int:
    j = text.find(" ", i)
    return j if j >= 0 else i


def plant(tokenizer, text_tokens, length: int, rng: np.random.Generator, needles: int = 4):
    """One window of exactly ``length`` tokens: the text of ``text_tokens`` (a document's first
    tokens, at least as many as fit) with ``needles`` needles at word boundaries, then the question
    and the answers.

    The window is encoded once, as text (pieces encoded one by one would each get the tokenizer's
    BOS, and SentencePiece's leading "▁"); the answers' tokens are found by character offsets, and
    the few tokens the one encoding has beyond ``length`` are taken from the end of the document
    text, after the last needle.

    Returns (tokens int32[L], weights float32[L - 1], depths, values).
    """
    if not 1 <= needles <= len(KEYS):
        raise ValueError(f"needles: expected 1 to {len(KEYS)}, got {needles}")
    keys = list(KEYS[:needles])
    values = [str(int(rng.integers(10000, 100000))) for _ in keys]
    planted = [NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
    tail, answers = QUESTION, []
    for k, v in zip(keys, values):
        tail += ANSWER.format(key=k)
        answers.append((len(tail), len(tail) + 1 + len(v)))  # " " + the digits, relative to the tail
        tail += " " + v
    fixed = len(tokenizer.encode(tail)) + sum(len(tokenizer.encode_plain(p)) for p in planted)
    room = length - fixed
    if room < needles:
        raise ValueError(f"length {length}: too short for {needles} needle(s) and the answers "
                         f"(needs more than {length - room} tokens)")
    if len(text_tokens) < room:
        raise ValueError(f"the document has {len(text_tokens)} tokens, {room} are needed")
    depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, needles))
    core = len(tokenizer.decode(list(text_tokens[:room])))  # needles go into the text of `room` tokens
    for extra in (16, 64, 256, len(text_tokens)):  # more text than fits, cut back after encoding
        body = tokenizer.decode(list(text_tokens[:room + extra]))
        cuts = [min(_next_space(body, int(d * core)), core) for d in depths]
        text, prev, needle_end = "", 0, 0
        for cut, p in zip(cuts, planted):
            text += body[prev:cut] + p
            prev, needle_end = cut, len(text)
        text += body[prev:]
        tail_start = len(text)
        ids, offsets = tokenizer.encode_offsets(text + tail)
        first_tail = next(i for i, (a, b) in enumerate(offsets) if b > tail_start and b > a)
        last_needle = max(i for i, (a, b) in enumerate(offsets) if a < needle_end and b > a) + 1
        excess = len(ids) - length
        if excess >= 0 and first_tail - excess >= last_needle:
            break
    else:
        raise ValueError(f"length {length}: the document's text does not fill the window")
    keep = np.r_[0:first_tail - excess, first_tail:len(ids)]
    ids = np.asarray(ids, np.int32)[keep]
    offsets = [offsets[i] for i in keep]
    spans = [(tail_start + a, tail_start + b) for a, b in answers]
    scored = np.array([any(a < e and s < b for s, e in spans) and b > a for a, b in offsets], np.float32)
    assert len(ids) == length
    return ids, scored[1:], depths, values


def needle_windows(tokenizer, tokens: np.ndarray, seed: int = 0, needles: int = 4) -> NeedleWindows:
    """Needle windows from plain windows ``tokens: int32[S, L]`` (each row's text is the filler),
    seeded by ``seed`` and the row."""
    tokens = np.asarray(tokens)
    out = [plant(tokenizer, row, tokens.shape[1], np.random.default_rng([seed, i]), needles)
           for i, row in enumerate(tokens)]
    return NeedleWindows(np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), [o[2] for o in out],
                         [o[3] for o in out])
