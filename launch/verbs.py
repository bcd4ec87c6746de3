"""The launcher's verbs over a slice: create, setup, run, watch, status, logs, stop, delete; and an
xpk workload. Each takes a :class:`~launch.runner.Runner` (which runs or, on dry-run, prints)."""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time

from . import remote
from .runner import Runner, Workers, each, tail
from .slices import Accelerator, LaunchError, Slice, State, read_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository the code is shipped from


@dataclasses.dataclass
class Context:
    """What every verb works with: the slice, the runner, the launcher's directory for the slice,
    the poll interval (seconds) and the log function."""
    slice: Slice
    runner: Runner
    dir: str
    poll: float = 30.0

    def log(self, msg: str) -> None:
        self.runner.log(msg)

    def event(self, kind: str, **fields) -> None:
        """One line of ``events.jsonl``: what the launcher did to the slice, and when."""
        if self.runner.dry_run:
            return
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "events.jsonl"), "a") as fh:
            fh.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": kind,
                                 **fields}) + "\n")


@dataclasses.dataclass(frozen=True)
class Job:
    """A command as it runs on a slice: the revision shipped, ``argv`` (``longrope-jax ...``), the
    start-up (``explicit`` processes on ``port``, else the TPU environment's detection) and the
    environment variables (``KEY=VALUE``) each worker exports."""
    rev: str
    argv: tuple[str, ...]
    explicit: bool = False
    port: int = remote.PORT
    env: tuple[str, ...] = ()

    def on(self, worker: int, addresses: tuple[str, ...] | None) -> str:
        """The bash line that starts it on ``worker``."""
        return remote.start(self.rev, list(self.argv), remote.processes(addresses, worker, self.port), self.env)


def _read_json(d: str, name: str) -> dict | None:
    """The launcher's file ``name`` in ``d`` (None: not written yet)."""
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def load_slice(d: str, name: str, given: dict) -> Slice:
    """The slice ``name``: as ``create`` recorded it in ``d/slice.json``, with the options given
    now (those not None) over it."""
    path = os.path.join(d, "slice.json")
    saved = _read_json(d, "slice.json") or {}
    fields = {**saved, **{k: v for k, v in given.items() if v is not None}, "name": name}
    if "zone" not in fields or "type" not in fields:
        raise LaunchError(f"{name}: no slice of that name was created from here ({path}); give --zone and --type")
    return Slice(**fields)


def _write_json(c: Context, name: str, obj) -> None:
    """``obj`` to the launcher's file ``name`` for the slice (written whole, then renamed)."""
    os.makedirs(c.dir, exist_ok=True)
    tmp = os.path.join(c.dir, name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, os.path.join(c.dir, name))


def save_slice(c: Context) -> None:
    _write_json(c, "slice.json", dataclasses.asdict(c.slice))


def setup_options(c: Context, mesh: str | None, extras: str | None) -> dict:
    """``setup``'s mesh and extras: those given, else those the last setup here used."""
    saved = _read_json(c.dir, "setup.json") or {}
    return {"mesh": mesh or saved.get("mesh"), "extras": extras or saved.get("extras") or "tpu"}


def query(c: Context) -> State:
    """What the cloud says of the slice now."""
    s, ask = c.slice, c.runner.ask
    if s.queued:
        q = ask(s.describe_queued())
        return read_state(q, ask(s.describe_node()) if q is not None else None)
    return read_state(None, ask(s.describe_node()))


def wait_healthy(c: Context, timeout: float | None = None) -> State:
    """Polls until the slice is ready; a lost or absent slice is an error."""
    t0 = time.time()
    while True:
        st = query(c)
        if st.kind == "healthy":
            return st
        if st.kind in ("lost", "absent"):
            raise LaunchError(f"{c.slice.name}: {st.state} while waiting for it to be ready")
        if timeout is not None and time.time() - t0 > timeout:
            raise LaunchError(f"{c.slice.name}: still {st.state} after {timeout:.0f} s; `create` again waits on")
        c.log(f"{c.slice.name}: {st.state} ({(time.time() - t0) / 60:.1f} min); polling every {c.poll:.0f} s")
        time.sleep(c.poll)


def create(c: Context, timeout: float | None = None) -> None:
    """Asks for the slice, or reuses it where it exists and is ready (or on its way); waits for it."""
    if not c.runner.dry_run:
        st = query(c)
        if st.kind == "lost":
            raise LaunchError(f"{c.slice.name}: exists but is {st.state}; `delete` it, or `watch` re-creates it")
        if st.kind != "absent":
            c.log(f"{c.slice.name}: exists ({st.state}); reusing it")
            save_slice(c)
            wait_healthy(c, timeout)
            return
    c.runner.do(c.slice.create())
    if not c.runner.dry_run:
        save_slice(c)
        c.event("create", type=c.slice.type, queued=c.slice.queued, provisioning=c.slice.provisioning)
        wait_healthy(c, timeout)
        c.log(f"{c.slice.name}: ready ({c.slice.accelerator.workers} workers)")


def ship(c: Context, rev: str) -> None:
    """The project's files at ``rev`` onto every worker (once: an unpacked revision is kept)."""
    path = os.path.join(c.dir, remote.tarball(rev))
    if c.runner.dry_run or not os.path.exists(path):
        if not c.runner.dry_run:
            os.makedirs(c.dir, exist_ok=True)
        c.runner.do(remote.archive(ROOT, rev, path + ".part"))
        c.runner.do(["mv", path + ".part", path])
    c.runner.do(c.slice.scp(path, remote.tarball(rev)))
    c.runner.do(c.slice.ssh("all", remote.unpack(rev)))


def _addresses(c: Context, st: State | None, explicit: bool) -> tuple[str, ...] | None:
    """The workers' addresses for explicit start-up flags (None: the TPU environment's detection)."""
    if not explicit:
        return None
    n = c.slice.accelerator.workers
    if c.runner.dry_run:
        return tuple(f"WORKER{i}_IP" for i in range(n))
    if st is None or len(st.addresses) != n:
        raise LaunchError(f"{c.slice.name}: --explicit-processes needs the {n} workers' addresses; the slice "
                          f"describes {len(st.addresses) if st else 0}")
    return st.addresses


def setup(c: Context, rev: str, explicit: bool = False, port: int = remote.PORT, mesh: str | None = None,
          extras: str = "tpu") -> None:
    """The revision and its pinned environment on every worker, then a check that each worker
    sees the devices the slice has (and, with ``mesh``, that the mesh fits them)."""
    acc = c.slice.accelerator
    if mesh:
        mesh_devices(mesh, acc)
    st = None if c.runner.dry_run else wait_healthy(c)
    ship(c, rev)
    c.log(f"{c.slice.name}: installing {rev[:12]}'s environment on {acc.workers} workers (minutes)")
    c.runner.do(c.slice.ssh("all", remote.install(rev, extras)))
    addresses = _addresses(c, st, explicit)
    outs = each(c.runner, lambda i: c.slice.ssh(i, remote.check(rev, remote.processes(addresses, i, port))),
                acc.workers)
    if c.runner.dry_run:
        return
    for i, out in enumerate(outs):
        local, total, platform = remote.read_check(i, out)
        if (local, total, platform) != (acc.devices_per_worker, acc.chips, "tpu"):
            raise LaunchError(f"worker {i} sees {local} {platform} devices of {total}; a {acc.name} slice has "
                              f"{acc.devices_per_worker} tpu devices on each of {acc.workers} workers, {acc.chips} "
                              "in all")
    c.event("setup", revision=rev)
    _write_json(c, "setup.json", {"mesh": mesh, "extras": extras})
    c.log(f"{c.slice.name}: {acc.workers} workers ready, {acc.devices_per_worker} TPU devices each")


def mesh_devices(mesh: str, acc: Accelerator) -> None:
    """Checks that a mesh (``data=2,sequence=16``; -1: the rest) fits the slice's devices."""
    sizes = []
    for part in mesh.split(","):
        axis, _, size = part.partition("=")
        if not size.lstrip("-").isdigit():
            raise LaunchError(f"--mesh: expected AXIS=SIZE,... such as fsdp=4,sequence=16, got {mesh!r}")
        sizes.append(int(size))
    fixed = 1
    for s in sizes:
        fixed *= s if s > 0 else 1
    if acc.chips % fixed or (-1 not in sizes and fixed != acc.chips):
        raise LaunchError(f"--mesh {mesh}: needs {fixed} devices{' times a whole number' if -1 in sizes else ''}; "
                          f"a {acc.name} slice has {acc.chips}")


def last_job(c: Context) -> Job:
    """The command that last ran here, as it ran."""
    saved = _read_json(c.dir, "command.json")
    if saved is None:
        raise LaunchError(f"{c.slice.name}: no command has run here ({c.dir}/command.json); give one after --")
    return Job(**{**saved, "argv": tuple(saved["argv"]), "env": tuple(saved["env"])})


def run_once(c: Context, job: Job, header: str) -> str:
    """The job on every worker until all end: "done", or "lost" where the slice was taken (a
    preemption, a maintenance event). A worker that fails on a healthy slice stops the others
    and is an error showing its last lines."""
    remote.command(list(job.argv))  # a malformed command fails before anything is shipped
    st = None
    if not c.runner.dry_run:
        st = query(c)
        if st.kind != "healthy":
            return "lost"
    ship(c, job.rev)
    addresses = _addresses(c, st, job.explicit)
    n = c.slice.accelerator.workers

    def argv_of(i):
        return c.slice.ssh(i, job.on(i, addresses))

    if c.runner.dry_run:
        for i in range(n):
            c.runner.do(argv_of(i))
        return "done"
    _write_json(c, "command.json", dataclasses.asdict(job))
    c.event("run", revision=job.rev, argv=job.argv)
    workers = Workers(argv_of, n, c.dir, f"{header}: {shlex.join(job.argv)} at {job.rev}")
    c.log(f"{c.slice.name}: running on {n} workers; logs in {c.dir}/worker-*.log")
    t_state = t_log = time.time()
    try:
        while True:
            ok, bad, code = workers.poll()
            if ok:
                return "done"
            now = time.time()
            if bad is not None or now - t_state >= c.poll:
                t_state = now
                st = query(c)
                if st.kind != "healthy":
                    c.log(f"{c.slice.name}: {st.state}; the command was cut off")
                    return "lost"
                if bad is not None:
                    c.runner.do(c.slice.ssh("all", remote.stop()))
                    raise LaunchError(f"worker {bad} failed (exit {code}); its last lines:\n"
                                      f"{workers.last_lines(bad)}")
            if now - t_log >= c.poll:
                t_log = now
                c.log(f"worker 0: {(workers.last_lines(0, 1) or '(no output yet)')[-160:]}")
            time.sleep(min(c.poll, 1.0))
    finally:
        workers.kill()


def recreate(c: Context, st: State) -> None:
    """A lost slice deleted and asked for again (a queued resource goes back in the queue)."""
    if st.kind != "absent":
        c.runner.do(c.slice.delete())
    c.runner.do(c.slice.create())
    c.event("recreate", was=st.state)
    wait_healthy(c)


def watch(c: Context, job: Job, retries: int, mesh: str | None = None, extras: str = "tpu") -> None:
    """The job on the slice until it ends; each time a preemption or maintenance event takes
    the slice, it is re-created and set up again and the same command rerun (a run resumes from
    its run directory's last checkpoint), at most ``retries`` times."""
    lost = 0
    while True:
        if not c.runner.dry_run:
            st = query(c)
            if st.kind != "healthy":
                c.log(f"{c.slice.name}: {st.state}; re-creating it")
                recreate(c, st)
                setup(c, job.rev, job.explicit, job.port, mesh, extras)
        if run_once(c, job, f"attempt {lost + 1}") == "done":
            c.event("done")
            c.log(f"{c.slice.name}: the command ended on every worker")
            return
        lost += 1
        c.event("lost", count=lost)
        if lost > retries:
            raise LaunchError(f"{c.slice.name}: lost {lost} times, more than --retries {retries}; `watch` again "
                              "re-creates it and resumes")


def status(c: Context) -> dict:
    st = query(c)
    out = {"name": c.slice.name, "type": c.slice.type, "zone": c.slice.zone, "queued": c.slice.queued,
           "state": st.state, "kind": st.kind, "addresses": list(st.addresses)}
    command = _read_json(c.dir, "command.json")
    if command is not None:
        out["command"] = command
    return out


def logs(c: Context, workers: list[int] | None, n: int) -> str:
    """The last ``n`` lines of each worker's log (all workers, or those asked)."""
    shown = []
    for i in workers if workers is not None else range(c.slice.accelerator.workers):
        path = os.path.join(c.dir, f"worker-{i}.log")
        shown.append(f"== worker {i} ({path})\n{tail(path, n) or '(no log)'}")
    return "\n".join(shown)


def stop(c: Context) -> None:
    c.runner.do(c.slice.ssh("all", remote.stop()))
    c.event("stop")


def delete(c: Context) -> None:
    c.runner.do(c.slice.delete())
    c.event("delete")


def xpk(runner: Runner, d: str, rev: str, argv: list[str], *, cluster: str, workload: str, type: str,
        base_image: str, num_slices: int = 1, max_restarts: int = 0, project: str | None = None,
        zone: str | None = None, extras: str = "tpu", env: tuple[str, ...] = ()) -> None:
    """An xpk workload on a GKE cluster running the command on every host of ``num_slices``
    slices: the revision's files are the image's script directory (xpk builds the image from
    ``base_image`` with them), the environment (``extras``) installed under the constraints at
    start (a no-op where ``base_image`` has it), ``env`` exported, and xpk restarts the workload
    up to ``max_restarts`` times."""
    acc = Accelerator.parse(type)
    code = os.path.join(d, f"code-{rev}")
    if runner.dry_run or not os.path.exists(code):  # the revision's files, unpacked once
        if not runner.dry_run:
            os.makedirs(d, exist_ok=True)
        tarball = os.path.join(d, remote.tarball(rev))
        runner.do(remote.archive(ROOT, rev, tarball + ".part"))
        runner.do(["mv", tarball + ".part", tarball])
        runner.do(["rm", "-rf", code + ".part"])
        runner.do(["mkdir", code + ".part"])
        runner.do(["tar", "-xzf", tarball, "-C", code + ".part"])
        runner.do(["mv", code + ".part", code])
    inner = remote.start_in_image(argv, extras, env)
    where = ([f"--project={project}"] if project else []) + ([f"--zone={zone}"] if zone else [])
    runner.do(["xpk", "workload", "create", f"--cluster={cluster}", f"--workload={workload}", *where,
               f"--tpu-type={acc.name}", f"--num-slices={num_slices}", f"--base-docker-image={base_image}",
               f"--script-dir={code}", f"--max-restarts={max_restarts}", f"--command={inner}"])
