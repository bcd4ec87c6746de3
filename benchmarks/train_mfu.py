#!/usr/bin/env python
"""Model FLOPs utilisation of ``configs/train/tiny.py``: the ``train`` job's own steps against
transformers + ``torch.optim.AdamW`` on the same model, weights, batches and schedule.

Ours: the ``longrope-jax train`` command on the config in a process of its own (eval off, one
checkpoint at the end), step times from its ``metrics.jsonl``
(``tokens_per_s``: the loop's wall time per step, data, checkpoint scheduling and metrics
included). Peer: the job's initial params exported to HF (``convert``), loaded by
transformers (``LlamaForCausalLM``), then the same updates: the job's batches (``chunks.npy``,
``step_rows``), ``clip_grad_norm_``, AdamW with the config's betas, eps, weight decay and the
same learning rate per step. The losses per step should agree to float32 rounding.

MFU = model FLOPs per second / this machine's measured fp32 matmul peak (``flops.machine_rate``,
max of numpy and jax, measured in the same run). Model FLOPs per token are the job's own
``train.flops.model_flops_per_token`` (6 x matmul parameters + causal attention). The first ``--skip`` steps
(compilation, warm-up) are left out of both medians.

    python benchmarks/train_mfu.py --steps 12 --threads 2 --json out/train_mfu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TINY = os.path.join(_bench.REPO, "configs", "train", "tiny.py")


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--config", default=TINY)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--no-peer", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a train setting for both sides (--config.KEY=VALUE), e.g. attention=dense")
    return p.parse_args(argv)


def _peer_steps(hf_dir, chunks, s, steps):
    """Per-step (seconds, loss) of transformers + torch AdamW on the job's batches and rates."""
    import time

    import numpy as np
    import torch
    import transformers

    from longrope_jax.train import data as data_lib
    from longrope_jax.train import step as step_lib

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    model.train(False)  # no dropout in either
    lr, update = step_lib.schedule(s), _bench.torch_adamw(model, s)
    ids = data_lib.order(len(chunks), s["seed"])
    out = []
    for t in range(steps):
        batch = torch.from_numpy(np.asarray(chunks[data_lib.step_rows(len(chunks), s["seed"], t, s["batch"], ids=ids)],
                                            np.int64))
        t0 = time.perf_counter()
        loss = update(batch, lr(t))
        out.append((time.perf_counter() - t0, loss))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _bench.setup_threads(args.threads, train=True)
    _bench.torch_threads()
    import dataclasses

    import numpy as np

    import flops
    from longrope_jax import checkpoint
    from longrope_jax.jobs import convert
    from longrope_jax.jobs import train as train_job
    from longrope_jax.train.flops import model_flops_per_token

    rate = flops.machine_rate(args.matmul_size, args.matmul_repeats)
    _bench.log(f"matmul {args.matmul_size}^3 fp32: peak {rate['peak'] / 1e9:.1f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        run, first = os.path.join(tmp, "run"), os.path.join(tmp, "first")
        overrides = [f"--config.steps={args.steps}", f"--config.checkpoint_every={args.steps}", "--config.eval_every=0",
                     *[f"--config.{x}" for x in args.set]]
        s = train_job.resolve(args.config, overrides, {"out": run})
        os.makedirs(first)
        cfg, params, _, tok_path, _, _ = train_job.initial_model(s, first, _bench.log)  # the job's initial params
        if not args.no_peer:
            checkpoint.save(os.path.join(tmp, "init"), dataclasses.replace(cfg, remat="none"), params,
                            tokenizer_file=tok_path)
            convert.run(os.path.join(tmp, "init"), os.path.join(tmp, "hf"))
        # The command in a process of its own: torch's threads (loaded here) never run beside XLA's.
        r = subprocess.run([sys.executable, "-m", "longrope_jax", "train", "--config", args.config, *overrides,
                            "--out", run], capture_output=True, text=True, cwd=_bench.REPO)
        if r.returncode:
            raise SystemExit(f"train failed: {r.stderr[-1500:]}")
        with open(os.path.join(run, "metrics.jsonl")) as fh:
            recs = [json.loads(line) for line in fh]
        chunks = np.load(os.path.join(run, "data", "chunks.npy"))
        peer = None if args.no_peer else _peer_steps(os.path.join(tmp, "hf"), chunks, s, args.steps)
    tokens = s["batch"] * s["seq_len"]
    per_token = model_flops_per_token(cfg, s["seq_len"])
    ours_s = _bench.median([tokens / r["tokens_per_s"] for r in recs[args.skip:]])
    row = {"ours": {"step_s": ours_s, "losses": [r["loss"] for r in recs],
                    "mfu": tokens * per_token / ours_s / rate["peak"]}}
    if peer is not None:
        peer_s = _bench.median([dt for dt, _ in peer[args.skip:]])
        row["peer"] = {"step_s": peer_s, "losses": [l for _, l in peer], "mfu": tokens * per_token / peer_s / rate["peak"]}
        row["speed_ratio"] = peer_s / ours_s
        row["max_loss_diff"] = max(abs(a - b) for a, b in zip(row["ours"]["losses"], row["peer"]["losses"]))
    o, p = row["ours"], row.get("peer")
    table = [[f"{s['batch']} x {s['seq_len']}", f"{tokens * per_token / 1e9:.2f}", f"{o['step_s']:.3f}",
              f"{100 * o['mfu']:.1f}%", p and f"{p['step_s']:.3f}", p and f"{100 * p['mfu']:.1f}%",
              p and f"{row['speed_ratio']:.2f}x", p and f"{row['max_loss_diff']:.2g}"]]
    headers = ["batch x length", "model GFLOP / step", "ours step (s)", "ours MFU", "transformers step (s)",
               "transformers MFU", "speed ratio (ours / transformers)", "max |loss diff| over steps"]
    notes = [f"{os.path.relpath(args.config, _bench.REPO)}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
             f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} kv, head dim {cfg.head_dim}, vocab "
             f"{cfg.vocab_size}, {s['dtype']}; {args.steps} steps, medians of steps {args.skip}..{args.steps - 1}; "
             f"{threads} thread(s) for torch and XLA.",
             f"Model FLOPs per token (train.flops.model_flops_per_token): {per_token:,.0f}; peak: {args.matmul_size}^3 "
             f"fp32 matmul, max(numpy {rate['numpy'] / 1e9:.1f}, jax {rate['jax'] / 1e9:.1f}) = "
             f"{rate['peak'] / 1e9:.1f} GFLOP/s (torch {rate['torch'] / 1e9:.1f}).",
             "Ours is the job's whole loop per step (data, metrics, checkpoint scheduling); the peer times the update "
             "only. Losses: " + " / ".join(f"{x:.4f}" for x in o["losses"][:4]) + " ..."]
    return _bench.finish("train_mfu", args,
                         "Train MFU of configs/train/tiny.py: the train job vs transformers + torch AdamW",
                         [_bench.md_table(headers, table)], notes, matmul_rate=rate, flops_per_token=per_token,
                         results=row)


if __name__ == "__main__":
    sys.exit(main())
