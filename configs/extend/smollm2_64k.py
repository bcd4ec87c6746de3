"""The paper's recipe scaled to SmolLM2-135M-Instruct (8k window): factors searched at 16k, fine-tuned
at 16k, the 32k factors searched on that model on top of its factors and fine-tuned from its
weights, a secondary search to 64k without fine-tuning, the short factors readjusted at 8k, perplexity
from 8k to 64k on held-out prose and code of other domains, and an HF export.

    longrope-jax extend --config smollm2_64k --out runs/smollm2-64k

A step at 16k takes minutes on 2 CPU cores and one 64k forward about half an hour: this pipeline
is for an accelerator (or patience). Every length and budget is a ``shared`` value (a test runs the
structure on a tiny LLaMA with the lengths scaled down).
"""

import os

import ml_collections

from . import default

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results", "data")


def get_config():
    c = default.get_config()
    c.model = "smollm2"
    c.data = ["stdlib:"]
    c.heldout = [os.path.normpath(os.path.join(RESULTS, f)) for f in ("heldout_vim.jsonl", "heldout_nodejs.jsonl")]
    c.shared = ml_collections.ConfigDict({
        "window": 8192, "l1": 16384, "l2": 32768, "l3": 65536, "eval_lengths": [8192, 16384, 32768, 65536],
        "steps1": 200, "steps2": 200, "batch": 8, "accum": 8, "remat": "full", "population": 16, "iterations": 3,
        "samples": 2, "mutations": 4, "parents": 6})
    sh = c.shared

    def search(target):
        return default.search(sh, target)

    def train(length, steps, weights, factors):
        return {"kind": "train", "weights": weights, "factors": factors, "seq_len": sh.get_ref(length),
                "steps": sh.get_ref(steps), "batch": sh.get_ref("batch"), "accum": sh.get_ref("accum"),
                "remat": sh.get_ref("remat"), "checkpoint_every": 25}

    c.stages = ml_collections.ConfigDict({
        "search16k": {"kind": "search", **search("l1")},
        "ft16k": train("l1", "steps1", "base", "search16k"),
        "search32k": {"kind": "search", "weights": "ft16k", "factors": "ft16k", **search("l2")},
        "ft32k": train("l2", "steps2", "ft16k", "search32k"),
        "search64k": {"kind": "search", "weights": "ft32k", "factors": "ft32k", **search("l3")},
        "readjust8k": {"kind": "readjust", "weights": "ft32k", "factors": "search64k", **search("window")},
        "evaluate": {"kind": "evaluate", "weights": "ft32k", "factors": "readjust8k",
                     "lengths": sh.get_ref("eval_lengths"), "ropes": ["model"]},
        "evaluate_base": {"kind": "evaluate", "weights": "base", "factors": "search16k",
                          "lengths": sh.get_ref("eval_lengths"), "ropes": ["yarn:8"]},
        "export": {"kind": "export", "weights": "ft32k", "factors": "readjust8k"},
    })
    c.order = ["search16k", "ft16k", "search32k", "ft32k", "search64k", "readjust8k", "evaluate", "evaluate_base",
               "export"]
    return c
