"""A fake Google Cloud CLI for the launcher's tests (``tests/test_launch.py``): put a ``gcloud``
that runs this file on PATH.

It records every call (``$FAKE_GCLOUD_DIR/calls.jsonl``), keeps the slices it was asked for
(``state.json``) and plays a script (``$FAKE_GCLOUD_SCRIPT``, JSON):

- ``addresses``: the workers' internal IPs a ready slice describes (their number is the workers).
- ``ready_after``: how many describes a new slice answers as being created before it is ready.
- ``execute``: regexes; an ``ssh --command`` matching one runs on the fake workers: ``bash -c``
  in ``homes/worker-<i>`` as the home directory, with ``worker_env`` added to the environment.
  The workers' disks outlive a re-creation (the test prepares what ``setup`` would leave).
- ``answers``: for other ssh commands, the first ``{"match", "worker" (optional), "stdout",
  "rc"}`` that matches answers (``{worker}`` in stdout is the worker's index); none: exit 0.
- ``preempt_when``: ``{"path", "lines"}``: the first describe after the file ``path`` has that many
  lines preempts the slice: the workers' commands are killed (SIGKILL), the slice says PREEMPTED
  (a queued resource SUSPENDED) and its ssh connections fail with 255, as a real one's would.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys

DIR = os.environ["FAKE_GCLOUD_DIR"]
SCRIPT = json.load(open(os.environ["FAKE_GCLOUD_SCRIPT"]))


@contextlib.contextmanager
def state():
    """The slices, read and written under a lock (several fake calls run at once)."""
    with open(os.path.join(DIR, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = os.path.join(DIR, "state.json")
        s = json.load(open(path)) if os.path.exists(path) else {"slices": {}, "pgids": [], "preempted": False}
        yield s
        with open(path + ".tmp", "w") as fh:
            json.dump(s, fh)
        os.replace(path + ".tmp", path)


def option(argv, name):
    for a in argv:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def workers():
    return len(SCRIPT["addresses"])


def home(i):
    return os.path.join(DIR, "homes", f"worker-{i}")


def kill_workers(s):
    for pgid in s["pgids"]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    s["pgids"] = []


def describe(name, queued):
    with state() as s:
        sl = s["slices"].get(name)
        if sl is None:
            print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: {name}", file=sys.stderr)
            return 1
        if sl["left"] > 0:
            sl["left"] -= 1
        elif sl["state"] == "CREATING":
            sl["state"] = "READY"
        p = SCRIPT.get("preempt_when")
        if p and not s["preempted"] and sl["state"] == "READY" and os.path.exists(p["path"]):
            if sum(1 for _ in open(p["path"])) >= p["lines"]:
                s["preempted"] = True
                sl["state"] = "PREEMPTED"
                kill_workers(s)
        node = sl["state"]
    if queued:
        q = {"READY": "ACTIVE", "CREATING": "PROVISIONING", "PREEMPTED": "SUSPENDED"}[node]
        print(json.dumps({"name": name, "state": {"state": q}}))
    else:
        ready = node == "READY"
        print(json.dumps({"name": name, "state": node, "acceleratorType": "fake",
                          "networkEndpoints": [{"ipAddress": a} for a in SCRIPT["addresses"]] if ready else []}))
    return 0


def ssh(name, worker, command):
    with state() as s:
        sl = s["slices"].get(name)
        if sl is None or sl["state"] != "READY":
            print(f"ssh: connect to host {name}: Connection refused", file=sys.stderr)
            return 255
    targets = range(workers()) if worker == "all" else [int(worker)]
    if any(re.search(x, command) for x in SCRIPT.get("execute", [])):
        rc = 0
        for i in targets:
            env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FAKE_GCLOUD_DIR")}
            env.update(SCRIPT.get("worker_env", {}), HOME=home(i))
            p = subprocess.Popen(["bash", "-c", command], cwd=home(i), env=env, start_new_session=True)
            with state() as s:
                s["pgids"].append(p.pid)

            def stop(*_, pgid=p.pid):  # the launcher ended this client: end the command too (the stand-in
                with contextlib.suppress(ProcessLookupError):  # for the `stop` that a real slice needs)
                    os.killpg(pgid, signal.SIGKILL)
                with state() as s:
                    s["pgids"] = [g for g in s["pgids"] if g != pgid]
                sys.exit(143)

            signal.signal(signal.SIGTERM, stop)
            code = p.wait()
            with state() as s:
                s["pgids"] = [g for g in s["pgids"] if g != p.pid]
            rc = rc or (255 if code < 0 else code)  # killed: the connection is gone
        return rc
    for i in targets:
        for a in SCRIPT.get("answers", []):
            if re.search(a["match"], command) and a.get("worker", i) == i:
                print(a.get("stdout", "").format(worker=i), flush=True)
                if a.get("rc", 0):
                    return a["rc"]
                break
    return 0


def main(argv):
    os.makedirs(DIR, exist_ok=True)
    with open(os.path.join(DIR, "calls.jsonl"), "a") as fh:
        fh.write(json.dumps(argv) + "\n")
    words = [a for a in argv if not a.startswith("-")]
    if words[:1] == ["alpha"]:
        words = words[1:]
    kind, verb, name = words[2], words[3], words[4] if len(words) > 4 else None
    queued = kind == "queued-resources"
    if verb == "create":
        with state() as s:
            if name in s["slices"]:
                print(f"ERROR: (gcloud.compute.tpus) ALREADY_EXISTS: {name}", file=sys.stderr)
                return 1
            s["slices"][name] = {"state": "CREATING", "left": SCRIPT.get("ready_after", 1), "queued": queued}
        return 0
    if verb == "describe":
        return describe(name, queued)
    if verb == "delete":
        with state() as s:
            kill_workers(s)
            if s["slices"].pop(name, None) is None:
                print(f"ERROR: (gcloud.compute.tpus) NOT_FOUND: {name}", file=sys.stderr)
                return 1
        return 0
    if verb == "scp":
        local, target = words[4], words[5]
        for i in range(workers()):
            dest = os.path.join(home(i), target.split(":", 1)[1])
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy(local, dest)
        return 0
    if verb == "ssh":
        return ssh(name, option(argv, "worker"), option(argv, "command"))
    print(f"fake gcloud: {' '.join(argv)}: not faked", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
