#!/usr/bin/env python
"""A tiny LongRoPE model's loss and gradient at 256k tokens with the ring on 8 virtual CPU devices.

What this shows is scale, not speed: one row of ``--length`` tokens (default 262144) split over
a ``sequence`` axis of 8, attention by the ring (zigzag order), the loss and every parameter's
gradient computed, with the per-device memory of each compiled program
(``compiled.memory_analysis()``). The peers in the same run: the same loss compiled for one
device (blockwise attention) and on the same mesh with k/v all-gathered (memory only), and the
one-device forward run for its loss (``--check``), which the ring's must equal to 1e-5.

The 8 devices share this machine's cores, so the times are the total work; XLA's CPU
collectives would give up waiting after 40 s in a step this long, so the flags below raise
their timeouts (set here before jax is imported).

    python benchmarks/ring_scale.py --length 262144 --json out/ring_scale.json
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--length", type=int, default=262144)
    p.add_argument("--devices", type=int, default=8, help="the sequence axis")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--block", type=int, default=1024, help="attention q / kv block")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the one-device forward (as long again as the ring's)")
    return p.parse_args(argv)


def tiny(length: int, layers: int):
    """A LLaMA of 2 query heads and 1 kv head of 32 (16 rotary pairs), LongRoPE factors from a
    4096-token original window, positions in the precise mode (they reach 2^18)."""
    import numpy as np

    from longrope_jax.model import ModelConfig

    pairs = 16
    return ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=length,
                       rope_theta=10000.0, precise_rope=True,
                       rope_parameters={"rope_type": "longrope", "original_max_position_embeddings": 4096,
                                        "short_factor": [1.0] * pairs,
                                        "long_factor": np.geomspace(1.0, length / 4096, pairs).tolist()})


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={args.devices} "
                               "--xla_cpu_collective_timeout_seconds=36000 "
                               "--xla_cpu_collective_call_terminate_timeout_seconds=36000")
    _bench.setup_threads(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from longrope_jax import parallel
    from longrope_jax.attention import select
    from longrope_jax.loss import mean_nll
    from longrope_jax.model import init_params, rope_spec
    from longrope_jax.train.aot import loss_report

    cfg = tiny(args.length, args.layers)
    spec = rope_spec(cfg)
    mesh = parallel.build({"sequence": args.devices})
    one = parallel.build(None, jax.devices()[:1])
    gib = 2**30
    memory = {}
    for name, m, att in (("ring", mesh, "ring"), ("all-gather", mesh, "blockwise"), ("one device", one, "blockwise")):
        memory[name] = {w: loss_report(cfg, m, length=args.length, grad=w == "grad", attention=att, block=args.block)
                        for w in ("forward", "grad")}
        _bench.log(f"{name}: grad temp {memory[name]['grad']['temp_bytes'] / gib:.3f} GiB per device")

    layout = select.layout_for(mesh, "ring")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.length), dtype=np.int32)

    def loss(p, t, layout, attention):
        return jnp.mean(mean_nll(p, t, spec, cfg=cfg, attention=attention, q_chunk=args.block, loss_chunk=4096,
                                 layout=layout))

    params = init_params(cfg, 0)
    placed = parallel.put_params(params, mesh)
    rows = parallel.put(tokens, layout.sharding(layout.rows()))
    fwd = jax.jit(loss, static_argnums=(2, 3))
    grad = jax.jit(jax.value_and_grad(loss), static_argnums=(2, 3))
    times = {}
    for what, fn in (("forward", fwd), ("forward + backward", grad)):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(placed, rows, layout, "ring"))
        times[what] = time.perf_counter() - t  # includes the compile (seconds of minutes)
        _bench.log(f"ring {what}: {times[what]:.1f} s")
    ring_loss, grads = out
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    ref_loss = None
    if args.check:
        t = time.perf_counter()
        ref_loss = float(fwd(params, jnp.asarray(tokens), None, "blockwise"))
        times["one device forward"] = time.perf_counter() - t
        _bench.log(f"one device forward: {times['one device forward']:.1f} s, loss {ref_loss:.6f}")

    table = []
    for name, rep in memory.items():
        table.append([name, rep["forward"]["argument_bytes"] / gib, rep["forward"]["temp_bytes"] / gib,
                      rep["grad"]["temp_bytes"] / gib,
                      f"{rep['grad']['temp_bytes'] / memory['ring']['grad']['temp_bytes']:.2f}x"])
    runs = [[what, f"{s:.1f}"] for what, s in times.items()]
    rel = None if ref_loss is None else abs(float(ring_loss) - ref_loss) / abs(ref_loss)
    notes = [f"{args.length} tokens, 1 row, {cfg.num_hidden_layers} layer(s), hidden {cfg.hidden_size}, 2 query heads / "
             f"1 kv head of 32, fp32, {args.block}-token blocks, sequence axis {args.devices} (virtual CPU devices "
             "sharing the machine's cores: the times are total work, compile included).",
             f"ring loss {float(ring_loss):.6f}" + ("" if ref_loss is None else
                                                   f", one device {ref_loss:.6f} (relative difference {rel:.2e})")
             + f"; every gradient finite: {finite}.",
             "memory per device from `compiled.memory_analysis()`; the last column is that program's gradient "
             "temporaries over the ring's."]
    return _bench.finish(
        "ring_scale", args, f"A tiny model at {args.length} tokens with the ring on {args.devices} CPU devices",
        [_bench.md_table(["program", "params GiB", "forward temp GiB", "grad temp GiB", "grad temp vs ring"], table),
         _bench.md_table(["run", "seconds"], runs)], notes,
        memory=memory, seconds=times, ring_loss=float(ring_loss), one_device_loss=ref_loss, grads_finite=finite)


if __name__ == "__main__":
    sys.exit(main())
