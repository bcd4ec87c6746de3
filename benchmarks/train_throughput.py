#!/usr/bin/env python
"""Train-step throughput and peak memory: longrope-jax's Optax AdamW step against transformers +
``torch.optim.AdamW`` on SmolLM2-135M, fp32, the same tokens, the same threads.

Ours: ``train.step.make_step`` (AdamW with global-norm clipping, the loss and flash backward of
``mean_nll``), jitted with the state donated, compiled once (reported apart). Peer: the
same update in PyTorch: ``loss.backward()``, ``clip_grad_norm_(1.0)``, ``AdamW.step()``,
``zero_grad``. Interleaved pairs (ours, then theirs) per repeat; the speed ratio is the median of
the pairs'. Peak memory: each side runs its step twice in a fresh child process (``--child``),
and the child's peak resident set (``VmHWM``) is reported, with ours' compiled temporaries
(``memory_analysis()``) beside it.

    python benchmarks/train_throughput.py --lengths 2048 8192 --threads 2 --json out/train_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--no-memory", action="store_true", help="skip the child processes' peak memory")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)  # the child's tokens (.npy), so it loads one model only
    return p.parse_args(argv)


def _ours(block, remat="none"):
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
    fn = jax.jit(step_lib.make_step(lambda p, t: jnp.mean(mean_nll(p, t, spec, cfg=cfg, q_chunk=block)),
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
    opt = torch.optim.AdamW(peer.parameters(), lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                            weight_decay=ADAMW["weight_decay"])

    def step(tokens):
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        loss = peer(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(peer.parameters(), ADAMW["clip_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def _child(args) -> int:
    """One side, two steps on ``--tokens`` in this fresh process; prints its peak RSS (GiB) as JSON:
    ``VmHWM`` of this process's address space (``ru_maxrss`` would carry the forking parent's)."""
    import numpy as np

    step = _ours(args.block, args.remat)[1] if args.child == "ours" else _peer(args.remat)
    tokens = np.load(args.tokens)
    step(tokens)
    step(tokens)
    with open("/proc/self/status") as fh:
        hwm_kib = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    print(json.dumps({"max_rss_gib": hwm_kib / 2**20}))
    return 0


def _peak(side, tokens, args) -> float | None:
    import tempfile

    import numpy as np

    with tempfile.NamedTemporaryFile(suffix=".npy") as f:
        np.save(f.name, np.asarray(tokens))
        argv = [sys.executable, os.path.abspath(__file__), "--child", side, "--tokens", f.name, "--block",
                str(args.block), "--remat", args.remat] + (["--threads", str(args.threads)] if args.threads else [])
        r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        _bench.log(f"{side} child at L={np.asarray(tokens).shape[-1]} failed: {r.stderr[-500:]}")
        return None
    peak = json.loads(r.stdout.splitlines()[-1])["max_rss_gib"]
    _bench.log(f"{side} child at L={np.asarray(tokens).shape[-1]}: peak RSS {peak:.2f} GiB")
    return peak


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    if args.child:
        return _child(args)
    comp = _bench.CompileLog()
    ours, our_step, our_memory = _ours(args.block, args.remat)
    peer_step = None if args.no_peer else _peer(args.remat)
    results, rows = [], []
    for n in args.lengths:
        tokens = _bench.pydoc_tokens(ours.tokenizer, n)
        with comp:
            loss0, first = _bench.timed(our_step, tokens)
        ours_t, peer_t, ratios, losses, plosses = [], [], [], [loss0], []
        if peer_step is not None:
            plosses.append(_bench.timed(peer_step, tokens)[0])  # its warm-up step, the same update as our first
        for i in range(args.repeats):
            loss, dt = _bench.timed(our_step, tokens)
            ours_t.append(dt)
            losses.append(loss)
            if peer_step is not None:
                ploss, pdt = _bench.timed(peer_step, tokens)
                peer_t.append(pdt)
                plosses.append(ploss)
                ratios.append(pdt / dt)
                _bench.log(f"L={n} pair {i + 1}: ours {dt:.1f}s, transformers {pdt:.1f}s ({ratios[-1]:.2f}x)")
        row = {"length": n, "ours": {"compile_s": comp.seconds, "first_call_s": first, "seconds": ours_t,
                                     "steady_s": _bench.median(ours_t), "losses": losses, **our_memory(tokens)}}
        if peer_step is not None:
            row["peer"] = {"seconds": peer_t, "steady_s": _bench.median(peer_t), "losses": plosses}
            row["speed_ratio"] = _bench.median(ratios)
            row["pair_ratios"] = ratios
        if not args.no_memory:
            row["ours"]["max_rss_gib"] = _peak("ours", tokens, args)
            if peer_step is not None:
                row["peer"]["max_rss_gib"] = _peak("peer", tokens, args)
        results.append(row)
        o, p = row["ours"], row.get("peer")
        rows.append([n, o["compile_s"], o["steady_s"], p and p["steady_s"], p and f"{row['speed_ratio']:.2f}x",
                     f">= {TARGET}x: " + ("n/a" if p is None else ("met" if row["speed_ratio"] >= TARGET else "NOT met")),
                     o.get("max_rss_gib"), p and p.get("max_rss_gib"), o["temp_gib"],
                     " / ".join(f"{x:.4f}" for x in o["losses"]), p and " / ".join(f"{x:.4f}" for x in p["losses"])])
    headers = ["length", "ours compile (s)", "ours step (s)", "transformers step (s)", "speed ratio", "target",
               "ours peak RSS GiB", "transformers peak RSS GiB", "ours compiled temp GiB",
               "losses ours (per step)", "losses transformers (per step)"]
    notes = [f"SmolLM2-135M-Instruct fp32, remat {args.remat}, pydoc text (first L tokens), one row per step, AdamW lr {ADAMW['lr']}, "
             f"clip {ADAMW['clip_norm']}; {threads} thread(s) for torch and XLA; median of {args.repeats} step(s).",
             "Both sides start from the same weights and take the same updates on the same tokens, so the per-step "
             "losses should agree (to float32 rounding).",
             "peak RSS: a fresh child process per side and length, two steps; it includes the model, the optimizer "
             "state and the runtime.", f"Target: >= {TARGET}x, and less memory."]
    return _bench.finish("train_throughput", args,
                         "Train step: longrope-jax (Optax AdamW) vs transformers + torch AdamW",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
