"""The TPU launcher (``launch/``): golden dry-runs, the slice and accelerator facts, and
create -> setup -> run -> preempted -> re-create -> resume end to end against a fake Cloud CLI
(``tests/fake_gcloud.py``) whose workers are 2 local CPU processes running the real command."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from processes import command_argv, free_port, two_processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "launch")
sys.path.insert(0, ROOT)

from launch import remote, verbs  # noqa: E402
from launch.slices import Accelerator, LaunchError, Slice, read_state  # noqa: E402


def _launch(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "launch", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Facts and one-line errors


@pytest.mark.parametrize("name,chips,workers", [("v4-8", 4, 1), ("v4-32", 16, 4), ("v5p-64", 32, 8),
                                                ("v5p-128", 64, 16), ("v5litepod-8", 8, 1), ("v5e-16", 16, 4),
                                                ("v6e-256", 256, 64)])
def test_accelerator_types_count_chips_and_hosts_as_cloud_tpu_does(name, chips, workers):
    a = Accelerator.parse(name)
    assert (a.chips, a.workers, a.chips // a.workers) == (chips, workers, chips // workers)


def test_bad_slices_are_one_line_errors():
    for kw, msg in [(dict(type="v5p-63"), "is not a v5p slice"), (dict(type="tpu-64"), "expected an accelerator"),
                    (dict(zone=""), "--zone is needed"), (dict(provisioning="best-effort"), "only a queued"),
                    (dict(name="My_Slice"), "lowercase letters")]:
        with pytest.raises(LaunchError, match=msg):
            Slice(**{"name": "s", "zone": "z", "type": "v4-8", **kw})
    with pytest.raises(LaunchError, match="needs 48 devices; a v5p-64 slice has 32"):
        verbs.mesh_devices("fsdp=3,sequence=16", Accelerator.parse("v5p-64"))
    verbs.mesh_devices("fsdp=-1,sequence=16", Accelerator.parse("v5p-64"))
    with pytest.raises(LaunchError, match="expected longrope-jax COMMAND"):
        remote.command(["python", "train.py"])
    r = _launch("status", "nowhere", "--launch-dir", "/nonexistent")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "launch status: error: nowhere: no slice of that name was created from here "
        "(/nonexistent/nowhere/slice.json); give --zone and --type"]


def test_a_description_says_healthy_pending_lost_or_absent():
    def node(state, **kw):
        return json.dumps({"state": state, "networkEndpoints": [{"ipAddress": "10.0.0.2"}], **kw})

    assert read_state(None, node("READY")).kind == "healthy"
    assert read_state(None, node("READY")).addresses == ("10.0.0.2",)
    assert read_state(None, node("READY", health="UNHEALTHY_MAINTENANCE")).kind == "lost"
    assert read_state(None, node("PREEMPTED")).kind == "lost"
    assert read_state(None, node("CREATING")).kind == "pending"
    assert read_state(None, None).kind == "absent"

    def queued(state):
        return json.dumps({"state": {"state": state}})

    assert read_state(queued("WAITING_FOR_RESOURCES"), None).kind == "pending"
    assert read_state(queued("SUSPENDED"), node("PREEMPTED")).kind == "lost"
    assert read_state(queued("ACTIVE"), node("READY")).kind == "healthy"


def test_the_launcher_imports_without_jax():
    code = "import sys, launch.__main__; assert 'jax' not in sys.modules, 'jax imported'"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_a_dirty_tree_is_refused_unless_allowed(tmp_path):
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "f.txt").write_text("a")
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert remote.revision(str(repo), None, False) == head
    (repo / "f.txt").write_text("b")
    with pytest.raises(LaunchError, match="uncommitted changes"):
        remote.revision(str(repo), None, False)
    snap = remote.revision(str(repo), None, True)
    assert snap != head and (repo / "f.txt").read_text() == "b"  # the work tree is left as it is
    shown = subprocess.run([*git, "show", f"{snap}:f.txt"], capture_output=True, text=True).stdout
    assert shown == "b"


def test_the_device_check_runs_the_commands_start_up_and_reads_back(tmp_path):
    """The check's own code, run here as a worker runs it (one process, 8 CPU devices)."""
    rev = "r0"
    (tmp_path / "longrope-jax").mkdir()
    os.symlink(ROOT, tmp_path / "longrope-jax" / rev)
    os.symlink(sys.prefix, tmp_path / "longrope-jax" / "venv")
    env = {**os.environ, "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    r = subprocess.run(["bash", "-c", remote.check(rev, [])], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert remote.read_check(0, r.stdout) == (8, 8, "cpu")
    with pytest.raises(LaunchError, match="worker 3: the device check printed no devices; its last line: boom"):
        remote.read_check(3, "boom\n")


# --------------------------------------------------------------------------------------------
# Golden dry-runs: the exact commands, with this checkout's paths and revision normalised


def _normalised(text, launch_dir):
    """The checkout, the launcher's directory and the revision (HEAD, or the snapshot of a dirty
    tree, whose hash changes with the time it is taken) as placeholders."""
    text = text.replace(ROOT, "<REPO>").replace(str(launch_dir), "<LAUNCH>")
    return re.sub(r"\b[0-9a-f]{40}\b", "<REV>", text)


DRY_RUNS = {
    "v5p_64_queued_spot": [
        ["create", "pod", "--zone=us-east5-a", "--type=v5p-64", "--queued", "--provisioning=spot"],
        ["setup", "pod", "--zone=us-east5-a", "--type=v5p-64", "--queued", "--mesh=fsdp=2,sequence=16"],
        ["run", "pod", "--zone=us-east5-a", "--type=v5p-64", "--queued", "--", "longrope-jax", "extend",
         "--config", "llama2_7b_2048k", "--out", "/mnt/runs/llama2-2048k", "--mesh", "fsdp=2,sequence=16"],
        ["stop", "pod", "--zone=us-east5-a", "--type=v5p-64", "--queued"],
        ["delete", "pod", "--zone=us-east5-a", "--type=v5p-64", "--queued"],
    ],
    "v4_32_tpu_vm": [
        ["create", "v4pod", "--zone=us-central2-b", "--type=v4-32", "--project=my-project"],
        ["setup", "v4pod", "--zone=us-central2-b", "--type=v4-32", "--project=my-project", "--explicit-processes"],
        ["run", "v4pod", "--zone=us-central2-b", "--type=v4-32", "--project=my-project", "--explicit-processes",
         "--", "longrope-jax", "train", "--config", "smollm2_32k_pose", "--out", "/mnt/runs/ft"],
        ["delete", "v4pod", "--zone=us-central2-b", "--type=v4-32", "--project=my-project"],
    ],
    "xpk_v5p_64": [
        ["xpk", "--cluster=my-cluster", "--workload=llama2-2048k", "--type=v5p-64", "--base-image=python:3.11",
         "--max-restarts=10", "--project=my-project", "--zone=us-east5-a", "--", "longrope-jax", "extend",
         "--config", "llama2_7b_2048k", "--out", "/mnt/runs/llama2-2048k", "--mesh", "fsdp=2,sequence=16"],
    ],
}


@pytest.mark.parametrize("case", sorted(DRY_RUNS))
def test_dry_runs_print_the_golden_commands(case, tmp_path):
    """``UPDATE_GOLDEN=1`` rewrites the files (review the diff)."""
    text = ""
    for args in DRY_RUNS[case]:
        dirty = ["--allow-dirty"] if args[0] in ("setup", "run", "xpk") else []
        r = _launch(args[0], "--dry-run", "--launch-dir", str(tmp_path), *dirty, *args[1:])
        assert r.returncode == 0, r.stderr
        text += f"$ python -m launch {args[0]} --dry-run {' '.join(args[1:])}\n{r.stdout}"
    text = _normalised(text, tmp_path)
    path = os.path.join(GOLDEN, f"{case}.txt")
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(GOLDEN, exist_ok=True)
        open(path, "w").write(text)
    assert text == open(path).read()
    assert not os.listdir(tmp_path)  # a dry run writes nothing


def test_the_pods_page_shows_what_the_dry_runs_print(tmp_path):
    """Each block of docs/pods.md that starts with ``$ python -m launch`` is that command's output
    (a line ``...`` elides the rest), with the slice remembered as its ``create`` records it."""
    import dataclasses

    text = open(os.path.join(ROOT, "docs", "pods.md")).read()
    blocks = re.findall(r"```\n\$ python -m launch (.*?)\n(.*?)```", text, re.S)
    assert len(blocks) >= 5
    (tmp_path / "llama2").mkdir()
    made = Slice(name="llama2", zone="us-east5-a", type="v5p-128", queued=True, provisioning="spot")
    (tmp_path / "llama2" / "slice.json").write_text(json.dumps(dataclasses.asdict(made)))
    for command, shown in blocks:
        args = shlex.split(command)
        dirty = ["--allow-dirty"] if args[0] in ("setup", "run", "watch", "xpk") else []
        r = _launch(args[0], "--launch-dir", str(tmp_path), *dirty, *args[1:])
        assert r.returncode == 0, (command, r.stderr)
        out = _normalised(r.stdout, tmp_path).splitlines()
        lines = shown.rstrip("\n").splitlines()
        if lines[-1] == "...":
            assert out[:len(lines) - 1] == lines[:-1] and len(out) >= len(lines), command
        else:
            assert out == lines, command


# --------------------------------------------------------------------------------------------
# End to end against the fake Cloud CLI: 2 local CPU processes are the slice's workers


@pytest.fixture
def fake(tmp_path):
    """A ``gcloud`` on PATH that plays ``tests/fake_gcloud.py``; returns (env, dir, write_script)."""
    d = tmp_path / "fake"
    (tmp_path / "bin").mkdir()
    gcloud = tmp_path / "bin" / "gcloud"
    gcloud.write_text(f"#!/bin/sh\nexec {sys.executable} {ROOT}/tests/fake_gcloud.py \"$@\"\n")
    gcloud.chmod(0o755)
    for i in range(2):  # what `setup` leaves on a worker (recorded here, not executed): the environment
        (d / "homes" / f"worker-{i}" / "longrope-jax").mkdir(parents=True)
        os.symlink(sys.prefix, d / "homes" / f"worker-{i}" / "longrope-jax" / "venv")
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "FAKE_GCLOUD_DIR": str(d),
           "FAKE_GCLOUD_SCRIPT": str(tmp_path / "script.json")}

    def script(**kw):
        base = {"addresses": ["127.0.0.1", "127.0.0.1"], "ready_after": 1,
                "execute": [r"tar -xzf", r"-m longrope_jax (train|extend|search)"],
                "answers": [{"match": CHECK_RE, "stdout": remote.CHECK + " {worker} 4 8 tpu"}],
                "worker_env": {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}}
        (tmp_path / "script.json").write_text(json.dumps({**base, **kw}))

    return env, d, script


CHECK_RE = re.escape(remote.CHECK)


def _calls(d):
    return [json.loads(line) for line in open(d / "calls.jsonl")]


def _verbs(calls):
    """(kind, verb) of each call: ('tpu-vm', 'create'), ... ."""
    out = []
    for argv in calls:
        words = [a for a in argv if not a.startswith("-") and a != "alpha"]
        out.append((words[2], words[3]))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tiny import word_corpus

    return word_corpus(tmp_path_factory.mktemp("corpus"))


TRAIN = ["--config", "tiny", "--config.seq_len=64", "--config.batch=8", "--config.model_config.hidden_size=64",
         "--config.model_config.intermediate_size=128", "--config.model_config.num_hidden_layers=2",
         "--config.loss_chunk=64", "--config.warmup_steps=2", "--config.steps=12", "--config.checkpoint_every=3",
         "--mesh", "data=8"]


def _losses(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))]


def test_create_setup_run_preempted_recreate_resume_end_to_end(fake, tmp_path, corpus):
    """A v4-16 TPU VM (2 workers) through the fake CLI: created, set up (recorded), the real
    ``longrope-jax train`` on both workers; the fake preempts the slice once step 4 is logged (the
    workers killed); ``watch`` re-creates it, sets it up again and reruns the command, which
    resumes from its last checkpoint and ends with the losses of an uninterrupted run."""
    env, d, script = fake
    run, port = str(tmp_path / "run"), free_port()
    script(preempt_when={"path": os.path.join(run, "metrics.jsonl"), "lines": 4})
    launch_dir = str(tmp_path / "launch")
    where = ["s1", "--launch-dir", launch_dir, "--poll", "0.2"]
    r = _launch("create", *where, "--zone=us-central2-b", "--type=v4-16", env=env)
    assert r.returncode == 0, r.stderr
    proc = ["--allow-dirty", "--explicit-processes", "--port", str(port)]
    r = _launch("setup", *where, *proc, "--mesh", "data=8", env=env)
    assert r.returncode == 0, r.stderr
    r = _launch("watch", *where, *proc, "--retries", "2", "--", "longrope-jax", "train", *TRAIN, "--out", run,
                "--data", corpus, env=env)
    assert r.returncode == 0, r.stderr[-3000:] + open(os.path.join(launch_dir, "s1", "worker-0.log")).read()[-3000:]

    verbs_seen = [v for v in _verbs(_calls(d)) if v[1] != "describe"]
    assert verbs_seen[0] == ("tpu-vm", "create") and verbs_seen.count(("tpu-vm", "create")) == 2
    assert verbs_seen.count(("tpu-vm", "delete")) == 1
    after = verbs_seen[verbs_seen.index(("tpu-vm", "delete")):]  # re-created, then set up again, then run
    assert [v for v in after if v[1] in ("create", "scp")][:2] == [("tpu-vm", "create"), ("tpu-vm", "scp")]
    installs = [c for c in _calls(d) if "pip install" in " ".join(c)]
    assert len(installs) == 2 and all("--worker=all" in c for c in installs)
    events = [json.loads(line)["event"] for line in open(os.path.join(launch_dir, "s1", "events.jsonl"))]
    assert events == ["create", "setup", "run", "lost", "recreate", "setup", "run", "done"]
    log0 = open(os.path.join(launch_dir, "s1", "worker-0.log")).read()
    assert "== " in log0 and "attempt 2" in log0 and "resumed from" in log0

    ref = str(tmp_path / "ref")
    ref_port = free_port()
    outs = two_processes(lambda i: command_argv("train", *TRAIN, "--out", ref, "--data", corpus, "--coordinator",
                                                f"localhost:{ref_port}", "--num-processes", "2", "--process-id",
                                                str(i)), cwd=ROOT)
    assert all(rc == 0 for rc, _, _ in outs), outs[0][2][-2000:]
    losses = _losses(run)
    assert [s for s, _ in losses] == list(range(12))
    assert losses == _losses(ref)  # every step, every float


def test_a_worker_failing_stops_the_others_and_shows_its_last_lines(fake, tmp_path, corpus):
    """Worker 1's command fails at once (scripted); worker 0's (a real, long training run) is
    ended, the remote `stop` is sent, and the error names worker 1 with its last lines."""
    env, d, script = fake
    script(answers=[{"match": CHECK_RE, "stdout": remote.CHECK + " {worker} 4 8 tpu"},
                    {"match": "-m longrope_jax train", "worker": 1, "stdout": "error: worker one broke", "rc": 3}],
           execute=["tar -xzf", "-m longrope_jax train .*--process-id 0"])
    where = ["s2", "--launch-dir", str(tmp_path / "launch"), "--poll", "0.2", "--zone=z", "--type=v4-16"]
    assert _launch("create", *where, env=env).returncode == 0
    run, port = str(tmp_path / "run"), free_port()
    r = _launch("run", *where, "--allow-dirty", "--explicit-processes", "--port", str(port), "--env", "TAG=a b", "--",
                "longrope-jax", "train", *TRAIN, "--config.steps=100000", "--out", run, "--data", corpus, env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-2:] == ["launch run: error: worker 1 failed (exit 3); its last lines:",
                                                  "error: worker one broke"]
    calls = [" ".join(c) for c in _calls(d)]
    assert any("--worker=all" in c and "kill -TERM" in c for c in calls)
    state = json.load(open(d / "state.json"))
    assert state["pgids"] == []  # worker 0's command ended with its client
    # `watch` with no command takes the last one as it ran: revision, start-up, environment.
    ran = sorted(a for c in _calls(d) for a in c if a.startswith("--command=") and "-m longrope_jax train" in a)
    r = _launch("watch", *where, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    again = sorted(a.replace("WORKER0_IP", "127.0.0.1") for line in r.stdout.splitlines() for a in shlex.split(line)
                   if a.startswith("--command=") and "-m longrope_jax train" in a)  # a dry run asks no addresses
    assert again == ran and len(ran) == 2
    assert all("export 'TAG=a b' && " in a and f"127.0.0.1:{port}" in a for a in ran)
