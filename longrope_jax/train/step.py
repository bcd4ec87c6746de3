"""The train step: Optax AdamW over the whole model, gradient accumulation, one jitted update.

State is a plain pytree ``{"step": int32[], "params": ..., "opt_state": ...}`` (what Orbax
saves). The loss is :func:`longrope_jax.loss.mean_nll` (flash backward, chunked loss: no
``[L, vocab]`` buffer either way) under a RoPE spec fixed for the stage: the spec is a closed-over
constant, never a parameter, and one spec serves every call (no short/long switching inside a
stage).

Schedules: linear warmup to ``lr`` over ``warmup_steps`` (step t at ``lr (t + 1) / warmup``), then ``linear`` (to
``end_lr_ratio x lr`` at ``steps``), ``cosine`` (the same end) or ``constant``.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")


def schedule(c: Mapping[str, Any]):
    """``optax`` schedule from ``lr``, ``warmup_steps``, ``schedule``, ``steps``, ``end_lr_ratio``."""
    lr, warm, steps = float(c["lr"]), int(c["warmup_steps"]), int(c["steps"])
    end = lr * float(c["end_lr_ratio"])
    decay = max(steps - warm, 1)
    after = {"linear": lambda: optax.linear_schedule(lr, end, decay),
             "cosine": lambda: optax.cosine_decay_schedule(lr, decay, alpha=end / lr if lr else 0.0),
             "constant": lambda: optax.constant_schedule(lr)}[c["schedule"]]()
    if warm == 0:
        return after
    # Step t of the warmup runs at lr (t + 1) / warmup: the first update is not wasted at 0.
    return optax.join_schedules([optax.linear_schedule(lr / warm, lr, warm - 1), after], [warm])


def optimizer(c: Mapping[str, Any]):
    """Global-norm clipping (``clip_norm``; 0 turns it off), then AdamW (``b1``, ``b2``, ``eps``,
    ``weight_decay``) on :func:`schedule`."""
    adamw = optax.adamw(schedule(c), b1=float(c["b1"]), b2=float(c["b2"]), eps=float(c["eps"]),
                        weight_decay=float(c["weight_decay"]))
    return optax.chain(optax.clip_by_global_norm(float(c["clip_norm"])), adamw) if c["clip_norm"] else adamw


def init_state(params, tx) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def make_step(loss_fn, tx, lr_schedule):
    """``step(state, batch) -> (state, metrics)``. ``loss_fn(params, micro)`` is a scalar mean
    over a microbatch's rows; ``batch`` stacks A microbatches on a leading axis (``int32[A, b,
    L]`` tokens, or a mapping of such arrays: tokens, positions, segment ids). Mixed microbatches
    (LongRoPE2's short and long windows): ``loss_fn`` and ``batch`` are mappings by kind, each
    kind's microbatches scanned with its own loss. The gradients (float32) of all microbatches are
    averaged, then one update. metrics: ``loss`` (the mean over microbatches; per kind as
    ``loss_KIND`` too), ``grad_norm`` (before clipping), ``lr`` (the rate this update used). Jit it
    with the state donated."""
    kinds = loss_fn if isinstance(loss_fn, Mapping) else None

    def step(state, batch):
        params = state["params"]

        def accumulate(fn, acc, microbatches):
            def micro(acc, t):
                loss, g = jax.value_and_grad(fn)(params, t)
                return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, (loss, g)), None

            return jax.lax.scan(micro, acc, microbatches)[0]

        def count(microbatches):
            return jax.tree.leaves(microbatches)[0].shape[0]

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        extra = {}
        if kinds is None:
            loss, grads = accumulate(loss_fn, zeros, batch)
            a = count(batch)
        else:
            loss, grads, a = zeros[0], zeros[1], 0
            for k in sorted(kinds):
                loss_k, grads = accumulate(kinds[k], (jnp.zeros((), jnp.float32), grads), batch[k])
                extra[f"loss_{k}"] = loss_k / count(batch[k])
                loss, a = loss + loss_k, a + count(batch[k])
        loss, grads = loss / a, jax.tree.map(lambda g: g / a, grads)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": lr_schedule(state["step"]), **extra}

    return step
