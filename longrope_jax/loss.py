"""The differentiable loss: next-token NLL of rows under one RoPE spec, on one device or laid out
on a mesh. The loss of a train step, and of every scoring call (``evaluate``).

The loss never materialises ``[L, vocab]`` logits for the whole window: the final hidden states
are projected and scored in chunks of ``loss_chunk`` tokens, in float32, each chunk
rematerialised in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longrope_jax.attention import select
from longrope_jax.model import ModelConfig, Transformer


def chunked_nll(model: Transformer, params, hidden, targets, loss_chunk: int, weights=None):
    """Summed (``weights``-weighted) NLL per row. hidden: [B, T, D]; targets: int32[B, T];
    weights: float32[B, T] or None (all 1) -> float32[B].

    Each chunk's projection and loss is rematerialised in the backward (``jax.checkpoint``), so
    neither pass holds more than one ``[B, loss_chunk, vocab]`` logits tile.
    """
    b, t, d = hidden.shape
    c = min(loss_chunk, t)
    n = -(-t // c)
    pad = n * c - t
    w = jnp.ones((b, t), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    valid = jnp.pad(w, [(0, 0), (0, pad)])
    hidden = jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)])
    targets = jnp.pad(targets, [(0, 0), (0, pad)])

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        h, y, m = args
        logits = model.apply({"params": params}, h, method=Transformer.project).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * m, axis=-1)

    return jnp.sum(jax.lax.map(one, (split(hidden), split(targets), split(valid))), axis=0)


def _sharded_nll(model, params, hidden, targets, loss_chunk, weights, layout):
    """:func:`chunked_nll` on each device's own tokens (``layout``), the rows' partial sums added
    after: the hidden states never leave their device. Only the head's weights are gathered."""
    from jax.sharding import PartitionSpec as P

    head = {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}
    rows = layout.rows()

    def local(head, h, y, m):
        return chunked_nll(model, head, h, y, loss_chunk, m)[:, None]

    # check_vma=False: under the evaluator's vmap over candidates (spmd_axis_name="data") the
    # shared targets and the batched logits vary over different axes, which the check rejects.
    part = jax.shard_map(local, mesh=layout.mesh, in_specs=(P(), layout.hidden(), rows, rows),
                         out_specs=rows, check_vma=False)(head, hidden, targets, weights)
    return jnp.sum(part, axis=1)


def mean_nll(params, tokens, spec, *, cfg: ModelConfig, attention: str = "blockwise", q_chunk: int | None = None,
             loss_chunk: int = 1024, weights=None, positions=None, segment_ids=None, seq_len: int | None = None,
             layout=None, layer_hook=None):
    """Mean next-token NLL of each row over its predictions: float32[B]. Pure and differentiable
    (the flash backward, the chunked loss): the loss of a gradient step.

    tokens: int32[B, L]; spec: a RopeSpec without candidate axis; weights: float32[B, L - 1] per
    prediction (the mean is weighted) or None. ``positions`` (int32[B, L]; None: ``0 .. L - 1``):
    each token's position, e.g. per document in a packed row or with positional skips;
    ``segment_ids`` (int32[B, L]; None: one document per row): the document of each token in a
    packed row, 0 for padding: a document attends only to itself, and its last token and the
    padding predict nothing. ``seq_len``: the call's length for the short/long choice (None: L;
    a skipped row gives the span its positions cover). ``layout`` (``parallel.Layout``): rows and
    tokens sharded on its mesh, attention by all-gather over ``sequence`` (``attention="ring"``:
    the ring), the loss on each device's tokens; with ``layout.zigzag`` tokens, targets,
    positions, segment ids and weights are put in zigzag order first (the loss is a sum: no
    inverse needed). None: one device. ``layer_hook``: the model's per-layer host callback
    (``progress.layer_done``), or None.
    """
    b, l = tokens.shape
    fn = select.function(attention, q_chunk, layout)
    model = Transformer(cfg, fn, layer_hook=layer_hook) if layout is None else Transformer(
        cfg, fn, layout.constrain, layer_hook)
    # Position i predicts token i + 1; the last position predicts nothing (weight 0), so hidden
    # states and targets keep the row's length and its sharding.
    targets = jnp.roll(tokens, -1, axis=1)
    w = jnp.ones((b, l - 1), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    w = jnp.pad(w, [(0, 0), (0, 1)])
    if segment_ids is not None:  # a document's last token, and padding, predict nothing
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        w = w * ((segment_ids == jnp.roll(segment_ids, -1, axis=1)) & (segment_ids != 0)).astype(jnp.float32)
    positions = (jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)) if positions is None
                 else jnp.asarray(positions, jnp.int32))
    if layout is not None and layout.zigzag:
        from longrope_jax.parallel import zigzag

        n = layout.mesh.shape["sequence"]
        tokens, targets, w, positions = (zigzag.apply(x, n) for x in (tokens, targets, w, positions))
        segment_ids = None if segment_ids is None else zigzag.apply(segment_ids, n)
    hidden = model.apply({"params": params}, tokens, positions, segment_ids, rope=spec, return_hidden=True,
                         seq_len=l if seq_len is None else seq_len)
    if layout is None:
        total = chunked_nll(model, params, hidden, targets, loss_chunk, w)
    else:
        total = _sharded_nll(model, params, hidden, targets, loss_chunk, w, layout)
    count = jnp.sum(w, axis=-1)
    return total / (count if segment_ids is None else jnp.maximum(count, 1.0))


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "q_chunk", "loss_chunk", "layout"))
def window_nll(params, tokens, spec, *, cfg: ModelConfig, attention: str = "dense", q_chunk: int | None = None,
               loss_chunk: int = 1024, layout=None):
    """Mean NLL of each window over its ``L - 1`` next-token predictions (:func:`mean_nll`, jitted).

    Args:
      params: model params.
      tokens: int32[S, L] windows.
      spec: RopeSpec for the call (no candidate axis).
    Returns:
      float32[S].
    """
    return mean_nll(params, tokens, spec, cfg=cfg, attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk,
                    layout=layout)
