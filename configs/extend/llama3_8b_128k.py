"""LongRoPE2's Llama-3-8B pipeline: from its 8k window to 128k with the critical-dimension search
(``mode: longrope2``, needle-driven perplexity as the fitness) on the base model, then fine-tuning
at 128k with mixed context windows (of each step's 8 microbatches, 2 hold documents within the 8k
window under the original RoPE, packed; the other 6 the long documents under the searched
factors), perplexity at 8k and 128k, and an HF export. No readjust: the mixed training keeps the
original window. The budget is LongRoPE2's 10B tokens (2384 steps of 32 rows of 128k tokens); the
optimizer settings are the LLaMA-2 recipe's (lr 2e-5, linear decay). PG19 documents (TFDS) here;
LongRoPE2 used its own mix. Ring attention on a v5p-128.

    longrope-jax plan --config llama3_8b_128k
    longrope-jax extend --config llama3_8b_128k --out /mnt/runs/llama3-128k  (on a pod: docs/pods.md)

Every length and budget is a ``shared`` value (a test runs the structure on a tiny LLaMA).
"""

import ml_collections

from . import default
from ..meshes import v5p_128
from ..models import llama3_8b


def get_config():
    c = default.get_config()
    c.model = llama3_8b.HUB
    c.data = ["tfds:pg19:train"]
    c.heldout = ["tfds:pg19:test"]
    c.mesh = v5p_128.MESH
    c.shared = ml_collections.ConfigDict({
        "eval_lengths": [8192, 131072], "window": 8192, "l1": 131072, "steps1": 2384, "batch": 32, "accum": 8,
        "short_microbatches": 2, "remat": "full", "attention": "ring", "population": 64, "iterations": 40,
        "samples": 5, "mutations": 16, "parents": 32})
    sh = c.shared
    c.stages = ml_collections.ConfigDict({
        "search128k": {"kind": "search", **default.search(sh, "l1", mode="longrope2", fitness="needle")},
        "ft128k": {"kind": "train", "weights": "base", "factors": "search128k", "seq_len": sh.get_ref("l1"),
                   "steps": sh.get_ref("steps1"), "batch": sh.get_ref("batch"), "accum": sh.get_ref("accum"),
                   "short_microbatches": sh.get_ref("short_microbatches"), "packing": True,
                   "remat": sh.get_ref("remat"), "attention": sh.get_ref("attention"), "dtype": "bfloat16"},
        "evaluate": {"kind": "evaluate", "weights": "ft128k", "factors": "ft128k",
                     "lengths": sh.get_ref("eval_lengths")},
        "export": {"kind": "export", "weights": "ft128k", "factors": "ft128k"},
    })
    c.order = ["search128k", "ft128k", "evaluate", "export"]
    return c
