"""Training rows as the method needs them: packed documents (against transformers on each document
alone), LongRoPE2's mixed context windows (a step's gradient against the two kinds computed
apart), PoSE's positional skips (within the span, reproducible, the long factors whatever the
method), and the train job with all three (a SIGKILL resume to the bit)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from longrope_jax import rope as rope_lib
from longrope_jax.loss import mean_nll
from longrope_jax.model import Transformer, init_params, rope_spec
from longrope_jax.train import data as data_lib
from longrope_jax.train import step as step_lib
from longrope_jax.train import trainer as trainer_lib

from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pack_index_places_whole_documents_with_their_own_segments_and_positions():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11], [12, 13]]
    got = data_lib.pack_index(docs, 6, bos=0, eos=99, min_document_tokens=2)
    # Pieces (BOS + doc + EOS cut at 6): [0 1 2 3 99], [0 5 6 7 8 9], [10 11 99], [0 12 13 99]; [4] too short.
    assert got["tokens"].tolist() == [[0, 1, 2, 3, 99, 0], [0, 5, 6, 7, 8, 9], [10, 11, 99, 0, 0, 0],
                                      [0, 12, 13, 99, 0, 0]]
    assert got["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    assert got["positions"].tolist() == [[0, 1, 2, 3, 4, 0], list(range(6)), [0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0]]
    two = data_lib.pack_index([[1, 2], [3], [4, 5, 6]], 8)  # no specials; [3] predicts nothing: left out
    assert two["tokens"].tolist() == [[1, 2, 4, 5, 6, 0, 0, 0]]
    assert two["segment_ids"].tolist() == [[1, 1, 2, 2, 2, 0, 0, 0]]
    assert two["positions"].tolist() == [[0, 1, 0, 1, 2, 0, 0, 0]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny LLaMA written as an HF directory and loaded by transformers (the reference)."""
    transformers = pytest.importorskip("transformers")
    from longrope_jax import hf

    from tiny import make_hf_dir

    d = make_hf_dir(str(tmp_path_factory.mktemp("packing")), max_position_embeddings=64)
    cfg, params = hf.load(d)
    return cfg, params, transformers.AutoModelForCausalLM.from_pretrained(d).eval()


def test_packed_documents_see_only_themselves_as_transformers_sees_each_alone(reference):
    import torch

    cfg, params, ref = reference
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, cfg.vocab_size, n).tolist() for n in (9, 17, 5)]
    packed = data_lib.pack_index(docs, 40)  # one row: 31 tokens of three documents, 9 of padding
    assert packed["tokens"].shape == (1, 40) and packed["segment_ids"].max() == 3
    tokens, seg, pos = (jnp.asarray(packed[k]) for k in ("tokens", "segment_ids", "positions"))
    logits = np.asarray(Transformer(cfg).apply({"params": params}, tokens, pos, seg))
    nll_sum, predictions = 0.0, 0
    for i, doc in enumerate(docs, 1):
        with torch.no_grad():
            out = ref(torch.tensor([doc]), labels=torch.tensor([doc]))
        want = out.logits[0].numpy()
        got = logits[0, np.asarray(packed["segment_ids"][0]) == i]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), i
        nll_sum += float(out.loss) * (len(doc) - 1)
        predictions += len(doc) - 1
    # The row's loss: every document's predictions, none across documents or from padding.
    got = float(mean_nll(params, tokens, rope_spec(cfg), cfg=cfg, positions=pos, segment_ids=seg, q_chunk=8,
                         loss_chunk=16)[0])
    assert got == pytest.approx(nll_sum / predictions, rel=1e-5)


def test_a_mixed_step_accumulates_the_two_kinds_under_their_own_rope():
    """One step of a long microbatch (the stage's factors) and a short packed one (the original
    RoPE): the step's gradient is the mean of the two gradients computed apart."""
    cfg = tiny_config(max_position_embeddings=32)
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, 0))  # sharper attention
    rng = np.random.default_rng(1)
    long_rows = {"tokens": jnp.asarray(rng.integers(0, cfg.vocab_size, (1, 2, 64)), jnp.int32)}
    short = data_lib.pack_index([rng.integers(1, cfg.vocab_size, n).tolist() for n in (10, 13, 20, 9)], 32)
    short_rows = {k: jnp.asarray(v[None]) for k, v in short.items()}
    assert short_rows["tokens"].shape == (1, 2, 32)
    long_spec = rope_lib.fixed(rope_lib.yarn(cfg.rope_theta, cfg.rotary_dim, 2.0, 32), "long")
    short_spec = rope_spec(cfg)

    def loss(spec, length):
        return lambda p, r: jnp.mean(mean_nll(p, r["tokens"], spec, cfg=cfg, positions=r.get("positions"),
                                              segment_ids=r.get("segment_ids"), seq_len=length, q_chunk=16,
                                              loss_chunk=16))

    fns = {"long": loss(long_spec, 64), "short": loss(short_spec, 32)}
    settings = dict(lr=1.0, warmup_steps=0, schedule="constant", steps=1, end_lr_ratio=1.0)
    # An optimizer that keeps the step's gradient as its state (and updates nothing).
    tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, state, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    new, m = jax.jit(step_lib.make_step(fns, tx, step_lib.schedule(settings)))(
        step_lib.init_state(params, tx), {"long": long_rows, "short": short_rows})
    (l_long, g_long) = jax.value_and_grad(fns["long"])(params, jax.tree.map(lambda x: x[0], long_rows))
    (l_short, g_short) = jax.value_and_grad(fns["short"])(params, jax.tree.map(lambda x: x[0], short_rows))
    assert float(m["loss"]) == pytest.approx((float(l_long) + float(l_short)) / 2, rel=1e-6)
    assert float(m["loss_long"]) == pytest.approx(float(l_long), rel=1e-6)
    assert abs(float(l_long) - float(loss(short_spec, 64)(params, jax.tree.map(lambda x: x[0], long_rows)))) > 1e-4
    for got, a, b in zip(jax.tree.leaves(new["opt_state"]), jax.tree.leaves(g_long), jax.tree.leaves(g_short)):
        want = (np.asarray(a) + np.asarray(b)) / 2
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_skipped_positions_stay_in_the_span_keep_their_order_and_repeat():
    base = np.broadcast_to(np.arange(64, dtype=np.int32), (3, 64))
    got = data_lib.skip_positions(base, 1024, 4, seed=7, step=5, batch_positions=[0, 1, 6])
    assert got.min() >= 0 and got.max() < 1024 and (np.diff(got, axis=1) >= 1).all()
    assert (got[:, :16] == np.arange(16)).all() and got[:, -1].max() > 64  # the first chunk stays; others move
    np.testing.assert_array_equal(got, data_lib.skip_positions(base, 1024, 4, seed=7, step=5, batch_positions=[0, 1, 6]))
    np.testing.assert_array_equal(got[2], data_lib.skip_positions(base[:1], 1024, 4, 7, 5, [6])[0])  # by position
    assert not np.array_equal(got, data_lib.skip_positions(base, 1024, 4, seed=7, step=6, batch_positions=[0, 1, 6]))
    np.testing.assert_array_equal(data_lib.skip_positions(base, 64, 4, 7, 5, [0, 1, 2]), base)  # no room: no skip
    with pytest.raises(data_lib.TrainDataError, match=r"skip_to: expected at least seq_len \(64\), got 32"):
        data_lib.skip_positions(base, 32, 2, 0, 0, [0, 1, 2])


SETTINGS = dict(seq_len=32, batch=2, accum=1, steps=2, seed=3, attention="blockwise", q_chunk=16, loss_chunk=16,
                lr=1e-3, warmup_steps=0, schedule="constant", end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
                weight_decay=0.0, clip_norm=1.0)


@pytest.mark.parametrize("method", ["longrope", "pi", "yarn"])
def test_a_skipped_row_trains_with_the_long_factors_whatever_the_method(method):
    """Rows of 32 tokens (below a 64-token window) skipped to span 256: the loss is the loss under
    the spec's long set fixed for the span at the skipped positions, which for a factors file
    with its own short set is not the loss a row of 32 tokens alone would get."""
    cfg = tiny_config(max_position_embeddings=64)
    p = cfg.rotary_dim // 2

    spec = {"longrope": rope_lib.longrope(cfg.rope_theta, cfg.rotary_dim, np.geomspace(1, 4, p), np.ones(p),
                                          original_max=64, max_position_embeddings=256),
            "pi": rope_lib.pi(cfg.rope_theta, cfg.rotary_dim, 4.0),
            "yarn": rope_lib.yarn(cfg.rope_theta, cfg.rotary_dim, 4.0, 64)}[method]
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, 0))
    chunks = np.random.default_rng(0).integers(0, cfg.vocab_size, (9, 32)).astype(np.int32)
    tr = trainer_lib.Trainer(cfg, spec, dict(SETTINGS, skip_to=256, skip_chunks=2))
    first = next(tr.batches(chunks, 0))
    assert 32 <= first["positions"].max() < 256 and (np.diff(first["positions"], axis=1) >= 1).all()
    records = []
    tr.fit(tr.init_state(params), tr.batches(chunks, 0), stop=1, progress=False,
           hooks=[lambda done, state, rec, last: records.append(rec)])
    rows = chunks[data_lib.step_rows(9, 3, 0, 2)]
    want = jnp.mean(mean_nll(params, jnp.asarray(rows), rope_lib.fixed(spec, "long"), cfg=cfg,
                             positions=jnp.asarray(first["positions"]), seq_len=256, q_chunk=16, loss_chunk=16))
    assert records[0]["loss"] == pytest.approx(float(want), rel=1e-6)
    if method == "longrope":
        as_row = jnp.mean(mean_nll(params, jnp.asarray(rows), spec, cfg=cfg, positions=jnp.asarray(first["positions"]),
                                   seq_len=32, q_chunk=16, loss_chunk=16))
        assert abs(float(as_row) - float(want)) > 1e-4  # the short set a row of 32 tokens would switch to


def test_zero_skips_give_the_ordinary_run_s_losses():
    cfg = tiny_config(max_position_embeddings=64)
    params = init_params(cfg, 0)
    chunks = np.random.default_rng(0).integers(0, cfg.vocab_size, (9, 32)).astype(np.int32)
    plain = trainer_lib.train(params, cfg, rope_spec(cfg), SETTINGS, chunks, progress=False)
    skipped = trainer_lib.train(params, cfg, rope_spec(cfg), dict(SETTINGS, skip_to=32), chunks, progress=False)
    np.testing.assert_allclose(skipped.record["loss"], plain.record["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(skipped.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The train job with packing, mixed windows and skips


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Documents of both kinds for a 64-token window: short ones (within it) and long ones."""
    d = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(40):
        (d / f"short{i}.py").write_text(" ".join(rng.choice(words, int(rng.integers(3, 12)))))
    for i in range(4):
        (d / f"long{i}.py").write_text(" ".join(rng.choice(words, 400)))
    return str(d)


STAGE = ["--config.model_config.hidden_size=64", "--config.model_config.intermediate_size=128",
         "--config.model_config.num_hidden_layers=1", "--config.model_config.max_position_embeddings=64",
         "--config.seq_len=64", "--config.batch=4", "--config.accum=2", "--config.loss_chunk=64",
         "--config.warmup_steps=2", "--config.packing=true", "--config.short_microbatches=1",
         "--config.skip_to=256", "--config.checkpoint_every=3"]


def _train(out, corpus, *extra, wait=True):
    from processes import command_argv

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    argv = command_argv("train", "--config", "tiny", "--out", str(out), "--data", corpus, *STAGE, *extra)
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"], r["loss_short"], r["loss_long"]) for r in map(json.loads, fh)]


def test_a_packed_mixed_skipped_run_resumes_after_sigkill_to_the_bit(tmp_path, mixed_corpus):
    whole = tmp_path / "whole"
    r = _train(whole, mixed_corpus, "--config.steps=9")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "rows of 64 tokens (packed)" in r.stderr and "short rows" in r.stderr
    from longrope_jax import checkpoint

    cfg, _, _ = checkpoint.restore(str(whole / "final"))
    assert cfg.max_position_embeddings == 256  # the span the skipped rows trained
    data = sorted(os.listdir(whole / "data"))
    assert data == ["chunks.npy", "positions.npy", "segment_ids.npy", "short_chunks.npy", "short_positions.npy",
                    "short_segment_ids.npy"]
    cut = tmp_path / "cut"
    p = _train(cut, mixed_corpus, "--config.steps=9", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 4 is logged: checkpoint 3 is on disk
        if os.path.exists(cut / "metrics.jsonl") and len(_losses(cut)) >= 5:
            break
        assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=120)
    r = _train(cut, mixed_corpus, "--config.steps=9")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]
    assert _losses(cut) == _losses(whole)


def test_a_stage_of_a_built_in_method_leaves_it_as_the_model_s_own_rope(tmp_path, mixed_corpus):
    """``--rope yarn:2`` on a 64-token model, rows skipped to span 256: YaRN over the model's own
    window is what the stage trains, and what ``final/`` states (its window the span), so
    ``--rope model`` on the result is the trained RoPE."""
    from longrope_jax import checkpoint
    from longrope_jax import factors as factors_lib
    from longrope_jax.model import ModelConfig

    out = tmp_path / "yarn"
    r = _train(out, mixed_corpus, "--config.steps=1", "--config.short_microbatches=0", "--config.packing=false",
               "--config.accum=1", "--rope", "yarn:2")
    assert r.returncode == 0, r.stderr[-2000:]
    cfg, _, _ = checkpoint.restore(str(out / "final"))
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_parameters == {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    base = ModelConfig(**{**json.loads(json.dumps(cfg.to_dict())), "max_position_embeddings": 64,
                          "rope_parameters": {"rope_type": "default"}})
    want = factors_lib.resolve_rope("yarn:2", base)
    np.testing.assert_allclose(rope_spec(cfg).long_factor, want.long_factor, rtol=1e-7)
