"""The paper's Mistral-7B pipeline (docs/method.md): sliding window off; factors searched at 128k,
fine-tuning at 128k (YaRN's recipe for Mistral: constant lr 1e-6, 64 rows a step, 400 steps), the
256k factors searched on that model on top of its factors and fine-tuned from its weights, the
short factors readjusted at the 8k window. PG19 documents (TFDS); ring attention on a v5p-128.

    longrope-jax extend --config mistral_7b_256k --out /mnt/runs/mistral-256k  (on a pod: docs/pods.md)

Every length and budget is a ``shared`` value (a test runs the structure on a tiny Mistral).
"""

import ml_collections

from . import default
from ..meshes import v5p_128
from ..models import mistral_7b


def get_config():
    c = default.get_config()
    c.model = mistral_7b.HUB
    c.data = ["tfds:pg19:train"]
    c.heldout = ["tfds:pg19:test"]
    c.mesh = v5p_128.MESH
    c.shared = ml_collections.ConfigDict({
        "eval_lengths": [8192, 131072, 262144],
        "window": 8192, "l1": 131072, "l2": 262144, "steps": 400, "batch": 64, "accum": 16, "remat": "full",
        "attention": "ring", "population": 64, "iterations": 40, "samples": 5, "mutations": 16, "parents": 32})
    sh = c.shared

    def search(target):
        return default.search(sh, target, no_sliding_window=True)

    def train(length, weights, factors):
        return {"kind": "train", "weights": weights, "factors": factors, "seq_len": sh.get_ref(length),
                "steps": sh.get_ref("steps"), "batch": sh.get_ref("batch"), "accum": sh.get_ref("accum"),
                "lr": 1e-6, "warmup_steps": 0, "schedule": "constant", "remat": sh.get_ref("remat"),
                "attention": sh.get_ref("attention"), "dtype": "bfloat16", "no_sliding_window": True}

    c.stages = ml_collections.ConfigDict({
        "search128k": {"kind": "search", **search("l1")},
        "ft128k": train("l1", "base", "search128k"),
        "search256k": {"kind": "search", "weights": "ft128k", "factors": "ft128k", **search("l2")},
        "ft256k": train("l2", "ft128k", "search256k"),
        "readjust8k": {"kind": "readjust", "weights": "ft256k", "factors": "search256k", **search("window")},
        "evaluate": {"kind": "evaluate", "weights": "ft256k", "factors": "readjust8k",
                     "lengths": sh.get_ref("eval_lengths")},
        "export": {"kind": "export", "weights": "ft256k", "factors": "readjust8k"},
    })
    c.order = ["search128k", "ft128k", "search256k", "ft256k", "readjust8k", "evaluate", "export"]
    return c
