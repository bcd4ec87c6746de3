#!/usr/bin/env python
"""One attention layer, forward and forward + backward: the flash kernel against torch's SDPA.

SmolLM2's attention shapes (9 query heads, 3 kv heads, head dim 64), causal, fp32, one row of
``--lengths`` tokens. Ours: ``blockwise_attention`` (``--blocks`` q x kv for the forward, its
backward in ``BWD_BLOCK``-token blocks), loss ``sum(out**2)``, ``jax.grad`` over q, k, v.
Peer in the same run: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)`` with ``.backward()``. Best of ``--repeats`` after a warm-up each; each side
in a process of its own (with torch loaded beside it, XLA's train step ran half as long again:
``train_throughput.py``). This
isolates attention from the rest of the model's step (``grad_throughput.py``).

    python benchmarks/attention_throughput.py --lengths 4096 --threads 2 --json out/attention_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096])
    p.add_argument("--blocks", type=int, nargs="+", default=[512, 256], help="forward q/kv block sizes to measure")
    p.add_argument("--bwd-block", type=int, help="override blockwise.BWD_BLOCK")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _measure(side: str, n: int, args) -> dict:
    """One side's best times at ``n`` tokens in this process: ``{"fwd": s, "fwd_bwd": s}`` for the
    peer, ``{block: {...}}`` for ours."""
    import numpy as np

    h, kvh, d = 9, 3, 64
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, n, x, d), np.float32) for x in (h, kvh, kvh))
    if side == "torch":
        torch = _bench.torch_threads()
        qt, kt, vt = (torch.tensor(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def peer_fwd():
            with torch.no_grad():
                sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)

        def peer_grad():
            o = sdpa(qt, kt, vt, is_causal=True, enable_gqa=True)
            (o * o).sum().backward()

        return {"fwd": _bench.best(peer_fwd, args.repeats), "fwd_bwd": _bench.best(peer_grad, args.repeats)}
    import jax
    import jax.numpy as jnp

    from longrope_jax.attention import blockwise

    if args.bwd_block:
        blockwise.BWD_BLOCK = args.bwd_block
    pos = jnp.arange(n, dtype=jnp.int32)[None]
    out = {}
    for blk in args.blocks:
        def attn(q, k, v, blk=blk):
            return blockwise.blockwise_attention(q, k, v, q_positions=pos, kv_positions=pos, block_q=blk,
                                                 block_kv=blk)

        fwd = jax.jit(attn)
        grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.square(attn(q, k, v))), argnums=(0, 1, 2)))
        out[blk] = {"fwd": _bench.best(lambda: jax.block_until_ready(fwd(q, k, v)), args.repeats),
                    "fwd_bwd": _bench.best(lambda: jax.block_until_ready(grad(q, k, v)), args.repeats),
                    "bwd_block": min(blk, blockwise.BWD_BLOCK)}
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    if args.side:  # one side at one length, in a process of its own
        print(json.dumps(_measure(args.side, args.lengths[0], args)))
        return 0
    rows, results = [], []
    for n in args.lengths:
        got = {}
        for side in ("torch", "ours"):  # each in a process of its own: neither runtime's threads beside the other's
            argv = ["--lengths", str(n), "--repeats", str(args.repeats), "--blocks", *map(str, args.blocks),
                    "--threads", str(threads)] + (["--bwd-block", str(args.bwd_block)] if args.bwd_block else [])
            got[side] = _bench.run_side(__file__, side, argv)
        pf, pg = got["torch"]["fwd"], got["torch"]["fwd_bwd"]
        for blk, o in got["ours"].items():
            of, og = o["fwd"], o["fwd_bwd"]
            results.append({"length": n, "block": int(blk), "bwd_block": o["bwd_block"], "ours_fwd_s": of,
                            "ours_fwd_bwd_s": og, "torch_fwd_s": pf, "torch_fwd_bwd_s": pg})
            rows.append([n, f"{blk} / {o['bwd_block']}", of, pf, f"{pf / of:.2f}x", og, pg, f"{pg / og:.2f}x"])
            _bench.log(f"L={n} block {blk}: ours fwd {of:.3f}s fwd+bwd {og:.3f}s; torch {pf:.3f}s / {pg:.3f}s")
    headers = ["length", "block fwd / bwd", "ours fwd (s)", "torch fwd (s)", "fwd ratio", "ours fwd+bwd (s)",
               "torch fwd+bwd (s)", "fwd+bwd ratio"]
    notes = [f"one attention layer, 9 q heads / 3 kv heads / head dim 64, causal, fp32, {threads} thread(s); "
             f"best of {args.repeats}; ratio = torch seconds / ours seconds; each side in a process of its own."]
    return _bench.finish("attention_throughput", args, "Attention layer: flash kernel vs torch SDPA",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
