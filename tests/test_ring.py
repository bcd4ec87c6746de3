"""Ring attention against the dense reference on 8 virtual CPU devices (conftest.py).

Values and q/k/v gradients equal dense's (max|diff| <= 1e-5 x max|ref|, fp32) for causal
attention with GQA, MQA, MHA, segment ids crossing shard boundaries, a sliding window, zigzag
order on and off, over sequence axes of 2, 4 and 8 (pairwise combinations).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import parallel
from longrope_jax.attention import dense_attention
from longrope_jax.attention.ring import ring_attention
from longrope_jax.parallel import zigzag

L, D = 64, 8


def _layout(n):
    return parallel.Layout(parallel.build({"sequence": n}, jax.devices()[:n]))


def _inputs(b, h, kvh, segments, seed=0, length=L, d=D):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, length, h, d), np.float32)
    k = rng.standard_normal((b, length, kvh, d), np.float32)
    v = rng.standard_normal((b, length, kvh, d), np.float32)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()
    seg = None
    if segments:  # documents of 13, 21 and 30 64ths of the row: boundaries inside shards and across them
        m = length // 64
        seg = np.broadcast_to(np.repeat(np.arange(3, dtype=np.int32), [13 * m, 21 * m, 30 * m]), (b, length)).copy()
    return q, k, v, pos, seg


def _check(got, ref, what):
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        scale = float(np.max(np.abs(r)))
        err = float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
        assert scale > 0 and err <= 1e-5 * scale, f"{what} {name}: {err:.3g} (max |ref| {scale:.3g})"


def _value_and_grads(fn, q, k, v, pos, seg, window, cot):
    def f(q, k, v):
        return fn(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
                  sliding_window=window)

    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(cot))


CASES = [  # (sequence axis, heads, kv heads, segments, window, zigzag)
    (2, 4, 2, False, None, True),  # GQA
    (4, 4, 1, True, None, False),  # MQA, segments
    (8, 4, 4, False, 12, True),  # MHA, window
    (2, 4, 4, True, 12, False),
    (4, 4, 2, False, 12, True),
    (8, 4, 1, True, None, True),
    (4, 4, 4, False, None, False),
    (8, 4, 2, True, 12, False),
]


def _ring_against_dense(n, h, kvh, segments, window, zig, **ring_kw):
    length = ring_kw.pop("length", L)
    q, k, v, pos, seg = _inputs(ring_kw.pop("batch", 2), h, kvh, segments, length=length, d=ring_kw.pop("d", D))
    if zig:  # the data in zigzag order, positions with it: dense masks by position as the ring does
        q, k, v, pos = (zigzag.apply(x, n) for x in (q, k, v, pos))
        seg = None if seg is None else zigzag.apply(seg, n)
    cot = np.random.default_rng(1).standard_normal(q.shape, np.float32)
    layout = _layout(n)
    ring = jax.jit(lambda *a: _value_and_grads(ring_attention(layout, **ring_kw), *a, window, cot))
    got = ring(q, k, v, pos, seg)
    ref = _value_and_grads(dense_attention, q, k, v, pos, seg, window, cot)
    _check(got, ref, f"n={n} h={h} kv={kvh} segments={segments} window={window} zigzag={zig} {ring_kw}")


@pytest.mark.parametrize("n, h, kvh, segments, window, zig", CASES)
def test_ring_equals_dense(n, h, kvh, segments, window, zig):
    _ring_against_dense(n, h, kvh, segments, window, zig, block_q=4, block_kv=4)


# The ring with Pallas splash kernels per chunk pair, run by Pallas's interpreter here (chunks of
# 128 tokens: splash's smallest block). (sequence axis, heads, kv heads, segments, zigzag)
SPLASH_CASES = [(2, 4, 2, False, True), (4, 4, 1, True, False), (8, 2, 2, True, True)]


@pytest.mark.parametrize("n, h, kvh, segments, zig", SPLASH_CASES)
def test_splash_ring_equals_dense(n, h, kvh, segments, zig):
    _ring_against_dense(n, h, kvh, segments, None, zig, kernel="splash", length=2 * n * 128, d=32, batch=1)


def test_splash_ring_refuses_what_static_masks_cannot_express():
    q, k, v, pos, _ = _inputs(1, 2, 2, False, length=512, d=32)
    attend = ring_attention(_layout(2), kernel="splash")
    run = lambda **kw: attend(q, k, v, q_positions=pos, kv_positions=pos, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"attention ring_splash: splash's masks are static, so a sliding window "
                                         r"\(100 tokens, shorter than the 512-token row\) is not supported; use "
                                         r"attention=ring"):
        run(sliding_window=100)
    # A window that never binds is no window.
    both = jax.jit(lambda: (run(sliding_window=512), run()))()
    np.testing.assert_array_equal(*both)
    with pytest.raises(ValueError, match=r"each device's chunk \(64 / 2 tokens\) must be a multiple of 128; got "
                                         r"length 512 over 8 devices"):
        ring_attention(_layout(8), kernel="splash")(q, k, v, q_positions=pos, kv_positions=pos)


def test_fully_masked_rows_are_zero():
    """Queries whose only visible keys are padding (segment id -1 on the keys' side) give zeros."""
    q, k, v, pos, _ = _inputs(1, 4, 2, False)
    qseg = np.zeros((1, L), np.int32)
    kseg = np.where(np.arange(L) < 40, -1, 0).astype(np.int32)[None]  # queries below 40 see no key
    layout = _layout(4)
    out = jax.jit(lambda q, k, v: ring_attention(layout, block_q=8, block_kv=8)(
        q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=qseg, kv_segment_ids=kseg))(q, k, v)
    ref = dense_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=qseg, kv_segment_ids=kseg)
    assert np.all(np.asarray(out)[:, :40] == 0) and np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(np.abs(ref).max()), rtol=0)


def test_zigzag_order_and_inverse():
    assert zigzag.order(16, 2).tolist() == [0, 1, 2, 3, 12, 13, 14, 15, 4, 5, 6, 7, 8, 9, 10, 11]
    x = np.arange(3 * 32).reshape(3, 32)
    np.testing.assert_array_equal(zigzag.restore(zigzag.apply(x, 4), 4), x)
    np.testing.assert_array_equal(zigzag.restore(zigzag.apply(jnp.asarray(x), 4), 4), x)
    with pytest.raises(ValueError, match=r"zigzag: the length \(30\) must be divisible by 2 x the sequence axis \(8\)"):
        zigzag.order(30, 4)


def test_hlo_rotates_kv_heads_in_the_input_dtype_n_minus_1_times():
    """One forward: collective-permutes of k and v at kv-head size in bf16 inside a loop of trip
    count n - 1 (and none of a query-head size: k/v are never expanded)."""
    n, h, kvh = 4, 8, 2
    q, k, v, pos, _ = _inputs(1, h, kvh, False)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    layout = _layout(n)
    fn = jax.jit(lambda q, k, v: ring_attention(layout, block_q=16, block_kv=16)(
        q, k, v, q_positions=pos, kv_positions=pos))
    lowered = fn.lower(q, k, v)
    # The program as written (CPU's compiler later widens bf16 to f32 for its own kernels).
    permutes = re.findall(r"collective_permute.*?: \((tensor<[^>]*>)\)", lowered.as_text())
    # k/v blocks [nk=1, B=1, KV=2, bk=16, D=8] in bf16; positions travel as int32.
    assert permutes.count("tensor<1x1x2x16x8xbf16>") == 2 and "tensor<1x1x16xi32>" in permutes, permutes
    assert not [p for p in permutes if p.startswith(f"tensor<1x1x{h}x")]  # never expanded to query heads
    assert len(permutes) == 3  # k, v, positions: one rotation each in the loop body
    trips = re.findall(r'"known_trip_count":\{"n":"(\d+)"', lowered.compile().as_text())
    assert str(n - 1) in trips, trips


# --------------------------------------------------------------------------------------------
# The whole model with attention=ring on a mesh against one device

from test_parallel import ORIG, _cfg, _one_device, _params, _tokens  # noqa: E402


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    return cfg, _params(cfg)


@pytest.mark.parametrize("length", [ORIG, 2 * ORIG])  # short factors, then long ones
def test_model_ppl_with_ring_equals_one_device(model, length):
    from longrope_jax import evaluate
    from longrope_jax import rope as rope_lib
    from longrope_jax.model import rope_spec

    cfg, params = model
    tokens = _tokens(2, length, seed=3)
    specs = rope_lib.stack([rope_spec(cfg)])
    ref = evaluate.score(params, cfg, tokens, specs, mesh=_one_device(), attention="blockwise", q_chunk=8,
                         loss_chunk=8)
    got = evaluate.score(params, cfg, tokens, specs, mesh=parallel.build("sequence=8"), attention="ring", q_chunk=8,
                         loss_chunk=8)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("attention, n, length", [("ring", 8, 2 * ORIG), ("ring_splash", 2, 512)])
def test_model_gradients_with_ring_equal_one_device(model, attention, n, length):
    """The loss and every parameter gradient; the splash ring at its smallest chunks (128 tokens),
    without the sliding window it refuses."""
    import dataclasses

    from longrope_jax.attention import select
    from longrope_jax.loss import mean_nll
    from longrope_jax.model import rope_spec

    cfg, params = model
    if attention == "ring_splash":
        cfg = dataclasses.replace(cfg, sliding_window=None, max_position_embeddings=length)
    tokens = _tokens(2, length, seed=4)
    spec = rope_spec(cfg)
    layout = select.layout_for(parallel.build(f"sequence={n}", jax.devices()[:n]), attention)
    assert layout.zigzag

    def loss(p, t, layout, attention):
        return jnp.mean(mean_nll(p, t, spec, cfg=cfg, attention=attention, q_chunk=8, loss_chunk=8, layout=layout))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(2, 3))
    ref_loss, ref = grad(params, jnp.asarray(tokens), None, "blockwise")
    got_loss, got = grad(parallel.put_params(params, layout.mesh),
                         parallel.put(tokens, layout.sharding(layout.rows())), layout, attention)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        scale = float(jnp.max(jnp.abs(r)))
        err = float(jnp.max(jnp.abs(np.asarray(g) - np.asarray(r))))
        assert scale > 0 and err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} (max |ref| {scale:.3g})"


def test_ring_needs_a_sequence_axis(model):
    from longrope_jax import evaluate
    from longrope_jax import rope as rope_lib
    from longrope_jax.model import rope_spec

    cfg, params = model
    with pytest.raises(ValueError, match=r"attention: ring needs a mesh with a sequence axis \(--mesh sequence=N\)"):
        evaluate.score(params, cfg, _tokens(1, ORIG), rope_lib.stack([rope_spec(cfg)]), mesh=parallel.build("data=8"),
                       attention="ring")


def test_auto_picks_all_gather_then_ring_by_predicted_bytes_and_refuses_naming_both(model):
    from longrope_jax import memory
    from longrope_jax.attention import select

    cfg, _ = model
    mesh = parallel.build("sequence=8")
    length = 1 << 16
    gather, ring = (memory.attention_bytes(cfg, length, mesh, s) for s in ("blockwise", "ring"))
    assert ring < gather  # the whole row's k/v against two chunks of it
    pick = lambda budget: select.pick("auto", length, cfg=cfg, mesh=mesh, memory_budget=budget)  # noqa: E731
    assert pick(gather) == "blockwise" and pick(gather - 1) == "ring" and pick(ring) == "ring"
    with pytest.raises(ValueError, match=rf"attention auto: 65536 tokens do not fit {(ring - 1) / 2**30:.2f} GiB per "
                                         rf"device on this mesh: k/v all-gathered needs {gather / 2**30:.2f} GiB, the "
                                         rf"ring {ring / 2**30:.2f} GiB"):
        pick(ring - 1)
    # Without a sequence axis nothing is gathered: the single-device rule (a forward: dense up to
    # 512 tokens; a train step: blockwise, the faster one measured there).
    assert select.pick("auto", length, cfg=cfg, mesh=parallel.build("data=8")) == "blockwise"
    assert [select.pick("auto", 512, cfg=cfg, train=t) for t in (False, True)] == ["dense", "blockwise"]


def test_bf16_error_is_no_worse_than_the_single_device_kernel():
    """bf16 inputs: the ring's error against an fp32 dense reference (on the same rounded inputs)
    is within 1.5x the single-device blockwise kernel's, output and q/k/v gradients."""
    from longrope_jax.attention import blockwise_attention

    n = 4
    q, k, v, pos, _ = _inputs(2, 4, 2, False, seed=5)
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
    cot = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape), jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = _value_and_grads(dense_attention, *f32, pos, None, None, cot.astype(jnp.float32))
    layout = _layout(n)
    ring = jax.jit(lambda *a: _value_and_grads(ring_attention(layout, block_q=8, block_kv=8), *a, None, cot))(
        q, k, v, pos, None)
    single = jax.jit(lambda *a: _value_and_grads(
        lambda *b, **kw: blockwise_attention(*b, **kw, block_q=8, block_kv=8), *a, None, cot))(q, k, v, pos, None)
    for name, r, s, e in zip(("out", "dq", "dk", "dv"), ring, single, ref):
        err = lambda x: float(jnp.max(jnp.abs(x.astype(jnp.float32) - e)))  # noqa: E731
        assert r.dtype == jnp.bfloat16
        assert err(r) <= 1.5 * err(s), f"{name}: ring {err(r):.3g}, single device {err(s):.3g}"
