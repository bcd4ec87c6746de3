"""Our functional RoPE (longrope_jax/rope.py) measured against transformers 5.23.

Every comparison is in float32. transformers is the reference: its ``ROPE_INIT_FUNCTIONS`` for
inverse frequencies and attention factors, and its rotary modules (``LlamaRotaryEmbedding``,
``Phi3RotaryEmbedding``) for cos / sin, so the per-call short/long switch and the dynamic-NTK
update run exactly as in a transformers forward.

Tolerances (measured on CPU, jax 0.10 + torch 2.13):
  * inverse frequencies, ``default`` and ``longrope``: rtol 1.2e-7 (one float32 ulp). Same float32
    formula ``1 / (lambda * base ** (2i/d))`` as transformers; bit-identical for d = 64 / 128,
    and one pair of 48 at d = 96 differs by one ulp (8.6e-8) because ``10000 ** (40/96)`` is a
    near-tie that torch's float32 ``pow`` rounds the other way (ours is correctly rounded).
  * inverse frequencies, ``linear`` / ``yarn`` / ``llama3``: rtol 1e-6 (measured max rel 1.2e-7,
    2.1e-7, 3.9e-7, i.e. <= 3 ulps): we store every method as per-pair factors and compute
    ``1 / (lambda_i * base ** (2i/d))`` where transformers computes ``(1 / base ** (2i/d)) / s``, a blend of two inverse
    frequencies, or a banded rewrite, and the roundings differ. ``dynamic``: rtol 1e-6 (measured
    1.3e-7): same formula, but the NTK base is a float32 ``pow`` of a traced length, and XLA's
    and torch's float32 ``pow`` differ by an ulp there.
  * attention factor: rtol 1e-7 (ours is stored as float32, transformers' is a Python float).
  * cos / sin: plain atol 1e-5 for ``default`` and ``longrope`` (measured 3e-7 for the Phi-3
    shape up to position 4096, 7.6e-6 for plain d = 96 up to 2999, from the one-ulp pair above)
    and for ``dynamic`` up to its window (6e-8). For the others an ulp in ``inv_freq`` moves the
    float32 angle ``pos * inv_freq`` by ``pos * |d inv_freq|`` plus one rounding of the angle (at
    pos 3000 up to ~2e-4 rad, either side of the true value: neither library is more exact), so
    they are checked with atol 1e-5 plus ``|angle| * ANGLE_RTOL + spacing(angle)`` per element
    (measured max abs: linear 1.2e-4 at s = 1.5 and 6e-8 at powers of two, yarn 6e-5, llama3
    1e-6, dynamic above its window 2.4e-4 at positions up to 4095).
"""

from __future__ import annotations

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_llama
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as hf_apply_phi3

from longrope_jax import hf, rope
from longrope_jax.model import rope_spec

SCALES = (1.5, 2.0, 4.0, 8.0, 32.0)
INV_RTOL = 1e-6  # see the module docstring: <= 2 float32 ulps for linear / yarn / llama3 / dynamic
ULP_RTOL = 1.2e-7  # one float32 ulp (2**-23 relative): default / longrope, see the module docstring
ATTN_RTOL = 1e-7
ANGLE_RTOL = 5e-7  # non-strict cos/sin: inv_freq within ~4 float32 ulps (measured 3.9e-7), see docstring
COS_ATOL = 1e-5

# One jitted cos/sin so that repeated specs with the same static fields compile once.
_cos_sin = jax.jit(rope.cos_sin)


# --------------------------------------------------------------------------------------------
# Helpers: one config.json dict drives both transformers and us.


def config_dict(
    rope_block=None,
    *,
    head_dim=64,
    heads=4,
    kv_heads=2,
    max_pos=4096,
    theta=10000.0,
    partial=None,
    key="rope_parameters",
    **extra,
):
    d = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 32,
        "hidden_size": head_dim * heads,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": max_pos,
        "rope_theta": theta,
    }
    if partial is not None:
        d["partial_rotary_factor"] = partial
    if rope_block is not None:
        d[key] = dict(rope_block)
    d.update(extra)
    return d


def hf_config(d, cls=LlamaConfig):
    """transformers' config from a config.json dict (deep-copied: transformers mutates it)."""
    d = copy.deepcopy(d)
    if cls is LlamaConfig:
        d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
    return cls(**d)


def ours_from_config(d) -> rope.RopeSpec:
    """Our spec through the production path: config.json -> ModelConfig -> rope_spec."""
    return rope_spec(hf.config_from_hf(copy.deepcopy(d)))


def hf_module(config):
    return (Phi3RotaryEmbedding if isinstance(config, Phi3Config) else LlamaRotaryEmbedding)(config)


def hf_init(config, seq_len=None):
    """transformers' (inv_freq float32[P], attention_factor) for the config's rope type."""
    kind = config.rope_parameters["rope_type"]
    fn = hf_module(config).compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
    inv, attn = fn(config, seq_len=seq_len)
    return inv.numpy().astype(np.float32), float(attn)


def hf_cos_sin(config, positions):
    """A fresh transformers rotary module run on ``positions`` [B, L]; returns the first P columns."""
    module = hf_module(config)
    cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.tensor(np.asarray(positions), dtype=torch.long))
    inv = module.inv_freq.numpy()
    p = inv.shape[-1]
    assert cos.shape[-1] == 2 * p  # cat(freqs, freqs) over rotary_dim
    np.testing.assert_array_equal(cos[..., :p].numpy(), cos[..., p:].numpy())
    return cos[..., :p].numpy(), sin[..., :p].numpy(), inv, float(module.attention_scaling)


def assert_inv(spec, seq_len, hf_inv, rtol=INV_RTOL):
    ours = np.asarray(rope.inv_freq(spec, seq_len))
    assert ours.dtype == np.float32 and ours.shape == hf_inv.shape
    np.testing.assert_allclose(ours, hf_inv, rtol=rtol, atol=0)
    return float(np.max(np.abs(ours.astype(np.float64) / hf_inv - 1)))


def assert_attn(spec, hf_attn):
    np.testing.assert_allclose(float(spec.attention_factor), hf_attn, rtol=ATTN_RTOL)


def assert_cos_sin(spec, positions, config, *, strict=False):
    """Our cos/sin vs a fresh transformers module on the same positions.

    With ``strict`` the tolerance is a plain ``COS_ATOL``. Otherwise each element may also differ
    by the angle difference that the inverse-frequency ulps explain (see the module docstring).
    Returns the max abs error.
    """
    positions = np.asarray(positions)
    hc, hs, hinv, hattn = hf_cos_sin(config, positions)
    assert_attn(spec, hattn)
    cos, sin = _cos_sin(jnp.asarray(positions, jnp.int32), spec)
    cos, sin = np.asarray(cos), np.asarray(sin)
    assert cos.dtype == np.float32 and cos.shape == hc.shape, (cos.shape, hc.shape)
    slack = 0.0
    if not strict:  # angles may differ by ANGLE_RTOL plus one float32 rounding of the angle
        angle = positions[..., None].astype(np.float32) * hinv
        slack = (np.abs(angle).astype(np.float64) * ANGLE_RTOL + np.spacing(np.abs(angle)).astype(np.float64)) * hattn
    err = 0.0
    for name, a, b in (("cos", cos, hc), ("sin", sin, hs)):
        e = np.abs(a.astype(np.float64) - b)
        bad = e > COS_ATOL + slack
        worst = np.unravel_index(e.argmax(), e.shape)
        assert not bad.any(), f"{name}: {bad.sum()} elements off, worst {e.max():.3g} at {worst}"
        err = max(err, float(e.max()))
    return err


def arange_positions(n, batch=1):
    return np.broadcast_to(np.arange(n, dtype=np.int64), (batch, n))


# --------------------------------------------------------------------------------------------
# Per builder: inverse frequencies and attention factor against ROPE_INIT_FUNCTIONS.


@pytest.mark.parametrize("theta,head_dim", [(10000.0, 64), (500000.0, 128), (10000.0, 96)])
def test_default(theta, head_dim):
    d = config_dict(head_dim=head_dim, theta=theta)
    config = hf_config(d)
    hinv, hattn = hf_init(config)
    for spec in (rope.default(theta, head_dim), ours_from_config(d)):
        assert_inv(spec, 10, hinv, rtol=ULP_RTOL)
        assert_attn(spec, hattn)
    assert_cos_sin(rope.default(theta, head_dim), arange_positions(3000), config, strict=True)


@pytest.mark.parametrize("scale", SCALES)
def test_linear(scale):
    d = config_dict({"rope_type": "linear", "factor": scale})
    config = hf_config(d)
    hinv, hattn = hf_init(config)
    for spec in (rope.pi(10000.0, 64, scale), ours_from_config(d)):
        assert_inv(spec, 10, hinv)
        assert_attn(spec, hattn)
    assert_cos_sin(rope.pi(10000.0, 64, scale), arange_positions(3000), config)


@pytest.mark.parametrize("scale", SCALES)
def test_dynamic(scale):
    """A fresh HF module per length, run on positions up to that length, so its dynamic update runs.

    Every call has the same shape (positions ``min(j, length - 1)``, j < 4 * lmax): one compile.
    """
    lmax = 1024
    d = config_dict({"rope_type": "dynamic", "factor": scale}, max_pos=lmax)
    config = hf_config(d)
    ours = rope.dynamic_ntk(10000.0, 64, scale, lmax)
    via_config = ours_from_config(d)
    jit_inv = jax.jit(rope.inv_freq)
    for length in (1, 100, lmax - 1, lmax, lmax + 1, 1500, 2 * lmax, 4 * lmax):
        positions = np.minimum(np.arange(4 * lmax), length - 1)[None]
        hc, hs, hinv, hattn = hf_cos_sin(config, positions)
        # transformers' own init function at this length agrees with its module.
        np.testing.assert_array_equal(hf_init(config, seq_len=torch.tensor(length))[0], hinv)
        assert_inv(ours, length, hinv)
        assert_inv(via_config, length, hinv)
        if length <= lmax:  # up to the window: plain RoPE, bit for bit, traced length or not
            np.testing.assert_array_equal(np.asarray(rope.inv_freq(ours, length)), hinv)
            np.testing.assert_array_equal(np.asarray(jit_inv(ours, jnp.int32(length))), hinv)
        else:
            assert not np.array_equal(hinv, hf_init(config)[0])  # the base really moved
        assert_cos_sin(ours, positions, config, strict=length <= lmax)


def _yarn_cases():
    cases = [({"factor": s}, {}) for s in SCALES]
    cases += [
        ({"factor": 4.0, "beta_fast": 16, "beta_slow": 2}, {"beta_fast": 16, "beta_slow": 2}),
        ({"factor": 4.0, "truncate": False}, {"truncate": False}),
        ({"factor": 8.0, "beta_fast": 24.0, "beta_slow": 1.5, "truncate": False},
         {"beta_fast": 24.0, "beta_slow": 1.5, "truncate": False}),
        ({"factor": 8.0, "mscale": 1.0, "mscale_all_dim": 0.8}, {"mscale": 1.0, "mscale_all_dim": 0.8}),
        ({"factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707}, {"mscale": 0.707, "mscale_all_dim": 0.707}),
        ({"factor": 4.0, "attention_factor": 1.25}, {"attention_factor": 1.25}),
    ]
    return cases


@pytest.mark.parametrize("block,kw", _yarn_cases(),
                         ids=["-".join(f"{k}={x}" for k, x in b.items()) for b, _ in _yarn_cases()])
def test_yarn(block, kw):
    orig, scale = 2048, block["factor"]
    block = {"rope_type": "yarn", "original_max_position_embeddings": orig, **block}
    d = config_dict(block, max_pos=int(orig * scale))
    config = hf_config(d)
    hinv, hattn = hf_init(config)
    for spec in (rope.yarn(10000.0, 64, scale, orig, **kw), ours_from_config(d)):
        assert_inv(spec, 10, hinv)
        assert_attn(spec, hattn)
    assert_cos_sin(rope.yarn(10000.0, 64, scale, orig, **kw), arange_positions(3000), config)


def test_yarn_large_theta():
    block = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}
    d = config_dict(block, head_dim=128, theta=500000.0, max_pos=32768)
    hinv, hattn = hf_init(hf_config(d))
    for spec in (rope.yarn(500000.0, 128, 4.0, 8192), ours_from_config(d)):
        assert_inv(spec, 10, hinv)
        assert_attn(spec, hattn)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("low,high", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3(scale, low, high):
    orig = 8192
    block = {"rope_type": "llama3", "factor": scale, "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": orig}
    d = config_dict(block, head_dim=128, theta=500000.0, max_pos=int(orig * scale))
    config = hf_config(d)
    hinv, hattn = hf_init(config)
    for spec in (rope.llama3(500000.0, 128, scale, orig, low, high), ours_from_config(d)):
        assert_inv(spec, 10, hinv)
        assert_attn(spec, hattn)
    assert_cos_sin(rope.llama3(500000.0, 128, scale, orig, low, high), arange_positions(3000), config)


# --------------------------------------------------------------------------------------------
# LongRoPE.


def _monotone_factors(rng, n, lo, hi):
    """Random but plausible factors: non-decreasing from ~lo to ~hi over the pairs."""
    steps = rng.gamma(2.0, size=n)
    curve = np.cumsum(steps) / steps.sum()
    return [float(x) for x in lo + (hi - lo) * curve]


PHI3_SHAPE = dict(head_dim=96, orig=4096, max_pos=131072, theta=10000.0)


@pytest.fixture(scope="module")
def phi3_factors():
    rng = np.random.default_rng(1234)
    short = _monotone_factors(rng, 48, 1.0, 3.0)
    long = _monotone_factors(rng, 48, 1.0, 60.0)
    assert short != long and np.all(np.diff(short) >= 0) and np.all(np.diff(long) >= 0)
    return short, long


def phi3_dict(short, long, *, key="rope_scaling", rope_type="longrope", block_orig=True, **extra):
    block = {"rope_type": rope_type, "short_factor": short, "long_factor": long}
    if block_orig:
        block["original_max_position_embeddings"] = PHI3_SHAPE["orig"]
    return config_dict(block, head_dim=PHI3_SHAPE["head_dim"], heads=32, kv_heads=32,
                       max_pos=PHI3_SHAPE["max_pos"], theta=PHI3_SHAPE["theta"], key=key, **extra)


def test_longrope_phi3_shape_inv_freq_and_attention(phi3_factors):
    short, long = phi3_factors
    orig, max_pos = PHI3_SHAPE["orig"], PHI3_SHAPE["max_pos"]
    expected_attn = math.sqrt(1 + math.log(32) / math.log(4096))
    assert abs(expected_attn - 1.1902380714) < 1e-10
    ours = rope.longrope(10000.0, 96, long, short, original_max=orig, max_position_embeddings=max_pos)
    assert ours.short_factor.shape == ours.long_factor.shape == (48,)
    for cls, d in (
        (LlamaConfig, phi3_dict(short, long, key="rope_parameters")),
        (Phi3Config, phi3_dict(short, long, block_orig=False, original_max_position_embeddings=orig)),
    ):
        config = hf_config(d, cls)
        for spec in (ours, ours_from_config(d)):
            for seq_len in (1, orig - 1, orig, orig + 1, 8192, max_pos):
                hinv, hattn = hf_init(config, seq_len=seq_len)
                # The same float32 formula, 1 / (factor * base ** (2i/d)): <= 1 ulp (pair 20 of 48).
                assert_inv(spec, seq_len, hinv, rtol=ULP_RTOL)
                assert_attn(spec, hattn)
                np.testing.assert_allclose(hattn, expected_attn, rtol=1e-12)
        # short at <= original, long above; they really are different.
        assert not np.allclose(hf_init(config, seq_len=orig)[0], hf_init(config, seq_len=orig + 1)[0])


def test_longrope_su_and_precedence(phi3_factors):
    """Old name ``su`` (4.x ``type`` key) and transformers 5.x precedence of top-level keys."""
    short, long = phi3_factors
    orig = PHI3_SHAPE["orig"]
    # (transformers 5.23 needs original_max_position_embeddings in an ``su`` block: it resolves
    # the top-level key before renaming ``su``.)
    block = {"type": "su", "short_factor": short, "long_factor": long, "original_max_position_embeddings": orig}
    d = phi3_dict(short, long, block_orig=False, original_max_position_embeddings=orig)
    d["rope_scaling"] = block
    hf_block, theta, partial = hf.rope_parameters(d)
    assert hf_block["rope_type"] == "longrope" and "type" not in hf_block
    assert hf_block["original_max_position_embeddings"] == orig
    spec = rope.from_hf(hf_block, theta=theta, rotary_dim=int(96 * partial),
                        max_position_embeddings=PHI3_SHAPE["max_pos"])
    spec_su = rope.from_hf(block, theta=theta, rotary_dim=96, max_position_embeddings=PHI3_SHAPE["max_pos"])
    config = hf_config(d, Phi3Config)  # Phi3Config maps "su" to "longrope"
    assert config.rope_parameters["rope_type"] == "longrope"
    for s in (spec, spec_su, ours_from_config(d)):
        assert s.original_max == orig
        for seq_len in (orig, orig + 1):
            hinv, hattn = hf_init(config, seq_len=seq_len)
            assert_inv(s, seq_len, hinv, rtol=ULP_RTOL)
            assert_attn(s, hattn)
    # rope_scaling wins over rope_parameters; a top-level original_max wins over the block's.
    d2 = phi3_dict(short, long, key="rope_scaling", original_max_position_embeddings=2048)
    d2["rope_parameters"] = {"rope_type": "linear", "factor": 2.0}
    config2 = hf_config(d2, Phi3Config)
    s2 = ours_from_config(d2)
    assert s2.original_max == 2048 == config2.rope_parameters["original_max_position_embeddings"]
    for seq_len in (2048, 2049):
        hinv, hattn = hf_init(config2, seq_len=seq_len)
        assert_inv(s2, seq_len, hinv, rtol=ULP_RTOL)
        assert_attn(s2, hattn)


def test_longrope_explicit_factor_and_attention(phi3_factors):
    short, long = phi3_factors
    for extra in ({"factor": 16.0}, {"attention_factor": 1.3}, {"factor": 1.0}):
        d = phi3_dict(short, long, key="rope_parameters")
        d["rope_parameters"].update(extra)
        hinv, hattn = hf_init(hf_config(d), seq_len=5000)
        spec = ours_from_config(d)
        assert_inv(spec, 5000, hinv, rtol=ULP_RTOL)
        assert_attn(spec, hattn)


def test_longrope_cos_sin_switch(phi3_factors):
    """cos/sin through transformers' module, across the switch at L_orig - 1, L_orig, L_orig + 1."""
    short, long = phi3_factors
    orig = PHI3_SHAPE["orig"]
    d = phi3_dict(short, long, key="rope_parameters")
    config = hf_config(d)
    spec = ours_from_config(d)
    errs = {}
    for length in (1, 1000, orig - 1, orig, orig + 1):  # positions 0 .. length - 1, one shape
        positions = np.minimum(np.arange(orig + 1), length - 1)[None]
        errs[length] = assert_cos_sin(spec, positions, config, strict=True)
    # Long iff max(pos) + 1 > original_max, over the whole call (not per row, not by capacity).
    mixed = np.stack([np.arange(orig + 1 - 64, orig + 1), np.arange(64)])
    errs["mixed"] = assert_cos_sin(spec, mixed, config, strict=True)
    c_long, _ = _cos_sin(jnp.asarray(mixed), spec)
    c_short, _ = _cos_sin(jnp.asarray(mixed[1:]), spec)
    assert not np.allclose(np.asarray(c_long[1]), np.asarray(c_short[0]))  # row 2 changed with row 1
    scattered = np.array([[0, 4095, 17, 2048]])  # max 4095 -> length 4096 -> short
    errs["scattered"] = assert_cos_sin(spec, scattered, config, strict=True)
    assert max(errs.values()) < COS_ATOL


def test_partial_rotary(phi3_factors):
    """partial_rotary_factor 0.5: rotary_dim = head_dim * 0.5, for each method transformers supports."""
    head_dim, rd = 64, 32
    rng = np.random.default_rng(7)
    short, long = _monotone_factors(rng, rd // 2, 1.0, 2.0), _monotone_factors(rng, rd // 2, 1.0, 20.0)
    cases = [
        (Phi3Config, None, rope.default(10000.0, rd), True),
        (LlamaConfig, {"rope_type": "linear", "factor": 4.0}, rope.pi(10000.0, rd, 4.0), False),
        (LlamaConfig, {"rope_type": "dynamic", "factor": 4.0}, rope.dynamic_ntk(10000.0, rd, 4.0, 4096), False),
        (LlamaConfig, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
         rope.yarn(10000.0, rd, 4.0, 1024), False),
        (Phi3Config, {"rope_type": "longrope", "short_factor": short, "long_factor": long},
         rope.longrope(10000.0, rd, long, short, original_max=1024, max_position_embeddings=4096), True),
    ]
    for cls, block, ours, exact in cases:
        extra = {"original_max_position_embeddings": 1024} if cls is Phi3Config else {}
        d = config_dict(block, head_dim=head_dim, max_pos=4096, partial=0.5, **extra)
        config = hf_config(d, cls)
        via_config = ours_from_config(d)
        assert via_config.rotary_dim == ours.rotary_dim == rd
        for length in (1000, 1024, 1025, 6000):
            hinv, hattn = hf_init(config, seq_len=length)
            assert hinv.shape == (rd // 2,)
            for spec in (ours, via_config):
                assert_inv(spec, length, hinv, rtol=ULP_RTOL if exact else INV_RTOL)
                assert_attn(spec, hattn)
        assert_cos_sin(ours, arange_positions(1025), config, strict=exact)

    # apply_rotary on a partial head equals transformers' Phi-3 apply (the tail passes through).
    spec = cases[-1][2]
    x = np.random.default_rng(0).standard_normal((2, 1025, 3, head_dim)).astype(np.float32)
    positions = arange_positions(1025, batch=2)
    cos, sin = rope.cos_sin(jnp.asarray(positions), spec)
    ours = np.asarray(rope.apply_rotary(jnp.asarray(x), cos, sin, rope.HALF))
    hc, hs, _, _ = hf_cos_sin(hf_config(config_dict(cases[-1][1], head_dim=head_dim, max_pos=4096, partial=0.5,
                                                     original_max_position_embeddings=1024), Phi3Config), positions)
    hcos = torch.from_numpy(np.concatenate([hc, hc], -1))
    hsin = torch.from_numpy(np.concatenate([hs, hs], -1))
    xt = torch.from_numpy(x).transpose(1, 2)
    q, _ = hf_apply_phi3(xt, xt, hcos, hsin)
    np.testing.assert_allclose(ours, q.transpose(1, 2).numpy(), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ours[..., rd:], x[..., rd:])


# --------------------------------------------------------------------------------------------
# Start tokens and the candidate axis.


@pytest.mark.parametrize("n_hat", [0, 1, 4, 64])
def test_start_tokens(phi3_factors, n_hat):
    short, long = phi3_factors
    spec = rope.longrope(10000.0, 96, long, short, original_max=4096, max_position_embeddings=131072,
                         start_tokens=n_hat)
    plain = spec.replace(start_tokens=jnp.asarray(0, jnp.int32))
    base = rope.default(10000.0, 96)
    for length in (200, 5000):  # short and long factor sets
        positions = jnp.arange(length)[None]
        cos, sin = _cos_sin(positions, spec)
        bc, bs = _cos_sin(positions, base)  # original angles, attention factor 1
        pc, ps = _cos_sin(positions, plain)
        np.testing.assert_allclose(cos[:, :n_hat], bc[:, :n_hat], atol=1e-7, rtol=0)
        np.testing.assert_allclose(sin[:, :n_hat], bs[:, :n_hat], atol=1e-7, rtol=0)
        np.testing.assert_allclose(cos[:, n_hat:], pc[:, n_hat:], atol=1e-7, rtol=0)
        np.testing.assert_allclose(sin[:, n_hat:], ps[:, n_hat:], atol=1e-7, rtol=0)
        if n_hat > 1:  # no attention factor below n_hat: cos^2 + sin^2 == 1 there, factor^2 above
            norm = np.asarray(cos**2 + sin**2)[0]
            np.testing.assert_allclose(norm[:n_hat], 1.0, atol=1e-6)
            np.testing.assert_allclose(norm[n_hat:], float(spec.attention_factor) ** 2, atol=1e-5)


def test_candidate_axis_matches_each_spec(phi3_factors):
    short, long = phi3_factors
    rng = np.random.default_rng(3)
    specs = []
    for k in range(3):
        lf = np.asarray(long) * rng.uniform(0.9, 1.1, 48)
        sf = np.maximum(np.asarray(short) * rng.uniform(0.9, 1.1, 48), 1.0)
        specs.append(rope.longrope(10000.0, 96, lf, sf, original_max=4096, max_position_embeddings=131072,
                                   attention_factor=1.0 + 0.1 * k, start_tokens=[0, 4, 16][k]))
    stacked = rope.stack(specs)
    assert stacked.long_factor.shape == (3, 48) and stacked.attention_factor.shape == (3,)
    for positions in (np.arange(3000)[None], np.stack([np.arange(4100), np.arange(4100) + 7])):
        positions = jnp.asarray(positions)
        sc, ss = _cos_sin(positions, stacked)
        assert sc.shape == (3, *positions.shape, 48)
        assert rope.inv_freq(stacked, 4097).shape == (3, 48)
        for k, spec in enumerate(specs):
            c, s = _cos_sin(positions, spec)
            np.testing.assert_allclose(sc[k], c, atol=1e-7, rtol=0)
            np.testing.assert_allclose(ss[k], s, atol=1e-7, rtol=0)
    with pytest.raises(rope.RopeError, match="static"):
        rope.stack([specs[0], rope.default(10000.0, 96)])


def test_factor_values_do_not_recompile(phi3_factors):
    short, long = phi3_factors
    traces = []

    @jax.jit
    def f(positions, spec):
        traces.append(1)  # runs once per trace (= per compilation)
        return rope.cos_sin(positions, spec)

    positions = jnp.arange(5000)[None]
    rng = np.random.default_rng(5)

    def make(k, start):
        return rope.longrope(10000.0, 96, np.asarray(long) * (1 + k), np.asarray(short) * rng.uniform(1, 1.2, 48),
                             original_max=4096, max_position_embeddings=131072, attention_factor=1.0 + k,
                             start_tokens=start)

    outs = [f(positions, make(k, start)) for k, start in ((0, 0), (1, 0), (2, 8), (3, 32))]
    assert len(traces) == 1 and f._cache_size() == 1
    assert not np.allclose(outs[0][0], outs[1][0])
    # The same holds with a candidate axis; a new K or a new static field does recompile.
    f(positions, rope.stack([make(0, 0), make(1, 4)]))
    f(positions, rope.stack([make(2, 0), make(3, 1)]))
    assert len(traces) == 2
    f(positions, rope.longrope(20000.0, 96, long, short, original_max=4096, max_position_embeddings=131072))
    assert len(traces) == 3


# --------------------------------------------------------------------------------------------
# Layouts.


def test_interleaved_layout_matches_half():
    rng = np.random.default_rng(11)
    b, l, h, hd = 2, 37, 3, 64
    x = rng.standard_normal((b, l, h, hd)).astype(np.float32)
    spec = rope.yarn(10000.0, hd, 4.0, 16)
    cos, sin = rope.cos_sin(jnp.arange(l)[None] + 100, spec)
    y_half = np.asarray(rope.apply_rotary(jnp.asarray(x), cos, sin, rope.HALF))
    x_int = half_to_interleaved_heads(x)
    y_int = np.asarray(rope.apply_rotary(jnp.asarray(x_int), cos, sin, rope.INTERLEAVED))
    np.testing.assert_allclose(y_int, half_to_interleaved_heads(y_half), atol=1e-6, rtol=0)

    # Our half layout is transformers' rotate_half application (Llama).
    hcos = torch.from_numpy(np.concatenate([np.asarray(cos)] * 2, -1))
    hsin = torch.from_numpy(np.concatenate([np.asarray(sin)] * 2, -1))
    xt = torch.from_numpy(x).transpose(1, 2)
    q, _ = hf_apply_llama(xt, xt, hcos, hsin)
    np.testing.assert_allclose(y_half, q.transpose(1, 2).numpy(), atol=1e-6, rtol=0)

    with pytest.raises(rope.RopeError, match="layout"):
        rope.apply_rotary(jnp.asarray(x), cos, sin, "meta")


def half_to_interleaved_heads(x):
    """[B, L, H, hd] in half layout -> interleaved, via the weight permutation on the feature axis."""
    b, l, h, hd = x.shape
    return rope.half_to_interleaved(x.reshape(b, l, h * hd), h, axis=-1).reshape(b, l, h, hd)


@pytest.mark.parametrize("n_heads,n_kv,head_dim", [(4, 4, 16), (8, 2, 32), (6, 3, 96)])
def test_permutations_match_gguf(n_heads, n_kv, head_dim):
    rng = np.random.default_rng(n_heads)
    hidden = 24
    proc = LlamaTensorProcessor()
    wq = rng.standard_normal((n_heads * head_dim, hidden)).astype(np.float32)
    wk = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    bias = rng.standard_normal(n_kv * head_dim).astype(np.float32)
    # GGUF (llama.cpp, interleaved) -> HF (half): transformers' reverse permutation.
    np.testing.assert_array_equal(rope.interleaved_to_half(wq, n_heads),
                                  proc._reverse_permute_weights(wq, n_heads, n_heads))
    np.testing.assert_array_equal(rope.interleaved_to_half(wk, n_kv),
                                  proc._reverse_permute_weights(wk, n_heads, n_kv))
    np.testing.assert_array_equal(rope.interleaved_to_half(bias, n_kv),
                                  proc._reverse_permute_weights(bias, n_heads, n_kv))
    for w, n in ((wq, n_heads), (wk, n_kv), (bias, n_kv)):
        np.testing.assert_array_equal(rope.interleaved_to_half(rope.half_to_interleaved(w, n), n), w)
        np.testing.assert_array_equal(rope.half_to_interleaved(rope.interleaved_to_half(w, n), n), w)
    # axis= on a transposed weight is the same permutation.
    np.testing.assert_array_equal(rope.interleaved_to_half(wk.T, n_kv, axis=1), rope.interleaved_to_half(wk, n_kv).T)
    # interleaved_to_half really maps pair i = dims (2i, 2i+1) to dims (i, i + hd/2).
    row = np.arange(head_dim)
    half = rope.interleaved_to_half(row, 1)
    np.testing.assert_array_equal(half[: head_dim // 2], row[0::2])
    np.testing.assert_array_equal(half[head_dim // 2 :], row[1::2])


# --------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("field", ["long_factor", "short_factor"])
def test_longrope_bad_factors(field):
    good = [1.0] * 32

    def build(bad):
        kw = {"long_factor": good, "short_factor": good, field: bad}
        return rope.longrope(10000.0, 64, kw["long_factor"], kw["short_factor"], original_max=4096,
                             max_position_embeddings=16384)

    with pytest.raises(rope.RopeError, match=rf"{field}: expected 32 factors .*got 31"):
        build([1.0] * 31)
    with pytest.raises(rope.RopeError, match=rf"{field}: expected 32 factors"):
        build([[1.0] * 32])
    nan = list(good)
    nan[5] = float("nan")
    with pytest.raises(rope.RopeError, match=rf"{field}\[5\]: expected a finite factor > 0, got .*nan"):
        build(nan)
    for v in (0.0, -2.0, float("inf")):
        bad = list(good)
        bad[31] = v
        with pytest.raises(rope.RopeError, match=rf"{field}\[31\]: expected a finite factor > 0"):
            build(bad)
    with pytest.raises(rope.RopeError, match=field):
        build("abc")


def test_from_hf_bad_blocks():
    kw = dict(theta=10000.0, rotary_dim=64, max_position_embeddings=4096, source="cfg.json")
    with pytest.raises(rope.RopeError, match=r"cfg\.json: rope_scaling\.rope_type: .*got 'ntk-by-parts'"):
        rope.from_hf({"rope_type": "ntk-by-parts", "factor": 2.0}, **kw)
    with pytest.raises(rope.RopeError, match=r"rope_scaling\.factor: required for rope_type 'linear'"):
        rope.from_hf({"rope_type": "linear"}, **kw)
    with pytest.raises(rope.RopeError, match=r"rope_scaling\.long_factor: required"):
        rope.from_hf({"type": "su", "short_factor": [1.0] * 32}, **kw)
    with pytest.raises(rope.RopeError, match=r"cfg\.json: long_factor: expected 32 factors"):
        rope.from_hf({"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 16}, **kw)
    with pytest.raises(rope.RopeError, match=r"short_factor\[0\]: expected a finite factor > 0"):
        rope.from_hf({"rope_type": "longrope", "short_factor": [-1.0] * 32, "long_factor": [1.0] * 32}, **kw)
    with pytest.raises(rope.RopeError, match="factor"):
        rope.pi(10000.0, 64, 0.0)
    with pytest.raises(rope.RopeError, match="rotary_dim"):
        rope.default(10000.0, 63)
    with pytest.raises(hf.HFError, match="rope_scaling"):
        hf.rope_parameters({"rope_scaling": [1, 2]})


# --------------------------------------------------------------------------------------------
# The short/long switch is a decision of the whole call (sharded or packed positions).


def _shard_cos_sin(spec, positions, seq_len):
    return [np.asarray(a) for a in jax.jit(rope.cos_sin)(jnp.asarray(positions, jnp.int32), spec, seq_len)]


@pytest.mark.parametrize("kind", ["longrope", "dynamic"])
def test_shards_on_both_sides_of_the_switch_agree_with_the_whole_call(phi3_factors, kind):
    """A sequence of 5120 positions over a 4096 window, cut into two shards: one wholly below the
    window, one beyond it. Given the call's length, each shard's cos/sin is transformers' for the
    whole sequence at its positions; from its local maximum the first shard takes the short
    factors (dynamic NTK: the unscaled base) and is wrong."""
    short, long = phi3_factors
    orig, n = PHI3_SHAPE["orig"], 5120
    if kind == "longrope":
        d = phi3_dict(short, long, block_orig=False, original_max_position_embeddings=orig, max_position_embeddings=n)
        config = hf_config(d, Phi3Config)
    else:
        d = config_dict({"rope_type": "dynamic", "factor": 2.0}, head_dim=96, heads=32, kv_heads=32, max_pos=orig)
        config = hf_config(d)
    spec = ours_from_config(d)
    positions = arange_positions(n)
    hc, hs, _, _ = hf_cos_sin(config, positions)  # the whole sequence, one call
    tol = 5e-4  # angles up to 5e3 rad: float32 ulps of the angle (see assert_cos_sin)
    cut = 2048
    for lo, hi in ((0, cut), (cut, n)):
        cos, sin = _shard_cos_sin(spec, positions[:, lo:hi], n)
        np.testing.assert_allclose(cos, hc[:, lo:hi], atol=tol, rtol=0)
        np.testing.assert_allclose(sin, hs[:, lo:hi], atol=tol, rtol=0)
    local, _ = _shard_cos_sin(spec, positions[:, :cut], None)  # the shard's own max + 1 = 2048
    assert np.abs(local - hc[:, :cut]).max() > 100 * tol
    if kind == "longrope":  # a stage's fixed long set: the same angles, whatever the shard
        cos, _ = _shard_cos_sin(rope.fixed(spec, "long"), positions[:, :cut], None)
        np.testing.assert_allclose(cos, hc[:, :cut], atol=tol, rtol=0)
        with pytest.raises(rope.RopeError, match="no fixed factor set"):
            rope.fixed(ours_from_config(config_dict({"rope_type": "dynamic", "factor": 2.0})), "long")


# --------------------------------------------------------------------------------------------
# Precise angles up to 2M positions


def test_precise_angles_match_float64_at_two_million_positions():
    """At position 2,097,151 the float32 product ``position * inv_freq`` is off by up to 0.06
    rad here (transformers computes the same); the precise mode is within 1e-5 rad (modulo 2 pi) of
    ``float64(position) * float64(inv_freq)``, for plain, LongRoPE-scaled and large-base
    frequencies, and its cos/sin within 1e-5 of float64's."""
    def wrap(x):
        return (x + np.pi) % (2 * np.pi) - np.pi

    pos = np.array([0, 1, 8191, 65537, 1_000_003, 2_097_151, rope.PRECISE_MAX_POSITION - 1], np.int32)
    for theta, d, factors in ((10000.0, 128, None), (500000.0, 128, None), (10000.0, 96, np.linspace(1.0, 64.0, 48))):
        spec = rope.default(theta, d) if factors is None else rope.longrope(
            theta, d, factors, factors, original_max=4096, max_position_embeddings=2**21, attention_factor=1.0)
        inv = np.asarray(rope.inv_freq(spec, 2**21), np.float32)
        ref = pos.astype(np.float64)[:, None] * inv.astype(np.float64)[None]
        got = np.asarray(jax.jit(rope.precise_angles)(jnp.asarray(pos)[:, None], jnp.asarray(inv)[None]), np.float64)
        plain = pos.astype(np.float32)[:, None] * inv[None]
        assert np.abs(wrap(got - ref)).max() <= 1e-5
        assert np.abs(wrap(plain.astype(np.float64) - ref))[pos == 2_097_151].max() > 1e-2  # the control
        cos, sin = rope.cos_sin(jnp.asarray(pos)[None], spec, seq_len=2**21, precise=True)
        np.testing.assert_allclose(np.asarray(cos)[0], np.cos(ref), atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(sin)[0], np.sin(ref), atol=1e-5, rtol=0)
