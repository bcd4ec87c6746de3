"""The search as the official LongRoPE code runs it: factor range [1, 1 + s] instead of [1, 1.25 s].

    longrope-jax search --config official --model PATH --data DATA --target-length N --out DIR
"""

from . import default


def get_config():
    c = default.get_config()
    c.factor_range = "official"
    return c
