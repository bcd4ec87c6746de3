"""Dense softmax attention: the reference every other implementation is tested against.

The contract shared by all attention functions::

    fn(q, k, v, *, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
       sliding_window, scale) -> out

    q: [B, L, H, D]; k, v: [B, S, KV, D] with H % KV == 0 (GQA, MQA, MHA);
    positions: int[B, L] / int[B, S] global positions (any order: masks use them, not indices);
    segment_ids: int[B, L] / int[B, S] or None (packed documents never attend across);
    sliding_window: int or None: key j is visible to query i iff 0 <= p_i - p_j < window;
    out: [B, L, H, D] in q's dtype; a query row that sees no key (fully masked) is zero (what packed
      documents and a ring's partial blocks need).

Scores and softmax run in float32. GQA folds the query group into the score rows, so k and v
are never expanded in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_heads(q, k) -> int:
    """The query group size ``H // KV``; raises when ``KV`` does not divide ``H``."""
    h, kvh = q.shape[2], k.shape[2]
    if h % kvh:
        raise ValueError(f"attention: query heads ({h}) must be a multiple of kv heads ({kvh})")
    return h // kvh


def mask(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None, sliding_window=None):
    """Visibility mask bool[B, L, S]: causal by position, optional window and segments."""
    qp = q_positions[:, :, None]
    kp = kv_positions[:, None, :]
    m = kp <= qp
    if sliding_window is not None:
        m = m & (qp - kp < sliding_window)
    if q_segment_ids is not None and kv_segment_ids is not None:
        m = m & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return m


def _attend(q, k, v, m, scale):
    b, l, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, l, kvh, g, d)
    s = jnp.einsum("blkgd,bskd->bkgls", qg, k, preferred_element_type=jnp.float32) * jnp.float32(scale)
    s = jnp.where(m[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(jnp.any(m, axis=-1)[:, None, None, :, None], p, 0.0).astype(v.dtype)  # fully masked rows: 0
    o = jnp.einsum("bkgls,bskd->blkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, l, h, d).astype(q.dtype)


def dense_attention(
    q,
    k,
    v,
    *,
    q_positions,
    kv_positions,
    q_segment_ids=None,
    kv_segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    q_chunk: int | None = None,
):
    """Masked dense attention; ``q_chunk`` bounds memory to ``[H, q_chunk, S]`` scores at a time.

    Chunking over queries does not change the arithmetic of any row.
    """
    b, l, h, d = q.shape
    check_heads(q, k)
    scale = d**-0.5 if scale is None else scale
    if q_segment_ids is None or kv_segment_ids is None:
        q_segment_ids = kv_segment_ids = None
    if q_chunk is None or l <= q_chunk:
        m = mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, sliding_window)
        return _attend(q, k, v, m, scale)

    n = -(-l // q_chunk)
    pad = n * q_chunk - l

    def chunks(x, fill=0):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.moveaxis(x.reshape(b, n, q_chunk, *x.shape[2:]), 1, 0)

    qs, qps = chunks(q), chunks(q_positions)
    qss = chunks(q_segment_ids) if q_segment_ids is not None else None

    def one(args):
        qc, qpc, qsc = args
        m = mask(qpc, kv_positions, qsc, kv_segment_ids, sliding_window)
        return _attend(qc, k, v, m, scale)

    out = jax.lax.map(one, (qs, qps, qss))
    out = jnp.moveaxis(out, 0, 1).reshape(b, n * q_chunk, h, d)
    return out[:, :l]
