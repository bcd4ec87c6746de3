"""The trainer over params in memory (``longrope_jax.train.trainer``): steps against a reference
loop written here (optax on ``jax.grad`` of a dense, unchunked loss, on the rows that
``(seed, step)`` name), on one device and on a mesh; the caller's params left intact; stages
chained in memory; hooks, stops and a non-finite loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longrope_jax import parallel
from longrope_jax import rope as rope_lib
from longrope_jax.model import Transformer, init_params, rope_spec
from longrope_jax.train import data as data_lib
from longrope_jax.train import trainer as trainer_lib

from tiny import tiny_config

SETTINGS = dict(seq_len=32, batch=4, accum=2, steps=3, seed=5, attention="blockwise", q_chunk=16, loss_chunk=16,
                lr=1e-3, warmup_steps=0, schedule="constant", end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                weight_decay=0.01, clip_norm=1.0)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    chunks = np.random.default_rng(0).integers(0, cfg.vocab_size, (11, 32)).astype(np.int32)
    return cfg, init_params(cfg, 0), chunks


def _reference(params, cfg, spec, chunks, settings, start=0):
    """The stage written out: each step's rows by ``step_rows``, the mean over rows of the dense
    model's mean next-token NLL, clipped AdamW at a constant rate."""
    s = settings
    tx = optax.chain(optax.clip_by_global_norm(s["clip_norm"]),
                     optax.adamw(s["lr"], s["b1"], s["b2"], s["eps"], weight_decay=s["weight_decay"]))

    opt, losses = tx.init(params), []
    for t in range(start, s["steps"]):
        rows = jnp.asarray(chunks[data_lib.step_rows(len(chunks), s["seed"], t, s["batch"])])
        value, g = _dense_grad(params, rows, spec, cfg)
        upd, opt = tx.update(g, opt, params)
        params = optax.apply_updates(params, upd)
        losses.append(float(value))
    return params, losses


def _dense_loss(params, tokens, spec, cfg):
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = Transformer(cfg).apply({"params": params}, tokens, pos, rope=spec)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


_dense_grad = jax.jit(jax.value_and_grad(_dense_loss), static_argnums=3)


@pytest.mark.parametrize("mesh, attention", [(None, "blockwise"), ("data=2,sequence=4", "blockwise"),
                                             (None, "auto"), ("data=2,sequence=4", "auto")])
def test_train_from_params_in_memory_equals_the_reference_loop(setup, mesh, attention):
    """``auto``: blockwise on one device, k/v all-gathered blockwise on the mesh (this memory)."""
    cfg, params, chunks = setup
    spec = rope_lib.pi(cfg.rope_theta, cfg.rotary_dim, 2.0)  # the stage's fixed RoPE, not the model's own
    before = jax.tree.map(np.array, params)
    records = []
    result = trainer_lib.train(params, cfg, spec, dict(SETTINGS, attention=attention), chunks,
                               mesh=mesh and parallel.build(mesh),
                               hooks=[lambda done, state, rec, last: records.append((done, rec["loss"], last))],
                               progress=False)
    ref, ref_losses = _reference(params, cfg, spec, chunks, SETTINGS)
    assert result.step == 3 and result.stopped is None and int(result.state["step"]) == 3
    assert [(d, last) for d, _, last in records] == [(1, False), (2, False), (3, True)]
    np.testing.assert_allclose([l for _, l, _ in records], ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(result.params), jax.tree.leaves(ref)):
        np.testing.assert_allclose(parallel.fetch(a), b, rtol=0, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)):  # the caller's arrays, not donated
        np.testing.assert_array_equal(np.asarray(a), b)


def test_a_second_stage_continues_from_the_first_in_memory(setup):
    """Stage 2 (another spec) from stage 1's params in memory: the reference run on stage 1's
    reference params; the optimizer state starts afresh, as a new stage's does."""
    cfg, params, chunks = setup
    first = trainer_lib.train(params, cfg, rope_spec(cfg), SETTINGS, chunks, progress=False)
    spec = rope_lib.yarn(cfg.rope_theta, cfg.rotary_dim, 2.0, cfg.max_position_embeddings)
    second = trainer_lib.train(first.params, cfg, spec, dict(SETTINGS, steps=2, seed=6), chunks, progress=False)
    ref1, _ = _reference(params, cfg, rope_spec(cfg), chunks, SETTINGS)
    ref2, _ = _reference(ref1, cfg, spec, chunks, dict(SETTINGS, steps=2, seed=6))
    for a, b in zip(jax.tree.leaves(second.params), jax.tree.leaves(ref2)):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_fit_resumes_from_a_state_at_any_step(setup):
    """3 steps in one go equal 1 step, then ``fit`` from that state at step 1: bit for bit."""
    cfg, params, chunks = setup
    tr = trainer_lib.Trainer(cfg, rope_spec(cfg), SETTINGS)
    whole = tr.fit(tr.init_state(params), tr.batches(chunks, 0), progress=False)
    part = tr.fit(tr.init_state(params), tr.batches(chunks, 0, 1), stop=1, progress=False)
    rest = tr.fit(part.state, tr.batches(chunks, 1), start=1, progress=False)
    assert rest.step == 3 and rest.record["step"] == 2
    for a, b in zip(jax.tree.leaves(rest.params), jax.tree.leaves(whole.params)):
        np.testing.assert_array_equal(a, b)


def test_a_stop_request_ends_the_loop_after_the_hooks_see_the_step(setup):
    cfg, params, chunks = setup
    seen, asked = [], iter([None, "SIGTERM", None])
    result = trainer_lib.train(params, cfg, rope_spec(cfg), dict(SETTINGS, steps=10), chunks, progress=False,
                               hooks=[lambda done, state, rec, last: seen.append((done, last))],
                               should_stop=lambda: next(asked))
    assert (result.step, result.stopped) == (2, "SIGTERM") and seen == [(1, False), (2, True)]


def test_evaluation_every_n_steps_adds_the_held_out_perplexity(setup):
    """``held_out``: the perplexity of the params after the step, on its windows, under the stage's spec."""
    from longrope_jax import evaluate

    cfg, params, chunks = setup
    spec, windows = rope_spec(cfg), {32: chunks[:2]}
    states, recs = [], []
    trainer_lib.train(params, cfg, spec, SETTINGS, chunks, progress=False, eval_every=2,
                      evaluate_fn=trainer_lib.held_out(cfg, spec, windows, loss_chunk=16, q_chunk=16),
                      hooks=[lambda done, state, rec, last: (recs.append(rec), states.append(
                          jax.tree.map(np.array, state["params"])))])
    assert ["eval_ppl_32" in r for r in recs] == [False, True, False]
    nll = evaluate.score(states[1], cfg, chunks[:2], rope_lib.stack([spec]), attention="dense")
    assert recs[1]["eval_ppl_32"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-5)


def test_a_non_finite_loss_raises_before_any_hook_sees_the_step(setup):
    cfg, params, chunks = setup
    seen = []
    with pytest.raises(trainer_lib.NonFiniteLoss, match=r"^step \d+: the loss is (nan|inf|-inf); stopping$") as e:
        trainer_lib.train(params, cfg, rope_spec(cfg), dict(SETTINGS, lr=1e30, clip_norm=0.0, steps=10), chunks,
                          progress=False, hooks=[lambda done, *_: seen.append(done)])
    assert 1 <= e.value.step < 10 and seen == list(range(1, e.value.step + 1))  # steps 0..step-1 were finite


def test_a_batch_that_accum_does_not_divide_is_refused(setup):
    cfg, _, _ = setup
    with pytest.raises(trainer_lib.TrainError, match=r"^batch: expected a multiple of accum \(3\), got 4$"):
        trainer_lib.Trainer(cfg, rope_spec(cfg), dict(SETTINGS, accum=3))
