"""Blockwise attention against the dense reference: values and gradients, fp32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.attention import blockwise_attention, dense_attention

from tiny import largest_residual


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


# --------------------------------------------------------------------------------------------
# The flash backward: gradients against jax.grad of dense, per-block functions driven by hand.

FLASH_CASES = {**CASES, "fully_masked_rows": dict(masked_rows=True)}


def _case(name, seed=0):
    """(q, k, v, kwargs) of a case: 77 tokens, so every block size below leaves an uneven block."""
    c = FLASH_CASES[name]
    q, k, v, pos = _inputs(seed, kv=c.get("kv", 2))
    seg = None
    kw = dict(q_positions=pos, kv_positions=pos, sliding_window=c.get("window"))
    if c.get("segments"):
        seg = jnp.broadcast_to((jnp.arange(77) >= 30).astype(jnp.int32) + (jnp.arange(77) >= 61), pos.shape)
        pos = pos - jnp.array([0, 30, 61])[seg]
        kw.update(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    if c.get("permute"):
        perm = np.random.default_rng(0).permutation(77)
        q, k, v, pos = q[:, perm], k[:, perm], v[:, perm], pos[:, perm]
        kw.update(q_positions=pos, kv_positions=pos)
    if c.get("masked_rows"):  # rows 5..8 in a document no key has; rows 0..2 before every key
        qseg = jnp.zeros_like(pos).at[:, 5:9].set(9)
        kw.update(kv_positions=pos + 3, q_segment_ids=qseg, kv_segment_ids=jnp.zeros_like(pos))
    return q, k, v, kw


def _grads(fn, q, k, v, kw):
    def loss(q, k, v):
        o = fn(q, k, v, **kw)
        return jnp.sum(o * jnp.cos(o)), o

    (_, o), g = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, g


def _close(ours, ref, what):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err, scale = float(np.max(np.abs(ours - ref))), float(np.max(np.abs(ref)))
    assert np.all(np.isfinite(ours)) and err <= 1e-5 * scale, f"{what}: max diff {err:.3g}, max |ref| {scale:.3g}"


@pytest.mark.parametrize("name,blocks", [(n, (16, 16)) for n in FLASH_CASES] + [("causal_gqa", (32, 8)),
                                         ("window", (8, 32)), ("fully_masked_rows", (8, 8))])
def test_flash_values_and_gradients_equal_dense(name, blocks):
    """Values and d/dq, d/dk, d/dv of the flash kernel equal ``jax.grad`` of the dense reference:
    max |diff| <= 1e-5 x max |ref| per tensor."""
    q, k, v, kw = _case(name)
    od, gd = _grads(dense_attention, q, k, v, kw)
    ob, gb = _grads(lambda *a, **x: blockwise_attention(*a, **x, block_q=blocks[0], block_kv=blocks[1]), q, k, v, kw)
    _close(ob, od, "out")
    for what, a, b in zip("qkv", gb, gd):
        _close(a, b, f"d{what}")
    if name == "fully_masked_rows":
        assert np.all(np.asarray(ob)[:, :3] == 0) and np.all(np.asarray(gb[0])[:, :3] == 0)


def test_flash_saves_no_score_tile(capsys):
    """The backward keeps q, k, v, the output and the log-sum-exp: no residual grows with L x S
    (dense's does: the check can fail)."""
    q, k, v, kw = _case("causal_gqa")
    flash = largest_residual(lambda q, k, v: blockwise_attention(q, k, v, **kw, block_q=16, block_kv=16), capsys,
                              q, k, v)
    assert flash <= q.size
    assert largest_residual(lambda q, k, v: dense_attention(q, k, v, **kw), capsys, q, k, v) >= 77 * 77


def test_flash_inside_a_layer_scan_saves_no_score_tile(capsys):
    """Under an outer ``lax.scan`` (the model's layers) the backward still keeps only per-layer
    q, k, v, out and lse: JAX would otherwise save the forward's per-block score tiles
    ([nq, nk, ..., bq, bk], quadratic in L) as residuals of the scan."""
    q, k, v, kw = _case("causal_gqa")

    def layers(q, k, v):
        def body(x, _):
            return blockwise_attention(x, k, v, **kw, block_q=16, block_kv=16), None

        return jax.lax.scan(body, q, None, length=3)[0]

    assert largest_residual(layers, capsys, q, k, v) <= 3 * q.size


def _fold(q, kvh):
    """[B, L, H, D] -> the block layout [B, KV, G, L, D]."""
    b, l, h, d = q.shape
    return jnp.transpose(q.reshape(b, l, kvh, h // kvh, d), (0, 2, 3, 1, 4))


def _unfold(x):
    b, kvh, g, l = x.shape[:4]
    return jnp.moveaxis(x, 3, 1).reshape(b, l, kvh * g, *x.shape[4:])


@pytest.mark.parametrize("name", ["causal_gqa", "window", "segments", "zigzag_positions", "fully_masked_rows"])
def test_block_functions_over_pieces_equal_the_kernel(name):
    """What a ring does: k/v split into uneven pieces, each merged into the carry by ``block_fwd``,
    then each piece's gradients from ``block_bwd`` with the final lse and delta. The out, lse and
    gradients equal the dense reference's (lse: logsumexp of its masked scores)."""
    from longrope_jax.attention import blockwise as bw
    from longrope_jax.attention.dense import mask

    q, k, v, kw = _case(name)
    kvh, scale = k.shape[2], q.shape[-1] ** -0.5
    qp, kp = kw["q_positions"], kw["kv_positions"]
    qs, ks = kw.get("q_segment_ids"), kw.get("kv_segment_ids")
    window = kw["sliding_window"]
    cuts = [0, 20, 33, 77]  # pieces of 20, 13 and 44 keys
    pieces = [(k[:, a:b], v[:, a:b], kp[:, a:b], None if ks is None else ks[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    qf = _fold(q, kvh)
    carry = bw.init_carry(qf)
    for kb, vb, kpb, ksb in pieces:
        carry = bw.block_fwd(qf, jnp.moveaxis(kb, 1, 2), jnp.moveaxis(vb, 1, 2), qp, kpb, qs, ksb, carry,
                             sliding_window=window, scale=scale)
    out, lse = bw.finalize(carry)
    od, gd = _grads(dense_attention, q, k, v, kw)
    _close(_unfold(out), od, "out")
    m = mask(qp, kp, qs, ks, window)
    s = jnp.einsum("blkgd,bskd->bkgls", q.reshape(*q.shape[:2], kvh, -1, q.shape[-1]), k) * scale
    ref_lse = jax.nn.logsumexp(jnp.where(m[:, None, None], s, -jnp.inf), axis=-1)
    seen = np.asarray(jnp.any(m, axis=-1))[:, None, None]
    np.testing.assert_allclose(np.asarray(lse)[np.broadcast_to(seen, lse.shape)],
                               np.asarray(ref_lse)[np.broadcast_to(seen, lse.shape)], atol=1e-5, rtol=1e-6)
    assert np.all(np.asarray(lse)[~np.broadcast_to(seen, lse.shape)] == bw.LSE_MASKED)
    # The backward: d_out of the same loss, delta = rowsum(d_out * out).
    d_out = jax.grad(lambda o: jnp.sum(o * jnp.cos(o)))(od)
    do_f = _fold(d_out, kvh)
    delta = jnp.sum(do_f * out, axis=-1)
    dq = jnp.zeros(qf.shape, jnp.float32)
    dks, dvs = [], []
    for kb, vb, kpb, ksb in pieces:
        dqj, dkj, dvj = bw.block_bwd(qf, jnp.moveaxis(kb, 1, 2), jnp.moveaxis(vb, 1, 2), qp, kpb, qs, ksb, lse, delta,
                                     do_f, sliding_window=window, scale=scale)
        dq, dks, dvs = dq + dqj, dks + [jnp.moveaxis(dkj, 2, 1)], dvs + [jnp.moveaxis(dvj, 2, 1)]
    _close(_unfold(dq), gd[0], "dq")
    _close(jnp.concatenate(dks, axis=1), gd[1], "dk")
    _close(jnp.concatenate(dvs, axis=1), gd[2], "dv")


def test_a_remat_policy_keeps_the_flash_output_and_lse(capsys):
    """Under ``jax.checkpoint`` with the model's ``attention`` policy the backward keeps the tagged
    output and log-sum-exp (attention's forward is not run again); with ``nothing_saveable`` not."""
    import re

    from jax.ad_checkpoint import print_saved_residuals

    from longrope_jax.model import _remat_policy

    q, k, v, kw = _case("causal_gqa")

    def layer(q, k, v):
        return jnp.sum(jnp.cos(blockwise_attention(jnp.sin(q), k, v, **kw, block_q=16, block_kv=16)))

    def names(policy):
        capsys.readouterr()
        print_saved_residuals(jax.checkpoint(layer, policy=_remat_policy(policy)), q, k, v)
        return set(re.findall(r"named '(\w+)'", capsys.readouterr().out))

    assert names("attention") == {"attention_out", "attention_lse"}
    assert names("nothing_saveable") == set()
