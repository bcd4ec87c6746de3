"""The train command's settings: what each must hold (their defaults: ``configs/train/default.py``),
their resolution from flags, overrides and a config, and the checks no single setting makes. A
pipeline's train stage is a section checked by the same rules."""

from __future__ import annotations

from longrope_jax import config_files, parallel
from longrope_jax.config_files import MODEL_KINDS
from longrope_jax.train import trainer as trainer_lib
from longrope_jax.train.trainer import TrainError

# What each setting of ``longrope-jax train`` must hold (its defaults: ``configs/train/default.py``).
KINDS = dict(
    **parallel.SETTINGS_KINDS, **dict(MODEL_KINDS, model="str?"), model_config="dict", init_seed="int0", rope="str",
    data="strs", prepared="str?", field="str", seq_len="int", min_document_tokens="int0", packing="bool",
    short_microbatches="int0",
    skip_to="int?", skip_chunks="int", batch="int", accum="int", steps="int",
    lr="number", warmup_steps="int0", schedule="linear|cosine|constant", end_lr_ratio="number0", b1="number0",
    b2="number0", eps="number", weight_decay="number0", clip_norm="number0", seed="int0", dtype="float32|bfloat16",
    remat="none|full|dots|attention", attention="auto|dense|blockwise|ring|ring_splash", q_chunk="int?", loss_chunk="int",
    checkpoint_every="int", keep="int", eval_every="int0", eval_data="strs?", eval_lengths="ints?", eval_samples="int",
    out="str")
REQUIRED = ("out", "seq_len")
LISTY = ("data", "eval_data", "eval_lengths")


def resolve(config: str | None = None, overrides=(), flags=None):
    """The settings of one ``train`` run (``config_files.resolve``), checked as a whole."""
    return check(config_files.resolve("train", KINDS, config=config, overrides=overrides, flags=flags,
                                      required=REQUIRED, listy=LISTY))


def section(given, where: str):
    """A ``train`` section in memory (a pipeline stage's) merged onto the defaults and checked."""
    return check(config_files.section("train", KINDS, given, where, required=REQUIRED, listy=LISTY))


def replaced(s, changes):
    """Settings ``s`` with ``changes`` (key -> value), checked (a copy; ``s`` stays as it is)."""
    out = s.copy_and_resolve_references()
    with out.unlocked():
        for k, v in changes.items():
            out[k] = v
    out.lock()
    return check(out)


def check(s):
    """What no single setting says: held-out evaluation needs its data, the batch splits into
    microbatches, a model comes from a path or from ``model_config``."""
    if s["eval_every"] and not (s["eval_data"] and s["eval_lengths"]):
        raise TrainError("eval_every: held-out perplexity needs eval_data and eval_lengths")
    trainer_lib.check(s)
    if not s["model"] and not s["model_config"]:
        raise TrainError("model: expected a model path, or model_config for a model trained from scratch")
    return s
