"""Attention implementations sharing one signature (see :mod:`.dense` for the contract).

``get(name)`` returns the function; the model receives it and never knows which one it runs.
"""

from longrope_jax.attention.blockwise import blockwise_attention
from longrope_jax.attention.dense import dense_attention
from longrope_jax.attention.fused import fused_attention

IMPLEMENTATIONS = {"dense": dense_attention, "blockwise": blockwise_attention, "fused": fused_attention}


def get(name: str):
    try:
        return IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"attention: expected one of {sorted(IMPLEMENTATIONS)}, got {name!r}") from None


__all__ = ["blockwise_attention", "dense_attention", "fused_attention", "get", "IMPLEMENTATIONS"]
