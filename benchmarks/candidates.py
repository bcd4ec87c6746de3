#!/usr/bin/env python
"""K RoPE candidates in one ``evaluate.score`` call against a per-candidate Python loop.

The candidates (default K = 8, scale 2) are PI, NTK and YaRN factors and mutations of them
(log-normal noise on the factors, kept >= 1 and non-decreasing, as LongRoPE's search does), all
built with ``rope.longrope`` so they share one spec structure; PI and NTK keep attention factor 1,
YaRN and its mutations YaRN's. One window of the pydoc text (``--length`` tokens), SmolLM2 fp32.

* ours: ``evaluate.score(params, cfg, tokens, rope.stack(specs))``: one jitted call. On a single
  CPU device the candidates go one after another inside it (``lax.map``; ``--vmap`` forces the
  vmapped batch, which the budget ``--memory-budget-gib`` then splits); ``candidates_nll`` is
  compiled once.
* loop (the official LongRoPE code's way): for each candidate a fresh spec (fresh inv_freq)
  is built and ``window_nll`` scores it; K calls.
* ``--torch-loop`` adds the same loop in transformers (PyTorch, SDPA): the rotary embedding's
  ``inv_freq`` and ``attention_scaling`` replaced per candidate, a forward with ``labels=``.

Each path runs once to compile (time and number of compilations reported: ``_cache_size()``
deltas of the jitted function and XLA compile events), then ``--repeats`` timed runs.

    python benchmarks/candidates.py --length 4096 --json out/candidates.json
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--length", type=int, default=4096, help="window length (tokens)")
    p.add_argument("--k", type=int, default=8, help="number of candidates (>= 3: PI, NTK, YaRN, then mutations)")
    p.add_argument("--scale", type=float, default=2.0, help="context scale of the candidates")
    p.add_argument("--sigma", type=float, default=0.1, help="log-normal mutation strength")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each path after the compiling run")
    p.add_argument("--q-chunk", type=int, default=512, help="blockwise q/kv block (beyond 2048 tokens)")
    p.add_argument("--memory-budget-gib", type=float, default=None,
                   help="evaluate.score's memory budget (default: the library's, 4 GiB on CPU)")
    p.add_argument("--vmap", action="store_true",
                   help="batch the candidates with vmap (the accelerator path) instead of the CPU default, lax.map")
    p.add_argument("--torch-loop", action="store_true",
                   help="also time the loop in transformers (K forwards; slow at long lengths)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k: expected at least 1")
    return args


def candidate_factors(cfg, k: int, scale: float, sigma: float, seed: int):
    """[(name, long_factor float64[P], attention_factor)] * k."""
    import numpy as np

    from longrope_jax import rope

    theta, rd, lmax = cfg.rope_theta, cfg.rotary_dim, cfg.max_position_embeddings
    p = rd // 2
    bases = [
        (f"pi:{scale:g}", np.full(p, scale), 1.0),
        (f"ntk:{scale:g}", rope.ntk_factors(rd, scale), 1.0),
        (f"yarn:{scale:g}", rope.yarn_factors(theta, rd, scale, lmax), rope.yarn_attention_factor(scale)),
    ]
    rng = np.random.default_rng(seed)
    out = list(bases[:k])
    i = 0
    while len(out) < k:
        name, f, af = bases[i % len(bases)]
        g = np.maximum.accumulate(np.maximum(f * np.exp(rng.normal(0.0, sigma, p)), 1.0))
        out.append((f"{name}~mut{i + 1}", g, af))
        i += 1
    return out


def build_spec(cfg, factors, attention_factor, scale):
    """A fresh LongRoPE spec (what the official code rebuilds per candidate)."""
    from longrope_jax import rope

    lmax = cfg.max_position_embeddings
    return rope.longrope(cfg.rope_theta, cfg.rotary_dim, factors, original_max=lmax,
                         max_position_embeddings=int(round(scale * lmax)), attention_factor=attention_factor)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    import numpy as np

    from longrope_jax import evaluate, memory, rope
    from longrope_jax.attention import select
    from longrope_jax.loss import window_nll

    comp = _bench.CompileLog()
    ours = _bench.load_ours()
    cfg, params = ours.cfg, ours.params
    tokens = _bench.pydoc_tokens(ours.tokenizer, args.length)
    attn = select.pick("auto", args.length)
    qc = args.q_chunk if args.length > 2048 else None
    cands = candidate_factors(cfg, args.k, args.scale, args.sigma, args.seed)
    budget = int(args.memory_budget_gib * 2**30) if args.memory_budget_gib else memory.default_budget()
    import jax

    sequential = False if args.vmap else (len(jax.local_devices()) == 1 and jax.devices()[0].platform == "cpu")
    per_candidate = memory.item_bytes(cfg, args.length, qc or 512)
    kc = args.k if sequential else memory.calls_within(args.k, 1, per_candidate, budget)[0]
    machine = _bench.machine()
    n_tok = args.k * args.length

    # ours: one score call.
    def run_score():
        specs = rope.stack([build_spec(cfg, f, af, args.scale) for _, f, af in cands])
        return evaluate.score(params, cfg, tokens, specs, memory_budget=budget, attention=attn, q_chunk=qc,
                              sequential=sequential)[:, 0]

    # the official way: a fresh spec and one window_nll call per candidate.
    def run_loop():
        out = []
        for _, f, af in cands:
            spec = build_spec(cfg, f, af, args.scale)
            out.append(float(np.asarray(window_nll(params, tokens, spec, cfg=cfg, attention=attn, q_chunk=qc))[0]))
        return np.asarray(out)

    # Compile both first, then alternate their timed runs (drift in machine load hits both alike).
    specs_of = {"ours: evaluate.score (one call)": (run_score, evaluate.candidates_nll, -(-args.k // kc)),
                "loop: fresh spec + window_nll per candidate": (run_loop, window_nll, args.k)}
    paths = {}
    for name, (fn, jitted, calls) in specs_of.items():
        before = jitted._cache_size()
        with comp:
            nll, first = _bench.timed(fn)
        paths[name] = {"calls": calls, "compilations": jitted._cache_size() - before, "xla_compilations": comp.backend,
                       "compile_s": comp.seconds, "first_run_s": first, "seconds": [], "nll": nll.tolist()}
        _bench.log(f"{name}: compile {comp.seconds:.1f}s, first run {first:.1f}s")
    for _ in range(args.repeats):
        for name, (fn, jitted, _) in specs_of.items():
            before = jitted._cache_size()
            nll, dt = _bench.timed(fn)
            paths[name]["seconds"].append(dt)
            paths[name]["compilations"] += jitted._cache_size() - before  # stays as it was: no recompilation
            paths[name]["nll"] = nll.tolist()
    for name, r in paths.items():
        r["steady_s"] = _bench.median(r["seconds"])
        r["tokens_per_s"] = n_tok / r["steady_s"]
        _bench.log(f"{name}: steady {r['steady_s']:.1f}s")

    if args.torch_loop:
        import torch

        peer = _bench.load_peer()
        rot = peer.model.rotary_emb

        def run_torch():
            out = []
            for _, f, af in cands:
                spec = build_spec(cfg, f, af, args.scale)
                rot.inv_freq = torch.tensor(np.asarray(rope.inv_freq(spec, args.length), np.float32))
                rot.attention_scaling = float(af)
                out.append(_bench.peer_nll(peer, tokens))
            return np.asarray(out)

        _bench.peer_nll(peer, tokens[:, :min(256, args.length)])  # warm-up
        times = []
        for _ in range(args.repeats):
            nll, dt = _bench.timed(run_torch)
            times.append(dt)
        steady = _bench.median(times)
        paths["peer: transformers loop (inv_freq per candidate)"] = {
            "calls": args.k, "compilations": 0, "xla_compilations": 0, "compile_s": 0.0, "first_run_s": None,
            "seconds": times, "steady_s": steady, "tokens_per_s": n_tok / steady, "nll": nll.tolist()}
        _bench.log(f"transformers loop: steady {steady:.1f}s")

    names = list(paths)
    ours_p, loop_p = paths[names[0]], paths[names[1]]
    speedup = loop_p["steady_s"] / ours_p["steady_s"]
    met = speedup >= 1.0 and ours_p["compilations"] == 1
    headers = ["path", "calls", "compilations", "compile (s)", "1st run incl. compile (s)", "steady (s)",
               "candidate-tokens/s", "ours speed-up over it", "target"]
    rows = []
    for name, r in paths.items():
        is_ours = name == names[0]
        rows.append([name, r["calls"], f"{r['compilations']} ({r['xla_compilations']} XLA)", r["compile_s"],
                     r["first_run_s"], r["steady_s"], round(r["tokens_per_s"], 1),
                     None if is_ours else f"{r['steady_s'] / ours_p['steady_s']:.2f}x",
                     ("speed-up >= 1.0x and 1 compilation: " + ("met" if met else "NOT met")) if is_ours else None])
    ref = np.asarray(loop_p["nll"])
    crow = []
    for i, (cname, _, af) in enumerate(cands):
        row = [cname, f"{af:.4f}", math.exp(ours_p["nll"][i]), math.exp(loop_p["nll"][i]),
               f"{abs(ours_p['nll'][i] - ref[i]):.2e}"]
        if args.torch_loop:
            tn = paths[names[2]]["nll"][i]
            row += [math.exp(tn), f"{abs(tn - ref[i]):.2e}"]
        crow.append(row)
    cheaders = ["candidate", "attn factor", "ppl (score)", "ppl (loop)", "|Δnll| score-loop"]
    if args.torch_loop:
        cheaders += ["ppl (transformers)", "|Δnll| transformers-loop"]
    notes = [
        f"K = {args.k} candidates at scale {args.scale:g}, one {args.length}-token pydoc window, SmolLM2 fp32, "
        f"attention {attn}" + (f" (block {qc})" if qc else "") + f"; {threads} thread(s) for torch and XLA.",
        f"evaluate.score plan: {'lax.map' if sequential else 'vmap'}, {kc} candidate(s) per call, "
        f"{-(-args.k // kc)} call(s) "
        f"(memory budget {budget / 2**30:.2f} GiB, {per_candidate / 2**20:.0f} "
        "MiB per candidate).",
        "compilations: growth of the jitted function's cache (candidates_nll / window_nll); in brackets all XLA "
        "compilations seen during the first run (tiny eager ops included). compile (s): XLA trace+lower+compile "
        "seconds of the first run. Persistent compilation cache off.",
        f"steady: median of {args.repeats} run(s) after the compiling run. Target: evaluate.score at least as fast "
        "as the loop, with one compilation.",
    ]
    return _bench.finish(
        "candidates", args, f"{args.k} RoPE candidates: one evaluate.score call vs a per-candidate loop",
        [_bench.md_table(headers, rows), _bench.md_table(cheaders, crow)], notes, machine_info=machine,
        plan={"sequential": sequential, "candidates_per_call": kc, "calls": -(-args.k // kc), "budget": budget},
        candidates=[{"name": n, "long_factor": f.tolist(), "attention_factor": af} for n, f, af in cands],
        paths=paths, speedup=speedup, target_met=met)


if __name__ == "__main__":
    sys.exit(main())
