"""The ``generate`` job: greedy continuation of a prompt, streamed to stderr, a JSON line on stdout."""

from __future__ import annotations

import json
import sys

from longrope_jax import config_files
from longrope_jax.factors import parse_rope, resolve_rope
from longrope_jax.generate import greedy
from longrope_jax.loading import LoadedModel, model_from

# What each setting of ``longrope-jax generate`` must hold (its defaults: configs/generate/default.py).
KINDS = dict(**config_files.MODEL_KINDS, prompt="str", max_new_tokens="int", rope="str")


def resolve(config: str | None = None, overrides=(), flags=None):
    return config_files.resolve("generate", KINDS, config=config, overrides=overrides, flags=flags,
                                required=("model", "prompt"))


def run(model: str | LoadedModel, prompt: str, max_new_tokens: int, rope: str = "model", *,
        param_dtype: str = "float32", tokenizer: str | None = None, sliding_window: bool = True,
        stream=None) -> dict:
    """Returns the result dict; ``stream`` receives decoded text pieces as they come."""
    parsed = parse_rope(rope)
    m = model_from(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    tok = m.need_tokenizer()
    ids = tok.encode(prompt)
    spec = resolve_rope(parsed, m.cfg, len(ids) + max_new_tokens, m.factors)
    done: list[int] = []

    def show(t):
        if stream:
            before = tok.decode(done)
            done.append(t)
            stream(tok.decode(done)[len(before):])

    g = greedy(m.params, m.cfg, ids, max_new_tokens, spec, eos_token_id=m.cfg.eos_token_id, progress=show)
    return {"model": m.source, "rope": rope, "prompt_tokens": len(ids), "new_tokens": len(g.tokens),
            "tokens": g.tokens, "completion": tok.decode(g.tokens), "reencoded_at": g.reencoded_at}


def main(s, log) -> int:
    """``longrope-jax generate`` with resolved settings ``s`` (:func:`resolve`)."""
    try:
        rec = run(s.model, s.prompt, s.max_new_tokens, s.rope, param_dtype=s.param_dtype, tokenizer=s.tokenizer,
                  sliding_window=not s.no_sliding_window,
                  stream=lambda piece: print(piece, end="", file=sys.stderr, flush=True))
    finally:
        print(file=sys.stderr)  # the streamed text's line ends, whatever ends the generation
    print(json.dumps(rec), flush=True)
    return 0
