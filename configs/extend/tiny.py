"""The whole method on a model that trains here (the demo's pipeline, ``longrope-jax demo``): a tiny
LLaMA pretrained on the Python standard library at a 512-token window; a search at 8x (4096) without
fine-tuning; fine-tuning at 8x in three arms with the same steps and rows, started from the
searched factors, from PI and from YaRN; a secondary search at 16x (8192) on the fine-tuned
LongRoPE arm without fine-tuning; a readjust of its short factors at the original window;
perplexity at every length on held-out prose (pydoc: the model saw only code); an HF export.

    longrope-jax extend --config tiny --out runs/extend-tiny [--config.shared.window=128 ...]

Every length derives from ``shared.window`` (the pretraining window; the lengths scored,
``shared.lengths``, are given apart), every fine-tuning arm's steps from ``shared.ft_steps``, every
search's budget from ``shared.population`` and ``shared.iterations``: one value each, changed once. The searches keep start tokens at 0: Hugging Face cannot express them, and
the export must load in transformers. The budgets are sized to the demo's 15 minutes on 2 CPU
cores.
"""

import ml_collections

from . import default
from ..train import tiny as tiny_train


def get_config():
    c = default.get_config()
    c.shared = ml_collections.ConfigDict({"window": 512, "ft_steps": 120, "pretrain_steps": 400, "population": 16,
                                          "iterations": 3, "lengths": [512, 1024, 2048, 4096, 8192]})
    w = c.shared.get_ref("window")
    pretrain = tiny_train.get_config()
    model_config = ml_collections.ConfigDict(pretrain.model_config.to_dict())
    model_config.max_position_embeddings = w
    lengths = c.shared.get_ref("lengths")  # where every arm is scored: the window to 16x it

    def ft(factors):
        return {"kind": "train", "weights": "pretrain", "factors": factors, "seq_len": w * 8, "batch": 1,
                "steps": c.shared.get_ref("ft_steps"), "lr": 1e-3, "warmup_steps": 5, "schedule": "cosine",
                "end_lr_ratio": 0.1, "b2": 0.95, "weight_decay": 0.01, "loss_chunk": 512, "checkpoint_every": 10}

    def search(**kw):
        return {"population": c.shared.get_ref("population"), "iterations": c.shared.get_ref("iterations"),
                "mutations": 4, "crossovers": 4, "parents": 4, "samples": 2, "start_tokens": [0], **kw}

    c.stages = ml_collections.ConfigDict({
        "pretrain": {"kind": "train", "model_config": model_config, "seq_len": w, "steps": c.shared.get_ref(
            "pretrain_steps"), **{k: pretrain[k] for k in ("batch", "lr", "warmup_steps", "schedule", "end_lr_ratio",
                                                            "b2", "weight_decay", "loss_chunk", "checkpoint_every")}},
        "search8x": {"kind": "search", **search(target_length=w * 8)},
        "ft_longrope": ft("search8x"),
        "ft_pi": ft("pi:8"),
        "ft_yarn": ft("yarn:8"),
        "search16x": {"kind": "search", "weights": "ft_longrope", "factors": "ft_longrope",
                      **search(target_length=w * 16)},
        "readjust": {"kind": "readjust", "weights": "ft_longrope", "factors": "search16x", **search(target_length=w)},
        "eval_base": {"kind": "evaluate", "weights": "pretrain", "factors": "search8x", "lengths": lengths,
                      "ropes": ["none", "pi:8", "yarn:8"]},
        # The LongRoPE arm with its readjusted factors, and with the 8x factors it was fine-tuned with.
        "eval_longrope": {"kind": "evaluate", "weights": "ft_longrope", "factors": "readjust", "lengths": lengths,
                          "ropes": ["model"]},
        "eval_pi": {"kind": "evaluate", "weights": "ft_pi", "lengths": lengths},
        "eval_yarn": {"kind": "evaluate", "weights": "ft_yarn", "lengths": lengths},
        "export": {"kind": "export", "weights": "ft_longrope", "factors": "readjust"},
    })
    c.order = ["pretrain", "search8x", "ft_longrope", "ft_pi", "ft_yarn", "search16x", "readjust", "eval_base",
               "eval_longrope", "eval_pi", "eval_yarn", "export"]
    return c
