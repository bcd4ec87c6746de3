"""Fused attention kernels behind the common contract, where the backend has one.

- GPU: ``jax.nn.dot_product_attention`` (cuDNN flash attention for bf16/fp16 inputs; XLA
  otherwise).
- TPU: the Pallas splash-attention kernel (GQA through its MQA form, one kernel per kv head).
- CPU: none; ``implementation="splash_interpret"`` runs the TPU kernel in Pallas' TPU interpret
  mode and ``"xla"`` runs ``jax.nn.dot_product_attention``'s XLA path, both for tests.

These kernels mask by index, not by position: causal means key index <= query index. That equals
the position rule whenever positions increase with the index inside each segment (plain windows
and packed documents); it does not hold for reordered (zigzag) positions or a KV cache, which
need the blockwise or dense implementation. Queries and keys must have the same length.
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


def _jax_nn(q, k, v, segs, sliding_window, scale, impl):
    if segs is not None:
        raise ValueError("fused attention (cudnn/xla): segment ids are not supported; use 'splash' or 'blockwise'")
    window = (sliding_window - 1, 0) if sliding_window is not None else None
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation=None if impl in ("auto", "cudnn") else "xla")


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
    q_positions=None,
    kv_positions=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    sliding_window: int | None = None,
    scale: float | None = None,
    implementation: str = "auto",
    block: int = 512,
):
    """Fused causal attention; shapes as in :mod:`.dense` (positions are not used for masking)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"fused attention: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check(q, k, implementation)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    segs = None
    if q_segment_ids is not None and kv_segment_ids is not None:
        segs = (q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32))
    impl = implementation
    if impl == "auto":
        backend = jax.default_backend()
        impl = {"gpu": "cudnn", "tpu": "splash"}.get(backend)
        if impl is None:
            raise ValueError(f"fused attention: no fused kernel on backend {backend!r}; use 'blockwise'")
    if impl in ("cudnn", "xla"):
        return _jax_nn(q, k, v, segs, sliding_window, scale, impl)
    return _splash(q, k, v, segs, sliding_window, scale, block, interpret=impl == "splash_interpret")


__all__ = ["fused_attention", "IMPLEMENTATIONS"]
