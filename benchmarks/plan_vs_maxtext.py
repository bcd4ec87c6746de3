"""LLaMA-2-7B's train step compiled for a TPU topology here, ours (``longrope-jax plan``) and
MaxText's (``train_compile``), side by side: per-device bytes and the compiler's step-time estimate.

Both: LLaMA-2-7B, 4 rows a step of LENGTH tokens, no accumulation, full remat, bf16 activations,
fp32 weights and AdamW moments, on v5p-128 (64 chips) as fsdp 4 x sequence 16; ours with ring
attention (``--attention``: ``ring`` or ``ring_splash``), MaxText with ring context parallelism
(``use_tokamax_splash=True``, its splash kernels). MaxText runs from its own virtual environment
(Python >= 3.12, ``pip install "maxtext[tpu]==0.2.5"``; it brings its own jax and libtpu), so each
side's versions are printed.

    python benchmarks/plan_vs_maxtext.py --maxtext-python /work/maxtext-venv/bin/python \
        --lengths 32768 131072 [--json benchmarks/logs/plan_vs_maxtext.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

ROWS, TOPOLOGY, MAXTEXT_TOPOLOGY, MESH = 4, "v5p:4x4x4", "v5p-128", "fsdp=4,sequence=16"


def ours(length: int, attention: str) -> dict:
    argv = [sys.executable, "-m", "longrope_jax", "plan", "--config", "train/default",
            "--config.model=meta-llama/Llama-2-7b-hf", "--topology", TOPOLOGY, "--mesh", MESH,
            f"--config.seq_len={length}", f"--config.batch={ROWS}", "--config.accum=1", "--config.remat=full",
            "--config.dtype=bfloat16", "--config.param_dtype=float32", f"--config.attention={attention}",
            "--no-suggest"]
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    out = json.loads(r.stdout.splitlines()[-1])["stages"]["train"]["compiled"]
    return {k: out.get(k) for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes",
                                    "optimal_seconds", "compile_seconds", "versions")}


def maxtext(python: str, length: int) -> dict:
    code = "import maxtext, os; print(os.path.dirname(maxtext.__file__))"
    base = os.path.join(subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.strip(),
                        "configs", "base.yml")
    argv = [python, "-m", "maxtext.trainers.pre_train.train_compile", base, f"compile_topology={MAXTEXT_TOPOLOGY}",
            "compile_topology_num_slices=1", "model_name=llama2-7b", f"max_target_length={length}",
            f"per_device_batch_size={ROWS / 64}", "ici_fsdp_parallelism=4", "ici_context_parallelism=16",
            "remat_policy=full", "dtype=bfloat16", "weight_dtype=float32", "context_parallel_strategy=ring",
            "use_tokamax_splash=True", "attention=flash", "base_output_directory=/tmp/maxtext_compile",
            f"run_name=plan_vs_maxtext_{length}"]
    r = subprocess.run(argv, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
    text = r.stdout + r.stderr
    m = re.search(r"CompiledMemoryStats\((.*?)\)", text)
    if r.returncode or not m:
        raise RuntimeError(f"MaxText's train_compile failed (rc {r.returncode}): {text[-2000:]}")
    stats = dict(re.findall(r"(\w+)=(\d+)", m.group(1)))
    out = {k: int(stats[f"{k[:-6]}_size_in_bytes"]) for k in ("argument_bytes", "output_bytes", "temp_bytes",
                                                               "alias_bytes")}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    sec = re.search(r"'optimal_seconds': ([-\d.e]+)", text)
    out["optimal_seconds"] = float(sec.group(1)) if sec else None
    versions = subprocess.run([python, "-c", "import jax, importlib.metadata as m; print(jax.__version__, "
                               "m.version('libtpu'), m.version('maxtext'))"], capture_output=True, text=True)
    out["versions"] = dict(zip(("jax", "libtpu", "maxtext"), versions.stdout.split()))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maxtext-python", required=True, help="the python of MaxText's virtual environment")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--attention", default="ring", choices=["ring", "ring_splash"])
    p.add_argument("--json", help="write the rows here too")
    a = p.parse_args()
    rows = []
    print(f"{'tokens':>8} | {'ours GiB':>9} | {'MaxText GiB':>11} | {'ours / MaxText':>14} | "
          f"{'ours temp':>9} | {'MaxText temp':>12} | {'ours est s':>10} | {'MaxText est s':>13}")
    for n in a.lengths:
        o, m = ours(n, a.attention), maxtext(a.maxtext_python, n)
        rows.append({"length": n, "ours": o, "maxtext": m})
        g = 2**30
        print(f"{n:>8} | {o['peak_bytes'] / g:9.2f} | {m['peak_bytes'] / g:11.2f} | "
              f"{o['peak_bytes'] / m['peak_bytes']:14.2f} | {o['temp_bytes'] / g:9.2f} | {m['temp_bytes'] / g:12.2f} | "
              f"{o['optimal_seconds'] if o['optimal_seconds'] and o['optimal_seconds'] > 0 else 'none':>10} | "
              f"{m['optimal_seconds']:>13.4f}", flush=True)
    print(f"ours: {rows[0]['ours']['versions']}; MaxText: {rows[0]['maxtext']['versions']}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
