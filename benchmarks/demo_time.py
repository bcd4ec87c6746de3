#!/usr/bin/env python
"""The demo's wall time and each stage's: ``longrope-jax demo`` (``configs/extend/tiny.py``) run in a
fresh folder, the stages' seconds read from its ``pipeline.json``. Target: the whole method in at
most 15 minutes on 2 idle CPU cores, compilation included. No peer: nothing else runs this pipeline.

    python benchmarks/demo_time.py --json out/demo_time.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench  # noqa: E402

TARGET_S = 15 * 60


def parse_args(argv=None):
    p = _bench.parser(__doc__)
    p.add_argument("--out", help="run folder (default: a temporary one)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    _bench.setup_threads(args.threads)
    import json
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "demo")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "longrope_jax", "demo", "--out", out], check=True,
                       stdout=subprocess.DEVNULL)
        total = time.perf_counter() - t
        with open(os.path.join(out, "pipeline.json")) as fh:
            stages = {k: v["seconds"] for k, v in json.load(fh)["stages"].items()}
        with open(os.path.join(out, "report.json")) as fh:
            claims = json.load(fh)["claims"]
    rows = [[k, f"{v:.1f}"] for k, v in stages.items()] + [["total (the command, start-up included)",
                                                           f"{total:.1f}"]]
    notes = [f"target: at most {TARGET_S} s: {'met' if total <= TARGET_S else 'NOT met'}.",
             "claims: " + "; ".join(f"{k}: {'holds' if v['holds'] else 'does not hold'}" for k, v in claims.items())]
    return _bench.finish("demo_time", args, "The demo's wall time", [_bench.md_table(["stage", "seconds"], rows)],
                         notes, stages=stages, total_s=total, claims=claims)


if __name__ == "__main__":
    sys.exit(main())
