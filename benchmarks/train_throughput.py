#!/usr/bin/env python
"""Train-step throughput and peak memory: longrope-jax's Optax AdamW step against transformers +
``torch.optim.AdamW`` on SmolLM2-135M, fp32, the same tokens, the same threads.

Ours: ``train.step.make_step`` (AdamW with global-norm clipping, the loss and flash backward of
``mean_nll``), jitted with the state donated, compiled once (reported apart). Peer: the
same update in PyTorch: ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``AdamW.step()``,
``zero_grad``. Each side runs in a process of its own (``--child``, steps asked for over a pipe),
stopped (SIGSTOP) while the other side steps, so neither runtime's threads run beside the
other's: with both in one process XLA's step took half as long again as alone (2026-12-07: 15.4 s
beside torch, 10.4 s alone), and 13-16 s with torch idle in a process of its own. Interleaved pairs (ours, then theirs) per repeat; the speed
ratio is the median of the pairs'. Peak memory: each side's process's peak resident set
(``VmHWM``, one process per side and length), with ours' compiled temporaries
(``memory_analysis()``) beside it.

    python benchmarks/train_throughput.py --lengths 2048 8192 --threads 2 --json out/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET = 1.0  # ours / transformers steps per second
ADAMW = dict(lr=2e-5, warmup_steps=0, schedule="constant", steps=1000, end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8,
             weight_decay=0.0, clip_norm=1.0)  # docs/method.md: the official code's recipe


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--block", type=int, default=512, help="flash attention q/kv block")
    p.add_argument("--remat", choices=["none", "full"], default="none",
                   help="full: our remat policy 'full' and transformers' gradient checkpointing, per layer on both")
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--train-command", action="store_true",
                   help="also run `longrope-jax train` on the same settings and report its steady step time "
                        "(from its metrics.jsonl), to check the benchmark measures what the command runs")
    p.add_argument("--attention", choices=["blockwise", "dense"], default="blockwise", help="ours: the kernel")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)  # the child's tokens (.npy), so it loads one model only
    return p.parse_args(argv)


def _ours(block, remat="none", attention="blockwise"):
    """(step(tokens) -> loss, compiled report fn): our train step on SmolLM2, state held inside."""
    import jax
    import jax.numpy as jnp

    from longrope_jax.loss import mean_nll
    from longrope_jax.model import rope_spec
    from longrope_jax.train import step as step_lib

    import dataclasses

    ours = _bench.load_ours()
    cfg, spec = dataclasses.replace(ours.cfg, remat=remat), rope_spec(ours.cfg)
    tx = step_lib.optimizer(ADAMW)
    fn = jax.jit(step_lib.make_step(lambda p, t: jnp.mean(mean_nll(p, t, spec, cfg=cfg, attention=attention, q_chunk=block)),
                                    tx, step_lib.schedule(ADAMW)), donate_argnums=0)
    box = {"state": step_lib.init_state(ours.params, tx)}

    def step(tokens):
        box["state"], m = fn(box["state"], jnp.asarray(tokens)[None])
        return float(m["loss"])

    def memory(tokens):
        m = fn.lower(box["state"], jnp.asarray(tokens)[None]).compile().memory_analysis()
        return {"temp_gib": m.temp_size_in_bytes / 2**30, "argument_gib": m.argument_size_in_bytes / 2**30}

    return ours, step, memory


def _peer(remat="none"):
    import numpy as np
    import torch

    peer = _bench.load_peer()
    peer.train(False)  # no dropout in either
    if remat == "full":  # HF checkpoints layers only in training mode; SmolLM2's dropout is 0 there
        peer.gradient_checkpointing_enable()
        peer.train(True)
    update = _bench.torch_adamw(peer, ADAMW)

    def step(tokens):
        return update(torch.from_numpy(np.asarray(tokens, np.int64)))

    return step


def _child(args) -> int:
    """One side in this process: loads it, then answers each command read on stdin with one JSON
    line on stdout: ``step`` (loss, seconds; the first also its compile time), ``memory`` (ours'
    compiled temporaries) and ``quit`` (peak RSS: ``VmHWM`` of this process, GiB)."""
    import numpy as np

    out = sys.stdout
    sys.stdout = sys.stderr  # the runtimes' prints stay off the protocol
    tokens = np.load(args.tokens)
    if args.child == "ours":
        _, step, memory = _ours(args.block, args.remat, args.attention)
    else:
        step, memory = _peer(args.remat), None
    import contextlib

    comp, first = (_bench.CompileLog() if args.child == "ours" else contextlib.nullcontext()), True
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            with comp:
                loss, dt = _bench.timed(step, tokens)
            reply = {"loss": loss, "seconds": dt, **({"compile_s": getattr(comp, "seconds", None)} if first else {})}
            first = False
        elif cmd == "memory":
            reply = memory(tokens) if memory else {}
        else:
            with open("/proc/self/status") as fh:
                hwm_kib = next(int(x.split()[1]) for x in fh if x.startswith("VmHWM:"))
            reply = {"max_rss_gib": hwm_kib / 2**20}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd == "quit":
            break
    return 0


class _Side:
    """A side's process (:func:`_child`) on the tokens in ``path``."""

    def __init__(self, side, path, args):
        argv = [sys.executable, os.path.abspath(__file__), "--child", side, "--tokens", path, "--block",
                str(args.block), "--remat", args.remat, "--attention", args.attention]
        argv += ["--threads", str(args.threads)] if args.threads else []
        self.side = side
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def pause(self) -> None:
        """SIGSTOP while the other side runs: an idle runtime's threads may still spin."""
        os.kill(self.p.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.p.pid, signal.SIGCONT)

    def ask(self, cmd: str) -> dict:
        try:
            self.p.stdin.write(cmd + "\n")
            self.p.stdin.flush()
            line = self.p.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise SystemExit(f"the {self.side} process exited (rc {self.p.wait()}); its stderr is above")
        return json.loads(line)

    def close(self) -> dict:
        got = self.ask("quit")
        self.p.wait()
        return got


def _train_command(n: int, args) -> dict:
    """``longrope-jax train`` on SmolLM2 with this benchmark's settings (one row of ``n`` pydoc
    tokens a step, the same AdamW, kernel, block and remat), ``repeats + 1`` steps in a process of
    its own; the steady step time is the median of ``n / tokens_per_s`` after its first step."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        argv = [sys.executable, "-m", "longrope_jax", "train", "--model", "smollm2", "--data", "pydoc:",
                f"--config.seq_len={n}", "--config.batch=1", f"--config.steps={args.repeats + 1}",
                f"--config.lr={ADAMW['lr']}", "--config.warmup_steps=0", "--config.schedule=constant",
                f"--config.clip_norm={ADAMW['clip_norm']}", f"--config.attention={args.attention}",
                f"--config.q_chunk={args.block}", f"--config.remat={args.remat}", "--config.checkpoint_every=1000",
                "--out", os.path.join(d, "run")]
        r = subprocess.run(argv, capture_output=True, text=True, cwd=_bench.REPO)
        if r.returncode:
            raise SystemExit(f"train command failed: {r.stderr[-1500:]}")
        with open(os.path.join(d, "run", "metrics.jsonl")) as fh:
            recs = [json.loads(x) for x in fh]
    seconds = [n / r["tokens_per_s"] for r in recs[1:]]
    _bench.log(f"L={n} train command: steps {', '.join(f'{x:.1f}s' for x in seconds)}")
    return {"seconds": seconds, "steady_s": _bench.median(seconds), "losses": [r["loss"] for r in recs]}


def main(argv=None) -> int:
    import tempfile

    import numpy as np

    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads, train=True)
    if args.child:
        return _child(args)
    from longrope_jax.loading import load_model

    tok = load_model("smollm2", weights=False, to_device=False).need_tokenizer()
    results, rows = [], []
    for n in args.lengths:
        with tempfile.NamedTemporaryFile(suffix=".npy") as f:
            np.save(f.name, np.asarray(_bench.pydoc_tokens(tok, n)))
            ours = _Side("ours", f.name, args)
            peer = None if args.no_peer else _Side("peer", f.name, args)
            other = {id(ours): peer, id(peer): ours}

            def step(side):  # the other side stopped meanwhile
                if other[id(side)] is not None:
                    other[id(side)].pause()
                try:
                    return side.ask("step")
                finally:
                    if other[id(side)] is not None:
                        other[id(side)].resume()

            first = step(ours)  # compile + the first update; the peer's first update matches it
            ours_t, peer_t, ratios, losses, plosses = [], [], [], [first["loss"]], []
            if peer is not None:
                plosses.append(step(peer)["loss"])
            for i in range(args.repeats):
                o = step(ours)
                ours_t.append(o["seconds"])
                losses.append(o["loss"])
                if peer is not None:
                    q = step(peer)
                    peer_t.append(q["seconds"])
                    plosses.append(q["loss"])
                    ratios.append(q["seconds"] / o["seconds"])
                    _bench.log(f"L={n} pair {i + 1}: ours {o['seconds']:.1f}s, transformers {q['seconds']:.1f}s "
                               f"({ratios[-1]:.2f}x)")
                else:
                    _bench.log(f"L={n} step {i + 1}: ours {o['seconds']:.1f}s")
            mem = ours.ask("memory")
            row = {"length": n, "ours": {"compile_s": first["compile_s"], "first_call_s": first["seconds"],
                                         "seconds": ours_t, "steady_s": _bench.median(ours_t), "losses": losses,
                                         **mem, "max_rss_gib": ours.close()["max_rss_gib"]}}
            if peer is not None:
                row["peer"] = {"seconds": peer_t, "steady_s": _bench.median(peer_t), "losses": plosses,
                               "max_rss_gib": peer.close()["max_rss_gib"]}
                row["speed_ratio"] = _bench.median(ratios)
                row["pair_ratios"] = ratios
        if args.train_command:
            row["train_command"] = _train_command(n, args)
        results.append(row)
        o, p = row["ours"], row.get("peer")
        rows.append([n, o["compile_s"], o["steady_s"], row.get("train_command", {}).get("steady_s"), p and p["steady_s"], p and f"{row['speed_ratio']:.2f}x",
                     f">= {TARGET}x: " + ("n/a" if p is None else ("met" if row["speed_ratio"] >= TARGET else "NOT met")),
                     o.get("max_rss_gib"), p and p.get("max_rss_gib"), o["temp_gib"],
                     " / ".join(f"{x:.4f}" for x in o["losses"]), p and " / ".join(f"{x:.4f}" for x in p["losses"])])
    headers = ["length", "ours compile (s)", "ours step (s)", "train command step (s)", "transformers step (s)", "speed ratio", "target",
               "ours peak RSS GiB", "transformers peak RSS GiB", "ours compiled temp GiB",
               "losses ours (per step)", "losses transformers (per step)"]
    notes = [f"SmolLM2-135M-Instruct fp32, remat {args.remat}, pydoc text (first L tokens), one row per step, AdamW lr {ADAMW['lr']}, "
             f"clip {ADAMW['clip_norm']}; {threads} thread(s) for torch and XLA; median of {args.repeats} step(s).",
             "Both sides start from the same weights and take the same updates on the same tokens, so the per-step "
             "losses should agree (to float32 rounding).",
             "Each side in its own process (one per side and length); peak RSS is that process's (VmHWM), all "
             "its steps: the model, the optimizer state and the runtime.", f"Target: >= {TARGET}x, and less memory."]
    return _bench.finish("train_throughput", args,
                         "Train step: longrope-jax (Optax AdamW) vs transformers + torch AdamW",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
