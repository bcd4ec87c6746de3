"""Compiling training programs ahead of time for a TPU topology on a machine without one: what a
stage needs per device before it takes a pod.

    devices = aot.topology_devices("v5p:2x2x1")          # longrope_jax.parallel.aot
    report = loss_report(cfg, parallel.build("sequence=4", devices), length=32768, grad=True)
    report = step_report(Trainer(cfg, spec, settings, mesh=mesh))  # the real train step
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


def state_abstract(trainer, params) -> dict:
    """The abstract train state (``ShapeDtypeStruct`` leaves with their shardings) that
    ``trainer.init_state`` makes from ``params`` (abstract too): every leaf that mirrors a
    parameter (the AdamW moments: a path ending in the parameter's) laid out as that parameter,
    the counters replicated, as the run lays them out."""
    from jax.sharding import NamedSharding, PartitionSpec

    from longrope_jax.train import step as step_lib

    shapes = jax.eval_shape(lambda p: step_lib.init_state(p, trainer.tx), params)
    if trainer.layout is None:
        return shapes
    by_path = {tuple(k): sh for k, sh in jax.tree_util.tree_flatten_with_path(
        param_shardings(params, trainer.mesh))[0]}
    whole = NamedSharding(trainer.mesh, PartitionSpec())

    def sharding(path, x):
        for n in range(len(path)):
            sh = by_path.get(tuple(path[n:]))
            if sh is not None and len(sh.spec) <= x.ndim:
                return sh
        return whole

    return jax.tree_util.tree_map_with_path(
        lambda k, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(k, x)), shapes)


def batch_abstract(trainer) -> dict:
    """One step's abstract batch as ``trainer.place`` gives it (tokens, and positions where the
    stage skips), per kind where the step mixes windows."""
    def kind_batch(kind):
        shape = (kind.microbatches, trainer.micro, kind.length)
        names = ("tokens", "positions") if kind.skip_to else ("tokens",)
        return {n: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=trainer.rows) for n in names}

    batches = {k: kind_batch(kind) for k, kind in trainer.kinds.items()}
    return batches if len(batches) > 1 else batches["long"]


def step_report(trainer) -> dict:
    """``compile_report`` of ``trainer``'s own jitted step (parameters, AdamW moments, accumulation
    over microbatches, the state donated, remat, the chosen attention) for its mesh, which may
    hold compile-only TPU devices. Nothing is allocated."""
    params = jax.eval_shape(lambda: init_params(trainer.cfg, 0))
    return compile_report(trainer.train_step, state_abstract(trainer, params), batch_abstract(trainer))
