"""Compiling training programs ahead of time for a TPU topology on a machine without one: what a
stage needs per device before it takes a pod.

    devices = aot.topology_devices("v5p:2x2x1")          # longrope_jax.parallel.aot
    report = loss_report(cfg, parallel.build("sequence=4", devices), length=32768, grad=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from longrope_jax.attention import select
from longrope_jax.loss import mean_nll
from longrope_jax.model import init_params, rope_spec
from longrope_jax.parallel import Layout, check, param_shardings
from longrope_jax.parallel.aot import abstract, compile_report


def loss_report(cfg, mesh, *, length: int, batch: int = 1, grad: bool = False, attention: str = "blockwise",
                block: int = 512, loss_chunk: int = 1024) -> dict:
    """``compile_report`` of one batch's mean NLL (``grad``: its gradient with respect to every
    parameter) for ``cfg`` laid out on ``mesh`` (``parallel.Layout``: rows over data x fsdp,
    tokens over sequence, weights by the partition rules; a one-device mesh runs the
    single-device program). Nothing is allocated: the params are abstract. ``mesh`` may hold
    compile-only TPU devices (``parallel.aot.topology_devices``)."""
    check(mesh, cfg=cfg, length=length, batch=batch)
    layout = select.layout_for(mesh, attention)
    if layout is None and attention in select.RINGS:
        attention = "blockwise"  # one device: the plain single-device program
    spec = rope_spec(cfg)
    params = jax.eval_shape(lambda: init_params(cfg, 0))

    def loss(p, tokens):
        return jnp.mean(mean_nll(p, tokens, spec, cfg=cfg, attention=attention, q_chunk=block, loss_chunk=loss_chunk,
                                 layout=layout))

    rows = Layout(mesh).sharding(Layout(mesh).rows())
    shardings = param_shardings(params, mesh)
    args = (abstract(params, shardings), jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows))
    # The gradient keeps the params' sharding (what an optimizer step consumes), not replicated.
    jitted = jax.jit(jax.grad(loss), out_shardings=shardings) if grad else jax.jit(loss)
    return compile_report(jitted, *args)
