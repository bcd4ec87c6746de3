"""Rotary position embeddings as a pure function of ``(positions, RopeSpec)``.

Every RoPE scaling this project knows (none, PI, NTK, dynamic NTK, YaRN, llama3, LongRoPE) is
expressed as per-pair rescale factors ``lambda_i`` over the unscaled inverse frequencies
``base ** (-2i / d)``:

    inv_freq_i = 1 / (lambda_i * base ** (2i / d))

plus an attention factor (a multiplier on cos and sin), a start-token count ``n_hat`` (positions
below it keep the original, unscaled angles and no attention factor) and an optional short/long
pair switched per call with transformers' rule: long iff ``max(position) + 1 > original_max``.

The spec is a pytree whose factors are traced arrays, so changing them never recompiles and a
leading candidate axis ``[K, d/2]`` is accepted. Angles are computed in float32 from integer
positions of any shape; no position table is ever materialised.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

HALF = "half"  # HF layout: pair i is dims (i, i + d/2) -- ``rotate_half``.
INTERLEAVED = "interleaved"  # Meta / GGUF layout: pair i is dims (2i, 2i + 1).
LAYOUTS = (HALF, INTERLEAVED)


class RopeError(ValueError):
    """A RoPE description is malformed; the message names the source, field and expectation."""


@struct.dataclass
class RopeSpec:
    """A RoPE scaling as a pytree.

    Data fields (traced; may carry the same leading candidate axes ``[*K]``):
      short_factor: float32[*K, P] factors used when ``max(pos) + 1 <= original_max``.
      long_factor: float32[*K, P] factors used otherwise.
      attention_factor: float32[*K] multiplier on cos and sin (positions >= start_tokens).
      start_tokens: int32[*K] ``n_hat``: positions below it use unscaled angles, factor 1.
    Static fields (part of the tree structure; changing them recompiles):
      theta: RoPE base.
      rotary_dim: rotated dims per head (``P = rotary_dim // 2`` pairs).
      original_max: switching threshold for the short/long pair (None: long set always).
      dynamic_scale: if set, dynamic NTK (HF ``dynamic``) with this factor over
        ``dynamic_max`` positions; the factors are then ignored.
    Labels (``"yarn:2"``) are not part of a spec: what computes the same compiles once (callers
    name their specs; ``factors.rope_label``).
    """

    short_factor: jax.Array
    long_factor: jax.Array
    attention_factor: jax.Array
    start_tokens: jax.Array
    theta: float = struct.field(pytree_node=False, default=10000.0)
    rotary_dim: int = struct.field(pytree_node=False, default=64)
    original_max: int | None = struct.field(pytree_node=False, default=None)
    dynamic_scale: float | None = struct.field(pytree_node=False, default=None)
    dynamic_max: int = struct.field(pytree_node=False, default=0)

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2


def static_key(spec: RopeSpec) -> tuple:
    """The static fields that must agree for specs to be stacked."""
    return (spec.theta, spec.rotary_dim, spec.original_max, spec.dynamic_scale, spec.dynamic_max)


def stackable(specs: Mapping[str, RopeSpec]) -> list[list[str]]:
    """The names of ``specs`` in groups that :func:`stack` takes together (one static structure
    each), in first-seen order."""
    groups: dict = {}
    for name, sp in specs.items():
        groups.setdefault(static_key(sp), []).append(name)
    return list(groups.values())


def value_key(spec: RopeSpec) -> tuple:
    """What a spec computes, hashable: its static fields and its data's float32/int32
    bytes. Specs with equal keys give bit-identical angles (a search reuses scores by this key)."""
    leaves = (spec.short_factor, spec.long_factor, spec.attention_factor, spec.start_tokens)
    return static_key(spec) + tuple((np.asarray(x).dtype.str, np.asarray(x).shape, np.asarray(x).tobytes())
                                    for x in leaves)


def stack(specs: Sequence[RopeSpec]) -> RopeSpec:
    """Stacks specs with identical static fields into one spec with a leading candidate axis."""
    statics = {static_key(s) for s in specs}
    if len(statics) != 1:
        raise RopeError(f"cannot stack RoPE specs with different static fields: {sorted(map(str, statics))}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *specs)


# --------------------------------------------------------------------------------------------
# The pure function.


def _exponent(rotary_dim: int) -> np.ndarray:
    """``2i / d`` as transformers computes it: float32[P], an IEEE float32 division.

    Computed with numpy on purpose: XLA rewrites a division by a broadcast scalar into a multiply
    by its reciprocal, which is off by an ulp for most ``d`` that are not powers of two (96).
    """
    return np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)


def _pos_freq(theta: float, rotary_dim: int) -> jax.Array:
    """``base ** (2i / d)``: float32[P], transformers' float32 power (here correctly rounded)."""
    return jnp.asarray(np.power(np.float64(np.float32(theta)), _exponent(rotary_dim).astype(np.float64)), jnp.float32)


def inv_freq(spec: RopeSpec, seq_len: jax.Array | int) -> jax.Array:
    """Inverse frequencies used by a call whose largest position is ``seq_len - 1``.

    Returns float32[*K, P]. ``seq_len`` may be traced.
    """
    if spec.dynamic_scale is not None:
        s, lmax, d = spec.dynamic_scale, spec.dynamic_max, spec.rotary_dim
        seq = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(lmax))
        base = jnp.float32(spec.theta) * ((jnp.float32(s) * seq / jnp.float32(lmax)) - jnp.float32(s - 1)) ** (
            jnp.float32(d / (d - 2))
        )
        inv = 1.0 / jnp.power(base, jnp.asarray(_exponent(d)))
        # Up to the window: exactly the unscaled frequencies (XLA's traced pow is an ulp off them).
        inv = jnp.where(seq > jnp.float32(lmax), inv, 1.0 / _pos_freq(spec.theta, d))
        return jnp.broadcast_to(inv, spec.long_factor.shape)
    if spec.original_max is None:  # no short/long pair
        factors = spec.long_factor.astype(jnp.float32)
    else:
        use_long = jnp.asarray(seq_len) > spec.original_max
        factors = jnp.where(use_long, spec.long_factor, spec.short_factor).astype(jnp.float32)
    return 1.0 / (factors * _pos_freq(spec.theta, spec.rotary_dim))


# 2 pi as a float32 pair (hi + lo carries 48 bits), for the precise angles' reduction.
_TWO_PI_HI = float(np.float32(2 * np.pi))
_TWO_PI_LO = float(np.float32(2 * np.pi - float(np.float32(2 * np.pi))))
PRECISE_MAX_POSITION = 2**22  # the precise angles' exact splits hold below this


def _split12(a):
    """Dekker's split: ``a = hi + lo`` exactly, each with at most 12 significant bits."""
    c = a * jnp.float32(4097.0)
    hi = c - (c - a)
    return hi, a - hi


def _mod_two_pi(t):
    """``t mod 2 pi`` in [-pi, pi] of an exact float32 ``t`` (|t| < 2**24), a few ulps of pi off:
    ``t - k * 2 pi`` with the product ``k * hi`` taken exactly (Dekker) and 2 pi to 48 bits."""
    k = jnp.round(t * jnp.float32(1 / (2 * np.pi)))
    kh, kl = _split12(k)
    ch, cl = _split12(jnp.float32(_TWO_PI_HI))
    p = k * jnp.float32(_TWO_PI_HI)
    e = ((kh * ch - p) + kh * cl + kl * ch) + kl * cl  # k * hi = p + e exactly
    return ((t - p) - e) - k * jnp.float32(_TWO_PI_LO)


def precise_angles(positions, inv_freq):
    """``position * inv_freq`` reduced modulo 2 pi, within about 1e-6 rad of the float64 product
    of the same float32 ``inv_freq`` for positions below ``PRECISE_MAX_POSITION`` (2**22), where
    the plain float32 product is off by up to ``position * 2**-24`` rad (0.125 at 2**21).

    The position is split into ``a * 2**11 + b`` and the frequency into two 12-bit halves, so the
    four partial products are exact float32 numbers; each is reduced modulo 2 pi before they are
    added. positions: int[..., 1] (broadcast against inv_freq [..., P]); returns float32.
    """
    p = positions.astype(jnp.int32)
    a = (p >> 11).astype(jnp.float32)  # < 2**11
    b = (p & 2047).astype(jnp.float32)  # < 2**11
    fh, fl = _split12(inv_freq.astype(jnp.float32))
    big = jnp.float32(2048.0)
    return (_mod_two_pi(a * (fh * big)) + _mod_two_pi(a * (fl * big)) + _mod_two_pi(b * fh)
            + _mod_two_pi(b * fl))


def cos_sin(positions: jax.Array, spec: RopeSpec, seq_len: jax.Array | int | None = None, *,
            precise: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotation angles, attention factor applied.

    Args:
      positions: int[...] global token positions, any shape (e.g. ``[B, L]``), any order.
      spec: a RopeSpec; its data fields may have leading candidate axes ``[*K]``.
      seq_len: the length of the whole call, which picks the short or long factors (and dynamic
        NTK's base): give it when ``positions`` are a part of the call (a sequence shard, a
        packed row), whose local maximum says nothing of the whole. None: ``max(positions) + 1``
        of this array, as transformers does for a whole sequence. A stage that must not switch
        passes a fixed set instead (:func:`fixed`).
      precise: angles by :func:`precise_angles` (exact to ~1e-6 rad up to 2**22 positions)
        instead of the float32 product transformers computes (the default keeps its parity).
    Returns:
      (cos, sin): float32[*K, ..., P].
    """
    positions = jnp.asarray(positions)
    seq_len = jnp.max(positions) + 1 if seq_len is None else seq_len
    batch = spec.long_factor.shape[:-1]
    nb, npos = len(batch), positions.ndim

    def expand(a):  # [*K, P] -> [*K, 1..., P]
        return a.reshape(a.shape[:-1] + (1,) * npos + a.shape[-1:])

    def expand_scalar(a):  # [*K] -> [*K, 1..., 1]
        return jnp.asarray(a).reshape(jnp.shape(a) + (1,) * (npos + 1))

    pos = positions.astype(jnp.float32).reshape((1,) * nb + positions.shape + (1,))
    if precise:
        angles = precise_angles(positions.reshape((1,) * nb + positions.shape + (1,)), expand(inv_freq(spec, seq_len)))
    else:
        angles = pos * expand(inv_freq(spec, seq_len))
    attn = expand_scalar(spec.attention_factor).astype(jnp.float32)
    cos, sin = jnp.cos(angles) * attn, jnp.sin(angles) * attn
    # Start tokens: original angles, no attention factor. Skipped entirely when none are kept.
    orig = pos * (1.0 / _pos_freq(spec.theta, spec.rotary_dim))
    keep = pos < expand_scalar(spec.start_tokens).astype(jnp.float32)

    def with_start(cs):
        c, s = cs
        return jnp.where(keep, jnp.cos(orig), c), jnp.where(keep, jnp.sin(orig), s)

    return jax.lax.cond(jnp.any(spec.start_tokens > 0), with_start, lambda cs: cs, (cos, sin))


def fixed(spec: RopeSpec, which: str) -> RopeSpec:
    """The spec with one factor set for every call: ``"long"`` or ``"short"`` (what a fine-tuning
    stage trains with; no switching on any length). Dynamic NTK has no fixed set."""
    if which not in ("long", "short"):
        raise RopeError(f"fixed: expected 'long' or 'short', got {which!r}")
    if spec.dynamic_scale is not None:
        raise RopeError("fixed: dynamic NTK recomputes its base from the length; it has no fixed factor set")
    f = spec.long_factor if which == "long" else spec.short_factor
    return spec.replace(short_factor=f, long_factor=f, original_max=None)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, layout: str = HALF) -> jax.Array:
    """Rotates the first ``2P`` dims of each head of ``x``; the rest pass through.

    Args:
      x: [B, L, H, head_dim] queries or keys.
      cos, sin: [B, L, P] (broadcast over heads); cast to ``x.dtype`` as transformers does.
      layout: ``"half"`` (HF, ``rotate_half``) or ``"interleaved"`` (Meta / GGUF).
    """
    p = cos.shape[-1]
    rd = 2 * p
    cos = cos[..., None, :].astype(x.dtype)
    sin = sin[..., None, :].astype(x.dtype)
    rot, rest = x[..., :rd], x[..., rd:]
    if layout == HALF:
        x1, x2 = rot[..., :p], rot[..., p:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == INTERLEAVED:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
    else:
        raise RopeError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def interleaved_to_half(w: np.ndarray, n_heads: int, axis: int = 0) -> np.ndarray:
    """Permutes q/k projection outputs from interleaved (Meta/GGUF) to half-split (HF) order.

    ``axis`` indexes the ``n_heads * head_dim`` output features; for k pass the kv head count.
    """
    w = np.moveaxis(np.asarray(w), axis, 0)
    hd = w.shape[0] // n_heads
    out = w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return np.moveaxis(out, 0, axis)


def half_to_interleaved(w: np.ndarray, n_heads: int, axis: int = 0) -> np.ndarray:
    """Inverse of :func:`interleaved_to_half` (HF -> Meta / llama.cpp order)."""
    w = np.moveaxis(np.asarray(w), axis, 0)
    hd = w.shape[0] // n_heads
    out = w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return np.moveaxis(out, 0, axis)


# --------------------------------------------------------------------------------------------
# Builders. Each returns a RopeSpec over ``rotary_dim`` with factors computed in float64 and
# stored as float32.


def _spec(
    factors,
    *,
    theta: float,
    rotary_dim: int,
    attention_factor: float = 1.0,
    short_factors=None,
    original_max: int | None = None,
    start_tokens: int = 0,
    dynamic_scale: float | None = None,
    dynamic_max: int = 0,
) -> RopeSpec:
    p = rotary_dim // 2
    long = np.broadcast_to(np.asarray(factors, np.float64), (p,))
    short = long if short_factors is None else np.asarray(short_factors, np.float64)
    return RopeSpec(
        short_factor=jnp.asarray(short, jnp.float32),
        long_factor=jnp.asarray(long, jnp.float32),
        attention_factor=jnp.asarray(attention_factor, jnp.float32),
        start_tokens=jnp.asarray(start_tokens, jnp.int32),
        theta=float(theta),
        rotary_dim=int(rotary_dim),
        original_max=int(original_max) if original_max is not None else None,
        dynamic_scale=dynamic_scale,
        dynamic_max=int(dynamic_max),
    )


def _check_rotary(theta, rotary_dim):
    if not rotary_dim or rotary_dim % 2:
        raise RopeError(f"rotary_dim: expected a positive even integer, got {rotary_dim!r}")
    if not (theta > 0):
        raise RopeError(f"rope_theta: expected a positive number, got {theta!r}")


def _check_scale(scale, name="factor"):
    if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise RopeError(f"{name}: expected a positive finite number, got {scale!r}")


def default(theta: float, rotary_dim: int) -> RopeSpec:
    """Unscaled RoPE."""
    _check_rotary(theta, rotary_dim)
    return _spec(1.0, theta=theta, rotary_dim=rotary_dim)


def pi(theta: float, rotary_dim: int, scale: float) -> RopeSpec:
    """Position interpolation (HF ``linear``): ``lambda_i = s``."""
    _check_rotary(theta, rotary_dim)
    _check_scale(scale)
    return _spec(scale, theta=theta, rotary_dim=rotary_dim)


def ntk_factors(rotary_dim: int, scale: float) -> np.ndarray:
    """Static NTK-aware factors ``lambda_i = s ** (2i / (d - 2))``: float64[P]."""
    i = np.arange(rotary_dim // 2, dtype=np.float64)
    return float(scale) ** (2.0 * i / (rotary_dim - 2))


def ntk(theta: float, rotary_dim: int, scale: float) -> RopeSpec:
    """Static NTK-aware scaling: ``base' = base * s ** (d / (d - 2))``."""
    _check_rotary(theta, rotary_dim)
    _check_scale(scale)
    return _spec(ntk_factors(rotary_dim, scale), theta=theta, rotary_dim=rotary_dim)


def dynamic_ntk(theta: float, rotary_dim: int, scale: float, max_position_embeddings: int) -> RopeSpec:
    """HF ``dynamic``: the NTK base recomputed from the call's length when it exceeds the window.

    Equals a fresh transformers module per call (HF's module keeps the largest base it has seen).
    """
    _check_rotary(theta, rotary_dim)
    _check_scale(scale)
    return _spec(
        1.0,
        theta=theta,
        rotary_dim=rotary_dim,
        dynamic_scale=float(scale),
        dynamic_max=max_position_embeddings,
    )


def yarn_attention_factor(scale: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    def get(s, m=1.0):
        return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

    if mscale and mscale_all_dim:
        return float(get(scale, mscale) / get(scale, mscale_all_dim))
    return get(scale)


def yarn_factors(
    theta: float,
    rotary_dim: int,
    scale: float,
    original_max: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> np.ndarray:
    """YaRN's per-pair factors: float64[P], ``lambda_i = 1 / (ramp_i / s + 1 - ramp_i)``."""
    d = rotary_dim

    def dim_for(rot):
        return d * math.log(original_max / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_for(beta_fast), dim_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    # transformers computes the ramp in float32; keep it, so the factors match bit for bit.
    ramp = np.clip((np.arange(d // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    ramp = ramp.astype(np.float64)
    return 1.0 / (ramp / scale + 1.0 - ramp)


def yarn(
    theta: float,
    rotary_dim: int,
    scale: float,
    original_max: int,
    *,
    beta_fast: float | None = None,
    beta_slow: float | None = None,
    truncate: bool = True,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
) -> RopeSpec:
    """YaRN (HF ``yarn``): NTK-by-parts ramp between extrapolation and interpolation."""
    _check_rotary(theta, rotary_dim)
    _check_scale(scale)
    factors = yarn_factors(theta, rotary_dim, scale, original_max, beta_fast or 32.0, beta_slow or 1.0, truncate)
    if attention_factor is None:
        attention_factor = yarn_attention_factor(scale, mscale, mscale_all_dim)
    return _spec(
        factors, theta=theta, rotary_dim=rotary_dim, attention_factor=attention_factor
    )


def llama3_factors(
    theta: float,
    rotary_dim: int,
    scale: float,
    original_max: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> np.ndarray:
    """Llama 3.1's wavelength-banded factors: float64[P]."""
    inv = 1.0 / (np.float64(theta) ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
    low_wl, high_wl = original_max / low_freq_factor, original_max / high_freq_factor
    wavelen = 2 * math.pi / inv
    new = np.where(wavelen > low_wl, inv / scale, inv)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * new / scale + smooth * new
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    new = np.where(medium, smoothed, new)
    return inv / new


def llama3(
    theta: float,
    rotary_dim: int,
    scale: float,
    original_max: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> RopeSpec:
    """Llama 3.1 scaling (HF ``llama3``)."""
    _check_rotary(theta, rotary_dim)
    _check_scale(scale)
    f = llama3_factors(theta, rotary_dim, scale, original_max, low_freq_factor, high_freq_factor)
    return _spec(f, theta=theta, rotary_dim=rotary_dim)


def longrope_attention_factor(max_position_embeddings: int, original_max: int, factor: float | None = None) -> float:
    """The paper's default ``sqrt(1 + ln s / ln L_orig)``, 1 when ``s <= 1``.

    ``s`` is ``max_position_embeddings / original_max`` unless an explicit HF ``factor`` is given
    (transformers 5.x lets it win).
    """
    s = max_position_embeddings / original_max if factor is None else float(factor)
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original_max))


def check_factors(values: Any, n: int, *, source: str, field: str) -> np.ndarray:
    """Validates a factor list: ``n`` finite positive numbers. Returns float64[n]."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise RopeError(f"{source}: {field}: expected a list of {n} positive numbers, got {values!r:.80}") from None
    if arr.ndim != 1 or arr.shape[0] != n:
        raise RopeError(
            f"{source}: {field}: expected {n} factors (rotary_dim / 2), got "
            f"{arr.shape[0] if arr.ndim == 1 else 'shape ' + str(arr.shape)}"
        )
    bad = np.flatnonzero(~np.isfinite(arr) | (arr <= 0))
    if bad.size:
        i = int(bad[0])
        raise RopeError(f"{source}: {field}[{i}]: expected a finite factor > 0, got {float(arr[i])!r}")
    return arr


def longrope(
    theta: float,
    rotary_dim: int,
    long_factor,
    short_factor=None,
    *,
    original_max: int,
    max_position_embeddings: int,
    attention_factor: float | None = None,
    start_tokens: int = 0,
    source: str = "longrope",
) -> RopeSpec:
    """LongRoPE: searched per-pair factors, optional short set, start tokens."""
    _check_rotary(theta, rotary_dim)
    p = rotary_dim // 2
    lf = check_factors(long_factor, p, source=source, field="long_factor")
    sf = lf if short_factor is None else check_factors(short_factor, p, source=source, field="short_factor")
    if attention_factor is None:
        attention_factor = longrope_attention_factor(max_position_embeddings, original_max)
    if not isinstance(start_tokens, (int, np.integer)) or start_tokens < 0:
        raise RopeError(f"{source}: start_tokens: expected an integer >= 0, got {start_tokens!r}")
    return _spec(
        lf,
        theta=theta,
        rotary_dim=rotary_dim,
        attention_factor=attention_factor,
        short_factors=sf,
        original_max=original_max,
        start_tokens=int(start_tokens),
    )


def from_hf(
    rope_parameters: Mapping[str, Any] | None,
    *,
    theta: float,
    rotary_dim: int,
    max_position_embeddings: int,
    source: str = "config.json",
) -> RopeSpec:
    """Builds a spec from a standardised HF rope block (see ``hf.rope_parameters``).

    ``rope_parameters`` holds ``rope_type`` and its keys; ``original_max_position_embeddings`` is
    already resolved with transformers' precedence.
    """
    block = dict(rope_parameters or {})
    kind = block.get("rope_type", block.get("type", "default")) or "default"
    if kind == "su":
        kind = "longrope"

    def need(key):
        if block.get(key) is None:
            raise RopeError(f"{source}: rope_scaling.{key}: required for rope_type {kind!r}, missing")
        return block[key]

    orig = block.get("original_max_position_embeddings") or max_position_embeddings
    if kind == "default":
        return default(theta, rotary_dim)
    if kind == "linear":
        return pi(theta, rotary_dim, float(need("factor")))
    if kind == "dynamic":
        return dynamic_ntk(theta, rotary_dim, float(need("factor")), max_position_embeddings)
    if kind == "yarn":
        factor = block.get("factor")
        if factor is None:
            factor = max_position_embeddings / orig
        return yarn(
            theta,
            rotary_dim,
            float(factor),
            int(orig),
            beta_fast=block.get("beta_fast"),
            beta_slow=block.get("beta_slow"),
            truncate=block.get("truncate", True),
            mscale=block.get("mscale"),
            mscale_all_dim=block.get("mscale_all_dim"),
            attention_factor=block.get("attention_factor"),
        )
    if kind == "llama3":
        return llama3(
            theta,
            rotary_dim,
            float(need("factor")),
            int(orig),
            float(need("low_freq_factor")),
            float(need("high_freq_factor")),
        )
    if kind == "longrope":
        attn = block.get("attention_factor")
        if attn is None:
            attn = longrope_attention_factor(max_position_embeddings, int(orig), block.get("factor"))
        return longrope(
            theta,
            rotary_dim,
            need("long_factor"),
            need("short_factor"),
            original_max=int(orig),
            max_position_embeddings=int(max_position_embeddings),
            attention_factor=float(attn),
            source=source,
        )
    raise RopeError(
        f"{source}: rope_scaling.rope_type: expected one of default, linear, dynamic, yarn, llama3, "
        f"longrope (or su), got {kind!r}"
    )
