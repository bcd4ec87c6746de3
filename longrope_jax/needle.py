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


def plant(tokenizer, text_tokens, length: int, rng: np.random.Generator, needles: int = 4):
    """One window of exactly ``length`` tokens: ``text_tokens`` (the document's tokens, at least
    as many as fit) with ``needles`` needles, then the question and the answers.

    Returns (tokens int32[L], weights float32[L - 1], depths, values).
    """
    if not 1 <= needles <= len(KEYS):
        raise ValueError(f"needles: expected 1 to {len(KEYS)}, got {needles}")
    keys = list(KEYS[:needles])
    values = [str(int(rng.integers(10000, 100000))) for _ in keys]
    planted = [tokenizer.encode(NEEDLE.format(key=k, value=v)) for k, v in zip(keys, values)]
    tail, weight = list(tokenizer.encode(QUESTION)), [0.0] * len(tokenizer.encode(QUESTION))
    for k, v in zip(keys, values):
        prompt, answer = tokenizer.encode(ANSWER.format(key=k)), tokenizer.encode(" " + v)
        tail += prompt + answer
        weight += [0.0] * len(prompt) + [1.0] * len(answer)
    room = length - len(tail) - sum(len(p) for p in planted)
    if room < needles:
        raise ValueError(f"length {length}: too short for {needles} needle(s) and the answers "
                         f"(needs more than {length - room} tokens)")
    if len(text_tokens) < room:
        raise ValueError(f"the document has {len(text_tokens)} tokens, {room} are needed")
    depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, needles))
    cuts = [int(d * room) for d in depths]
    ids: list[int] = []
    prev = 0
    for cut, p in zip(cuts, planted):
        ids += list(text_tokens[prev:cut]) + p
        prev = cut
    ids += list(text_tokens[prev:room]) + tail
    w = [0.0] * (length - len(tail)) + weight
    assert len(ids) == length and len(w) == length
    return np.asarray(ids, np.int32), np.asarray(w[1:], np.float32), depths, values


def needle_windows(tokenizer, tokens: np.ndarray, seed: int = 0, needles: int = 4) -> NeedleWindows:
    """Needle windows from plain windows ``tokens: int32[S, L]`` (each row's text is the filler),
    seeded by ``seed`` and the row."""
    tokens = np.asarray(tokens)
    out = [plant(tokenizer, row, tokens.shape[1], np.random.default_rng([seed, i]), needles)
           for i, row in enumerate(tokens)]
    return NeedleWindows(np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), [o[2] for o in out],
                         [o[3] for o in out])
