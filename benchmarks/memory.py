#!/usr/bin/env python
"""Peak resident memory of ``longrope-jax ppl`` against transformers' forward with labels.

For each length, two subprocesses run under ``/usr/bin/time -v`` ("Maximum resident set size"):

* ours: ``python -m longrope_jax ppl --model smollm2 --data pydoc: --length N --rope none``
  (exactly the command line tool; its JSON line gives the perplexity and seconds);
* peer: this script in ``--peer-child`` mode: transformers loads the same GGUF in fp32 (SDPA) and
  runs one forward with ``labels=`` on the same first N tokens of the pydoc text, then prints
  the loss. Lengths above ``--peer-max-length`` (default 16384) are skipped for the peer: its
  full ``[L, vocab]`` logits and float32 loss copies take about 22 GiB at 32k.

The subprocesses inherit the thread setting (same count for torch and XLA). ``--background-log
PATH`` appends one JSON line per finished length, so a long run (64k) can go in the background
and be reported as far as it got with ``--from-log PATH``.

    python benchmarks/memory.py --lengths 16384 32768 --json out/memory.json
    nohup python benchmarks/memory.py --lengths 65536 --background-log out/memory64k.jsonl &
    python benchmarks/memory.py --from-log out/memory64k.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TIME = "/usr/bin/time"
TARGET_LENGTH, TARGET_GIB = 32768, 6.0


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768], help="window lengths (tokens)")
    p.add_argument("--peer-max-length", type=int, default=16384,
                   help="run the transformers peer only up to this length (its memory grows with L x vocab)")
    p.add_argument("--no-peer", action="store_true", help="ours only")
    p.add_argument("--background-log", metavar="PATH", help="append one JSON line per finished length")
    p.add_argument("--from-log", metavar="PATH", help="print the table of a --background-log file and exit")
    p.add_argument("--peer-child", nargs=2, metavar=("TOKENS_NPY", "GGUF"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peer_child(tokens_path: str, gguf: str) -> int:
    """Runs inside /usr/bin/time: transformers only (no jax imported), one forward with labels."""
    t0 = time.perf_counter()
    import numpy as np

    model = _bench.load_peer(gguf)
    tokens = np.load(tokens_path)
    t1 = time.perf_counter()
    nll, dt = _bench.timed(_bench.peer_nll, model, tokens)
    print(json.dumps({"nll": nll, "ppl": float(np.exp(nll)), "forward_s": dt, "load_s": t1 - t0}), flush=True)
    return 0


def parse_time_v(text: str) -> dict:
    out = {}
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["max_rss_kib"] = int(m.group(1))
        out["max_rss_gib"] = int(m.group(1)) / 2**20
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    if m:
        secs = 0.0
        for part in m.group(1).split(":"):
            secs = secs * 60 + float(part)
        out["wall_s"] = secs
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        out["exit_status"] = int(m.group(1))
    return out


def under_time(cmd: list[str], tmp: str, tag: str) -> dict:
    tv = os.path.join(tmp, f"{tag}.time")
    _bench.log(f"running {tag}: {' '.join(cmd)}")
    proc = subprocess.run([TIME, "-v", "-o", tv, *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = {"command": cmd, "returncode": proc.returncode}
    try:
        with open(tv) as fh:
            res.update(parse_time_v(fh.read()))
    except OSError:
        pass
    last = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if last:
        res["output"] = json.loads(last[-1])
    if proc.returncode:
        res["stderr_tail"] = proc.stderr[-2000:]
        _bench.log(f"{tag} failed (rc {proc.returncode}): {proc.stderr[-500:]}")
    return res


def run_length(length: int, args, tokenizer, gguf: str, tmp: str) -> dict:
    import numpy as np

    ours_cmd = [sys.executable, "-m", "longrope_jax", "ppl", "--model", "smollm2", "--data", "pydoc:",
                "--length", str(length), "--rope", "none"]
    rec = {"length": length, "ours": under_time(ours_cmd, tmp, f"ours-{length}")}
    if args.no_peer:
        rec["peer"] = {"skipped": "--no-peer"}
    elif length > args.peer_max_length:
        rec["peer"] = {"skipped": f"length {length} > --peer-max-length {args.peer_max_length}"}
    else:
        npy = os.path.join(tmp, f"tokens-{length}.npy")
        np.save(npy, _bench.pydoc_tokens(tokenizer, length))
        child = [sys.executable, os.path.abspath(__file__), "--peer-child", npy, gguf]
        if args.threads:
            child += ["--threads", str(args.threads)]
        rec["peer"] = under_time(child, tmp, f"peer-{length}")
    o, p = rec["ours"], rec["peer"]
    if "max_rss_kib" in o and "max_rss_kib" in p:
        rec["rss_ratio_peer_over_ours"] = p["max_rss_kib"] / o["max_rss_kib"]
    if length == TARGET_LENGTH:
        rec["target_gib"] = TARGET_GIB
        rec["target_met"] = o.get("returncode") == 0 and o.get("max_rss_gib", 1e9) <= TARGET_GIB
    return rec


def table(records: list[dict]) -> str:
    headers = ["length", "ours peak RSS (GiB)", "ours wall (s)", "ours scoring (s)", "ours ppl",
               "transformers peak RSS (GiB)", "transformers wall (s)", "transformers forward (s)", "transformers ppl",
               "RSS ratio (transformers/ours)", "target"]
    rows = []
    for r in records:
        o, p = r["ours"], r["peer"]
        oo, po = o.get("output", {}), p.get("output", {})
        ours_rss = o.get("max_rss_gib")
        if o.get("returncode"):
            ours_rss = f"{ours_rss:.3f} (FAILED rc {o['returncode']})" if ours_rss else f"FAILED rc {o['returncode']}"
        if "skipped" in p:
            peer_rss = f"skipped ({p['skipped']})"
        else:
            peer_rss = p.get("max_rss_gib")
            if p.get("returncode"):
                peer_rss = f"{peer_rss:.3f} (FAILED rc {p['returncode']})" if peer_rss else f"FAILED rc {p['returncode']}"
        target = None
        if "target_met" in r:
            target = f"<= {r['target_gib']:g} GiB: " + ("met" if r["target_met"] else "NOT met")
        ratio = r.get("rss_ratio_peer_over_ours")
        rows.append([r["length"], ours_rss, o.get("wall_s"), oo.get("seconds"), oo.get("ppl"), peer_rss, p.get("wall_s"),
                     po.get("forward_s"), po.get("ppl"), f"{ratio:.2f}x" if ratio else None, target])
    return _bench.md_table(headers, rows)


NOTES = [
    "Peak RSS from `/usr/bin/time -v` (Maximum resident set size) of the whole process: interpreter, runtime, "
    "model weights (fp32), tokenizer and activations. Wall: the whole subprocess (loading, tokenising, ours' "
    "compilation); ours scoring: the `seconds` of its JSON line (compilation included; the persistent "
    "compilation cache of `longrope-jax` is in whatever state it is); transformers forward: the one forward.",
    f"Target: ours at {TARGET_LENGTH} tokens within {TARGET_GIB:g} GiB.",
]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.peer_child:
        _bench.setup_threads(args.threads)
        code = peer_child(*args.peer_child)
        assert "jax" not in sys.modules, "the peer child must not import jax (it would count in its memory)"
        return code
    if args.from_log:
        with open(args.from_log) as fh:
            records = [json.loads(ln) for ln in fh if ln.strip()]
        _bench.report(f"Peak resident memory (from {args.from_log}, {len(records)} finished length(s))",
                      [table(records)], NOTES)
        return 0
    if not os.path.exists(TIME):
        raise SystemExit(f"{TIME} not found (apt-get install time)")
    threads = _bench.setup_threads(args.threads)
    from longrope_jax.loading import gguf_to_cache, smollm2_path
    from longrope_jax.tokenizer import load_for

    gguf = smollm2_path()
    tokenizer = load_for(gguf_to_cache(gguf)[0])
    machine = _bench.machine()
    records = []
    with tempfile.TemporaryDirectory(prefix="longrope-mem-") as tmp:
        for length in args.lengths:
            rec = run_length(length, args, tokenizer, gguf, tmp)
            rec["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            records.append(rec)
            _bench.log(f"{length}: ours {rec['ours'].get('max_rss_gib', float('nan')):.3f} GiB; peer "
                       + (rec["peer"].get("skipped") or f"{rec['peer'].get('max_rss_gib', float('nan')):.3f} GiB"))
            if args.background_log:
                with open(args.background_log, "a") as fh:
                    fh.write(json.dumps(rec) + "\n")
    return _bench.finish("memory", args,
                         "Peak resident memory: `longrope-jax ppl` vs transformers forward with labels",
                         [table(records)], NOTES + [f"{threads} thread(s) for torch and XLA."],
                         machine_info=machine, results=records)


if __name__ == "__main__":
    sys.exit(main())
