#!/usr/bin/env python
"""Per-device memory of a sharded forward and loss gradient as the sequence axis grows.

At one fixed length, for ``--mesh-sizes`` (default 1, 2, 4, 8 devices on the ``sequence`` axis),
``train.aot.loss_report``: the compiled executable's per-device argument and temporary bytes
of one window's mean NLL and of its gradient (kept sharded like the params), weights over fsdp x
sequence, attention by the all-gather strategy (queries local, k/v of the whole row gathered on
every device) or, with ``--attention ring``, the ring (zigzag order; ``ring_splash``: with
splash kernels per step). The peer in the same run
is one device (sequence 1). Nothing runs; the numbers do not depend on the machine's load. What
this shows: the token-proportional part of the temporaries falls with the axis, while the
gathered k/v (O(L) per device, which the ring removes) does not.

On CPU (8 virtual devices, set here before jax is imported) or, with ``--topology``, for a TPU
topology (docs/parallel.md; needs ``libtpu``):

    python benchmarks/mesh_memory.py --length 32768 --json out/mesh_memory_cpu.json
    python benchmarks/mesh_memory.py --topology v5p:2x2x2 --shapes llama2-7b --dtype bfloat16 --remat full \\
        --length 131072 --json out/mesh_memory_v5p.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402
from grad_memory import SHAPES  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--mesh-sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="sequence axis sizes")
    p.add_argument("--fsdp", type=int, default=1, help="fsdp axis size beside the sequence axis")
    p.add_argument("--batch", type=int, default=1, help="windows per batch (a multiple of --fsdp)")
    p.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    p.add_argument("--layers", type=int, help="override the layer count (compile time)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--remat", default="full", help="layer remat policy of the gradient (ModelConfig.remat)")
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--attention", choices=["blockwise", "ring", "ring_splash"], default="blockwise",
                   help="blockwise: k/v all-gathered over sequence; ring: ring attention (zigzag); ring_splash: the "
                        "ring with Pallas splash kernels (TPU topologies)")
    p.add_argument("--topology", help="compile for this TPU topology (e.g. v5p:2x2x2; needs libtpu)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"  # TPU devices, if any, are compile-only
    if not args.topology:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.fsdp * max(args.mesh_sizes)}"
    _bench.setup_threads(args.threads)
    import jax

    from longrope_jax import parallel
    from longrope_jax.model import ModelConfig
    from longrope_jax.parallel import aot
    from longrope_jax.train.aot import loss_report

    kw = dict(SHAPES[args.shapes], rope_parameters={"rope_type": "default"}, remat=args.remat, dtype=args.dtype,
              param_dtype=args.dtype)
    if args.layers:
        kw["num_hidden_layers"] = args.layers
    cfg = ModelConfig(**kw)
    devices = aot.topology_devices(args.topology) if args.topology else jax.devices()
    where = f"{args.topology} ({devices[0].device_kind})" if args.topology else f"CPU ({len(devices)} virtual devices)"
    gib = 2**30
    rows, results = [], []
    for n in args.mesh_sizes:
        mesh = parallel.build({"fsdp": args.fsdp, "sequence": n}, devices[:args.fsdp * n])
        rep = {w: loss_report(cfg, mesh, length=args.length, batch=args.batch, grad=w == "grad", block=args.block,
                              attention=args.attention)
               for w in ("forward", "grad")}
        results.append({"sequence": n, **rep})
        _bench.log(f"sequence={n}: forward temp {rep['forward']['temp_bytes'] / gib:.2f} GiB, grad temp "
                   f"{rep['grad']['temp_bytes'] / gib:.2f} GiB ({rep['grad']['compile_seconds']}s compile)")
    one = results[0]

    def show(rep, key):  # a program the TPU compiler refused: the temporaries it asked for
        if rep.get("over_hbm"):
            return f"> HBM ({rep['temp_bytes'] / gib:.1f})" if key == "temp_bytes" else None
        return rep[key] / gib

    for r in results:
        f, g = r["forward"], r["grad"]
        rows.append([r["sequence"], show(f, "argument_bytes"), show(f, "temp_bytes"), show(g, "temp_bytes"),
                     show(g, "output_bytes"), f"{one['grad']['temp_bytes'] / g['temp_bytes']:.2f}x"])
    strategy = {"ring": "ring attention (zigzag)", "ring_splash": "ring attention with splash kernels (zigzag)",
                "blockwise": "blockwise attention, k/v all-gathered"}[args.attention]
    kv = 2 * args.length * cfg.num_key_value_heads * cfg.head_dim * (2 if args.dtype == "bfloat16" else 4) / gib
    notes = [f"{args.shapes} shapes ({cfg.num_hidden_layers} layers), {args.dtype}, remat {args.remat}, one window of "
             f"{args.length} tokens x {args.batch} window(s), fsdp={args.fsdp}, {strategy} ({args.block}-token blocks); "
             f"{where}.",
             "per device, from `compiled.memory_analysis()`: params (argument), forward / gradient temporaries, "
             "gradient output; the last column is one device's gradient temporaries over this mesh's.",
             f"one layer's whole-row k and v: {kv:.3f} GiB, which the all-gather holds on every device whatever "
             "the sequence axis and the ring splits over it."]
    headers = ["sequence", "params GiB", "forward temp GiB", "grad temp GiB", "grads GiB", "grad temp: 1 device / this"]
    return _bench.finish("mesh_memory", args, f"Per-device memory over the sequence axis ({strategy})",
                         [_bench.md_table(headers, rows)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
