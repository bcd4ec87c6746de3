"""Choosing attention: a name (``--attention``) and a mesh -> the function the model receives,
the :class:`~longrope_jax.parallel.Layout` it runs on, and what ``auto`` means at a length.

Names: ``dense``, ``blockwise``, ``fused`` (:func:`longrope_jax.attention.get`) run on one
device, or under the all-gather strategy on a mesh (:mod:`.gather`); ``ring`` and
``ring_splash`` (:data:`RINGS`) are ring attention (:mod:`.ring`) with blockwise or Pallas
splash kernels per step, zigzag token order.
"""

from __future__ import annotations

import functools

from longrope_jax import memory, parallel
from longrope_jax.attention import get

RINGS = {"ring": "blockwise", "ring_splash": "splash"}  # attention name -> the ring's per-chunk kernel


def layout_for(mesh, attention: str, batch_axes=None):
    """The :class:`longrope_jax.parallel.Layout` that ``attention`` runs on over ``mesh``: None
    for no mesh or one device (the single-device program); zigzag order for a ring over a
    sequence axis (it balances causal work; the all-gather needs none)."""
    if mesh is None or mesh.devices.size == 1:
        return None
    zig = attention in RINGS and int(mesh.shape["sequence"]) > 1
    return parallel.Layout(mesh, *(() if batch_axes is None else (batch_axes,)), zigzag=zig)


def function(name: str, q_chunk: int | None, layout=None):
    """The attention function of ``name`` (block size ``q_chunk``); on a ``layout``, a ring
    (:data:`RINGS`) or the named kernel under the all-gather strategy (``attention.gather``)."""
    blocks = {"block_q": q_chunk, "block_kv": q_chunk} if q_chunk else {}
    if name in RINGS:
        if layout is None or layout.mesh.shape["sequence"] == 1:
            raise ValueError(f"attention: {name} needs a mesh with a sequence axis (--mesh sequence=N)")
        from longrope_jax.attention.ring import ring_attention

        return ring_attention(layout, kernel=RINGS[name], **blocks)
    fn = get(name)
    if q_chunk:
        fn = functools.partial(fn, **(blocks if name == "blockwise" else
                                      {"block": q_chunk} if name == "fused" else {"q_chunk": q_chunk}))
    if layout is not None:
        from longrope_jax.attention.gather import all_gather_attention

        fn = all_gather_attention(fn, layout)
    return fn


def pick(name: str, length: int, *, cfg=None, mesh=None, memory_budget: int | None = None, windows: int = 1,
         train: bool = False) -> str:
    """``name``, with ``auto`` resolved: on one device the dense reference up to 512 tokens,
    blockwise beyond (2.7x faster than dense at 2048 tokens on 2 CPU cores); for a train step
    (``train``: forward and backward) blockwise at every length (SmolLM2 on 2 CPU cores, fp32:
    dense took 1.14x blockwise's step at 512 tokens and 3.0x at 2048, benchmarks/RESULTS.md).

    On a mesh with a sequence axis, ``auto`` chooses the strategy by predicted per-device bytes
    (:func:`longrope_jax.memory.attention_bytes` of ``cfg``) against ``memory_budget`` (default
    :func:`longrope_jax.memory.default_budget`): k/v all-gathered (blockwise on the whole row:
    MaxText measured it faster than a ring at 32k) when it fits, else the ring; neither fitting is
    an error naming both figures.
    """
    if name != "auto":
        return name
    n = 1 if mesh is None else int(mesh.shape["sequence"])
    if n == 1 or cfg is None:
        return "dense" if length <= 512 and not train else "blockwise"
    budget = memory_budget or memory.default_budget()
    need = {s: memory.attention_bytes(cfg, length, mesh, s, windows=windows) for s in ("blockwise", "ring")}
    for strategy in ("blockwise", "ring"):
        if need[strategy] <= budget:
            return strategy
    gib = 2**30
    raise ValueError(f"attention auto: {length} tokens do not fit {budget / gib:.2f} GiB per device on this mesh: "
                     f"k/v all-gathered needs {need['blockwise'] / gib:.2f} GiB, the ring "
                     f"{need['ring'] / gib:.2f} GiB (add devices to the sequence axis, or give more memory)")


def default_block(length: int, q_chunk: int | None = None) -> int | None:
    """The attention block (``q_chunk``) used when none is given: 512 beyond 512 tokens."""
    return q_chunk if q_chunk is not None else (512 if length > 512 else None)
