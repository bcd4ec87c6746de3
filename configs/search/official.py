"""The search as the official LongRoPE code runs it: factor range [1, 1 + s] instead of [1, 1.25 s].

    longrope-jax search --config configs/search/official.py --model PATH --data DATA \
        --target-length N --out DIR
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.factor_range = "official"
    return c
