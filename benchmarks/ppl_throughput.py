#!/usr/bin/env python
"""Forward perplexity throughput: longrope-jax against transformers (PyTorch, SDPA).

One window of the pydoc text per length (its first L tokens), SmolLM2-135M in fp32, no RoPE
scaling. Ours: ``evaluate.perplexity`` (``window_nll``) with the ``ppl`` command's attention
choice (dense up to 2048 tokens, blockwise with q/kv blocks of ``--q-chunk`` beyond) and the loss
in 1024-token chunks. Peer: ``AutoModelForCausalLM(..., attn_implementation="sdpa")`` forward with
``labels=`` under ``torch.inference_mode``. Same tokens, same thread count.

Ours is called once to compile (reported separately: the XLA trace/lower/compile seconds, and the
first call's wall time), then timed ``--repeats`` times; the peer gets one short warm-up forward
(``--peer-warmup-tokens``), then ``--repeats`` timed forwards. Throughput is L / median seconds.
The JAX persistent compilation cache is off unless ``--compilation-cache``.

    python benchmarks/ppl_throughput.py --lengths 2048 8192 16384 --json out/ppl_throughput.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET = 1.2  # ours / transformers tokens per second, at 8k and beyond
TARGET_FROM = 8192


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 16384], help="window lengths (tokens)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per length and side after the warm-up")
    p.add_argument("--q-chunk", type=int, default=512, help="blockwise q/kv block beyond 2048 tokens")
    p.add_argument("--loss-chunk", type=int, default=1024)
    p.add_argument("--peer-warmup-tokens", type=int, default=256,
                   help="length of the peer's untimed warm-up forward (0: none)")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--compilation-cache", action="store_true",
                   help="use longrope-jax's persistent compilation cache (compile time then measures a cache load)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    import numpy as np

    from longrope_jax import evaluate
    from longrope_jax.attention import select
    from longrope_jax.factors import resolve_rope
    from longrope_jax.loss import window_nll

    if args.compilation_cache:
        from longrope_jax.cache import enable_compilation_cache

        enable_compilation_cache()
    comp = _bench.CompileLog()
    ours = _bench.load_ours()
    peer = None if args.no_peer else _bench.load_peer()
    if peer is not None and args.peer_warmup_tokens:
        _bench.peer_nll(peer, _bench.pydoc_tokens(ours.tokenizer, args.peer_warmup_tokens))

    machine = _bench.machine()
    results = []
    for length in args.lengths:
        tokens = _bench.pydoc_tokens(ours.tokenizer, length)
        spec = resolve_rope("none", ours.cfg, length)
        attn = select.pick("auto", length)
        qc = args.q_chunk if length > 2048 else None

        def run():
            return evaluate.perplexity(ours.params, ours.cfg, tokens, spec, attention=attn, q_chunk=qc,
                                       loss_chunk=args.loss_chunk)

        before = window_nll._cache_size()
        with comp:
            res, first = _bench.timed(run)
        compile_s, backend_compiles = comp.seconds, comp.backend
        times = []
        for _ in range(args.repeats):
            res, dt = _bench.timed(run)
            times.append(dt)
        steady = _bench.median(times)
        row = {
            "length": length, "attention": attn, "q_chunk": qc,
            "ours": {"ppl": res["ppl"], "nll": res["nll"], "first_call_s": first, "compile_s": compile_s,
                     "xla_compilations": backend_compiles,
                     "window_nll_compilations": window_nll._cache_size() - before,
                     "seconds": times, "steady_s": steady, "tokens_per_s": length / steady},
        }
        _bench.log(f"{length}: ours ppl {res['ppl']:.4f}, compile {compile_s:.1f}s, steady {steady:.1f}s")
        if peer is not None:
            ptimes, nll = [], None
            for _ in range(args.repeats):
                nll, dt = _bench.timed(_bench.peer_nll, peer, tokens)
                ptimes.append(dt)
            psteady = _bench.median(ptimes)
            row["peer"] = {"ppl": float(np.exp(nll)), "nll": nll, "seconds": ptimes, "steady_s": psteady,
                           "tokens_per_s": length / psteady}
            row["speed_ratio"] = row["ours"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
            row["ppl_ratio"] = row["ours"]["ppl"] / row["peer"]["ppl"]
            _bench.log(f"{length}: transformers ppl {row['peer']['ppl']:.4f}, {psteady:.1f}s")
        if length >= TARGET_FROM:
            row["target_speed_ratio"] = TARGET
            row["target_met"] = row.get("speed_ratio", 0) >= TARGET if peer is not None else None
        results.append(row)

    headers = ["length", "attention", "ours compile (s)", "ours 1st call (s)", "ours steady (s)", "ours tok/s",
               "transformers (s)", "transformers tok/s", "speed ratio", "target", "ppl ours",
               "ppl transformers", "ppl ratio"]
    rows = []
    for r in results:
        o, pr = r["ours"], r.get("peer")
        target = None
        if "target_speed_ratio" in r:
            met = r["target_met"]
            target = f">= {TARGET}x: " + ("n/a" if met is None else ("met" if met else "NOT met"))
        rows.append([r["length"], r["attention"] + (f"/{r['q_chunk']}" if r["q_chunk"] else ""),
                     o["compile_s"], o["first_call_s"], o["steady_s"], round(o["tokens_per_s"], 1),
                     pr and pr["steady_s"], pr and round(pr["tokens_per_s"], 1),
                     pr and f"{r['speed_ratio']:.2f}x", target, o["ppl"], pr and pr["ppl"],
                     pr and f"{r['ppl_ratio']:.6f}"])
    notes = [
        f"SmolLM2-135M-Instruct fp32, pydoc text (first L tokens), rope none; {threads} thread(s) for torch and XLA.",
        "speed ratio = ours tok/s / transformers tok/s on steady-state (median of "
        f"{args.repeats} run(s)); ours compile = XLA trace+lower+compile seconds of the first call "
        "(persistent cache " + ("ON" if args.compilation_cache else "off") + ").",
        "ppl ratio = ours / transformers on the same tokens (expected ~1).",
        f"Target: >= {TARGET}x at {TARGET_FROM} tokens and beyond.",
    ]
    return _bench.finish("ppl_throughput", args,
                         "Perplexity forward throughput: longrope-jax vs transformers (SDPA)",
                         [_bench.md_table(headers, rows)], notes, machine_info=machine, results=results)


if __name__ == "__main__":
    sys.exit(main())
