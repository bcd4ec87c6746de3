"""Blockwise (online-softmax) attention: memory O(L x block), exact, same contract as dense.

For each query block, a scan over key/value blocks keeps a float32 running max, denominator and
numerator. A key block is skipped (``lax.switch``) when no pair in it can be visible: every key
position is after every query position (above the causal diagonal), or every pair is outside the
sliding window; a block where every pair is visible (below the diagonal, inside the window, one
segment) is computed without a mask or infinity guards, which on CPU saves passes over the score
tile (the exponential and those passes are the cost, REFERENCE.md section 7). The test uses positions, not indices, so reordered (zigzag) positions still skip
correctly. Under GQA the query group is folded into the matmul rows (``[KV, G * block, D]``), so k
and v are never expanded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longrope_jax.attention.dense import check_heads
from longrope_jax.attention.dense import mask as visible

_BIG = jnp.iinfo(jnp.int32).max


def _pad_to(x, n, axis, value):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def blockwise_attention(
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
    block_q: int = 512,
    block_kv: int = 512,
):
    """Exact attention computed block by block. Shapes as in :mod:`.dense`."""
    b, l, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = check_heads(q, k)
    scale = d**-0.5 if scale is None else scale
    use_seg = q_segment_ids is not None and kv_segment_ids is not None
    bq, bk = min(block_q, l), min(block_kv, s)
    nq, nk = -(-l // bq), -(-s // bk)

    # Padded keys sit at position +inf (never visible); padded query rows are sliced off.
    qp = _pad_to(q_positions.astype(jnp.int32), nq * bq, 1, 0)
    kp = _pad_to(kv_positions.astype(jnp.int32), nk * bk, 1, _BIG)
    qs = _pad_to(q_segment_ids, nq * bq, 1, 0) if use_seg else None
    ks = _pad_to(kv_segment_ids, nk * bk, 1, -1) if use_seg else None
    qx = _pad_to(q, nq * bq, 1, 0).reshape(b, nq, bq, kvh, g, d)
    qx = jnp.transpose(qx, (1, 0, 3, 4, 2, 5))  # [nq, B, KV, G, bq, D]
    kx = jnp.transpose(_pad_to(k, nk * bk, 1, 0).reshape(b, nk, bk, kvh, d), (1, 0, 3, 2, 4))  # [nk, B, KV, bk, D]
    vx = jnp.transpose(_pad_to(v, nk * bk, 1, 0).reshape(b, nk, bk, kvh, d), (1, 0, 3, 2, 4))
    kpb = jnp.moveaxis(kp.reshape(b, nk, bk), 1, 0)  # [nk, B, bk]
    ksb = jnp.moveaxis(ks.reshape(b, nk, bk), 1, 0) if use_seg else None

    def one_q_block(args):
        qb, qpb, qsb = args  # [B, KV, G, bq, D], [B, bq], [B, bq]
        qb = qb * jnp.asarray(scale, qb.dtype)  # scaling q is cheaper than scaling the score tile
        q_lo, q_hi = jnp.min(qpb), jnp.max(qpb)
        if use_seg:
            q_seg_lo, q_seg_hi = jnp.min(qsb), jnp.max(qsb)

        def scores(kb):
            return jnp.einsum("bkgqd,bksd->bkgqs", qb, kb, preferred_element_type=jnp.float32)

        def update(c, sc, vb, guard):
            m, den, acc = c
            m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if guard else m_new
            p = jnp.exp(sc - safe[..., None])
            corr = jnp.exp(m - safe)  # exp(-inf) = 0 before the first visible key
            den = den * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
            return m_new, den, acc * corr[..., None] + pv

        def step(carry, kv):
            kb, vb, kpos, kseg = kv

            def masked(c):  # a block on the diagonal / window edge / segment boundary
                vis = visible(qpb, kpos, qsb, kseg, sliding_window)[:, None, None]  # [B, 1, 1, bq, bk]
                return update(c, jnp.where(vis, scores(kb), -jnp.inf), vb, True)

            def full(c):  # every pair visible: no mask, and every row's max is finite
                return update(c, scores(kb), vb, False)

            k_lo = jnp.min(kpos)
            k_hi = jnp.max(jnp.where(kpos == _BIG, -_BIG, kpos))
            skip = k_lo > q_hi
            # Every key at or before every query, no padded key: all visible (window, segments aside).
            every = (k_hi <= q_lo) & (jnp.max(kpos) != _BIG)
            if sliding_window is not None:
                # float32 is exact for positions below 2**24 and cannot overflow.
                k_hi_f, k_lo_f = k_hi.astype(jnp.float32), k_lo.astype(jnp.float32)
                skip = skip | (q_lo.astype(jnp.float32) - k_hi_f >= sliding_window)
                every = every & (q_hi.astype(jnp.float32) - k_lo_f < sliding_window)
            if use_seg:
                every = every & (q_seg_lo == q_seg_hi) & (jnp.min(kseg) == q_seg_lo) & (jnp.max(kseg) == q_seg_lo)
            branch = jnp.where(skip, 0, jnp.where(every, 1, 2))
            return jax.lax.switch(branch, (lambda c: c, full, masked), carry), None

        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, d), jnp.float32),
        )
        (m, den, acc), _ = jax.lax.scan(step, init, (kx, vx, kpb, ksb))
        out = acc / jnp.where(den > 0, den, 1.0)[..., None]
        return out.astype(q.dtype)  # [B, KV, G, bq, D]

    qpbs = jnp.moveaxis(qp.reshape(b, nq, bq), 1, 0)
    qsbs = jnp.moveaxis(qs.reshape(b, nq, bq), 1, 0) if use_seg else None
    out = jax.lax.map(one_q_block, (qx, qpbs, qsbs))  # [nq, B, KV, G, bq, D]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(b, nq * bq, h, d)
    return out[:, :l]
