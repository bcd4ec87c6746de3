"""Pallas splash attention as the ring's per-chunk kernel (``ring_attention(kernel="splash")``).

Stock splash kernels take static index masks, so each device's rows are cut into two chunks
(the zigzag layout's early and late chunk; halves of a contiguous shard) and every (query chunk,
visiting k/v chunk) pair is one of three precomputed cases, chosen per step from the chunks'
first and last positions (``lax.switch``): every key before every query (``FullMask``), the same
chunk (``CausalMask``), or every key after every query (skipped). The causal mask is by index
inside a pair, so positions must be consecutive inside each chunk: the model's are. Segment ids
travel with k/v and go to the kernel as ``SegmentIds``; a sliding window shorter than the row is
refused (no static mask expresses it once chunks move).

Per pair the forward returns the normalised output and its log-sum-exp (``save_residuals``),
merged into a float32 (out, lse) carry; the backward calls splash's fused dq/dk/dv kernel with
the pair's inputs and the row's *final* out and lse, which is exactly the pair's share of the
gradient. That kernel is splash's VJP rule, a private function of the pinned jax version
(``splash_attention_kernel._splash_attention_bwd``); the tests call it through the Pallas
interpreter, so a jax upgrade that changes it fails in CI. On a mesh of TPU devices (including
compile-only topology devices) the kernels are compiled by Mosaic; on any other backend they run
in Pallas's interpreter: exact but slow, for tests.

Shapes per device: q ``[B, 2c, H, D]`` (c tokens per chunk, a multiple of 128), k/v
``[B, 2c, KV, D]``; chunk layout ``[2, B, heads, c, D]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

from longrope_jax.attention.blockwise import LSE_MASKED

SKIP, FULL, CAUSAL = 0, 1, 2
LANES = 128  # splash's block sizes are multiples of the TPU's 128 lanes
NEG = -1e30  # the carry's log-sum-exp before any visible key (finite: exp(NEG - NEG) is not NaN)


def splash_steps(mesh, length: int, local_length: int, window: int | None, scale: float, block: int = 512):
    """:class:`SplashSteps` for rows of ``length`` tokens, ``local_length`` per device; one-line
    errors for what the kernel cannot do."""
    if window is not None and window < length:
        raise ValueError(f"attention ring_splash: splash's masks are static, so a sliding window ({window} tokens, "
                         f"shorter than the {length}-token row) is not supported; use attention=ring")
    chunk = local_length // 2
    if local_length % 2 or chunk % LANES:
        raise ValueError(f"attention ring_splash: each device's chunk ({local_length} / 2 tokens) must be a multiple "
                         f"of {LANES}; got length {length} over {length // local_length} devices")
    b = max(LANES, min(block, chunk) // LANES * LANES)
    while chunk % b:
        b -= LANES
    interpret = mesh.devices.flat[0].platform != "tpu"
    return SplashSteps(scale=scale, chunk=chunk, block=b, interpret=interpret)


def _chunks(x):
    """``[B, 2c, heads, D]`` -> ``[2, B, heads, c, D]``; ``[B, 2c]`` -> ``[2, B, c]``."""
    b, l = x.shape[:2]
    x = x.reshape(b, 2, l // 2, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0) if x.ndim == 3 else jnp.moveaxis(x, (1, 2), (0, 3))


def _unchunk(x):
    """The inverse of :func:`_chunks` for ``[2, B, heads, c, D]``."""
    x = jnp.moveaxis(x, (0, 3), (1, 2))
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _kind(qp, kp):
    """The pair's case from its positions ``int32[B, c]``: ``FULL``, ``CAUSAL`` (same chunk) or ``SKIP``."""
    full = jnp.max(kp) < jnp.min(qp)
    return jnp.where(full, FULL, jnp.where(jnp.min(kp) == jnp.min(qp), CAUSAL, SKIP)).astype(jnp.int32)


def _collapsed(info):
    """Mask info as splash's jitted entry passes it to its VJP (partial mask blocks flattened)."""
    if info is None or info.partial_mask_blocks is None:
        return info
    return info._replace(partial_mask_blocks=info.partial_mask_blocks.reshape(-1, *info.partial_mask_blocks.shape[-2:]))


@dataclasses.dataclass(frozen=True)
class SplashSteps:
    """The ring's per-chunk math (see :class:`.ring.BlockwiseSteps` for the method contract) with
    splash kernels on (query chunk, k/v chunk) pairs."""

    scale: float
    chunk: int
    block: int
    interpret: bool

    def _kernels(self, heads: int):
        """``{FULL: kernel, CAUSAL: kernel}`` for ``heads`` query heads (built inside the trace:
        their mask tables are arrays)."""
        b = self.block
        sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, use_fused_bwd_kernel=True)
        shape = (self.chunk, self.chunk)
        return {kind: sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                         q_seq_shards=1, save_residuals=True, interpret=self.interpret)
                for kind, mask in ((FULL, sa.FullMask(shape)), (CAUSAL, sa.CausalMask(shape)))}

    @staticmethod
    def _rows(fn, segs, *xs):
        """``fn`` over the batch (splash kernels take one row), segment ids as ``SegmentIds``."""
        def one(*a):
            *a, qs, ks = a if segs[0] is not None else (*a, None, None)
            return fn(*a, None if qs is None else sa.SegmentIds(qs, ks))

        return jax.vmap(one)(*xs, *(segs if segs[0] is not None else ()))

    def _sides(self, q, k, v, qp, kp, qs, ks):
        """The query side (scaled q, positions, segments) and the k/v side, each as two chunks."""
        seg = lambda s: None if s is None else _chunks(s)
        qc = _chunks(q) * jnp.asarray(self.scale, q.dtype)
        return (qc, _chunks(qp), seg(qs)), (_chunks(k), _chunks(v), _chunks(kp), seg(ks))

    def fwd_start(self, q, k, v, qp, kp, qs, ks):
        qside, kv = self._sides(q, k, v, qp, kp, qs, ks)
        carry = (jnp.zeros(qside[0].shape, jnp.float32), jnp.full(qside[0].shape[:-1], NEG, jnp.float32))
        return qside, carry, kv

    def merge(self, qside, carry, kv):
        (qc, qp, qs), (kc, vc, kp, ks) = qside, kv
        kernels = self._kernels(qc.shape[2])
        out, lse = carry
        outs, lses = [], []
        for a in range(2):
            o, l = out[a], lse[a]
            for b in range(2):
                def run(kind, a=a, b=b):
                    def fn(q, k, v, ids):
                        o, (l,) = kernels[kind](q, k, v, segment_ids=ids)
                        return o.astype(jnp.float32), l
                    return lambda: self._rows(fn, (None if qs is None else qs[a], None if ks is None else ks[b]),
                                              qc[a], kc[b], vc[b])

                skip = lambda: (jnp.zeros(o.shape, jnp.float32), jnp.full(l.shape, NEG, jnp.float32))
                o_ab, l_ab = jax.lax.switch(_kind(qp[a], kp[b]), (skip, run(FULL), run(CAUSAL)))
                new = jnp.logaddexp(l, l_ab)
                o = o * jnp.exp(l - new)[..., None] + o_ab * jnp.exp(l_ab - new)[..., None]
                l = new
            outs.append(o)
            lses.append(l)
        return jnp.stack(outs), jnp.stack(lses)

    def fwd_end(self, qside, carry, q):
        out, lse = carry
        seen = lse > NEG / 2  # a row no key is visible to gives zeros, and no gradient
        out = jnp.where(seen[..., None], out, 0.0)
        return _unchunk(out).astype(q.dtype), jnp.where(seen, lse, LSE_MASKED)

    def bwd_start(self, res, d_out):
        q, k, v, qp, kp, qs, ks, out, lse = res
        qside, kv = self._sides(q, k, v, qp, kp, qs, ks)
        return (*qside, _chunks(out), lse, _chunks(d_out.astype(out.dtype))), kv

    def grads(self, qside, kv):
        (qc, qp, qs, oc, lse, doc), (kc, vc, kp, ks) = qside, kv
        kernels = self._kernels(qc.shape[2])
        dq = [jnp.zeros(qc.shape[1:], jnp.float32)] * 2
        dk = [jnp.zeros(kc.shape[1:], jnp.float32)] * 2
        dv = [jnp.zeros(vc.shape[1:], jnp.float32)] * 2
        for a in range(2):
            for b in range(2):
                def run(kind, a=a, b=b):
                    kernel = kernels[kind]
                    kw = kernel.kwargs

                    def fn(q, k, v, o, l, do, ids):
                        res = (q, k, v, ids, None, o, l, _collapsed(kernel.dq_mask_info),
                               _collapsed(kernel.dkv_mask_info))
                        g = sk._splash_attention_bwd(False, kw["mask_value"], kw["is_mqa"], kw["block_sizes"], None,
                                                     kw["mask_function"], kw["attn_logits_soft_cap"], kw["interpret"],
                                                     res, do)
                        return tuple(x.astype(jnp.float32) for x in g[3:6])
                    return lambda: self._rows(fn, (None if qs is None else qs[a], None if ks is None else ks[b]),
                                              qc[a], kc[b], vc[b], oc[a], lse[a], doc[a])

                skip = lambda a=a, b=b: (jnp.zeros_like(dq[a]), jnp.zeros_like(dk[b]), jnp.zeros_like(dv[b]))
                g = jax.lax.switch(_kind(qp[a], kp[b]), (skip, run(FULL), run(CAUSAL)))
                dq[a], dk[b], dv[b] = dq[a] + g[0], dk[b] + g[1], dv[b] + g[2]
        return jnp.stack(dq), jnp.stack(dk), jnp.stack(dv)

    def bwd_end(self, res, dq, dk, dv):
        q, k, v = res[:3]
        return ((_unchunk(dq) * jnp.float32(self.scale)).astype(q.dtype), _unchunk(dk).astype(k.dtype),
                _unchunk(dv).astype(v.dtype), None, None, None, None)
