#!/usr/bin/env python
"""Compiled memory of a whole-model loss gradient: the flash backward against dense attention.

For each length, ``jax.jit(jax.grad(loss)).lower(...).compile().memory_analysis()`` of the mean
next-token NLL of one window, compiled only (nothing runs, so lengths whose dense gradient could
never fit still compile):

* ours: blockwise attention with its flash backward (512-token blocks) and the chunked loss
  (1024-token chunks, rematerialised per chunk);
* peer: the same model and loss through the dense reference attention (what ``jax.grad`` keeps
  without a custom VJP: the ``[H, L, L]`` probabilities of every layer).

Both use the model's layer scan without remat (``--remat`` to change), float32. The report gives
temporary bytes per length, their ratio, and the log-log slope of each (1: linear in L, 2:
quadratic). ``--topology`` compiles for a TPU topology instead (docs/parallel.md; needs
``libtpu``), with ``--shapes llama2-7b`` and ``--dtype bfloat16`` for the pod-planning table.

    python benchmarks/grad_memory.py --lengths 2048 4096 8192 16384 32768 --json out/grad_memory.json
    python benchmarks/grad_memory.py --topology v5p:2x2x1 --shapes llama2-7b --layers 1 --dtype bfloat16 \\
        --lengths 32768 131072 --no-peer
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET_LENGTH, TARGET_GIB = 16384, 8.0
SHAPES = {
    # name: ModelConfig fields (SmolLM2-135M as the GGUF ships it; LLaMA-2-7B from its config.json)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, tie_word_embeddings=True),
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=128, max_position_embeddings=4096,
                      rope_theta=10000.0, tie_word_embeddings=False),
}


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    p.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, help="override the number of layers (e.g. 1 for a per-layer figure)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="params and compute")
    p.add_argument("--remat", default="none", help="the model's remat policy (model.REMAT_POLICIES)")
    p.add_argument("--block", type=int, default=512, help="flash attention block (q and kv)")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--peer-max-length", type=int, default=32768, help="dense peer only up to this length")
    p.add_argument("--topology", help="compile for this TPU topology (e.g. v5p:2x2x1; needs libtpu), one device")
    return p.parse_args(argv)


def compiled_memory(cfg, length: int, attention: str, block: int, device=None) -> dict:
    """Memory analysis of the compiled gradient of one window's mean NLL (nothing is run)."""
    import jax

    from longrope_jax import parallel
    from longrope_jax.train.aot import loss_report

    mesh = parallel.build(None, [device or jax.devices()[0]])
    return loss_report(cfg, mesh, length=length, grad=True, attention=attention, block=block)


def slope(points: list[tuple[int, int]]) -> float | None:
    """Least-squares slope of log(bytes) against log(length)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.topology:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the TPU devices are compile-only
    _bench.setup_threads(args.threads)
    import jax

    from longrope_jax.model import ModelConfig

    kw = dict(SHAPES[args.shapes], rope_parameters={"rope_type": "default"}, remat=args.remat,
              dtype=args.dtype, param_dtype=args.dtype)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    cfg = ModelConfig(**kw)
    device = None
    where = f"CPU ({jax.devices()[0].device_kind})"
    if args.topology:
        from longrope_jax.parallel import aot

        device = aot.topology_devices(args.topology)[0]
        where = f"{args.topology} ({device.device_kind}), one device"
    rows, results = [], []
    for n in args.lengths:
        ours = compiled_memory(cfg, n, "blockwise", args.block, device)
        _bench.log(f"L={n}: flash {ours['temp_bytes'] / 2**30:.2f} GiB temporary ({ours['compile_seconds']}s compile)")
        peer = None
        if not args.no_peer and n <= args.peer_max_length:
            peer = compiled_memory(cfg, n, "dense", args.block, device)
            _bench.log(f"L={n}: dense {peer['temp_bytes'] / 2**30:.2f} GiB temporary ({peer['compile_seconds']}s)")
        results.append({"length": n, "ours": ours, "peer": peer})
        def gib(r):
            return None if r is None else (f"> HBM ({r['temp_bytes'] / 2**30:.1f})" if r.get("over_hbm")
                                           else r["temp_bytes"] / 2**30)

        rows.append([n, gib(ours), gib(peer),
                     None if peer is None else peer["temp_bytes"] / ours["temp_bytes"],
                     (ours.get("argument_bytes", 0) + ours.get("output_bytes", 0)) / 2**30])
    s_ours = slope([(r["length"], r["ours"]["temp_bytes"]) for r in results])
    s_peer = slope([(r["length"], r["peer"]["temp_bytes"]) for r in results if r["peer"]])
    table = _bench.md_table(["length", "flash temp GiB", "dense temp GiB", "dense / flash", "args + grads GiB"], rows)
    at = {r["length"]: r["ours"]["temp_bytes"] / 2**30 for r in results}
    notes = [f"Model: {args.shapes} shapes ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, heads "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}, vocab {cfg.vocab_size}), {args.dtype}, remat "
             f"{args.remat}; gradient of one window's mean NLL w.r.t. every parameter; compiled for {where}.",
             "Log-log slope of temporary bytes against L (1 = linear, 2 = quadratic): flash "
             + ("-" if s_ours is None else f"{s_ours:.2f}") + ", dense " + ("-" if s_peer is None else f"{s_peer:.2f}")
             + ".",
             f"Target: linear in L, {TARGET_LENGTH} tokens under {TARGET_GIB:g} GiB: "
             + (f"{at[TARGET_LENGTH]:.2f} GiB ({'met' if at[TARGET_LENGTH] < TARGET_GIB else 'NOT met'})."
                if TARGET_LENGTH in at else "not measured here.")]
    return _bench.finish("grad_memory", args, "Compiled memory of the loss gradient (flash vs dense attention)",
                         [table], notes, results=results, slope={"ours": s_ours, "peer": s_peer})


if __name__ == "__main__":
    sys.exit(main())
