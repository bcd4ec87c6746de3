"""``prepare-data``: a stage's rows tokenised once into ArrayRecord shards; ``train`` reading them
(``--config.prepared``) on 2 processes ends with the losses of a run that builds its rows from the
text itself; rows prepared for another stage or tokenizer are refused in one line."""

import json
import os
import subprocess

import numpy as np
import pytest

from processes import command_argv, free_port, two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=8")
SMALL = ["--config.seq_len=64", "--config.batch=8", "--config.model_config.hidden_size=64",
         "--config.model_config.intermediate_size=128", "--config.model_config.num_hidden_layers=1",
         "--config.loss_chunk=64", "--config.warmup_steps=2", "--config.steps=4", "--config.checkpoint_every=2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(6):
        (d / f"doc{i}.py").write_text(" ".join(rng.choice(words, int(rng.integers(100, 900)))))
    return str(d)


def _run(*args, timeout=300):
    return subprocess.run(command_argv(*args), capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("packing", [False, True])
def test_prepared_rows_are_the_rows_train_builds(tmp_path, corpus, packing):
    """Every field of every row read back (by random access, across shards) equals the index
    ``train`` builds from the same data and settings."""
    from longrope_jax.data import rows as rows_lib
    from longrope_jax.jobs import train
    from longrope_jax.tokenizer import Tokenizer
    from longrope_jax.train import settings

    out = tmp_path / "prepared"
    extra = [f"--config.packing={packing}", "--config.min_document_tokens=150"]
    r = _run("prepare-data", "--config", "tiny", "--data", corpus, "--out", str(out), "--rows-per-shard", "70",
             *SMALL, *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    s = settings.resolve("tiny", [*SMALL, *extra], {"data": [corpus], "out": str(tmp_path / "run")})
    cfg, tok = train.scratch(s)
    want = train.build_rows(s, tok, cfg, cfg.max_position_embeddings, lambda m: None)["long"]
    fields = rows_lib.Rows(str(out)).fields
    shards = json.load(open(out / "prepared.json"))["shards"]
    assert sorted(fields) == sorted(want) and len(shards) == -(-len(want["tokens"]) // 70) > 1
    ids = np.random.default_rng(0).permutation(len(want["tokens"]))
    for name, arr in want.items():
        assert len(fields[name]) == len(arr)
        np.testing.assert_array_equal(fields[name][ids], arr[ids])
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode_plain("def x") == tok.encode_plain("def x")


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))]


def test_two_processes_train_from_prepared_rows_to_the_losses_of_the_text(tmp_path, corpus):
    prepared = tmp_path / "prepared"
    r = _run("prepare-data", "--config", "tiny", "--data", corpus, "--out", str(prepared), *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = tmp_path / "ref"
    r = _run("train", "--config", "tiny", "--data", corpus, "--out", str(ref), "--mesh", "data=8", *SMALL)
    assert r.returncode == 0, r.stderr[-2000:]

    run, port = tmp_path / "run", free_port()
    argv = command_argv("train", "--config", "tiny", f"--config.prepared={prepared}", "--out",
                        str(run), "--mesh", "data=8", *SMALL, "--coordinator", f"localhost:{port}",
                        "--num-processes", "2")
    res = two_processes(lambda i: argv + ["--process-id", str(i)], ROOT, env={"PYTHONPATH": ROOT})
    assert all(rc == 0 for rc, _, _ in res), res[0][2][-2000:] + res[1][2][-2000:]
    assert f"prepared in {prepared}" in res[0][2] and not os.path.exists(run / "data")  # nothing tokenised
    got, want = _losses(run), _losses(ref)
    assert [s for s, _ in got] == [s for s, _ in want] == [0, 1, 2, 3]
    np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=1e-5)


def test_rows_prepared_otherwise_are_refused_in_one_line(tmp_path, corpus):
    prepared = tmp_path / "prepared"
    assert _run("prepare-data", "--config", "tiny", "--data", corpus, "--out", str(prepared), *SMALL).returncode == 0
    base = ["train", "--config", "tiny", f"--config.prepared={prepared}", *SMALL]
    for i, (extra, msg) in enumerate([
        (["--config.seq_len=32"], f"{prepared}/prepared.json: seq_len: the rows were prepared with 64, the stage has "
                                  "32; prepare them again or use the same setting"),
        (["--config.model_config.vocab_size=300", "--tokenizer", str(_other_tokenizer(tmp_path))],
         f"{prepared}/prepared.json: tokenizer_sha256: the rows were tokenised with another tokenizer"),
    ]):
        r = _run(*base, "--out", str(tmp_path / f"run{i}"), *extra)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert msg in r.stderr.strip().splitlines()[-1], r.stderr[-500:]
    r = _run("prepare-data", "--config", "tiny", "--data", corpus, "--out", str(prepared), *SMALL)
    assert r.returncode == 2 and f"{prepared}: exists (expected a new prepared data directory); pass --overwrite" \
        in r.stderr.strip().splitlines()[-1]


def _other_tokenizer(tmp_path):
    from tiny import byte_tokenizer_file

    (tmp_path / "tok").mkdir()
    return byte_tokenizer_file(str(tmp_path / "tok"))
