"""``longrope-jax``: argparse subcommands, each parsing flags and calling one library function.

JSON lines go to stdout, the human table and progress to stderr (REFERENCE.md section 8).
"""

from __future__ import annotations

import argparse
import json
import sys


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _table(rows: list[dict]) -> str:
    head = f"{'length':>8} {'rope':<24} {'ppl':>12} {'predictions':>12} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        mark = " (beyond window, unscaled)" if r.get("beyond_window") else ""
        lines.append(f"{r['length']:>8} {r['rope']:<24} {r['ppl']:>12.4f} {r['predictions']:>12} "
                     f"{r['seconds']:>8.1f}{mark}")
    return "\n".join(lines)


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF directory, .gguf file, 'smollm2', or Hub id")
    p.add_argument("--tokenizer", help="tokenizer.json overriding the model's own")
    p.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-sliding-window", action="store_true", help="switch Mistral's sliding window off")


def cmd_ppl(args) -> int:
    from longrope_jax.evaluate import run_ppl

    rows = []
    for rec in run_ppl(args.model, args.data, args.length, args.rope or ["none"], samples=args.samples,
                       seed=args.seed, param_dtype=args.param_dtype, attention=args.attention,
                       q_chunk=args.q_chunk, loss_chunk=args.loss_chunk, tokenizer=args.tokenizer,
                       sliding_window=not args.no_sliding_window, field=args.field, log=_log):
        print(json.dumps(rec), flush=True)
        rows.append(rec)
    _log(_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longrope-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ppl", help="perplexity of a model under RoPE scalings at given lengths")
    _add_model_flags(p)
    p.add_argument("--data", required=True, help="text file, .jsonl, directory, or 'pydoc:'")
    p.add_argument("--length", type=int, action="append", required=True, help="tokens per window (repeatable)")
    p.add_argument("--rope", action="append",
                   help="none | pi:S | ntk:S | dynamic:S | yarn:S | llama3:S | longrope | FACTORS.json (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="documents per length (seeded choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--attention", default="auto", choices=["auto", "dense", "blockwise"],
                   help="auto: dense up to 2048 tokens, blockwise beyond")
    p.add_argument("--q-chunk", type=int, default=None,
                   help="attention block: query rows (dense) or q/kv block size (blockwise); default 512 beyond 2048")
    p.add_argument("--loss-chunk", type=int, default=1024, help="tokens per projection+loss step")
    p.set_defaults(func=cmd_ppl)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from longrope_jax.cache import enable_compilation_cache

    enable_compilation_cache()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        _log(f"longrope-jax {args.command}: error: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
