"""ppl of SmolLM2-135M (8k window) at 10k tokens under none, PI, NTK and YaRN (the README default).

    longrope-jax ppl --config configs/ppl/smollm2_beyond_window.py --config.length=[16384]
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.model = "smollm2"
    c.data = "pydoc:"
    c.length = [10240]
    c.rope = ["none", "pi:2", "ntk:2", "yarn:2"]
    c.samples = 1
    c.seed = 0
    c.field = "text"
    c.tokenizer = ""
    c.param_dtype = "float32"
    c.no_sliding_window = False
    c.attention = "auto"
    c.q_chunk = 0
    c.loss_chunk = 1024
    return c
