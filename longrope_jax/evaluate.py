"""Scoring: the K-candidate evaluator (NLL of K RoPE specs on S windows, calls sized by the
memory model and laid out on a mesh), perplexity, and named specs scored together.

The loss itself is :func:`longrope_jax.loss.mean_nll`; attention is chosen by
:mod:`longrope_jax.attention.select`; call sizes come from :mod:`longrope_jax.memory`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import memory, parallel
from longrope_jax import progress as progress_lib
from longrope_jax.attention import select
from longrope_jax.loss import mean_nll, window_nll
from longrope_jax.model import ModelConfig


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "q_chunk", "loss_chunk", "sequential", "layout",
                                             "progress"))
def candidates_nll(params, tokens, specs, *, cfg: ModelConfig, attention: str = "blockwise",
                   q_chunk: int | None = None, loss_chunk: int = 1024, weights=None, sequential: bool = False,
                   layout=None, progress: bool = False):
    """Mean NLL of K candidate RoPE specs on S windows in one call: float32[K, S].

    ``specs`` carries a leading candidate axis (``rope.stack``); the weights are shared by every
    candidate (unbatched params), never copied. New factor values reuse the compiled function: it
    is compiled once per (K, S, L, model) shape. ``weights``: float32[S, L - 1] per prediction
    (e.g. 1 on a needle's answer tokens, 0 elsewhere; the mean is weighted), or None.
    ``sequential``: candidates one after another inside the call (``lax.map``) instead of
    ``vmap``: on a CPU one window already fills the cores, and K windows' activations at once
    only spill the caches; accelerators want the batch. ``layout``: on a mesh, the candidates go
    over ``data`` (``vmap(spmd_axis_name="data")``) and the windows over ``layout.batch_axes``.
    ``progress``: each layer reports to the active ``progress`` tracker (a host callback).
    """
    def one(sp):
        return mean_nll(params, tokens, sp, cfg=cfg, attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk,
                        weights=weights, layout=layout, layer_hook=progress_lib.layer_done if progress else None)

    if sequential:
        return jax.lax.map(one, specs)
    data = layout is not None and layout.mesh.shape["data"] > 1
    return jax.vmap(one, spmd_axis_name="data" if data else None)(specs)


def one_cpu(devices=None) -> bool:
    """Whether scoring runs on a single CPU device, where candidates go one after another (a
    call's memory and time are then one candidate's times K, so callers may as well make K = 1
    calls and report each)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return len(devices) == 1 and devices[0].platform == "cpu"


def call_shape(cfg: ModelConfig, k: int, s: int, length: int, mesh, *, budget: int, attention: str = "blockwise",
               q_chunk: int | None = None, loss_chunk: int = 1024, sequential: bool = False):
    """How :func:`score` splits K candidates on S windows of ``length`` tokens on ``mesh`` (None:
    one device) within ``budget`` bytes per device: ``(candidates per call, windows per call,
    layout)``, a whole number of candidates per data shard and of windows per fsdp shard."""
    sizes = parallel.axis_sizes(mesh) if mesh is not None else {a: 1 for a in parallel.AXES}
    nd, nf = sizes["data"], sizes["fsdp"]
    per_item = memory.item_bytes(cfg, length, q_chunk or 512, loss_chunk)
    if sequential:  # memory is one candidate's at a time: every candidate in one call
        kc, sc = k, memory.calls_within(1, s, per_item, budget, 1)[1]
    else:
        kc, sc = memory.calls_within(k, s, per_item, budget, nd)
    kc = -(-kc // nd) * nd
    sc = -(-sc // nf) * nf
    return kc, sc, select.layout_for(mesh, attention, ("fsdp",))


def score(params, cfg: ModelConfig, tokens, specs, *, memory_budget: int | None = None,
          attention: str = "blockwise", q_chunk: int | None = None, loss_chunk: int = 1024,
          mesh=None, devices=None, weights=None, sequential: bool | None = None, label: str | None = None
          ) -> np.ndarray:
    """NLL of K candidates on S windows: float64[K, S], split into as few calls as fit the budget.

    ``mesh`` (``parallel.build``): candidates over its ``data`` axis, windows over ``fsdp``,
    tokens over ``sequence``, heads over ``tensor``, weights by the partition rules; a run over
    several processes gives every process the same result. None: the candidates spread over
    ``devices`` (default the local ones; one device: no mesh).

    ``sequential``: score the candidates of a call one after another (see ``candidates_nll``);
    None: on a single CPU device, where a call's memory is then one candidate's.

    ``weights``: float32[S, L - 1] prediction weights (None: the plain mean over L - 1).

    Candidates go through in their given order, ``kc`` at a time (the last call padded by
    repeating the last candidate, so every call has one shape and one compilation); results do
    not depend on the split.

    On CPU devices a call that runs longer than 10 s reports its progress per layer on stderr
    (process 0; ``label`` names the work), from inside the compiled call (``progress``).
    """
    tokens = np.asarray(tokens, np.int32)
    k = specs.long_factor.shape[0]
    s, length = tokens.shape
    if mesh is None:
        devices = list(devices) if devices is not None else jax.local_devices()
        mesh = parallel.build({"data": len(devices)}, devices) if len(devices) > 1 else None
    if sequential is None:
        sequential = one_cpu(list(mesh.devices.flat) if mesh is not None else devices)
    nd = parallel.axis_sizes(mesh)["data"] if mesh is not None else 1
    kc, sc, layout = call_shape(cfg, k, s, length, mesh, budget=memory_budget or memory.default_budget(),
                                attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk, sequential=sequential)
    if layout is not None:
        parallel.check(mesh, cfg=cfg, length=length)
        params = parallel.put_params(params, mesh)
    n_calls = -(-k // kc)
    pad = n_calls * kc - k
    padded = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], pad, axis=0)]) if pad else np.asarray(a),
                          specs)
    wpad = -(-s // sc) * sc - s  # pad windows too, so every call has one shape
    if weights is not None:
        weights = np.asarray(weights, np.float32)
        if weights.shape != (s, length - 1):
            raise ValueError(f"weights: expected shape {(s, length - 1)} (windows, predictions), got {weights.shape}")
    if wpad:
        tokens = np.concatenate([tokens, np.repeat(tokens[-1:], wpad, axis=0)])
        if weights is not None:
            weights = np.concatenate([weights, np.repeat(weights[-1:], wpad, axis=0)])

    def place(x, spec):
        return jnp.asarray(x) if layout is None else parallel.put(x, layout.sharding(spec))

    from jax.sharding import PartitionSpec as P

    out = np.zeros((k, s), np.float64)
    windows = range(0, s, sc)
    progress = progress_lib.enabled(mesh.devices.flat if mesh is not None else devices)
    label = label or f"{k} candidate(s) on {s} window(s) of {length} tokens"
    with (progress_lib.tracking(n_calls * len(windows), kc if sequential else 1, cfg.num_hidden_layers, label)
          if progress else contextlib.nullcontext()):
        for c in range(n_calls):
            chunk = jax.tree.map(lambda a: place(a[c * kc:(c + 1) * kc], P("data" if nd > 1 else None)), padded)
            rows = []
            for i, w in enumerate(windows):
                progress_lib.call_started(c * len(windows) + i)
                wts = None if weights is None else place(weights[w:w + sc], layout and P(layout.batch, None))
                res = candidates_nll(params, place(tokens[w:w + sc], layout and layout.rows()), chunk, cfg=cfg,
                                     attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk, weights=wts,
                                     sequential=sequential, layout=layout, progress=progress)
                rows.append(np.asarray(parallel.fetch(res) if layout is not None else res, np.float64))
            res = np.concatenate(rows, axis=1)[:, :s]
            take = min(kc, k - c * kc)
            out[c * kc:c * kc + take] = res[:take]
    return out


def perplexity(params, cfg: ModelConfig, tokens: np.ndarray, spec, *, attention: str = "dense",
               q_chunk: int | None = None, loss_chunk: int = 1024, batch: int = 1) -> dict:
    """Perplexity of windows ``tokens: int32[S, L]`` under ``spec``, ``batch`` windows per call.

    Returns ``{"ppl", "nll", "nll_per_window", "predictions"}``: the mean is over all predictions.
    """
    tokens = np.asarray(tokens, np.int32)
    out = []
    for i in range(0, tokens.shape[0], batch):
        nll = window_nll(params, jnp.asarray(tokens[i:i + batch]), spec, cfg=cfg, attention=attention,
                         q_chunk=q_chunk, loss_chunk=loss_chunk)
        out.append(np.asarray(nll, np.float64))
    per = np.concatenate(out)
    mean = float(per.mean())
    return {"ppl": math.exp(mean), "nll": mean, "nll_per_window": per.tolist(),
            "predictions": int(tokens.shape[0] * (tokens.shape[1] - 1))}


def score_named(params, cfg: ModelConfig, tokens, specs: Mapping[str, Any], *, log=None, **score_kw
                ) -> dict[str, tuple[np.ndarray, float]]:
    """NLL of named specs on windows ``tokens: int32[S, L]``: ``{name: (float64[S], seconds)}``.

    Specs that share a structure (none, PI, NTK, YaRN, llama3, factor files of one model) are
    stacked and scored together by :func:`score`; ``seconds`` is each one's share of its group's
    call. ``score_kw``: :func:`score`'s options. ``log`` receives one line per group.
    """
    import time

    from longrope_jax import rope as rope_lib

    out = {}
    for names in rope_lib.stackable(specs):
        if log is not None:
            log(f"length {tokens.shape[1]}: scoring {', '.join(names)} on {tokens.shape[0]} window(s) ...")
        t = time.time()
        res = score(params, cfg, tokens, rope_lib.stack([specs[n] for n in names]),
                    label=f"length {tokens.shape[1]}: {', '.join(names)}", **score_kw)
        dt = time.time() - t
        if log is not None:
            log(f"length {tokens.shape[1]}: scored {', '.join(names)} on {tokens.shape[0]} window(s) in {dt:.1f}s "
                f"({len(names) * tokens.size / dt:.0f} tok/s incl. compilation)")
        for i, n in enumerate(names):
            out[n] = (res[i], dt / len(names))
    return out
