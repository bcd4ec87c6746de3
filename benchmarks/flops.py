#!/usr/bin/env python
"""Achieved FLOP rate of our forward as a share of this machine's measured fp32 matmul rate.

Machine rate: a ``--matmul-size``^3 fp32 matmul (default 2048) timed in numpy and in jax (best of
``--matmul-repeats`` after a warm-up); the larger of the two is the ceiling (torch's is shown for
information).

Model FLOPs, counted analytically for one forward over L tokens (no backward):

    FLOPs = 2 * P_matmul * L  +  4 * (L^2 / 2) * H * d_head * n_layers

    P_matmul = n_layers * (D*H*d_head + 2*D*KV*d_head + H*d_head*D + 3*D*F) + V*D

(q, k, v, o, gate, up, down projections and the LM head; embeddings lookups, norms, RoPE, softmax
and the loss are not counted; attention counts QK^T and PV over the causal half only, so a
kernel computing whole diagonal blocks does more work than it is credited with.)

Ours: ``window_nll`` on one pydoc window with the ``ppl`` command's attention choice
(dense up to 2048 tokens, blockwise with ``--q-chunk`` blocks beyond), compiled once, then timed.
Peer: transformers (PyTorch, SDPA) forward with ``labels=`` on the same tokens, after a short
warm-up. Both are credited the same FLOPs.

    python benchmarks/flops.py --lengths 2048 8192 --json out/flops.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

FORMULA = ("FLOPs = 2 * P_matmul * L + 4 * (L^2/2) * H * d_head * n_layers, "
           "P_matmul = n_layers * (D*H*d_head + 2*D*KV*d_head + H*d_head*D + 3*D*F) + V*D")


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[8192], help="window lengths (tokens)")
    p.add_argument("--repeats", type=int, default=1, help="timed forwards per length and side after the warm-up")
    p.add_argument("--q-chunk", type=int, default=512, help="blockwise q/kv block beyond 2048 tokens")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--no-peer", action="store_true", help="ours only (no transformers)")
    return p.parse_args(argv)


def matmul_params(cfg) -> int:
    d, h, kv, hd, f, v, n = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                             cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers)
    return n * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f) + v * d


def model_flops(cfg, length: int) -> dict:
    linear = 2 * matmul_params(cfg) * length
    attn = 4 * (length * length / 2) * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers
    return {"linear": linear, "attention": attn, "total": linear + attn}


def machine_rate(n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    flops = 2.0 * n**3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)

    def best(fn):
        return flops / _bench.best(fn, repeats)

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    out = {"size": n, "numpy": best(lambda: a @ b), "jax": best(lambda: mm(ja, jb).block_until_ready())}
    with torch.inference_mode():
        out["torch"] = best(lambda: ta @ tb)
    out["peak"] = max(out["numpy"], out["jax"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    _bench.torch_threads()
    from longrope_jax.attention import select
    from longrope_jax.factors import resolve_rope
    from longrope_jax.loss import window_nll

    comp = _bench.CompileLog()
    ours = _bench.load_ours()
    cfg = ours.cfg
    peer = None if args.no_peer else _bench.load_peer()
    if peer is not None:
        _bench.peer_nll(peer, _bench.pydoc_tokens(ours.tokenizer, min(256, min(args.lengths))))
    rate = machine_rate(args.matmul_size, args.matmul_repeats)
    _bench.log(f"matmul {args.matmul_size}^3: numpy {rate['numpy'] / 1e9:.1f}, jax {rate['jax'] / 1e9:.1f}, "
               f"torch {rate['torch'] / 1e9:.1f} GFLOP/s")
    machine = _bench.machine()

    results = []
    for length in args.lengths:
        tokens = _bench.pydoc_tokens(ours.tokenizer, length)
        spec = resolve_rope("none", cfg, length)
        attn = select.pick("auto", length)
        qc = args.q_chunk if length > 2048 else None
        import numpy as np

        def run():
            return np.asarray(window_nll(ours.params, tokens, spec, cfg=cfg, attention=attn, q_chunk=qc))

        with comp:
            _, first = _bench.timed(run)
        compile_s = comp.seconds
        times = [_bench.timed(run)[1] for _ in range(args.repeats)]
        fl = model_flops(cfg, length)
        steady = _bench.median(times)
        row = {"length": length, "attention": attn, "q_chunk": qc, "flops": fl,
               "ours": {"compile_s": compile_s, "first_call_s": first, "seconds": times, "steady_s": steady,
                        "flop_rate": fl["total"] / steady, "share_of_peak": fl["total"] / steady / rate["peak"]}}
        _bench.log(f"{length}: ours {steady:.1f}s = {fl['total'] / steady / 1e9:.1f} GFLOP/s")
        if peer is not None:
            ptimes = [_bench.timed(_bench.peer_nll, peer, tokens)[1] for _ in range(args.repeats)]
            ps = _bench.median(ptimes)
            row["peer"] = {"seconds": ptimes, "steady_s": ps, "flop_rate": fl["total"] / ps,
                           "share_of_peak": fl["total"] / ps / rate["peak"]}
            _bench.log(f"{length}: transformers {ps:.1f}s = {fl['total'] / ps / 1e9:.1f} GFLOP/s")
        results.append(row)

    headers = ["length", "attention", "model GFLOP (linear + attn)", "ours compile (s)", "ours steady (s)", "ours GFLOP/s",
               "ours % of peak", "transformers (s)", "transformers GFLOP/s", "transformers % of peak",
               "ours / transformers"]
    rows = []
    for r in results:
        o, p, fl = r["ours"], r.get("peer"), r["flops"]
        rows.append([r["length"], r["attention"] + (f"/{r['q_chunk']}" if r["q_chunk"] else ""),
                     f"{fl['total'] / 1e9:.1f} ({fl['linear'] / 1e9:.1f} + {fl['attention'] / 1e9:.1f})",
                     o["compile_s"], o["steady_s"], round(o["flop_rate"] / 1e9, 2), f"{100 * o['share_of_peak']:.1f}%",
                     p and p["steady_s"], p and round(p["flop_rate"] / 1e9, 2),
                     p and f"{100 * p['share_of_peak']:.1f}%", p and f"{o['flop_rate'] / p['flop_rate']:.2f}x"])
    mrow = [[f"{args.matmul_size}^3 fp32 matmul", round(rate["numpy"] / 1e9, 1), round(rate["jax"] / 1e9, 1),
             round(rate["torch"] / 1e9, 1), round(rate["peak"] / 1e9, 1)]]
    notes = [
        f"{FORMULA}; SmolLM2-135M: n_layers={cfg.num_hidden_layers}, D={cfg.hidden_size}, H={cfg.num_attention_heads}, "
        f"KV={cfg.num_key_value_heads}, d_head={cfg.head_dim}, F={cfg.intermediate_size}, V={cfg.vocab_size}, "
        f"P_matmul={matmul_params(cfg):,}. Attention counts the causal half only; embeddings, norms, RoPE, softmax "
        "and the loss are not counted.",
        f"Peak = max(numpy, jax) of the matmul, best of {args.matmul_repeats}; % of peak = achieved / peak.",
        f"Steady: median of {args.repeats} forward(s) after the compiling call (ours) or a 256-token warm-up "
        f"(transformers); {threads} thread(s) for torch and XLA; persistent compilation cache off.",
    ]
    return _bench.finish(
        "flops", args, "Achieved FLOP rate of the forward (share of measured fp32 matmul peak)",
        [_bench.md_table(["machine rate (GFLOP/s)", "numpy", "jax", "torch (info)", "peak"], mrow),
         _bench.md_table(headers, rows)], notes, machine_info=machine,
        formula=FORMULA, matmul_params=matmul_params(cfg), matmul_rate=rate, results=results)


if __name__ == "__main__":
    sys.exit(main())
