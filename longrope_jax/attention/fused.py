"""Fused attention kernels behind the common contract, where the backend has one.

- GPU: ``jax.nn.dot_product_attention`` (cuDNN flash attention for bf16/fp16 inputs; XLA
  otherwise).
- TPU: the Pallas splash-attention kernel (GQA through its MQA form, one kernel per kv head).
- CPU (and ``implementation="xla"``): ``jax.nn.dot_product_attention``'s XLA path with the
  contract's mask built from positions, segments and window: exact for any positions, O(L^2)
  scores (a reference for the fused call, not a long-context path). ``"splash_interpret"`` runs
  the TPU kernel in Pallas' TPU interpret mode, for tests.

The cuDNN and splash kernels mask by index, not by position (causal: key index <= query index).
That equals the contract's rule exactly when queries and keys carry the same positions and
segments, segments are contiguous, and within a segment positions step by one with the index
(plain windows, packed documents). Other inputs (zigzag orders, a row that sees no key) go to the
blockwise kernel, chosen at run time by ``lax.cond`` on that test, so the contract holds for every
input. Queries and keys must have the same length (no KV cache: a one-line error).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from longrope_jax.attention.dense import check_heads

IMPLEMENTATIONS = ("auto", "cudnn", "xla", "splash", "splash_interpret")


def _check(q, k, impl):
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"fused attention ({impl}): queries and keys must have the same length "
                         f"(got {q.shape[1]} and {k.shape[1]}); use 'blockwise' with a KV cache")
    check_heads(q, k)


def index_rule_holds(q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None):
    """bool[]: whether masking by index (what the cuDNN and splash kernels do) equals masking by
    these positions and segments (see the module docstring), so every row also sees itself."""
    off = q_positions - jnp.arange(q_positions.shape[1], dtype=q_positions.dtype)
    ok = jnp.all(q_positions == kv_positions)
    if q_segment_ids is None or kv_segment_ids is None:
        return ok & jnp.all(off == off[:, :1])
    step = jnp.diff(q_segment_ids, axis=1)
    return (ok & jnp.all(q_segment_ids == kv_segment_ids) & jnp.all(step >= 0)
            & jnp.all(jnp.where(step == 0, jnp.diff(off, axis=1) == 0, True)))


def _xla(q, k, v, q_positions, kv_positions, segs, sliding_window, scale):
    from longrope_jax.attention.dense import mask as visible

    m = visible(q_positions, kv_positions, *(segs or (None, None)), sliding_window)  # [B, L, S]
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, mask=m[:, None], implementation="xla")
    return jnp.where(jnp.any(m, axis=-1)[:, :, None, None], out, 0).astype(q.dtype)  # fully masked rows: 0


def _cudnn(q, k, v, segs, sliding_window, scale):
    if segs is not None:
        raise ValueError("fused attention (cudnn): segment ids are not supported; use 'splash' or 'blockwise'")
    window = (sliding_window - 1, 0) if sliding_window is not None else None
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation="cudnn")


@functools.lru_cache(maxsize=32)
def _splash_kernel(length: int, groups: int, window: int | None, block: int):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    if window is None:
        one = sm.CausalMask((length, length))
    else:
        one = sm.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
    mask = sm.MultiHeadMask([one] * groups)
    bs = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                       block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return sk.make_splash_mqa_single_device(mask, block_sizes=bs)


def _splash(q, k, v, segs, sliding_window, scale, block, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, l, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    blk = min(block, -(-l // 128) * 128)
    lp = -(-l // blk) * blk
    pad = lp - l
    # Padding goes at the end: under the causal mask no real query sees a padded key.
    qh = jnp.pad(q * jnp.asarray(scale, q.dtype), [(0, 0), (0, pad), (0, 0), (0, 0)])
    kh = jnp.pad(k, [(0, 0), (0, pad), (0, 0), (0, 0)])
    vh = jnp.pad(v, [(0, 0), (0, pad), (0, 0), (0, 0)])
    qh = jnp.transpose(qh.reshape(b, lp, kvh, g, d), (0, 2, 3, 1, 4)).reshape(b * kvh, g, lp, d)
    kh = jnp.transpose(kh, (0, 2, 1, 3)).reshape(b * kvh, lp, d)
    vh = jnp.transpose(vh, (0, 2, 1, 3)).reshape(b * kvh, lp, d)
    with jax.ensure_compile_time_eval():  # cached across traces: its arrays must be concrete
        kernel = _splash_kernel(lp, g, sliding_window, blk)
    if segs is not None:
        sq = jnp.repeat(jnp.pad(segs[0], [(0, 0), (0, pad)], constant_values=-1), kvh, axis=0)
        sk_ = jnp.repeat(jnp.pad(segs[1], [(0, 0), (0, pad)], constant_values=-2), kvh, axis=0)
    else:
        sq = sk_ = jnp.zeros((b * kvh, lp), jnp.int32)

    ctx = contextlib.nullcontext()
    if interpret:
        from jax.experimental.pallas import tpu as pltpu

        ctx = pltpu.force_tpu_interpret_mode()
    with ctx:
        out = jax.lax.map(lambda a: kernel(a[0], a[1], a[2], segment_ids=sk.SegmentIds(q=a[3], kv=a[4])),
                          (qh, kh, vh, sq, sk_))
    out = jnp.transpose(out.reshape(b, kvh, g, lp, d), (0, 3, 1, 2, 4)).reshape(b, lp, h, d)
    return out[:, :l].astype(q.dtype)


def fused_attention(
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
    implementation: str = "auto",
    block: int = 512,
):
    """Fused causal attention; shapes and contract as in :mod:`.dense`."""
    from longrope_jax.attention.blockwise import blockwise_attention

    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"fused attention: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check(q, k, implementation)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segs = None
    if q_segment_ids is not None and kv_segment_ids is not None:
        segs = (q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    impl = implementation
    if impl == "auto":
        impl = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    if impl == "xla":
        return _xla(q, k, v, q_positions, kv_positions, segs, sliding_window, scale)
    if impl == "cudnn":
        kernel = lambda: _cudnn(q, k, v, segs, sliding_window, scale)  # noqa: E731
    else:
        kernel = lambda: _splash(q, k, v, segs, sliding_window, scale, block,  # noqa: E731
                                 interpret=impl == "splash_interpret")
    general = lambda: blockwise_attention(q, k, v, q_positions=q_positions, kv_positions=kv_positions,  # noqa: E731
                                          q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                                          sliding_window=sliding_window, scale=scale, block_q=block, block_kv=block)
    holds = index_rule_holds(q_positions, kv_positions, *(segs or (None, None)))
    return jax.lax.cond(holds, lambda _: kernel(), lambda _: general(), None)


__all__ = ["fused_attention", "IMPLEMENTATIONS"]
