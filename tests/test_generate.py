"""Greedy generation with a KV cache: equal to a full re-encode at every step, across L_orig."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import generate, model as model_lib, rope
from longrope_jax.model import Transformer, init_cache

from tiny import tiny_config

L_ORIG = 16


def _longrope_model(arch="llama", window=None, seed=0):
    rng = np.random.default_rng(seed)
    short = np.sort(rng.uniform(1.0, 1.5, 4))
    long = np.sort(rng.uniform(1.5, 6.0, 4))
    block = {"rope_type": "longrope", "short_factor": short.tolist(), "long_factor": long.tolist(),
             "original_max_position_embeddings": L_ORIG}
    cfg = tiny_config(max_position_embeddings=4 * L_ORIG, rope_parameters=block, architecture=arch,
                      sliding_window=window)
    params = model_lib.init_params(cfg, seed)
    # Larger weights than the 0.02 init, so logits are far from uniform and argmax ties are unlikely.
    params = jax.tree.map(lambda a: a * 6.0 if a.ndim > 1 else a, params)
    return cfg, params


def _reference(params, cfg, prompt, n, spec):
    """Full re-encode of the whole sequence at every step (no cache)."""
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t, rope=spec))
    seq, logits = list(prompt), []
    for _ in range(n):
        lg = np.asarray(fwd(params, jnp.asarray([seq], jnp.int32))[0, -1])
        logits.append(lg)
        seq.append(int(lg.argmax()))
    return seq[len(prompt):], logits


@pytest.mark.parametrize("arch,window,attention", [("llama", None, "dense"), ("mistral", 6, "dense"),
                                                   ("llama", None, "blockwise")])
def test_generation_across_original_window_equals_full_reencode(arch, window, attention):
    cfg, params = _longrope_model(arch, window)
    spec = model_lib.rope_spec(cfg)
    prompt = [3, 17, 200, 45, 9, 88, 121, 7, 64, 5]
    n = 20  # crosses L_orig = 16
    g = generate.greedy(params, cfg, prompt, n, spec, keep_logits=True, attention=attention)
    ref_tokens, ref_logits = _reference(params, cfg, prompt, n, spec)
    assert g.tokens == ref_tokens
    assert g.reencoded_at == [L_ORIG]
    np.testing.assert_allclose(np.stack(g.step_logits), np.stack(ref_logits), atol=1e-4, rtol=0)


def test_stale_cache_would_be_wrong():
    """Without the re-encode, the first long step differs: the test above has teeth."""
    cfg, params = _longrope_model()
    spec = model_lib.rope_spec(cfg)
    seq = list(range(1, L_ORIG + 1))  # 16 tokens: prefill uses the short factors
    cache = init_cache(cfg, 1, L_ORIG + 1)
    _, cache = generate._prefill(params, jnp.asarray([seq], jnp.int32), spec, cache, cfg=cfg)
    stale, _ = generate._step(params, jnp.asarray([99], jnp.int32), jnp.int32(L_ORIG), spec, cache, cfg=cfg)
    full = Transformer(cfg).apply({"params": params}, jnp.asarray([seq + [99]], jnp.int32), rope=spec)[:, -1]
    assert np.abs(np.asarray(stale) - np.asarray(full)).max() > 1e-2


def test_no_switch_without_short_long_pair():
    cfg, params = _longrope_model()
    spec = rope.yarn(cfg.rope_theta, cfg.rotary_dim, 4.0, L_ORIG)
    prompt = list(range(1, 13))
    g = generate.greedy(params, cfg, prompt, 8, spec, keep_logits=True)
    ref_tokens, ref_logits = _reference(params, cfg, prompt, 8, spec)
    assert g.tokens == ref_tokens and g.reencoded_at == []
    np.testing.assert_allclose(np.stack(g.step_logits), np.stack(ref_logits), atol=1e-4, rtol=0)


def test_stops_at_eos_and_bad_input():
    cfg, params = _longrope_model()
    spec = model_lib.rope_spec(cfg)
    first = generate.greedy(params, cfg, [4, 5, 6], 1, spec).tokens[0]
    g = generate.greedy(params, cfg, [4, 5, 6], 10, spec, eos_token_id=first)
    assert g.tokens == [first]
    with pytest.raises(ValueError, match="prompt encodes to no tokens"):
        generate.greedy(params, cfg, [], 3, spec)
    with pytest.raises(ValueError, match="--max-new-tokens: expected at least 1"):
        generate.greedy(params, cfg, [1], 0, spec)
