"""The demo's pipeline shrunk to a 64-token window (every stage kind, a few seconds each), run as
a command, and what its stages leave: shared by the pipeline, notebook and storage tests, which
all compare with one uninterrupted run (``conftest.extend_whole``)."""

from __future__ import annotations

import json
import os
import subprocess

from processes import command_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device, so a search scores (and logs) one candidate per call; checkpoints every step, so a
# kill lands between.
SHRINK = ["--config.shared.window=64", "--config.shared.ft_steps=3", "--config.shared.pretrain_steps=6",
          "--config.shared.population=4", "--config.shared.iterations=1", "--config.shared.lengths=[64,512,1024]",
          "--config.stages.pretrain.batch=4", *[f"--config.stages.{s}.checkpoint_every=1"
                                                for s in ("ft_longrope", "ft_pi", "ft_yarn")]]


def extend_argv(out, *extra, config="tiny", shrink=SHRINK):
    return command_argv("extend", "--config", config, "--out", str(out), *shrink, *extra)


def extend(out, *extra, wait=True, devices=1, env=None, **kw):
    env = dict(os.environ, **(env or {}), JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    argv = extend_argv(out, *extra, **kw)
    if not wait:
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)


def results(out, named=None):
    """What a pipeline's stages leave in ``out``: losses, factors, perplexities (the ropes they name
    relative to the run directory, which they name ``named``: default ``out``; a URL for a run on a
    store)."""
    got = {}
    for d in sorted(os.listdir(out)):
        path = os.path.join(out, d)
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            with open(os.path.join(path, "metrics.jsonl")) as fh:
                got[d] = [r["loss"] for r in map(json.loads, fh)]
        if os.path.exists(os.path.join(path, "factors.json")):
            with open(os.path.join(path, "factors.json")) as fh:
                f = json.load(fh)
            got[d] = (f["long_factor"], f["short_factor"], f.get("per_length"))
        if os.path.exists(os.path.join(path, "ppl.jsonl")):
            with open(os.path.join(path, "ppl.jsonl")) as fh:
                rows = map(json.loads, fh)
                got[d] = [(r["rope"].replace(str(named or out), ""), r["length"], r["ppl"]) for r in rows]
    return got
