"""Ring attention: exact attention over a sequence-sharded layout with O(L / n) memory per device.

Under ``shard_map`` over the ``sequence`` axis (n devices) each device keeps its queries; the
k/v chunks (kv heads only under GQA, in their input dtype, with their global positions and
segment ids) travel around the ring with ``lax.ppermute``, and each visiting chunk is merged into
the float32 carry by a per-chunk kernel. n - 1 rotations in the forward, each issued before the
current chunk's compute so communication can overlap it.

The backward (a ``jax.custom_vjp``; residuals q, k, v, out and lse, all local) rotates k, v and
the float32 dk, dv accumulators together, n hops, so each chunk's gradients arrive home; dq stays
local. The zigzag order (:mod:`longrope_jax.parallel.zigzag`) balances causal work over devices.

The per-chunk kernels (frozen dataclasses, static under the VJP):

- :class:`BlockwiseSteps` (default, any backend): the blockwise kernel's per-block functions
  (:func:`.blockwise.merge_chunk`, :func:`.blockwise.grads_chunk`), masking by the positions
  that travel with k/v, so any token order, sliding windows and segments are exact.
- :class:`longrope_jax.attention.splash.SplashSteps` (``kernel="splash"``): Pallas splash
  attention per chunk pair (TPU; Pallas's interpreter elsewhere).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from longrope_jax.attention import blockwise as bw
from longrope_jax.attention.dense import check_heads


@dataclasses.dataclass(frozen=True)
class BlockwiseSteps:
    """The ring's per-chunk math from the blockwise kernel: ``fwd_start`` splits the local
    inputs into (query side, carry, visiting k/v), ``merge`` folds one visiting chunk in,
    ``fwd_end`` gives (out, lse); ``bwd_start`` / ``grads`` / ``bwd_end`` the same for the
    backward (``grads`` returns dq for the query side, dk and dv in the visiting chunk's layout)."""

    window: int | None
    scale: float
    bq: int
    bk: int

    def fwd_start(self, q, k, v, qp, kp, qs, ks):
        qx, kx, vx, qpb, kpb, qsb, ksb = bw.to_blocks(q, k, v, qp, kp, qs, ks, self.bq, self.bk)
        qx = qx * jnp.asarray(self.scale, qx.dtype)
        return (qx, qpb, qsb), bw.init_carries(qx), (kx, vx, kpb, ksb)

    def merge(self, qside, carry, kv):
        return bw.merge_chunk(carry, *qside, *kv, sliding_window=self.window)

    def fwd_end(self, qside, carry, q):
        out, lse = bw.finalize(carry)
        return bw.unblock_q(out, q.shape[1]).astype(q.dtype), lse

    def bwd_start(self, res, d_out):
        qx, kx, vx, qpb, kpb, qsb, ksb, rows = bw.bwd_blocks(res, d_out, self.scale, self.bq, self.bk)
        return (qx, qpb, qsb, *rows), (kx, vx, kpb, ksb)

    def grads(self, qside, kv):
        return bw.grads_chunk(*qside, *kv, sliding_window=self.window)

    def bwd_end(self, res, dq, dk, dv):
        return bw.grads_out(res, dq, dk, dv, self.scale)


def _rotate(tree, n: int):
    """Device i's pieces to device i + 1 (mod n) over ``sequence``."""
    perm = [(i, (i + 1) % n) for i in range(n)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, "sequence", perm), tree)


def _forward(steps, n, q, k, v, qp, kp, qs, ks):
    qside, carry, kv = steps.fwd_start(q, k, v, qp, kp, qs, ks)

    def body(_, state):
        carry, kv = state
        nxt = _rotate(kv, n)  # issued before this chunk's compute
        return steps.merge(qside, carry, kv), nxt

    carry, kv = jax.lax.fori_loop(0, n - 1, body, (carry, kv))
    return steps.fwd_end(qside, steps.merge(qside, carry, kv), q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _ring(steps, n, q, k, v, qp, kp, qs, ks):
    return _forward(steps, n, q, k, v, qp, kp, qs, ks)[0]


def _ring_fwd(steps, n, q, k, v, qp, kp, qs, ks):
    out, lse = _forward(steps, n, q, k, v, qp, kp, qs, ks)
    return out, (q, k, v, qp, kp, qs, ks, out, lse)


def _ring_bwd(steps, n, res, d_out):
    qside, kv = steps.bwd_start(res, d_out)

    def step(dq, kv, dkv):
        dqi, dki, dvi = steps.grads(qside, kv)
        return dq + dqi, _rotate((dkv[0] + dki, dkv[1] + dvi), n)  # dk, dv travel on with their chunk

    def body(_, state):
        dq, kv, dkv = state
        nxt = _rotate(kv, n)  # issued before this chunk's compute
        dq, dkv = step(dq, kv, dkv)
        return dq, nxt, dkv

    zeros = (jnp.zeros(kv[0].shape, jnp.float32), jnp.zeros(kv[1].shape, jnp.float32))
    dq = jnp.zeros(qside[0].shape, jnp.float32)
    dq, kv, dkv = jax.lax.fori_loop(0, n - 1, body, (dq, kv, zeros))
    dq, (dk, dv) = step(dq, kv, dkv)  # the n-th hop brings every chunk's dk, dv home
    return steps.bwd_end(res, dq, dk, dv)


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention(layout, *, block_q: int = 512, block_kv: int = 512, kernel: str = "blockwise"):
    """An attention function with the contract of :mod:`.dense` over ``layout``
    (:class:`longrope_jax.parallel.Layout`): q, k, v ``[B, L, heads, D]`` sharded as
    ``layout.heads()``, positions and segment ids as ``layout.rows()``.

    ``kernel``: ``blockwise`` (:class:`BlockwiseSteps`) or ``splash``
    (:class:`longrope_jax.attention.splash.SplashSteps`: causal and segments, no sliding
    window; compiled for TPU meshes, interpreted elsewhere)."""
    if kernel not in ("blockwise", "splash"):
        raise ValueError(f"ring attention: kernel must be 'blockwise' or 'splash', got {kernel!r}")
    n = int(layout.mesh.shape["sequence"])

    def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
               sliding_window=None, scale=None):
        check_heads(q, k)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        segs = q_segment_ids is not None and kv_segment_ids is not None
        window = None if sliding_window is None else int(sliding_window)
        local_l = q.shape[1] // n
        if kernel == "splash":
            from longrope_jax.attention.splash import splash_steps

            steps = splash_steps(layout.mesh, q.shape[1], local_l, window, scale, max(block_q, block_kv))
        else:
            steps = BlockwiseSteps(window, scale, min(block_q, local_l), min(block_kv, local_l))
        heads, rows = layout.heads(), layout.rows()

        def local(q, k, v, qp, kp, *seg):
            qs, ks = seg if segs else (None, None)
            return _ring(steps, n, q, k, v, qp, kp, qs, ks)

        args = (q, k, v, q_positions, kv_positions) + ((q_segment_ids, kv_segment_ids) if segs else ())
        specs = (heads, heads, heads, rows, rows) + ((rows, rows) if segs else ())
        return jax.shard_map(local, mesh=layout.mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)

    return attend
