#!/usr/bin/env python
"""The cost of progress from inside compiled calls: ``evaluate.score`` with the per-layer host
callback (``progress.layer_done``, what ``ppl``, ``search`` and ``train``'s evaluation run on
CPU) against the same call compiled without it.

SmolLM2-135M fp32, one pydoc window per length, no RoPE scaling, the ``ppl`` command's attention
choice. Both programs are compiled first; then ``--repeats`` timed pairs alternate (with, then
without), so drift in the machine's load hits both alike; the overhead is the median of the
pairs' ratios minus 1. Target: under 2%. The tracker prints nothing here (its first line is due
after 10 s; the callbacks still run and are what is measured).

    python benchmarks/progress_overhead.py --lengths 2048 8192 --repeats 3 --json out/progress_overhead.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET = 0.02


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--repeats", type=int, default=3, help="timed pairs per length")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads)
    import jax

    from longrope_jax import evaluate, progress
    from longrope_jax import rope as rope_lib
    from longrope_jax.attention import select
    from longrope_jax.factors import resolve_rope

    ours = _bench.load_ours()
    progress.EVERY = 1e9  # measure the callbacks, not the lines
    rows, results = [], []
    for length in args.lengths:
        tokens = _bench.pydoc_tokens(ours.tokenizer, length)
        specs = rope_lib.stack([resolve_rope("none", ours.cfg, length)])
        attn = select.pick("auto", length)

        def run(on):
            progress.ENABLED = on
            return evaluate.score(ours.params, ours.cfg, tokens, specs, attention=attn,
                                  q_chunk=select.default_block(length), devices=jax.local_devices()[:1])

        nll = {on: run(on) for on in (True, False)}  # compile both
        assert abs(float(nll[True][0, 0]) - float(nll[False][0, 0])) <= 1e-6 * abs(float(nll[False][0, 0]))
        pairs = []
        for _ in range(args.repeats):
            _, with_s = _bench.timed(run, True)
            _, without_s = _bench.timed(run, False)
            pairs.append((with_s, without_s))
        ratio = _bench.median([w / wo for w, wo in pairs])
        results.append({"length": length, "pairs": pairs, "overhead": ratio - 1})
        with_s, without_s = _bench.median([w for w, _ in pairs]), _bench.median([wo for _, wo in pairs])
        rows.append([length, f"{with_s:.2f}", f"{without_s:.2f}", f"{100 * (ratio - 1):+.2f}%",
                     "yes" if ratio - 1 < TARGET else "NO"])
        _bench.log(f"{length}: with {rows[-1][1]} s, without {rows[-1][2]} s, overhead {rows[-1][3]}")
    table = _bench.md_table(["length", "with progress (s)", "without (s)", "overhead (median of pairs)",
                             f"under {100 * TARGET:.0f}%"], rows)
    notes = [f"SmolLM2-135M fp32, {ours.cfg.num_hidden_layers} layers (a callback each), one window, "
             f"{threads} thread(s); {args.repeats} alternating pairs per length after compiling both programs.",
             f"jax {jax.__version__}; the peer is the same call compiled without the callback."]
    return _bench.finish("progress_overhead", args, "Progress from inside compiled calls: overhead", [table], notes,
                         results=results)


if __name__ == "__main__":
    sys.exit(main())
