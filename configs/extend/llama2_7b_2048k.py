"""The paper's LLaMA-2-7B pipeline (docs/method.md): factors searched at 128k on the base model,
400 steps of fine-tuning at 128k, the 256k factors searched on that model on top of its factors and
600 more steps at 256k from its weights, a secondary search to 2048k on the 256k model without
fine-tuning, and the short factors readjusted at 4k (the original window) and 8k. PG19 documents
(TFDS) as the paper used; ring attention on a v5p-128 slice.

    longrope-jax extend --config llama2_7b_2048k --out /mnt/runs/llama2-2048k  (on a pod: docs/pods.md)

The paper's budgets (search: population 64, 40 generations, 5 windows; halved from 512k, 10
generations at 2048k). Every length and budget is a ``shared`` value, so a test runs this pipeline's
structure on a tiny LLaMA with the lengths scaled down.
"""

import ml_collections

from . import default
from ..meshes import v5p_128
from ..models import llama2_7b


def get_config():
    c = default.get_config()
    c.model = llama2_7b.HUB
    c.data = ["tfds:pg19:train"]
    c.heldout = ["tfds:pg19:test"]
    c.mesh = v5p_128.MESH
    c.shared = ml_collections.ConfigDict({
        "eval_lengths": [4096, 8192, 131072, 262144, 2097152],
        "window": 4096, "l1": 131072, "l2": 262144, "l3": 2097152, "short2": 8192,
        "steps1": 400, "steps2": 600, "batch": 32, "accum": 8, "remat": "full", "attention": "ring",
        "population": 64, "iterations": 40, "samples": 5, "population_long": 32, "iterations_long": 10,
        "samples_long": 3, "mutations": 16, "mutations_long": 8, "parents": 32, "parents_long": 16})
    sh = c.shared

    def search(target, long=False):
        return default.search(sh, target, "_long" if long else "", attention="auto")

    def train(length, steps, weights, factors):
        return {"kind": "train", "weights": weights, "factors": factors, "seq_len": sh.get_ref(length),
                "steps": sh.get_ref(steps), "batch": sh.get_ref("batch"), "accum": sh.get_ref("accum"),
                "remat": sh.get_ref("remat"), "attention": sh.get_ref("attention"), "dtype": "bfloat16"}

    c.stages = ml_collections.ConfigDict({
        "search128k": {"kind": "search", **search("l1")},
        "ft128k": train("l1", "steps1", "base", "search128k"),
        "search256k": {"kind": "search", "weights": "ft128k", "factors": "ft128k", **search("l2")},
        "ft256k": train("l2", "steps2", "ft128k", "search256k"),
        "search2048k": {"kind": "search", "weights": "ft256k", "factors": "ft256k", **search("l3", long=True)},
        "readjust4k": {"kind": "readjust", "weights": "ft256k", "factors": "search2048k", **search("window")},
        "readjust8k": {"kind": "readjust", "weights": "ft256k", "factors": "readjust4k", **search("short2")},
        "evaluate": {"kind": "evaluate", "weights": "ft256k", "factors": "readjust8k",
                     "lengths": sh.get_ref("eval_lengths")},
        "export": {"kind": "export", "weights": "ft256k", "factors": "readjust8k"},
    })
    c.order = ["search128k", "ft128k", "search256k", "ft256k", "search2048k", "readjust4k", "readjust8k", "evaluate",
               "export"]
    return c
