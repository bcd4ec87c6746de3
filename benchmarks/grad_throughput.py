#!/usr/bin/env python
"""Forward + backward time of one window: longrope-jax's loss gradient against transformers'
``loss.backward()`` (PyTorch, SDPA), SmolLM2-135M fp32, the same tokens, the same threads.

Ours: ``jax.jit(jax.value_and_grad(loss))`` of the mean next-token NLL, blockwise attention with
its flash backward (``--block``) and the loss in 1024-token chunks; compiled once (reported
apart), then timed ``--repeats`` times. Peer: ``model(input_ids, labels=).loss.backward()`` with
gradients zeroed between runs, after one untimed warm-up step of ``--peer-warmup-tokens``. Each
of its runs follows one of ours (interleaved pairs) and the ratio is the median of the pairs'.
The losses and a gradient norm are compared as a check that both computed the same thing.

    python benchmarks/grad_throughput.py --lengths 4096 --threads 2 --json out/grad_throughput.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET = 1.0  # ours / transformers steps per second


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--block", type=int, default=512, help="flash attention q/kv block")
    p.add_argument("--peer-warmup-tokens", type=int, default=256)
    p.add_argument("--no-peer", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads, train=True)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from longrope_jax.loss import mean_nll
    from longrope_jax.model import rope_spec

    comp = _bench.CompileLog()
    ours = _bench.load_ours()
    cfg, spec = ours.cfg, rope_spec(ours.cfg)
    grad_fn = jax.jit(jax.value_and_grad(
        lambda p, t: jnp.mean(mean_nll(p, t, spec, cfg=cfg, q_chunk=args.block))))
    peer = None if args.no_peer else _bench.load_peer()
    torch = None
    if peer is not None:
        import torch

        peer.train(False)  # no dropout in either

    def peer_step(tokens):
        ids = torch.from_numpy(np.asarray(tokens, np.int64))
        peer.zero_grad(set_to_none=True)
        loss = peer(input_ids=ids, labels=ids).loss
        loss.backward()
        return float(loss), float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in peer.parameters()
                                                 if p.grad is not None)))

    if peer is not None and args.peer_warmup_tokens:
        peer_step(_bench.pydoc_tokens(ours.tokenizer, args.peer_warmup_tokens))

    def our_step(tokens):
        loss, g = grad_fn(ours.params, jnp.asarray(tokens))
        norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g))))
        return float(loss), norm

    results, rows = [], []
    for n in args.lengths:
        tokens = _bench.pydoc_tokens(ours.tokenizer, n)
        with comp:
            (loss, norm), first = _bench.timed(our_step, tokens)
        # Pairs interleaved (ours, then transformers, per repeat): this machine's speed drifts by
        # more than the difference measured, so only a ratio within a pair is meaningful.
        times, pt, ratios, (ploss, pnorm) = [], [], [], (None, None)
        for i in range(args.repeats):
            times.append(_bench.timed(our_step, tokens)[1])
            if peer is not None:
                (ploss, pnorm), dt = _bench.timed(peer_step, tokens)
                pt.append(dt)
                ratios.append(dt / times[-1])
                _bench.log(f"L={n} pair {i + 1}: ours {times[-1]:.1f}s, transformers {dt:.1f}s ({ratios[-1]:.2f}x)")
        row = {"length": n, "ours": {"loss": loss, "grad_norm": norm, "compile_s": comp.seconds, "first_call_s": first,
                                     "seconds": times, "steady_s": _bench.median(times)}}
        _bench.log(f"L={n}: ours {row['ours']['steady_s']:.1f}s (loss {loss:.4f}, |g| {norm:.4f})")
        if peer is not None:
            row["peer"] = {"loss": ploss, "grad_norm": pnorm, "seconds": pt, "steady_s": _bench.median(pt)}
            row["pair_ratios"] = ratios
            row["speed_ratio"] = _bench.median(ratios)
            _bench.log(f"L={n}: transformers {row['peer']['steady_s']:.1f}s (loss {ploss:.4f}, |g| {pnorm:.4f})")
        results.append(row)
        o, p = row["ours"], row.get("peer")
        spread = p and f"{min(row['pair_ratios']):.2f}-{max(row['pair_ratios']):.2f}"
        rows.append([n, o["compile_s"], o["steady_s"], p and p["steady_s"], p and f"{row['speed_ratio']:.2f}x", spread,
                     f">= {TARGET}x: " + ("n/a" if p is None else ("met" if row["speed_ratio"] >= TARGET else "NOT met")),
                     o["loss"], p and p["loss"], o["grad_norm"], p and p["grad_norm"]])
    headers = ["length", "ours compile (s)", "ours fwd+bwd (s)", "transformers fwd+bwd (s)", "speed ratio",
               "pair ratios (min-max)", "target",
               "loss ours", "loss transformers", "|grad| ours", "|grad| transformers"]
    notes = [f"SmolLM2-135M-Instruct fp32, pydoc text (first L tokens), rope none; {threads} thread(s) for torch and XLA; "
             f"median of {args.repeats} step(s) after compilation (ours) / a warm-up step (transformers).",
             f"Ours: blockwise attention, flash backward, {args.block}-token blocks, loss in 1024-token chunks. "
             "speed ratio = median over interleaved pairs (ours, then transformers) of transformers seconds / ours seconds.",
             f"Target: >= {TARGET}x."]
    return _bench.finish("grad_throughput", args,
                         "Forward + backward of one window: longrope-jax vs transformers (SDPA)",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
