"""Phi-3-mini from its 4k window to 128k, as Microsoft's 128k sibling was made (LongRoPE on the 4k
model): factors searched at 128k on the base model, fine-tuning at 128k with them (the paper's
LLaMA-2 recipe: 400 steps, lr 2e-5 with linear decay, 32 rows a step), the short factors
readjusted at the 4k window, perplexity at 4k and 128k, and an HF export that ``Phi3ForCausalLM``
loads (fused ``qkv_proj`` / ``gate_up_proj``, its ``longrope`` block). The 2047-token sliding
window is switched off (the 128k model's window, 262144, covers every length). PG19 documents
(TFDS); ring attention on a v5p-128.

    longrope-jax plan --config phi3_mini_128k
    longrope-jax extend --config phi3_mini_128k --out /mnt/runs/phi3-mini-128k  (on a pod: docs/pods.md)

Every length and budget is a ``shared`` value (a test runs the structure on a tiny Phi-3).
"""

import ml_collections

from . import default
from ..meshes import v5p_128
from ..models import phi3_mini_4k


def get_config():
    c = default.get_config()
    c.model = phi3_mini_4k.HUB
    c.data = ["tfds:pg19:train"]
    c.heldout = ["tfds:pg19:test"]
    c.mesh = v5p_128.MESH
    c.shared = ml_collections.ConfigDict({
        "eval_lengths": [4096, 131072], "window": 4096, "l1": 131072, "steps1": 400, "batch": 32, "accum": 8,
        "remat": "full", "attention": "ring", "population": 64, "iterations": 40, "samples": 5, "mutations": 16,
        "parents": 32})
    sh = c.shared

    def search(target):
        return default.search(sh, target, no_sliding_window=True)

    c.stages = ml_collections.ConfigDict({
        "search128k": {"kind": "search", **search("l1")},
        "ft128k": {"kind": "train", "weights": "base", "factors": "search128k", "seq_len": sh.get_ref("l1"),
                   "steps": sh.get_ref("steps1"), "batch": sh.get_ref("batch"), "accum": sh.get_ref("accum"),
                   "remat": sh.get_ref("remat"), "attention": sh.get_ref("attention"), "dtype": "bfloat16",
                   "no_sliding_window": True},
        "readjust4k": {"kind": "readjust", "weights": "ft128k", "factors": "search128k", **search("window")},
        "evaluate": {"kind": "evaluate", "weights": "ft128k", "factors": "readjust4k",
                     "lengths": sh.get_ref("eval_lengths")},
        "export": {"kind": "export", "weights": "ft128k", "factors": "readjust4k"},
    })
    c.order = ["search128k", "ft128k", "readjust4k", "evaluate", "export"]
    return c
