"""Greedy decoding with a KV cache that stays correct across the short/long switch.

Under a spec with a short/long pair, a call uses the long factors iff ``max(position) + 1 >
original_max``. Cached keys were rotated with the factors of the call that wrote them, so when a
step first needs the long factors the whole prefix is re-encoded with them before continuing
(the bug transformers, vLLM and llama.cpp each had). The result equals re-encoding the whole
sequence at every step. Dynamic NTK recomputes its base from the length at every call; like
transformers, cached keys are not re-encoded for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attention_lib
from longrope_jax import progress as progress_lib
from longrope_jax import rope as rope_lib
from longrope_jax.model import ModelConfig, Transformer, init_cache


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "progress"))
def _prefill(params, tokens, spec, cache, *, cfg: ModelConfig, attention: str = "dense", progress: bool = False):
    b, l = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    model = Transformer(cfg, attention_lib.get(attention), layer_hook=progress_lib.layer_done if progress else None)
    hidden, cache = model.apply({"params": params}, tokens, positions, rope=spec, cache=cache, return_hidden=True)
    logits = model.apply({"params": params}, hidden[:, -1], method=Transformer.project)
    return logits.astype(jnp.float32), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _step(params, token, position, spec, cache, *, cfg: ModelConfig):
    """token: int32[B]; position: int32 scalar -> (logits float32[B, V], cache)."""
    b = token.shape[0]
    positions = jnp.full((b, 1), position, jnp.int32)
    logits, cache = Transformer(cfg).apply({"params": params}, token[:, None], positions, rope=spec, cache=cache)
    return logits[:, -1].astype(jnp.float32), cache


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # the new tokens
    reencoded_at: list[int]  # positions at which the prefix was re-encoded with the long factors
    step_logits: list[np.ndarray] | None = None  # float32[V] per new token, if requested


def _needs_long(spec: rope_lib.RopeSpec, seq_len: int) -> bool:
    return spec.original_max is not None and seq_len > spec.original_max


def greedy(params, cfg: ModelConfig, prompt: list[int], max_new_tokens: int, spec: rope_lib.RopeSpec,
           *, eos_token_id=None, keep_logits: bool = False, progress=None, attention: str = "auto") -> Generation:
    """Greedy continuation of ``prompt`` (one sequence) for up to ``max_new_tokens`` tokens.

    ``attention`` is used for the prompt (and re-encode) pass; ``auto`` picks blockwise beyond
    512 tokens. Decoding steps attend one query to the cache densely.
    """
    if not prompt:
        raise ValueError("generate: the prompt encodes to no tokens")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: expected at least 1, got {max_new_tokens}")
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    seq = list(prompt)
    max_len = len(prompt) + max_new_tokens
    cache = init_cache(cfg, 1, max_len)
    attn = "dense" if attention == "auto" and max_len <= 512 else ("blockwise" if attention == "auto" else attention)
    heartbeat = progress_lib.enabled(jax.devices()[:1])

    def encode(seq, cache):
        """The prompt (or the whole sequence, re-encoded) in one call, reporting per layer."""
        with (progress_lib.tracking(1, 1, cfg.num_hidden_layers, f"encoding {len(seq)} tokens") if heartbeat
              else contextlib.nullcontext()):
            return _prefill(params, jnp.asarray([seq], jnp.int32), spec, cache, cfg=cfg, attention=attn,
                            progress=heartbeat)

    logits, cache = encode(seq, cache)
    long_mode = _needs_long(spec, len(seq))
    out, reenc, kept = [], [], []
    for _ in range(max_new_tokens):
        nxt = int(jnp.argmax(logits[0]))
        if keep_logits:
            kept.append(np.asarray(logits[0]))
        out.append(nxt)
        seq.append(nxt)
        if progress:
            progress(nxt)
        if nxt in eos or len(out) == max_new_tokens:
            break
        p = len(seq) - 1  # position of the token just produced
        if not long_mode and _needs_long(spec, p + 1):
            logits, cache = encode(seq, init_cache(cfg, 1, max_len))
            long_mode = True
            reenc.append(p)
        else:
            logits, cache = _step(params, jnp.asarray([nxt], jnp.int32), jnp.int32(p), spec, cache, cfg=cfg)
    return Generation(out, reenc, kept if keep_logits else None)
