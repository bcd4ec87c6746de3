#!/usr/bin/env python
"""Where a train step's time goes, op by op: the trainer's jitted step (XLA CPU) against
transformers + torch AdamW on the same model, batch and settings, each side in a process of its own.

Ours: ``jax.profiler`` traces ``--steps`` steps after a warm-up; each XLA thunk's exclusive time
(its events minus the events nested in it, on each thread) is joined to the compiled HLO by
instruction name, which gives its kind (a dot, a fusion holding a dot, a loop fusion, a copy, the
``while``/``conditional`` control itself), its matmul FLOPs (``2 x output x contracted``) and
where in the program it comes from (its ``op_name``: attention's blockwise core, the projections,
the MLP, norms, the chunked loss, the optimizer; forward or backward). Peer: ``torch.profiler``'s
self CPU time per ATen op and its FLOPs for ``mm``/``addmm``/``bmm``.

The tables: per side the step's wall time, time in matmuls and their GFLOP/s, time in the rest;
our time by program part; the slowest ops of each side. Op times are summed over the threads that
ran them (XLA may run two thunks at once), so they may exceed the wall time.

    python benchmarks/step_profile.py --threads 2 --json benchmarks/logs/step_profile_tiny.json
    python benchmarks/step_profile.py --threads 2 --model smollm2 --set seq_len=2048 --set batch=1 --steps 2
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

CONTROL = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ")


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--config", default="tiny", help="a train config (name or file)")
    p.add_argument("--model", help="a model instead of the config's (e.g. smollm2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train setting, both sides")
    p.add_argument("--steps", type=int, default=5, help="steps profiled, after one warm-up step")
    p.add_argument("--top", type=int, default=15, help="slowest ops listed per side")
    p.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# The compiled program: what each instruction is.

_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) (\w[\w-]*)\((.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    m = _SHAPE.search(text)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def hlo_index(text: str) -> dict:
    """``{instruction: {"op", "flops", "part", "backward"}}`` of a compiled module's text. A fusion's
    FLOPs and dot-ness are those of the computation it calls."""
    comps, cur, instrs = {}, None, {}
    shapes = {}
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line and ("%" in line):
            cur = line.split("%", 1)[1].split(" ", 1)[0]
            comps[cur] = []
            continue
        m = _INSTR.match(line)
        if not m or cur is None:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = shape
        calls = re.search(r"calls=%([\w.-]+)", rest)
        meta = re.search(r'op_name="([^"]*)"', rest)
        flops = 0
        if op == "dot":
            lhs = re.match(r"%([\w.-]+)", rest)
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest).group(1)
            contracted = [int(x) for x in dims.split(",") if x]
            ldims = _dims(shapes.get(lhs.group(1), "")) if lhs else []
            k = 1
            for c in contracted:
                k *= ldims[c] if c < len(ldims) else 1
            out = 1
            for d in _dims(shape):
                out *= d
            flops = 2 * out * k
        instrs[name] = {"op": op, "calls": calls.group(1) if calls else None, "op_name": meta.group(1) if meta else "",
                        "flops": flops, "comp": cur}
        comps[cur].append(name)
    # Parameters of fused computations are named in the computation; their shapes come from the
    # ``parameter`` lines, which the pattern above records too. Fold fusions' dots into the fusion.
    for name, ins in instrs.items():
        if ins["op"] == "fusion" and ins["calls"] in comps:
            inner = [instrs[n] for n in comps[ins["calls"]]]
            ins["flops"] = sum(i["flops"] for i in inner)
            ins["dot"] = any(i["op"] in ("dot", "convolution") for i in inner)
            if not ins["op_name"]:
                ins["op_name"] = next((i["op_name"] for i in inner if i["op_name"]), "")
        else:
            ins["dot"] = ins["op"] in ("dot", "convolution")
    return {n: {"op": i["op"], "dot": i["dot"], "flops": i["flops"], "part": part_of(i["op_name"]),
                "backward": "transpose(" in i["op_name"]} for n, i in instrs.items()}


def part_of(op_name: str) -> str:
    """Which part of the step an op's ``op_name`` (JAX's name stack) belongs to; ops XLA made without
    one (some dots and fusions of the attention loop, for instance) are counted apart."""
    if not op_name:
        return "(no op_name: made by XLA)"
    if "self_attn/while" in op_name:
        return "attention core"
    for key, part in (("self_attn", "attention projections + RoPE"), ("mlp", "MLP"), ("layernorm", "norms"),
                      ("/norm", "norms"), ("embed_tokens", "embedding")):
        if key in op_name:
            return part
    if "jvp()" in op_name or "transpose(jvp())" in op_name:
        return "loss (chunked head)"
    if "Transformer" in op_name:
        return "model, other"
    return "optimizer, clip, step"


def kind_of(ins: dict | None, name: str) -> str:
    if ins is None:
        return "other"
    if ins["dot"]:
        return "matmul"
    op = ins["op"]
    if op in ("while", "conditional", "call"):
        return "control (while/cond)"
    if op in ("copy", "transpose") or "copy" in name or "transpose" in name:
        return "copy/transpose"
    if op == "fusion":
        return "elementwise/reduce fusion"
    return op


# ----------------------------------------------------------------------------------------------
# The two sides.


def _settings(args, out):
    from longrope_jax.jobs import train as train_job

    overrides = [f"--config.{x}" for x in args.set] + ([f"--config.model={args.model}"] if args.model else [])
    return train_job.resolve(args.config, overrides, {"out": out})


def _exclusive(events) -> dict:
    """``{name: [exclusive ns, count]}`` of one thread's events (nested events subtracted)."""
    out = collections.defaultdict(lambda: [0, 0])
    evs = sorted(((e.start_ns, e.duration_ns, e.name) for e in events), key=lambda x: (x[0], -x[1]))
    stack = []  # [end, name, child time, duration]

    def close(until):
        while stack and stack[-1][0] <= until:
            end, name, child, dur = stack.pop()
            out[name][0] += dur - child
            out[name][1] += 1
            if stack:
                stack[-1][2] += dur
    for start, dur, name in evs:
        close(start)
        stack.append([start + dur, name, 0, dur])
    close(float("inf"))
    return out


def ours(args, work: str) -> dict:
    import glob
    import time

    import jax
    import numpy as np
    from jax.profiler import ProfileData

    from longrope_jax.jobs import train as train_job
    from longrope_jax.model import rope_spec
    from longrope_jax.train import trainer as trainer_lib

    s = _settings(args, os.path.join(work, "run"))
    os.makedirs(os.path.join(work, "first"), exist_ok=True)
    cfg, params, _, _, _, _ = train_job.initial_model(s, os.path.join(work, "first"), _bench.log)
    tr = trainer_lib.Trainer(cfg, rope_spec(cfg), s)
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (64, s["seq_len"])).astype(np.int32)
    np.save(os.path.join(work, "rows.npy"), rows)
    state = tr.init_state(params)
    batch = tr.place(next(tr.batches(rows, 0)))
    index = hlo_index(tr.train_step.lower(state, batch).compile().as_text())
    state, m = tr.train_step(state, batch)
    float(m["loss"])
    trace = os.path.join(work, "trace")
    with jax.profiler.trace(trace):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = tr.train_step(state, batch)
            float(m["loss"])
        wall = (time.perf_counter() - t0) / args.steps
    xspace = sorted(glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True))[-1]
    per = collections.defaultdict(lambda: [0, 0])
    for plane in ProfileData.from_file(xspace).planes:
        for line in plane.lines:
            if line.name.startswith("tf_XLA"):
                for name, (ns, n) in _exclusive(line.events).items():
                    per[name][0] += ns
                    per[name][1] += n
    ops = []
    for name, (ns, n) in per.items():
        if name.startswith(CONTROL) or not ns:
            continue
        ins = index.get(name)
        ops.append({"name": name, "ms": ns / 1e6 / args.steps, "calls": n / args.steps, "kind": kind_of(ins, name),
                    "part": ins["part"] if ins else "?", "backward": bool(ins and ins["backward"]),
                    "gflop": ins["flops"] * (n / args.steps) / 1e9 if ins else 0.0})
    return {"wall_ms": wall * 1e3, "ops": ops, "tokens": tr.tokens_per_step}


def torch_side(args, work: str) -> dict:
    import dataclasses
    import time

    import numpy as np
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    from longrope_jax import checkpoint
    from longrope_jax.jobs import convert
    from longrope_jax.jobs import train as train_job
    from longrope_jax.train import step as step_lib

    _bench.torch_threads()
    s = _settings(args, os.path.join(work, "run"))
    cfg, params, _, tok_path, _, _ = train_job.initial_model(s, os.path.join(work, "first"), _bench.log)
    checkpoint.save(os.path.join(work, "init"), dataclasses.replace(cfg, remat="none"), params, tokenizer_file=tok_path)
    convert.run(os.path.join(work, "init"), os.path.join(work, "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(work, "hf"), torch_dtype=torch.float32,
                                                              attn_implementation="sdpa")
    model.train(False)
    batch = torch.from_numpy(np.load(os.path.join(work, "rows.npy"))[:s["batch"]].astype(np.int64))
    lr, update = step_lib.schedule(s), _bench.torch_adamw(model, s)

    def step(t):
        return update(batch, lr(t))

    step(0)
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        t0 = time.perf_counter()
        for t in range(args.steps):
            step(t + 1)
        wall = (time.perf_counter() - t0) / args.steps
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / args.steps
        if ms <= 0:
            continue
        name = e.key
        mm = name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
        kind = ("matmul" if mm else "attention kernel (SDPA)" if "scaled_dot_product" in name or "flash" in name
                else "optimizer (foreach)" if "_foreach" in name
                else "copy/transpose" if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::t")
                else "elementwise/other")
        ops.append({"name": name, "ms": ms, "calls": e.count / args.steps, "kind": kind, "part": "",
                    "backward": False, "gflop": (e.flops or 0) / args.steps / 1e9})
    return {"wall_ms": wall * 1e3, "ops": ops, "tokens": int(batch.numel())}


# ----------------------------------------------------------------------------------------------


def _summary(side: dict) -> dict:
    by = collections.defaultdict(float)
    for o in side["ops"]:
        by[o["kind"]] += o["ms"]
    mm = [o for o in side["ops"] if o["kind"] == "matmul"]
    mm_ms, mm_gf = sum(o["ms"] for o in mm), sum(o["gflop"] for o in mm)
    return {"wall_ms": side["wall_ms"], "op_ms": sum(by.values()), "matmul_ms": mm_ms, "matmul_gflop": mm_gf,
            "matmul_gflops": mm_gf / (mm_ms / 1e3) if mm_ms else 0.0, "by_kind": dict(by)}


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads, train=True)
    if args.side:
        print(json.dumps((ours if args.side == "ours" else torch_side)(args, args.work)))
        return 0
    got = {}
    with tempfile.TemporaryDirectory() as work:
        for side in ("ours", "torch"):  # ours first: it writes the rows both sides train on
            _bench.log(f"profiling {side} ({args.steps} steps)")
            got[side] = _bench.run_side(__file__, side, [
                "--work", work, "--threads", str(threads), "--config", args.config, "--steps", str(args.steps),
                *[f"--set={x}" for x in args.set], *(["--model", args.model] if args.model else [])])
    o, t = _summary(got["ours"]), _summary(got["torch"])
    kinds = sorted(set(o["by_kind"]) | set(t["by_kind"]),
                   key=lambda k: -(o["by_kind"].get(k, 0) + t["by_kind"].get(k, 0)))

    def fmt(x):
        return f"{x:.1f}"
    summary = _bench.md_table(
        ["", "ours (XLA CPU)", "transformers + torch", "ratio (torch / ours)"],
        [["step wall (ms)", fmt(o["wall_ms"]), fmt(t["wall_ms"]), f"{t['wall_ms'] / o['wall_ms']:.2f}x"],
         ["op time, all threads (ms)", fmt(o["op_ms"]), fmt(t["op_ms"]), f"{t['op_ms'] / o['op_ms']:.2f}x"],
         ["matmul GFLOP", f"{o['matmul_gflop']:.2f}", f"{t['matmul_gflop']:.2f}", ""],
         ["matmul GFLOP/s", fmt(o["matmul_gflops"]), fmt(t["matmul_gflops"]),
          f"{t['matmul_gflops'] / o['matmul_gflops']:.2f}x" if o["matmul_gflops"] else ""],
         *[[f"{k} (ms)", fmt(o["by_kind"].get(k, 0)), fmt(t["by_kind"].get(k, 0)), ""] for k in kinds]])
    parts = collections.defaultdict(lambda: collections.defaultdict(float))
    for op in got["ours"]["ops"]:
        column = ("bwd " if op["backward"] else "fwd ") + ("matmul" if op["kind"] == "matmul" else "other")
        parts[op["part"]][column] += op["ms"]
    cols = ["fwd matmul", "fwd other", "bwd matmul", "bwd other"]
    part_rows = sorted(([p, *[fmt(v[c]) for c in cols], fmt(sum(v.values()))] for p, v in parts.items()),
                       key=lambda r: -float(r[-1]))
    by_part = _bench.md_table(["ours: part", *[f"{c} (ms)" for c in cols], "total (ms)"], part_rows)

    def top(side):
        ops = sorted(got[side]["ops"], key=lambda x: -x["ms"])[:args.top]
        return _bench.md_table(
            [f"{side}: op", "kind", "part", "ms / step", "calls / step", "GFLOP/s"],
            [[x["name"], x["kind"], (("bwd " if x["backward"] else "fwd ") + x["part"]) if side == "ours" else "",
              f"{x['ms']:.2f}", f"{x['calls']:g}", f"{x['gflop'] / (x['ms'] / 1e3):.1f}" if x["gflop"] else ""]
             for x in ops])

    notes = [f"config {args.config}{' model ' + args.model if args.model else ''}, settings "
             f"{', '.join(args.set) or 'as configured'}; {got['ours']['tokens']} tokens a step; {args.steps} steps "
             f"profiled after one warm-up; {threads} thread(s) each side, each side in a process of its own.",
             "Op times are exclusive (nested events subtracted) and summed over threads; matmul GFLOP/s = the "
             "dots' FLOPs over their time (ours: dots and fusions holding one; torch: mm/addmm/bmm; SDPA's "
             "own matmuls are in its kernel's row)."]
    return _bench.finish("step_profile", args, "A train step op by op: ours (XLA CPU) against transformers + torch",
                         [summary, by_part, top("ours"), top("torch")], notes, results={"ours": o, "torch": t},
                         ops=got)


if __name__ == "__main__":
    sys.exit(main())
