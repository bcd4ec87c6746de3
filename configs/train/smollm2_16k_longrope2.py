"""A LongRoPE2-style stage: SmolLM2-135M-Instruct (8k window) fine-tuned at 16384 tokens with mixed
context windows: of each step's 8 microbatches, 2 hold documents within the original 8k window,
packed into rows of it and trained with the original RoPE (documents masked from each other),
the other 6 the longer documents, packed into 16k rows, under the 16k search's factors.

    longrope-jax train --config smollm2_16k_longrope2 --out runs/smollm2-16k-lr2 [--data CORPUS ...]

LongRoPE2 mixes the two to keep the original window's quality while extending; the share of
short microbatches is a setting (``short_microbatches``). The built-in ``stdlib:`` corpus has few
documents over 8k tokens: give ``--data`` for a real run. Otherwise the 16k stage of
``smollm2_16k`` (which it builds on).
"""

from . import smollm2_16k


def get_config():
    c = smollm2_16k.get_config()
    c.packing = True
    c.short_microbatches = 2
    return c
