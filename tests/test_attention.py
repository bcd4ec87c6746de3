"""Blockwise attention against the dense reference: values and gradients, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.attention import blockwise_attention, dense_attention


def _inputs(seed, b=2, l=77, h=6, kv=2, d=16):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, l, h, d), jnp.float32)
    k = jax.random.normal(ks[1], (b, l, kv, d), jnp.float32)
    v = jax.random.normal(ks[2], (b, l, kv, d), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    return q, k, v, pos


CASES = {
    "causal_gqa": dict(),
    "mha": dict(kv=6),
    "mqa": dict(kv=1),
    "window": dict(window=9),
    "segments": dict(segments=True),
    "zigzag_positions": dict(permute=True),
}


@pytest.mark.parametrize("name,blocks", [(n, (16, 16)) for n in CASES] + [("causal_gqa", (32, 8)), ("window", (8, 32)),
                                          ("segments", (128, 128))])
def test_blockwise_equals_dense(name, blocks):
    """77 tokens: the last block is uneven for every block size used."""
    c = CASES[name]
    q, k, v, pos = _inputs(0, kv=c.get("kv", 2))
    seg = None
    if c.get("segments"):
        seg = jnp.broadcast_to((jnp.arange(pos.shape[1]) >= 30).astype(jnp.int32) + (jnp.arange(pos.shape[1]) >= 61), pos.shape)
        starts = jnp.array([0, 30, 61])
        pos = pos - starts[seg]
    if c.get("permute"):
        perm = np.random.default_rng(0).permutation(pos.shape[1])
        q, k, v, pos = q[:, perm], k[:, perm], v[:, perm], pos[:, perm]
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              sliding_window=c.get("window"))

    def loss(fn, q, k, v, **extra):
        o = fn(q, k, v, **kw, **extra)
        return jnp.sum(o * jnp.cos(o)), o

    (ld, od), gd = jax.value_and_grad(lambda *a: loss(dense_attention, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (lb, ob), gb = jax.value_and_grad(
        lambda *a: loss(blockwise_attention, *a, block_q=blocks[0], block_kv=blocks[1]), argnums=(0, 1, 2),
        has_aux=True)(q, k, v)
    np.testing.assert_allclose(ob, od, atol=1e-5, rtol=0)
    for a, b_ in zip(gb, gd):  # k/v grads sum over heads and queries: allow float32 reordering
        np.testing.assert_allclose(a, b_, atol=1e-5, rtol=2e-6)


def test_dense_query_chunking_is_exact():
    q, k, v, pos = _inputs(1)
    kw = dict(q_positions=pos, kv_positions=pos, sliding_window=20)
    np.testing.assert_allclose(dense_attention(q, k, v, **kw, q_chunk=16), dense_attention(q, k, v, **kw), atol=1e-6)


FUSED = {
    "causal_gqa": dict(),
    "mha": dict(kv=6),
    "window": dict(window=9),
    "segments": dict(segments=True),
}


FUSED.update({"zigzag_positions": dict(permute=True), "window_segments": dict(window=20, segments=True)})


@pytest.mark.parametrize("impl,name", [(i, n) for i in ("splash_interpret", "xla") for n in FUSED])
def test_fused_equals_blockwise(impl, name):
    """The TPU splash kernel (Pallas interpret mode) and jax.nn.dot_product_attention (its XLA path)
    against the blockwise kernel, zigzag positions included (where the index rule fails, the splash
    path takes the blockwise kernel at run time)."""
    from longrope_jax.attention import fused_attention
    from longrope_jax.attention.fused import index_rule_holds

    c = FUSED[name]
    q, k, v, pos = _inputs(2, b=2, l=150, kv=c.get("kv", 2))
    seg = None
    if c.get("segments"):
        seg = jnp.broadcast_to((jnp.arange(150) >= 64).astype(jnp.int32), pos.shape)
        pos = pos - 64 * seg
    if c.get("permute"):
        perm = np.random.default_rng(1).permutation(150)
        q, k, v, pos = q[:, perm], k[:, perm], v[:, perm], pos[:, perm]
    assert bool(index_rule_holds(pos, pos, seg, seg)) == (not c.get("permute"))
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              sliding_window=c.get("window"))
    ref = dense_attention(q, k, v, **kw)
    got = jax.jit(lambda q, k, v: fused_attention(q, k, v, **kw, implementation=impl, block=128))(q, k, v)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)


def test_index_rule():
    from longrope_jax.attention.fused import index_rule_holds

    p = jnp.arange(8)[None]
    assert index_rule_holds(p, p) and index_rule_holds(p + 5, p + 5)  # an offset window is fine
    assert not index_rule_holds(p, p + 1) and not index_rule_holds(p.at[0, 3].set(2), p.at[0, 3].set(2))
    seg = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2]])
    packed = jnp.array([[0, 1, 2, 0, 1, 0, 1, 2]])
    assert index_rule_holds(packed, packed, seg, seg)
    assert not index_rule_holds(packed, packed, seg, seg.at[0, 7].set(1))  # q and k segments differ
    back = jnp.array([[0, 0, 1, 1, 0, 0, 2, 2]])  # segment 0 comes back: not contiguous
    assert not index_rule_holds(jnp.array([[0, 1, 0, 1, 2, 3, 0, 1]]), jnp.array([[0, 1, 0, 1, 2, 3, 0, 1]]), back, back)


@pytest.mark.parametrize("impl", ["dense", "blockwise", "xla", "splash_interpret"])
def test_fully_masked_rows_are_zero(impl):
    """A query row that sees no key gives zeros in every kernel (the contract), the other rows
    what dense gives; here rows whose segment (9) no key has, and rows before every key position."""
    from longrope_jax.attention import fused_attention

    q, k, v, pos = _inputs(4, b=2, l=130)
    qseg = jnp.zeros_like(pos).at[:, 5:9].set(9)
    kseg = jnp.zeros_like(pos)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=qseg, kv_segment_ids=kseg)
    fns = {"dense": dense_attention, "blockwise": lambda *a, **k: blockwise_attention(*a, **k, block_q=32, block_kv=32),
           "xla": lambda *a, **k: fused_attention(*a, **k, implementation="xla"),
           "splash_interpret": lambda *a, **k: fused_attention(*a, **k, implementation="splash_interpret", block=128)}
    out = fns[impl](q, k, v, **kw)
    assert np.all(np.asarray(out[:, 5:9]) == 0) and np.all(np.isfinite(np.asarray(out)))
    visible = np.ones(130, bool)
    visible[5:9] = False
    ref = blockwise_attention(q, k, v, **kw, block_q=16, block_kv=16)
    np.testing.assert_allclose(np.asarray(out)[:, visible], np.asarray(ref)[:, visible], atol=2e-5, rtol=0)
    late = dict(q_positions=pos, kv_positions=pos + 200)  # keys after every query: every row masked
    assert np.all(np.asarray(fns[impl](q, k, v, **late)) == 0) if impl in ("dense", "blockwise", "xla") else True


def test_fused_clear_errors():
    from longrope_jax.attention import fused_attention

    q, k, v, pos = _inputs(3, l=16)
    with pytest.raises(ValueError, match="same length"):
        fused_attention(q, k[:, :8], v[:, :8], q_positions=pos, kv_positions=pos[:, :8], implementation="xla")
    with pytest.raises(ValueError, match="implementation must be one of"):
        fused_attention(q, k, v, q_positions=pos, kv_positions=pos, implementation="flash9")
