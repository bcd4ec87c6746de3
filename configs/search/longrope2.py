"""LongRoPE2-mode search (Shang et al. 2025; ``docs/method.md``): the critical dimension is a gene,
pairs at or above it are searched in [s, 2 s], pairs below follow NTK-style from it, and the
fitness is the perplexity of needle answers planted at random depths (not of every token).

    longrope-jax search --config longrope2 --model PATH --data DATA --target-length N --out DIR \
        [--config.critical_range=[14,20]] [--config.fitness=ppl]
"""

from . import default


def get_config():
    c = default.get_config()
    c.mode = "longrope2"
    c.fitness = "needle"
    c.start_tokens = [0]  # LongRoPE2 keeps every position scaled
    return c
