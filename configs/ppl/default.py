"""Every setting of ``longrope-jax ppl`` with its default (README: ``longrope-jax ppl``).

    longrope-jax ppl --model PATH --data DATA --length N [--rope R ...] [--config.key=value ...]
"""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    common.add_model(c)
    c.data = placeholder(list)  # text file, .jsonl, directory, pydoc:, stdlib:, tfds:NAME[:SPLIT]; required
    c.field = "text"  # the JSONL field holding the text
    c.length = placeholder(list)  # tokens per window, one or more lengths; required
    c.rope = ["model"]  # the model as configured (what transformers computes)
    c.samples = 1  # windows per length (one per document, seeded choice)
    c.seed = 0
    c.needles = 0  # > 0: also LongRoPE2's needle fitness with this many needles per window
    c.attention = "auto"  # dense up to 512 tokens, blockwise beyond; on a mesh all-gather or ring by memory
    c.q_chunk = placeholder(int)  # attention block; unset: 512 beyond 512 tokens
    c.loss_chunk = 1024  # tokens per projection + loss step
    c.memory_budget_gib = placeholder(float)  # per device; unset: 80% of free device memory, 4 GiB on CPU
    c.plot = False  # ppl_vs_length.png under out
    c.out = placeholder(str)
    common.add_mesh(c)
    return c
