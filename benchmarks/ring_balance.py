#!/usr/bin/env python
"""Blocks the causal ring computes per device, in contiguous and in zigzag order.

For each sequence axis size n, device i at ring step s meets the k/v chunk of device
(i - s) mod n; every (query block, key block) pair is classified by the kernel's own test
(``blockwise.block_kind`` on the pair's global positions, as the ring runs it): skipped, or
computed (fully visible or masked). Devices move in lockstep (each step ends in a rotation), so
a step takes as long as its busiest device: the critical path is the sum over steps of the most
blocks any device computes. The peer in the same table is the contiguous order; the ideal is
the total work over n. Nothing runs on a device: the positions are the layouts'.

    python benchmarks/ring_balance.py --length 131072 --block 512 --mesh-sizes 4 8 32 --json out/ring_balance.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--length", type=int, default=131072)
    p.add_argument("--block", type=int, default=512, help="q and kv block (the ring's block_q / block_kv)")
    p.add_argument("--mesh-sizes", type=int, nargs="+", default=[4, 8, 32])
    return p.parse_args(argv)


def computed_blocks(length: int, n: int, block: int, zig: bool):
    """int[n, n]: blocks computed by device i at ring step s (causal)."""
    import jax
    import numpy as np

    from longrope_jax.attention import blockwise as bw
    from longrope_jax.parallel import zigzag

    pos = zigzag.order(length, n) if zig else np.arange(length, dtype=np.int32)
    local = length // n
    block = min(block, local)
    if local % block:
        raise SystemExit(f"--block {block}: must divide the {local} tokens per device")
    blocks = pos.reshape(n, local // block, 1, block)  # [device, block, B=1, tokens]
    kind = jax.jit(jax.vmap(jax.vmap(jax.vmap(bw.block_kind, (None, 0)), (0, None))))  # [device, q block, kv block]
    out = np.zeros((n, n), np.int64)
    for s in range(n):
        src = (np.arange(n) - s) % n
        out[:, s] = (np.asarray(kind(blocks, blocks[src])) != bw.SKIP).sum(axis=(1, 2))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    rows, results = [], []
    for n in args.mesh_sizes:
        if args.length % (2 * n):
            raise SystemExit(f"--length {args.length}: must be divisible by 2 x {n}")
        res = {}
        for zig in (False, True):
            c = computed_blocks(args.length, n, args.block, zig)
            res[zig] = {"per_device": c.sum(1).tolist(), "critical_path": int(c.max(0).sum()), "total": int(c.sum())}
        ideal = res[False]["total"] / n
        for zig in (False, True):
            r = res[zig]
            rows.append([n, "zigzag" if zig else "contiguous", min(r["per_device"]), max(r["per_device"]), r["total"],
                         r["critical_path"], f"{r['critical_path'] / ideal:.2f}",
                         f"{res[False]['critical_path'] / r['critical_path']:.2f}x"])
        results.append({"sequence": n, "contiguous": res[False], "zigzag": res[True]})
    headers = ["sequence", "order", "blocks, least busy device", "blocks, busiest device", "total blocks",
               "critical path (blocks)", "critical path / ideal", "speed-up over contiguous"]
    notes = [f"causal, {args.length} tokens, {args.block}-token q and kv blocks; a block counts when the kernel "
             "computes it (fully visible or masked), not when it is skipped by position.",
             "critical path: the sum over ring steps of the busiest device's blocks (the devices rotate in lockstep); "
             "ideal: total blocks / n. Zigzag adds blocks where a device's 2 chunks are shorter than a block "
             "(a block then spans both and cannot be skipped)."]
    return _bench.finish("ring_balance", args,
                         "Blocks per device in the causal ring, contiguous and zigzag order",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
