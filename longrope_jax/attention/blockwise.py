"""Blockwise (flash) attention: exact, same contract as dense, memory O(L x block) forward and
backward.

Built from two pure per-block functions that a ring calls for each visiting k/v block:

- :func:`block_fwd` merges one k/v block into a float32 carry (running max, denominator,
  accumulator); :func:`finalize` turns the carry into the output and its log-sum-exp.
- :func:`block_bwd` gives one k/v block's gradients from the *final* log-sum-exp and
  ``delta = rowsum(d_out * out)``.

Over whole chunks of blocks (what the kernel does once and a ring once per visiting chunk):
:func:`merge_chunk` (the forward) and :func:`grads_chunk` (the backward), with
:func:`bwd_blocks` / :func:`grads_out` turning residuals into block layout and back.

Both per-block functions skip a block (``lax.switch``) when no pair in it can be visible: every key position after
every query position (above the causal diagonal), or every pair outside the sliding window, or
(segments) no shared document; a block where every pair is visible is computed without a mask
or infinity guards, which on CPU saves passes over the score tile (docs/cpu.md). The
tests use positions, not indices, so reordered (zigzag) positions still skip correctly.

Block layout (GQA folds the query group into the rows, so k and v are never expanded):
``q: [B, KV, G, bq, D]``, ``k, v: [B, KV, bk, D]``, positions ``int32[B, bq]`` / ``int32[B, bk]``
(a padded key sits at position ``PAD_POSITION``: never visible), segment ids the same or None.

:func:`blockwise_attention` is a ``jax.custom_vjp`` that saves q, k, v, the output and the
log-sum-exp (the latter two tagged ``attention_out`` / ``attention_lse`` with
``checkpoint_name``) and recomputes the score tiles block by block in the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from longrope_jax.attention.dense import check_heads
from longrope_jax.attention.dense import mask as visible

PAD_POSITION = jnp.iinfo(jnp.int32).max
# The log-sum-exp of a row that sees no key: finite, so exp(s - lse) is 0, never NaN.
LSE_MASKED = 1e30
SKIP, FULL, MASKED = 0, 1, 2
BWD_BLOCK = 256  # the flash backward's largest q / kv block


def _pad_to(x, n, axis, value):
    pad = n - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def block_kind(q_pos, kv_pos, q_seg=None, kv_seg=None, sliding_window: int | None = None):
    """``SKIP`` (no pair visible), ``FULL`` (every pair visible) or ``MASKED``: int32 scalar.

    q_pos: int32[B, bq]; kv_pos: int32[B, bk] (``PAD_POSITION`` for padding); segments alike.
    """
    q_lo, q_hi = jnp.min(q_pos), jnp.max(q_pos)
    k_lo = jnp.min(kv_pos)
    k_hi = jnp.max(jnp.where(kv_pos == PAD_POSITION, -PAD_POSITION, kv_pos))
    skip = k_lo > q_hi
    # Every key at or before every query, no padded key: all visible (window, segments aside).
    every = (k_hi <= q_lo) & (jnp.max(kv_pos) != PAD_POSITION)
    if sliding_window is not None:
        # float32 is exact for positions below 2**24 and cannot overflow.
        k_hi_f, k_lo_f = k_hi.astype(jnp.float32), k_lo.astype(jnp.float32)
        skip = skip | (q_lo.astype(jnp.float32) - k_hi_f >= sliding_window)
        every = every & (q_hi.astype(jnp.float32) - k_lo_f < sliding_window)
    if q_seg is not None and kv_seg is not None:
        skip = skip | (jnp.max(kv_seg) < jnp.min(q_seg)) | (jnp.min(kv_seg) > jnp.max(q_seg))
        every = every & (jnp.min(q_seg) == jnp.max(q_seg)) & (jnp.min(kv_seg) == jnp.min(q_seg)) & (
            jnp.max(kv_seg) == jnp.min(q_seg))
    return jnp.where(skip, SKIP, jnp.where(every, FULL, MASKED)).astype(jnp.int32)


def _scores(q, k):
    """float32[B, KV, G, bq, bk] of a (scaled) q block and a k block."""
    return jnp.einsum("bkgqd,bksd->bkgqs", q, k, preferred_element_type=jnp.float32)


def _vis(q_pos, kv_pos, q_seg, kv_seg, sliding_window):
    return visible(q_pos, kv_pos, q_seg, kv_seg, sliding_window)[:, None, None]  # [B, 1, 1, bq, bk]


def init_carry(q):
    """The empty carry of a q block ``[B, KV, G, bq, D]``: (max -inf, denominator 0, accumulator 0)."""
    b, kvh, g, bq, d = q.shape
    return (jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, d), jnp.float32))


def block_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, carry, *, sliding_window: int | None = None,
              scale: float = 1.0):
    """Merges one k/v block into ``carry`` (see :func:`init_carry`); returns the new carry.

    ``scale`` multiplies the scores; a caller looping over k blocks pre-scales q once and passes 1.
    """

    def update(c, sc, guard):
        m, den, acc = c
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if guard else m_new
        p = jnp.exp(sc - safe[..., None])
        corr = jnp.exp(m - safe)  # exp(-inf) = 0 before the first visible key
        pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, den * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    if scale != 1.0:  # outside the branches (scaling inside them costs a pass each); the kernel pre-scales
        q = q * jnp.asarray(scale, q.dtype)

    def masked(c):  # a block on the diagonal / window edge / segment boundary
        vis = _vis(q_pos, kv_pos, q_seg, kv_seg, sliding_window)
        return update(c, jnp.where(vis, _scores(q, k), -jnp.inf), True)

    def full(c):  # every pair visible: no mask, and every row's max is finite
        return update(c, _scores(q, k), False)

    kind = block_kind(q_pos, kv_pos, q_seg, kv_seg, sliding_window)
    return jax.lax.switch(kind, (lambda c: c, full, masked), carry)


def finalize(carry):
    """(out float32[B, KV, G, bq, D], lse float32[B, KV, G, bq]) of a finished carry: a row that
    saw no key is zero with ``lse = LSE_MASKED``."""
    m, den, acc = carry
    seen = den > 0
    out = acc / jnp.where(seen, den, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, den, 1.0)), LSE_MASKED)
    return out, lse


def block_bwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, delta, d_out, *, sliding_window: int | None = None,
              scale: float = 1.0):
    """One k/v block's gradients: ``(dq float32[B, KV, G, bq, D], dk, dv float32[B, KV, bk, D])``.

    lse: the q block's final log-sum-exp ``[B, KV, G, bq]`` (:func:`finalize`); delta:
    ``rowsum(d_out * out)`` ``[B, KV, G, bq]``; d_out: ``[B, KV, G, bq, D]``.
    """

    # Outside the branches (scaling inside them costs a pass each); the kernel pre-scales q once
    # per q block, passes 1 and scales the summed dq once.
    qs = q * jnp.asarray(scale, q.dtype) if scale != 1.0 else q

    def rows(x):  # [B, KV, G, bq, *] -> [B, KV, G bq, *]: dk and dv contract one axis, not two
        return x.reshape(*x.shape[:2], -1, x.shape[-1])

    def grads(sc):
        p = jnp.exp(sc - lse[..., None])  # masked scores are -inf: p = 0
        dv = jnp.einsum("bkms,bkmd->bksd", rows(p), rows(d_out), preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", d_out, v.astype(jnp.float32), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None])
        dq = jnp.einsum("bkgqs,bksd->bkgqd", ds, k.astype(jnp.float32), preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkms,bkmd->bksd", rows(ds), rows(qs.astype(jnp.float32)), preferred_element_type=jnp.float32)
        return (dq * jnp.float32(scale) if scale != 1.0 else dq), dk, dv

    def masked(_):
        return grads(jnp.where(_vis(q_pos, kv_pos, q_seg, kv_seg, sliding_window), _scores(qs, k), -jnp.inf))

    def full(_):
        return grads(_scores(qs, k))

    def skip(_):
        return (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))

    kind = block_kind(q_pos, kv_pos, q_seg, kv_seg, sliding_window)
    return jax.lax.switch(kind, (skip, full, masked), None)


# --------------------------------------------------------------------------------------------
# The kernel: blocks of the whole arrays, a custom VJP over them.


def q_rows(x, bq, kvh):
    """[B, L, H, *rest] -> the q block layout [nq, B, KV, G, bq, *rest] (rows padded with 0)."""
    b, l, h = x.shape[:3]
    nq = -(-l // bq)
    x = _pad_to(x, nq * bq, 1, 0).reshape(b, nq, bq, kvh, h // kvh, *x.shape[3:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, 4)


def _kv_rows(x, bk):
    """[B, S, KV, D] -> [nk, B, KV, bk, D] (rows padded with 0)."""
    b, s, kvh, d = x.shape
    nk = -(-s // bk)
    return jnp.transpose(_pad_to(x, nk * bk, 1, 0).reshape(b, nk, bk, kvh, d), (1, 0, 3, 2, 4))


def _ids(x, blk, fill):
    """int[B, N] -> int32[n, B, blk], padded with ``fill``; None stays None."""
    if x is None:
        return None
    b, n = x.shape
    nb = -(-n // blk)
    return jnp.moveaxis(_pad_to(x.astype(jnp.int32), nb * blk, 1, fill).reshape(b, nb, blk), 1, 0)


def to_blocks(q, k, v, qp, kp, qs, ks, bq, bk):
    """The block layout of the whole arrays: q [nq, B, KV, G, bq, D], k/v [nk, B, KV, bk, D],
    positions [nq, B, bq] / [nk, B, bk], segments alike or None. Padded query rows sit at
    position 0 (sliced off later); padded keys at ``PAD_POSITION`` (never visible)."""
    kvh = k.shape[2]
    return (q_rows(q, bq, kvh), _kv_rows(k, bk), _kv_rows(v, bk), _ids(qp, bq, 0), _ids(kp, bk, PAD_POSITION),
            _ids(qs, bq, 0), _ids(ks, bk, -1))


def unblock_q(x, l):
    """[nq, B, KV, G, bq, *rest] -> [B, L, KV * G, *rest] (padded rows dropped)."""
    nq, b, kvh, g, bq = x.shape[:5]
    x = jnp.moveaxis(x, 4, 2)  # [nq, B, bq, KV, G, ...]
    x = jnp.moveaxis(x, 0, 1).reshape(b, nq * bq, kvh * g, *x.shape[5:])
    return x[:, :l]


def unblock_kv(x, s):
    """[nk, B, KV, bk, D] -> [B, S, KV, D]."""
    nk, b, kvh, bk, d = x.shape
    return jnp.transpose(x, (1, 0, 3, 2, 4)).reshape(b, nk * bk, kvh, d)[:, :s]


def merge_chunk(carry, qx, qpb, qsb, kx, vx, kpb, ksb, *, sliding_window=None, loop="while"):
    """Merges every k/v block of one chunk into the carries of every q block: the forward's work
    on one visiting chunk (the whole sequence for :func:`blockwise_attention`, one shard per ring
    step). Block layout as :func:`to_blocks`; ``qx`` pre-scaled; ``carry`` stacked over the q
    blocks (``[nq, ...]`` of :func:`init_carry`). ``loop``: ``"scan"`` over the k blocks
    (inference) or ``"while"`` (under differentiation: see the kernel's forward)."""
    nk = kx.shape[0]

    def one_q_block(args):
        c, qb, qpos, qseg = args
        if loop == "scan":
            def step(c, kv):
                kb, vb, kpos, kseg = kv
                return block_fwd(qb, kb, vb, qpos, kpos, qseg, kseg, c, sliding_window=sliding_window), None

            return jax.lax.scan(step, c, (kx, vx, kpb, ksb))[0]

        def body(state):
            j, c = state
            kseg = None if ksb is None else ksb[j]
            return j + 1, block_fwd(qb, kx[j], vx[j], qpos, kpb[j], qseg, kseg, c, sliding_window=sliding_window)

        return jax.lax.while_loop(lambda st: st[0] < nk, body, (0, c))[1]

    return jax.lax.map(one_q_block, (carry, qx, qpb, qsb))


def grads_chunk(qx, qpb, qsb, lse, dlx, dox, kx, vx, kpb, ksb, *, sliding_window=None):
    """The backward's work on one chunk of k/v blocks: ``(dq [nq, ...] float32, dk, dv
    [nk, ...] float32)`` of the q blocks (pre-scaled ``qx``; dq is with respect to the scaled q)
    against that chunk, from the final ``lse`` and ``delta`` (``dlx``) in the q block layout."""

    def one_q_block(acc, args):
        qb, qpos, qseg, lseb, dlb, dob = args

        def step(dq, kv):
            kb, vb, kpos, kseg = kv
            dqj, dkj, dvj = block_bwd(qb, kb, vb, qpos, kpos, qseg, kseg, lseb, dlb, dob,
                                      sliding_window=sliding_window)
            return dq + dqj, (dkj, dvj)

        dq, (dks, dvs) = jax.lax.scan(step, jnp.zeros(qb.shape, jnp.float32), (kx, vx, kpb, ksb))
        return (acc[0] + dks, acc[1] + dvs), dq

    zeros = (jnp.zeros(kx.shape, jnp.float32), jnp.zeros(vx.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(one_q_block, zeros, (qx, qpb, qsb, lse, dlx, dox))
    return dq, dk, dv


def init_carries(qx):
    """Empty carries of every q block of ``qx [nq, B, KV, G, bq, D]``."""
    return jax.vmap(init_carry)(qx)


def _forward(q, k, v, qp, kp, qs, ks, window, scale, bq, bk, loop="scan"):
    qx, kx, vx, qpb, kpb, qsb, ksb = to_blocks(q, k, v, qp, kp, qs, ks, bq, bk)
    qx = qx * jnp.asarray(scale, qx.dtype)  # once per q block, not per k block
    # Inference: a scan over the k blocks (the formulation RESULTS.md measured). Under
    # differentiation a while loop: inside an outer scan's autodiff (the model's layer scan) JAX
    # saves a scan's per-iteration ``lax.switch`` branch values as residuals, though the custom
    # VJP never reads them ([nq, nk] score tiles: quadratic memory); a while loop is never
    # linearised, so nothing of it is saved.
    carry = merge_chunk(init_carries(qx), qx, qpb, qsb, kx, vx, kpb, ksb, sliding_window=window, loop=loop)
    out, lse = finalize(carry)  # [nq, B, KV, G, bq, D], [nq, B, KV, G, bq]
    return unblock_q(out, q.shape[1]).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, qp, kp, qs, ks, window, scale, bq, bk):
    return _forward(q, k, v, qp, kp, qs, ks, window, scale, bq, bk)[0]


def _flash_fwd(q, k, v, qp, kp, qs, ks, window, scale, bq, bk):
    out, lse = _forward(q, k, v, qp, kp, qs, ks, window, scale, bq, bk, loop="while")
    out, lse = checkpoint_name(out, "attention_out"), checkpoint_name(lse, "attention_lse")
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def bwd_blocks(res, d_out, scale, bq, bk):
    """The backward's inputs in block layout from the residuals ``(q, k, v, positions, segments,
    out, lse)`` and ``d_out``: ``(qx pre-scaled, kx, vx, qpb, kpb, qsb, ksb, (lse, delta, d_out))``.

    The backward has its own blocks (at most ``BWD_BLOCK``): it holds five tile-sized arrays
    where the forward holds two, and on CPU 256 x 256 tiles ran faster than 512 x 512
    (RESULTS.md). Padded query rows have d_out 0, so they add nothing to dk, dv.
    """
    q, k, v, qp, kp, qs, ks, out, lse = res
    l, kvh = q.shape[1], k.shape[2]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, L, H]
    lse = unblock_q(lse[..., None], l)[..., 0]  # [B, L, H]
    bq, bk = min(bq, BWD_BLOCK), min(bk, BWD_BLOCK)
    qx, kx, vx, qpb, kpb, qsb, ksb = to_blocks(q, k, v, qp, kp, qs, ks, bq, bk)
    qx = qx * jnp.asarray(scale, qx.dtype)  # once per q block, as in the forward
    rows = (q_rows(lse, bq, kvh), q_rows(delta, bq, kvh), q_rows(d_out.astype(jnp.float32), bq, kvh))
    return qx, kx, vx, qpb, kpb, qsb, ksb, rows


def grads_out(res, dq, dk, dv, scale):
    """The custom VJP's cotangents from block-layout gradients (dq with respect to the scaled q)."""
    q, k, v = res[:3]
    dq = unblock_q(dq * jnp.float32(scale), q.shape[1]).astype(q.dtype)
    return (dq, unblock_kv(dk, k.shape[1]).astype(k.dtype), unblock_kv(dv, v.shape[1]).astype(v.dtype),
            None, None, None, None)


def _flash_bwd(window, scale, bq, bk, res, d_out):
    qx, kx, vx, qpb, kpb, qsb, ksb, rows = bwd_blocks(res, d_out, scale, bq, bk)
    dq, dk, dv = grads_chunk(qx, qpb, qsb, *rows, kx, vx, kpb, ksb, sliding_window=window)
    return grads_out(res, dq, dk, dv, scale)


_flash.defvjp(_flash_fwd, _flash_bwd)


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
    """Exact attention computed block by block, with a flash backward. Shapes as in :mod:`.dense`."""
    check_heads(q, k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q_segment_ids is None or kv_segment_ids is None:
        q_segment_ids = kv_segment_ids = None
    bq, bk = min(block_q, q.shape[1]), min(block_kv, k.shape[1])
    return _flash(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids,
                  None if sliding_window is None else int(sliding_window), float(scale), bq, bk)
