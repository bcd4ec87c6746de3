"""The vectorised candidate evaluator and the chunked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import evaluate, memory, rope
from longrope_jax.loss import chunked_nll, window_nll
from longrope_jax.model import Transformer, init_params

from tiny import largest_residual, tiny_config

L = 48


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(max_position_embeddings=16, num_hidden_layers=2)
    params = jax.tree.map(lambda a: a * 5.0 if a.ndim > 1 else a, init_params(cfg, 1))
    tokens = np.random.default_rng(0).integers(0, 256, (3, L)).astype(np.int32)
    return cfg, params, tokens


def _candidates(cfg, k, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(k):
        f = np.sort(rng.uniform(1.0, 4.0, cfg.rotary_dim // 2))
        out.append(rope.longrope(cfg.rope_theta, cfg.rotary_dim, f, original_max=16, max_position_embeddings=64,
                                 start_tokens=int(rng.integers(0, 3)) * 2, attention_factor=float(rng.uniform(1, 1.3))))
    return rope.stack(out)


def test_chunked_loss_equals_full_loss(model):
    cfg, params, tokens = model
    m = Transformer(cfg)
    logits = m.apply({"params": params}, jnp.asarray(tokens))
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    full = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0].sum(-1)
    hidden = m.apply({"params": params}, jnp.asarray(tokens), return_hidden=True)
    for chunk in (5, 16, 47, 1024):
        got = chunked_nll(m, params, hidden[:, :-1], jnp.asarray(tokens[:, 1:]), chunk)
        np.testing.assert_allclose(got, full, rtol=1e-6)


def test_chunked_loss_gradient_equals_full_and_keeps_one_tile(model, capsys):
    """The chunked loss's gradient (w.r.t. the hidden states and the params) equals the full-logits
    loss's, and its backward saves no logits: each chunk's are recomputed."""
    cfg, params, tokens = model
    m = Transformer(cfg)
    hidden = m.apply({"params": params}, jnp.asarray(tokens), return_hidden=True)[:, :-1]
    y = jnp.asarray(tokens[:, 1:])

    def full(p, h):
        lp = jax.nn.log_softmax(m.apply({"params": p}, h, method=Transformer.project).astype(jnp.float32), -1)
        return -jnp.sum(jnp.take_along_axis(lp, y[..., None], -1))

    def chunked(p, h):
        return jnp.sum(chunked_nll(m, p, h, y, 8))

    gf, gc = jax.grad(full, argnums=(0, 1))(params, hidden), jax.grad(chunked, argnums=(0, 1))(params, hidden)
    for a, b in zip(jax.tree.leaves(gc), jax.tree.leaves(gf)):
        np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))), rtol=0)
    logits_size = hidden.shape[0] * hidden.shape[1] * cfg.vocab_size

    largest = [largest_residual(f, capsys, params, hidden) for f in (chunked, full)]
    assert largest[0] < logits_size // 4 and largest[1] >= logits_size  # the check can fail


def test_candidate_batch_equals_one_by_one(model):
    cfg, params, tokens = model
    specs = _candidates(cfg, 5)
    got = evaluate.score(params, cfg, tokens, specs, attention="dense")
    for i in range(5):
        one = jax.tree.map(lambda a: a[i], specs)
        ref = window_nll(params, jnp.asarray(tokens), one, cfg=cfg, attention="dense")
        np.testing.assert_allclose(got[i], ref, rtol=2e-6)
    assert np.ptp(got[:, 0]) > 1e-3  # the candidates really differ


def test_new_factor_values_never_recompile(model):
    cfg, params, tokens = model
    kw = dict(cfg=cfg, attention="blockwise", q_chunk=16)
    evaluate.candidates_nll(params, jnp.asarray(tokens), _candidates(cfg, 4, 0), **kw)
    before = evaluate.candidates_nll._cache_size()
    for seed in (1, 2, 3):
        evaluate.candidates_nll(params, jnp.asarray(tokens), _candidates(cfg, 4, seed), **kw)
    assert evaluate.candidates_nll._cache_size() == before


def test_split_does_not_change_results(model):
    cfg, params, tokens = model
    specs = _candidates(cfg, 7)
    per = memory.item_bytes(cfg, L, 16)
    results = []
    for budget in (per * 3, per * 9, per * 21, per):  # kc = 1, 3, 7 candidates; last: windows split too
        kc = memory.calls_within(7, 3, per, budget)[0]
        assert kc == (1 if budget < 3 * per else -(-7 // -(-7 // (budget // (3 * per)))))
        results.append(evaluate.score(params, cfg, tokens, specs, memory_budget=budget, attention="blockwise",
                                      q_chunk=16, devices=jax.local_devices()[:1], sequential=False))
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=1e-6)


def test_sequential_candidates_equal_vmapped_ones(model):
    """On one CPU device candidates go one after another inside the call (lax.map): same numbers,
    one compilation, every candidate in one call whatever the budget (windows split by it)."""
    cfg, params, tokens = model
    specs = _candidates(cfg, 5, seed=3)
    dev = jax.local_devices()[:1]
    ref = evaluate.score(params, cfg, tokens, specs, attention="blockwise", q_chunk=16, devices=dev, sequential=False)
    per = memory.item_bytes(cfg, L, 16)
    before = evaluate.candidates_nll._cache_size()
    auto = evaluate.score(params, cfg, tokens, specs, attention="blockwise", q_chunk=16, devices=dev)
    assert evaluate.candidates_nll._cache_size() == before + 1  # the sequential variant, compiled once
    tight = evaluate.score(params, cfg, tokens, specs, attention="blockwise", q_chunk=16, devices=dev,
                           memory_budget=per)  # one window per call
    np.testing.assert_allclose(auto, ref, rtol=1e-6)
    np.testing.assert_allclose(tight, ref, rtol=1e-6)


def test_multi_device_spreads_candidates(model):
    cfg, params, tokens = model
    assert len(jax.local_devices()) == 8
    specs = _candidates(cfg, 8)
    one = evaluate.score(params, cfg, tokens, specs, attention="blockwise", q_chunk=16,
                         devices=jax.local_devices()[:1])
    many = evaluate.score(params, cfg, tokens, specs, attention="blockwise", q_chunk=16)
    np.testing.assert_allclose(many, one, rtol=1e-6)


def test_calls_within_a_budget():
    assert memory.calls_within(10, 4, 100, 10_000) == (10, 4)
    assert memory.calls_within(10, 4, 100, 1_000) == (2, 4)
    assert memory.calls_within(10, 1, 100, 400) == (4, 1)
    assert memory.calls_within(10, 4, 100, 250) == (1, 2)
    assert memory.calls_within(10, 4, 100, 10) == (1, 1)
    assert memory.calls_within(64, 2, 100, 1_000, n_devices=8) == (32, 2)
    assert memory.calls_within(3, 2, 100, 1_000, n_devices=8) == (8, 2)


def test_weighted_nll_equals_reference(model):
    """Prediction weights (the needle fitness): the weighted mean of per-token NLL from full logits."""
    cfg, params, tokens = model
    specs = _candidates(cfg, 3, seed=5)
    w = (np.random.default_rng(1).random((3, L - 1)) < 0.2).astype(np.float32)
    w[:, -1] = 1.0  # every window scores something
    got = evaluate.score(params, cfg, tokens, specs, attention="dense", loss_chunk=7, weights=w)
    for k in range(3):
        sp = jax.tree.map(lambda a: a[k], specs)
        logits = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), rope=sp), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
        np.testing.assert_allclose(got[k], (nll * w).sum(1) / w.sum(1), rtol=1e-5, atol=1e-6)
    ones = evaluate.score(params, cfg, tokens, specs, attention="dense", weights=np.ones((3, L - 1), np.float32))
    np.testing.assert_allclose(ones, evaluate.score(params, cfg, tokens, specs, attention="dense"), rtol=1e-6)
    with pytest.raises(ValueError, match=r"weights: expected shape \(3, 47\)"):
        evaluate.score(params, cfg, tokens, specs, weights=np.ones((3, L), np.float32))
