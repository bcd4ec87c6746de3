"""SmolLM2-135M-Instruct (8k window) fine-tuned for a 32k window at the cost of 2k-token rows:
positional skips (PoSE) over the committed 32k LongRoPE factors (``results/smollm2_32k/search_gen1``:
a progressive search on top of the 16k factors, one generation), their long set fixed for the
span. The paper's recipe (the defaults) scaled down to what a CPU can run: one row of 2048 tokens
per step, 300 steps.

    longrope-jax train --config smollm2_32k_pose --out runs/smollm2-32k-pose \\
        [--rope yarn:4 ...]          # another arm of the same stage: only its starting factors differ

``rope`` names the committed factors of this checkout (``results/`` is not installed with the
package: give ``--rope`` elsewhere). On 2 CPU cores a step takes about 20 s. The fine-tuning
study (``results/smollm2_32k_ft``) runs its arms with this config.
"""

import os

from . import default

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "results")


def get_config():
    c = default.get_config()
    c.model = "smollm2"
    c.rope = os.path.normpath(os.path.join(RESULTS, "smollm2_32k", "search_gen1", "factors.json"))
    c.seq_len = 2048
    c.skip_to = 32768
    c.skip_chunks = 2  # PoSE's two chunks: the second moved by one skip in [0, 32768 - 2048]
    c.batch = 1
    c.steps = 300
    c.checkpoint_every = 25
    # Held-out evaluation at 32k costs minutes a window here: done apart, before and after
    # (results/smollm2_32k_ft/run_all.sh); give eval_every to follow it during training.
    c.eval_data = ["pydoc:"]
    c.eval_lengths = [8192, 32768]
    return c
