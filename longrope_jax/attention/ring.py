"""Ring attention: exact attention over a sequence-sharded layout with O(L / n) memory per device.

Under ``shard_map`` over the ``sequence`` axis (n devices) each device keeps its queries; the
k/v chunks (kv heads only under GQA, in their input dtype, with their global positions and
segment ids) travel around the ring with ``lax.ppermute``, and each visiting chunk is merged into
the float32 carry by the blockwise kernel's per-block functions (:func:`.blockwise.merge_chunk`,
which skips blocks no query can see by position). n - 1 rotations in the forward, each issued
before the current chunk's compute so communication can overlap it.

The backward (a ``jax.custom_vjp``; residuals q, k, v, out and lse, all local) rotates k, v and
the float32 dk, dv accumulators together, n hops, so each chunk's gradients arrive home; dq stays
local. Masking is by the positions that travel with k/v, so any token order is exact; the zigzag
order (:mod:`longrope_jax.parallel.zigzag`) balances causal work over the devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from longrope_jax.attention import blockwise as bw
from longrope_jax.attention.dense import check_heads


def _rotate(tree, n: int):
    """Device i's pieces to device i + 1 (mod n) over ``sequence``."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, "sequence", perm), tree)


def _forward(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk):
    qx, kx, vx, qpb, kpb, qsb, ksb = bw.to_blocks(q, k, v, qp, kp, qs, ks, bq, bk)
    qx = qx * jnp.asarray(scale, qx.dtype)

    def merge(carry, kv):
        return bw.merge_chunk(carry, qx, qpb, qsb, *kv, sliding_window=window)

    def body(_, state):
        carry, kv = state
        nxt = _rotate(kv, n)  # issued before this chunk's compute
        return merge(carry, kv), nxt

    carry, kv = jax.lax.fori_loop(0, n - 1, body, (bw.init_carries(qx), (kx, vx, kpb, ksb)))
    out, lse = bw.finalize(merge(carry, kv))
    return bw.unblock_q(out, q.shape[1]).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _ring(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk):
    return _forward(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk)[0]


def _ring_fwd(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk):
    out, lse = _forward(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _ring_bwd(n, window, scale, bq, bk, res, d_out):
    qx, kx, vx, qpb, kpb, qsb, ksb, rows = bw.bwd_blocks(res, d_out, scale, bq, bk)

    def step(dq, kv, dkv):
        dqi, dki, dvi = bw.grads_chunk(qx, qpb, qsb, *rows, *kv, sliding_window=window)
        return dq + dqi, _rotate((dkv[0] + dki, dkv[1] + dvi), n)  # dk, dv travel on with their chunk

    def body(_, state):
        dq, kv, dkv = state
        nxt = _rotate(kv, n)  # issued before this chunk's compute
        dq, dkv = step(dq, kv, dkv)
        return dq, nxt, dkv

    zeros = (jnp.zeros(kx.shape, jnp.float32), jnp.zeros(vx.shape, jnp.float32))
    dq, kv, dkv = jax.lax.fori_loop(0, n - 1, body, (jnp.zeros(qx.shape, jnp.float32), (kx, vx, kpb, ksb), zeros))
    dq, (dk, dv) = step(dq, kv, dkv)  # the n-th hop brings every chunk's dk, dv home
    return bw.grads_out(res, dq, dk, dv, scale)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(layout, *, block_q: int = 512, block_kv: int = 512):
    """An attention function with the contract of :mod:`.dense` over ``layout``
    (:class:`longrope_jax.parallel.Layout`): q, k, v ``[B, L, heads, D]`` sharded as
    ``layout.heads()``, positions and segment ids as ``layout.rows()``."""
    n = int(layout.mesh.shape["sequence"])

    def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
               sliding_window=None, scale=None):
        check_heads(q, k)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        segs = q_segment_ids is not None and kv_segment_ids is not None
        window = None if sliding_window is None else int(sliding_window)
        heads, rows = layout.heads(), layout.rows()
        local_l = q.shape[1] // n
        bq, bk = min(block_q, local_l), min(block_kv, local_l)

        def local(q, k, v, qp, kp, *seg):
            qs, ks = seg if segs else (None, None)
            return _ring(q, k, v, qp, kp, qs, ks, n, window, scale, bq, bk)

        args = (q, k, v, q_positions, kv_positions) + ((q_segment_ids, kv_segment_ids) if segs else ())
        specs = (heads, heads, heads, rows, rows) + ((rows, rows) if segs else ())
        return jax.shard_map(local, mesh=layout.mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)

    return attend
