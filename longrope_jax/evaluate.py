"""Scoring: per-window negative log-likelihood and perplexity.

The loss never materialises ``[L, vocab]`` logits for the whole window: the final hidden states
are projected and scored in chunks of ``loss_chunk`` tokens, in float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attention_lib
from longrope_jax.model import ModelConfig, Transformer


def _attention(name: str, q_chunk: int | None):
    fn = attention_lib.get(name)
    if not q_chunk:
        return fn
    if name == "blockwise":
        return functools.partial(fn, block_q=q_chunk, block_kv=q_chunk)
    return functools.partial(fn, q_chunk=q_chunk)


def pick_attention(name: str, length: int) -> str:
    """``auto``: the dense reference up to 2048 tokens, blockwise beyond."""
    if name != "auto":
        return name
    return "dense" if length <= 2048 else "blockwise"


def chunked_nll(model: Transformer, params, hidden, targets, loss_chunk: int):
    """Summed NLL per row. hidden: [B, T, D]; targets: int32[B, T] -> float32[B]."""
    b, t, d = hidden.shape
    c = min(loss_chunk, t)
    n = -(-t // c)
    pad = n * c - t
    valid = jnp.pad(jnp.ones((b, t), jnp.float32), [(0, 0), (0, pad)])
    hidden = jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)])
    targets = jnp.pad(targets, [(0, 0), (0, pad)])

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    def one(args):
        h, y, m = args
        logits = model.apply({"params": params}, h, method=Transformer.project).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * m, axis=-1)

    return jnp.sum(jax.lax.map(one, (split(hidden), split(targets), split(valid))), axis=0)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "q_chunk", "loss_chunk"))
def window_nll(params, tokens, spec, *, cfg: ModelConfig, attention: str = "dense", q_chunk: int | None = None,
               loss_chunk: int = 1024):
    """Mean NLL of each window over its ``L - 1`` next-token predictions.

    Args:
      params: model params.
      tokens: int32[S, L] windows.
      spec: RopeSpec for the call (no candidate axis).
    Returns:
      float32[S].
    """
    model = Transformer(cfg, _attention(attention, q_chunk))
    hidden = model.apply({"params": params}, tokens, rope=spec, return_hidden=True)
    total = chunked_nll(model, params, hidden[:, :-1], tokens[:, 1:], loss_chunk)
    return total / (tokens.shape[1] - 1)


def perplexity(params, cfg: ModelConfig, tokens: np.ndarray, spec, *, attention: str = "dense",
               q_chunk: int | None = None, loss_chunk: int = 1024, batch: int = 1) -> dict:
    """Perplexity of windows ``tokens: int32[S, L]`` under ``spec``, ``batch`` windows per call.

    Returns ``{"ppl", "nll", "nll_per_window", "predictions"}``: the mean is over all predictions.
    """
    tokens = np.asarray(tokens, np.int32)
    spec = spec.replace(method="")  # a label only: dropping it lets methods share one compilation
    out = []
    for i in range(0, tokens.shape[0], batch):
        nll = window_nll(params, jnp.asarray(tokens[i:i + batch]), spec, cfg=cfg, attention=attention,
                         q_chunk=q_chunk, loss_chunk=loss_chunk)
        out.append(np.asarray(nll, np.float64))
    per = np.concatenate(out)
    mean = float(per.mean())
    return {"ppl": math.exp(mean), "nll": mean, "nll_per_window": per.tolist(),
            "predictions": int(tokens.shape[0] * (tokens.shape[1] - 1))}


def run_ppl(model: str, data: str, lengths: list[int], ropes: list[str], *, samples: int = 1, seed: int = 0,
            param_dtype: str = "float32", attention: str = "auto", q_chunk: int | None = None,
            loss_chunk: int = 1024, tokenizer: str | None = None, sliding_window: bool = True,
            field: str = "text", log=None):
    """The ``ppl`` job: yields one result dict per (length, rope), in the order given.

    Follows the perplexity protocol of REFERENCE.md section 8; ``log`` receives progress lines.
    """
    import time

    from longrope_jax.data import read_documents, windows
    from longrope_jax.factors import resolve_rope
    from longrope_jax.loading import load_model

    log = log or (lambda msg: None)
    t0 = time.time()
    m = load_model(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)
    if m.tokenizer is None:
        raise ValueError(f"{model}: the model has no tokenizer.json; pass --tokenizer PATH")
    log(f"loaded {model} in {time.time() - t0:.1f}s: {m.cfg.num_hidden_layers} layers, window "
        f"{m.cfg.max_position_embeddings}")
    docs = read_documents(data, field)
    tok_info = m.tokenizer.describe()
    for length in lengths:
        w = windows(docs, m.tokenizer, length, samples, seed, source=data)
        if w.skipped_short:
            log(f"length {length}: skipped {w.skipped_short} document(s) shorter than {length} tokens")
        attn = pick_attention(attention, length)
        qc = q_chunk if q_chunk is not None else (512 if length > 2048 else None)
        for r in ropes:
            spec = resolve_rope(r, m.cfg, length)
            t1 = time.time()
            res = perplexity(m.params, m.cfg, w.tokens, spec, attention=attn, q_chunk=qc,
                             loss_chunk=loss_chunk)
            dt = time.time() - t1
            rec = {
                "model": model,
                "model_sha256": m.sha256,
                "data": data,
                "length": length,
                "rope": r,
                "method": spec.method,
                "ppl": res["ppl"],
                "nll": res["nll"],
                "nll_per_window": res["nll_per_window"],
                "predictions": res["predictions"],
                "documents": w.documents,
                "documents_skipped_short": w.skipped_short,
                "documents_available": w.available,
                "seed": seed,
                "tokenizer": tok_info,
                "beyond_window": (length > m.cfg.max_position_embeddings and r == "none"),
                "original_window": m.cfg.max_position_embeddings,
                "param_dtype": param_dtype,
                "attention": attn,
                "seconds": round(dt, 2),
            }
            log(f"length {length} rope {r}: ppl {res['ppl']:.4f} ({res['predictions'] / dt:.0f} tok/s, "
                f"{dt:.1f}s incl. compilation)")
            yield rec
