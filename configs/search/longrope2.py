"""LongRoPE2-mode search (Shang et al. 2025; REFERENCE.md section 2): the critical dimension is a
gene, pairs at or above it are searched in [s, 2 s], pairs below follow NTK-style from it, and the
fitness is the perplexity of needle answers planted at random depths (not of every token).

    longrope-jax search --config configs/search/longrope2.py --model PATH --data DATA \
        --target-length N --out DIR [--config.critical_range=[14,20]] [--config.fitness=ppl]
"""

import os
import runpy


def get_config():
    c = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))["get_config"]()
    c.mode = "longrope2"
    c.fitness = "needle"
    c.start_tokens = [0]  # LongRoPE2 keeps every position scaled
    return c
