"""All-gather sequence parallelism: the simplest exact attention over a sequence-sharded layout.

Under ``shard_map`` each device keeps its own queries and gathers every key and value of the row
over the ``sequence`` axis (kv heads only under GQA: k/v are never expanded), with their global
positions and segment ids, then runs a single-device implementation (blockwise by default) on
them. Masking is by the gathered global positions, so any token order (zigzag included) is
exact. Per-device k/v memory is O(L): what a ring removes. Heads are split over ``tensor``. The
backward is JAX's transpose of the gather (a reduce-scatter of dk, dv) around the inner
function's own VJP.
"""

from __future__ import annotations

import jax

from longrope_jax.attention.dense import check_heads


def all_gather_attention(inner, layout):
    """An attention function with the contract of :mod:`.dense` that runs ``inner`` on the local
    queries against the gathered keys of ``layout`` (:class:`longrope_jax.parallel.Layout`)."""

    def attend(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
               sliding_window=None, scale=None):
        check_heads(q, k)
        segs = q_segment_ids is not None and kv_segment_ids is not None
        heads, rows = layout.heads(), layout.rows()

        def local(q, k, v, qp, kp, *seg):
            gather = lambda x: jax.lax.all_gather(x, "sequence", axis=1, tiled=True)  # noqa: E731
            qs, ks = seg if segs else (None, None)
            return inner(q, gather(k), gather(v), q_positions=qp, kv_positions=gather(kp), q_segment_ids=qs,
                         kv_segment_ids=None if ks is None else gather(ks), sliding_window=sliding_window,
                         scale=scale)

        args = (q, k, v, q_positions, kv_positions) + ((q_segment_ids, kv_segment_ids) if segs else ())
        specs = (heads, heads, heads, rows, rows) + ((rows, rows) if segs else ())
        return jax.shard_map(local, mesh=layout.mesh, in_specs=specs, out_specs=heads, check_vma=False)(*args)

    return attend
