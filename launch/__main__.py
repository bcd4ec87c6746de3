"""``python -m launch VERB ...``: TPU slices for longrope-jax over the Google Cloud CLI (docs/pods.md).

    python -m launch create NAME --zone us-east5-a --type v5p-64 --queued --provisioning spot
    python -m launch setup NAME
    python -m launch run NAME -- longrope-jax extend --config llama2_7b_2048k --out /mnt/runs/llama2
    python -m launch watch NAME --retries 10          # the last command, re-created and resumed
    python -m launch status|logs|stop|delete NAME
    python -m launch xpk --cluster C --workload W --type v5p-64 --base-image IMAGE -- longrope-jax ...

``--dry-run`` on every verb that changes something prints the commands it would run, one a line.
"""

import argparse
import dataclasses
import json
import sys

from . import remote, verbs
from .runner import Runner, raise_if_missing
from .slices import PROVISIONING, LaunchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--launch-dir", help="the launcher's own files: slices, commands, worker logs "
                                             "(default ~/.longrope-jax/launch)")
    common.add_argument("--poll", type=float, default=30.0, help="seconds between polls of the slice (default 30)")
    where = argparse.ArgumentParser(add_help=False, parents=[common])
    where.add_argument("name", metavar="NAME", help="the slice (a TPU VM, or a queued resource and its node)")
    where.add_argument("--zone", help="e.g. us-east5-a (remembered from create)")
    where.add_argument("--project", help="the Cloud project (default: gcloud's)")
    where.add_argument("--type", help="accelerator type: v4-32, v5p-64, v5litepod-16, v6e-256, ...")
    where.add_argument("--runtime", help="TPU runtime version (default: the generation's, e.g. v2-alpha-tpuv5)")
    where.add_argument("--queued", action="store_true", default=None, help="a queued resource, not a TPU VM")
    where.add_argument("--provisioning", choices=PROVISIONING,
                       help="on-demand (default), spot, reserved, or best-effort (queued only)")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    code = argparse.ArgumentParser(add_help=False)
    code.add_argument("--revision", help="the git revision to ship (default HEAD)")
    code.add_argument("--allow-dirty", action="store_true", help="ship uncommitted changes to tracked files")
    code.add_argument("--explicit-processes", action="store_true",
                      help="give each worker --coordinator/--num-processes/--process-id from the slice's worker "
                           "addresses, where the TPU environment's own detection is not available")
    code.add_argument("--port", type=int, help=f"the coordinator's port (default {remote.PORT})")
    command = argparse.ArgumentParser(add_help=False)
    command.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                         help="an environment variable for the command on every worker (repeatable), e.g. "
                              "TFDS_DATA_DIR=/mnt/tfds")

    s = sub.add_parser("create", parents=[where, dry], help="ask for the slice (reused where it exists); wait for it")
    s.add_argument("--timeout", type=float, help="seconds to wait for it to be ready (default: no limit)")
    env = argparse.ArgumentParser(add_help=False)
    env.add_argument("--mesh", help="the mesh the command will use; checked against the slice's devices")
    env.add_argument("--extras", help="the package's extras to install (default tpu; tpu,tfds for tfds: sources); "
                                      "watch's setups after a re-creation take setup's")
    sub.add_parser("setup", parents=[where, dry, code, env],
                   help="ship the revision, install its pinned environment on every worker, check each worker's "
                        "devices")
    sub.add_parser("run", parents=[where, dry, code, command],
                   help="run `-- longrope-jax ...` on every worker; the first failure stops all")
    s = sub.add_parser("watch", parents=[where, dry, code, command, env],
                       help="run and re-create the slice when it is lost, resuming the command (the last one run, "
                            "with its revision and start-up, where none is given)")
    s.add_argument("--retries", type=int, default=10, help="how many losses to recover from (default 10)")
    sub.add_parser("status", parents=[where], help="the slice's state and the last command (JSON on stdout)")
    s = sub.add_parser("logs", parents=[where], help="the last lines of each worker's log")
    s.add_argument("--worker", type=int, action="append", help="only this worker (repeatable)")
    s.add_argument("-n", type=int, default=20, help="lines per worker (default 20)")
    sub.add_parser("stop", parents=[where, dry], help="signal the running command on every worker (SIGTERM: a "
                                                      "training run saves its step and exits)")
    sub.add_parser("delete", parents=[where, dry], help="give the slice back")

    s = sub.add_parser("xpk", parents=[common, dry, code, command],
                       help="the command as an xpk workload on a GKE cluster")
    s.add_argument("--extras", default="tpu", help="the package's extras installed at start (default tpu)")
    s.add_argument("--cluster", required=True)
    s.add_argument("--workload", required=True)
    s.add_argument("--type", required=True, help="accelerator type, e.g. v5p-64")
    s.add_argument("--base-image", required=True,
                   help="the image xpk builds on (Python with pip; the environment preinstalled makes the start quick)")
    s.add_argument("--num-slices", type=int, default=1)
    s.add_argument("--max-restarts", type=int, default=0, help="xpk's restarts of a failed or preempted workload")
    s.add_argument("--project")
    s.add_argument("--zone")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = _parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    runner = Runner(dry_run=getattr(args, "dry_run", False))
    try:
        if not runner.dry_run and args.verb not in ("logs",):
            raise_if_missing("xpk" if args.verb == "xpk" else "gcloud")
        if args.verb == "xpk":
            d = remote.local_dir(args.launch_dir, args.workload)
            rev = remote.revision(verbs.ROOT, args.revision, args.allow_dirty)
            verbs.xpk(runner, d, rev, command, cluster=args.cluster, workload=args.workload, type=args.type,
                      base_image=args.base_image, num_slices=args.num_slices, max_restarts=args.max_restarts,
                      project=args.project, zone=args.zone, extras=args.extras, env=tuple(args.env))
            return 0
        d = remote.local_dir(args.launch_dir, args.name)
        given = dict(zone=args.zone, project=args.project, type=args.type, runtime=args.runtime, queued=args.queued,
                     provisioning=args.provisioning)
        c = verbs.Context(verbs.load_slice(d, args.name, given), runner, d, args.poll)
        if args.verb == "create":
            verbs.create(c, args.timeout)
        elif args.verb in ("setup", "run", "watch"):
            if args.verb == "watch" and not command:  # the last command, as it ran
                job = verbs.last_job(c)
                job = dataclasses.replace(job, rev=remote.revision(verbs.ROOT, args.revision or job.rev, True),
                                          explicit=args.explicit_processes or job.explicit,
                                          port=args.port or job.port, env=tuple(args.env) or job.env)
            else:
                job = verbs.Job(remote.revision(verbs.ROOT, args.revision, args.allow_dirty), tuple(command),
                                args.explicit_processes, args.port or remote.PORT, tuple(getattr(args, "env", ())))
            env = verbs.setup_options(c, getattr(args, "mesh", None), getattr(args, "extras", None))
            if args.verb == "setup":
                verbs.setup(c, job.rev, job.explicit, job.port, **env)
            elif args.verb == "run":
                if verbs.run_once(c, job, "run") == "lost":
                    raise LaunchError(f"{args.name}: not ready or lost (see `status`); `create` it, or `watch` "
                                      "re-creates it and resumes")
            else:
                verbs.watch(c, job, args.retries, **env)
        elif args.verb == "status":
            print(json.dumps(verbs.status(c)))
        elif args.verb == "logs":
            print(verbs.logs(c, args.worker, args.n))
        elif args.verb == "stop":
            verbs.stop(c)
        elif args.verb == "delete":
            verbs.delete(c)
        return 0
    except LaunchError as e:
        print(f"launch {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"launch {args.verb}: interrupted; the workers' commands go on (`stop` ends them)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
