#!/usr/bin/env python
"""Ring attention against the LongRoPE-era reference ring: the authors' ``ringattention``.

Same 8-device CPU mesh (virtual devices sharing this machine's cores: times are total work, not
parallel speed), MHA shapes (theirs has no GQA), causal, fp32, one row. Ours:
``attention.ring.ring_attention`` in contiguous order and in zigzag order. Peer:
``ringattention_jax.ring_attention`` of ``ringattention`` 0.1.2 (PyPI), loaded by path because
the package ``__init__`` calls a JAX API current JAX removed:

    pip download --no-deps ringattention==0.1.2 -d /tmp/ra && unzip -o /tmp/ra/*.whl -d /tmp/ra
    python benchmarks/ring_vs_authors.py --authors /tmp/ra/ringattention/ringattention_jax.py --length 8192

Forward and forward + backward (``jax.grad`` of ``sum(out**2)`` over q, k, v), best of
``--repeats`` after a warm-up; max |difference| of each output against dense attention on one
device. Needs ``einops`` (the authors' dependency).
"""

from __future__ import annotations

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--authors", required=True, help="path of ringattention/ringattention_jax.py")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    threads = _bench.setup_threads(args.threads)
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from longrope_jax import parallel
    from longrope_jax.attention import dense_attention
    from longrope_jax.attention.ring import ring_attention
    from longrope_jax.parallel import zigzag

    jax.config.update("jax_default_matmul_precision", "highest")
    spec = importlib.util.spec_from_file_location("ringattention_jax", args.authors)
    authors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(authors)

    n, length, h, d = args.devices, args.length, args.heads, args.head_dim
    args.block = min(args.block, length // n)  # the authors need whole chunks per device
    mesh = parallel.build({"sequence": n})
    layout = parallel.Layout(mesh, batch_axes=())
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, length, h, d), np.float32) for _ in range(3))
    pos = np.arange(length, dtype=np.int32)[None]
    heads = NamedSharding(mesh, P(None, "sequence", None, None))
    rows = NamedSharding(mesh, P(None, "sequence"))

    def ours(q, k, v, p):
        return ring_attention(layout, block_q=args.block, block_kv=args.block)(q, k, v, q_positions=p, kv_positions=p)

    kw = dict(causal_block_size=1, query_chunk_size=args.block, key_chunk_size=args.block, deterministic=True,
              dropout_rng=None, attn_pdrop=0.0, dtype=jnp.float32, policy=jax.checkpoint_policies.nothing_saveable,
              precision=None, prevent_cse=True)
    theirs_local = functools.partial(authors.ring_attention, attn_bias=None, segment_ids=None, cache_idx=None,
                                     axis_name="sequence", float32_logits=True, blockwise_kwargs=kw)
    spec4 = P(None, "sequence", None, None)

    def theirs(q, k, v, p):
        del p  # causal by chunk index: contiguous order only
        return jax.shard_map(lambda q, k, v: theirs_local(q, k, v), mesh=mesh, in_specs=(spec4,) * 3,
                             out_specs=spec4, check_vma=False)(q, k, v)

    ref_out, ref_vjp = jax.vjp(lambda q, k, v: dense_attention(q, k, v, q_positions=pos, kv_positions=pos), q, k, v)
    ref = (ref_out, *ref_vjp(2 * ref_out))
    rows_out, results = [], []
    for name, fn, zig in (("ours, contiguous", ours, False), ("ours, zigzag", ours, True),
                          ("authors' ringattention", theirs, False)):
        xs = [zigzag.apply(x, n) if zig else x for x in (q, k, v, pos)]
        args_ = [jax.device_put(x, heads) for x in xs[:3]] + [jax.device_put(xs[3], rows)]
        fwd = jax.jit(fn)
        grad = jax.jit(jax.value_and_grad(lambda q, k, v, p: jnp.sum(jnp.square(fn(q, k, v, p))), argnums=(0, 1, 2)))
        tf = _bench.best(lambda: jax.block_until_ready(fwd(*args_)), args.repeats)
        tg = _bench.best(lambda: jax.block_until_ready(grad(*args_)), args.repeats)
        out = np.asarray(fwd(*args_))
        got = (out, *[np.asarray(g) for g in grad(*args_)[1]])
        if zig:
            got = tuple(zigzag.restore(x, n) for x in got)
        err = [float(np.abs(g - np.asarray(r)).max() / np.abs(np.asarray(r)).max()) for g, r in zip(got, ref)]
        results.append({"name": name, "forward_s": tf, "forward_backward_s": tg, "max_rel_err": err})
        _bench.log(f"{name}: fwd {tf:.3f}s, fwd+bwd {tg:.3f}s, max |diff| / max |ref| {max(err):.2g}")
    peer = results[-1]
    for r in results:
        rows_out.append([r["name"], r["forward_s"], f"{peer['forward_s'] / r['forward_s']:.2f}x", r["forward_backward_s"],
                         f"{peer['forward_backward_s'] / r['forward_backward_s']:.2f}x",
                         " / ".join(f"{e:.1e}" for e in r["max_rel_err"])])
    headers = ["implementation", "fwd (s)", "fwd speed vs authors", "fwd+bwd (s)", "fwd+bwd speed vs authors",
               "max |diff| / max |dense| (out / dq / dk / dv)"]
    notes = [f"{n} virtual CPU devices on `sequence`, {threads} thread(s) in all; 1 x {length} tokens, {h} heads x {d} "
             f"(MHA), causal, fp32, {args.block}-token blocks; best of {args.repeats}.",
             "speed vs authors = authors' seconds / these seconds (> 1: faster). Reference: dense attention on "
             "one device."]
    return _bench.finish("ring_vs_authors", args, "Ring attention: ours vs the authors' ringattention",
                         [_bench.md_table(headers, rows_out)], notes, results=results)


if __name__ == "__main__":
    sys.exit(main())
