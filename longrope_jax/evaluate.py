"""Scoring: per-window negative log-likelihood and perplexity.

The loss never materialises ``[L, vocab]`` logits for the whole window: the final hidden states
are projected and scored in chunks of ``loss_chunk`` tokens, in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from longrope_jax import attention as attention_lib
from longrope_jax.model import ModelConfig, Transformer


RINGS = {"ring": "blockwise", "ring_splash": "splash"}  # attention name -> the ring's per-chunk kernel


def layout_for(mesh, attention: str, batch_axes=None):
    """The :class:`longrope_jax.parallel.Layout` that ``attention`` runs on over ``mesh``: None
    for no mesh or one device (the single-device program); zigzag order for a ring over a
    sequence axis (it balances causal work; the all-gather needs none)."""
    from longrope_jax import parallel

    if mesh is None or mesh.devices.size == 1:
        return None
    zig = attention in RINGS and int(mesh.shape["sequence"]) > 1
    return parallel.Layout(mesh, *(() if batch_axes is None else (batch_axes,)), zigzag=zig)


def _attention(name: str, q_chunk: int | None, layout=None):
    """The attention function of ``name``; on a ``layout``, a ring (:data:`RINGS`) or the named
    kernel under the all-gather strategy (``attention.gather``)."""
    blocks = {"block_q": q_chunk, "block_kv": q_chunk} if q_chunk else {}
    if name in RINGS:
        if layout is None or layout.mesh.shape["sequence"] == 1:
            raise ValueError(f"attention: {name} needs a mesh with a sequence axis (--mesh sequence=N)")
        from longrope_jax.attention.ring import ring_attention

        return ring_attention(layout, kernel=RINGS[name], **blocks)
    fn = attention_lib.get(name)
    if q_chunk:
        fn = functools.partial(fn, **(blocks if name == "blockwise" else
                                      {"block": q_chunk} if name == "fused" else {"q_chunk": q_chunk}))
    if layout is not None:
        from longrope_jax.attention.gather import all_gather_attention

        fn = all_gather_attention(fn, layout)
    return fn


def pick_attention(name: str, length: int, *, cfg: ModelConfig | None = None, mesh=None,
                   memory_budget: int | None = None, windows: int = 1) -> str:
    """``auto``: the dense reference up to 512 tokens, blockwise beyond (2.7x faster than dense
    at 2048 tokens on 2 CPU cores).

    On a mesh with a sequence axis, ``auto`` chooses the strategy by predicted per-device bytes
    (:func:`attention_bytes`) against ``memory_budget`` (default :func:`default_budget`): k/v
    all-gathered (blockwise on the whole row: MaxText measured it faster than a ring at 32k) when
    it fits, else the ring; neither fitting is an error naming both figures.
    """
    if name != "auto":
        return name
    n = 1 if mesh is None else int(mesh.shape["sequence"])
    if n == 1 or cfg is None:
        return "dense" if length <= 512 else "blockwise"
    budget = memory_budget or default_budget()
    need = {s: attention_bytes(cfg, length, mesh, s, windows=windows) for s in ("blockwise", "ring")}
    for strategy in ("blockwise", "ring"):
        if need[strategy] <= budget:
            return strategy
    gib = 2**30
    raise ValueError(f"attention auto: {length} tokens do not fit {budget / gib:.2f} GiB per device on this mesh: "
                     f"k/v all-gathered needs {need['blockwise'] / gib:.2f} GiB, the ring "
                     f"{need['ring'] / gib:.2f} GiB (add devices to the sequence axis, or give more memory)")


def attention_bytes(cfg: ModelConfig, length: int, mesh, strategy: str, *, windows: int = 1,
                    block: int = 512) -> int:
    """Predicted per-device bytes of one forward on ``mesh`` under ``strategy`` (``blockwise``:
    k/v all-gathered over ``sequence``; ``ring``): the local activations (:func:`item_bytes` of
    the local tokens) plus the k/v a device holds during attention: the whole row's for the
    all-gather, two chunks (the one computed and the one arriving) for the ring."""
    s = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    n, rows = s["sequence"], -(-windows // (s["data"] * s["fsdp"]))
    kv = 2 * cfg.num_key_value_heads // s["tensor"] * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    local = rows * item_bytes(cfg, length // n, block)
    held = length if strategy == "blockwise" else 2 * (length // n)
    return int(local + rows * kv * held)


def default_block(length: int, q_chunk: int | None = None) -> int | None:
    """The attention block (``q_chunk``) used when none is given: 512 beyond 512 tokens."""
    return q_chunk if q_chunk is not None else (512 if length > 512 else None)


def chunked_nll(model: Transformer, params, hidden, targets, loss_chunk: int, weights=None):
    """Summed (``weights``-weighted) NLL per row. hidden: [B, T, D]; targets: int32[B, T];
    weights: float32[B, T] or None (all 1) -> float32[B].

    Each chunk's projection and loss is rematerialised in the backward (``jax.checkpoint``), so
    neither pass holds more than one ``[B, loss_chunk, vocab]`` logits tile.
    """
    b, t, d = hidden.shape
    c = min(loss_chunk, t)
    n = -(-t // c)
    pad = n * c - t
    w = jnp.ones((b, t), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    valid = jnp.pad(w, [(0, 0), (0, pad)])
    hidden = jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)])
    targets = jnp.pad(targets, [(0, 0), (0, pad)])

    def split(x):
        return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        h, y, m = args
        logits = model.apply({"params": params}, h, method=Transformer.project).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return jnp.sum((lse - tgt) * m, axis=-1)

    return jnp.sum(jax.lax.map(one, (split(hidden), split(targets), split(valid))), axis=0)


def _sharded_nll(model, params, hidden, targets, loss_chunk, weights, layout):
    """:func:`chunked_nll` on each device's own tokens (``layout``), the rows' partial sums added
    after: the hidden states never leave their device. Only the head's weights are gathered."""
    from jax.sharding import PartitionSpec as P

    head = {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}
    rows = layout.rows()

    def local(head, h, y, m):
        return chunked_nll(model, head, h, y, loss_chunk, m)[:, None]

    # check_vma=False: under the evaluator's vmap over candidates (spmd_axis_name="data") the
    # shared targets and the batched logits vary over different axes, which the check rejects.
    part = jax.shard_map(local, mesh=layout.mesh, in_specs=(P(), layout.hidden(), rows, rows),
                         out_specs=rows, check_vma=False)(head, hidden, targets, weights)
    return jnp.sum(part, axis=1)


def mean_nll(params, tokens, spec, *, cfg: ModelConfig, attention: str = "blockwise", q_chunk: int | None = None,
             loss_chunk: int = 1024, weights=None, layout=None):
    """Mean next-token NLL of each row over its ``L - 1`` predictions: float32[B]. Pure and
    differentiable (the flash backward, the chunked loss): the loss of a gradient step.

    tokens: int32[B, L]; spec: a RopeSpec without candidate axis; weights: float32[B, L - 1] per
    prediction (the mean is weighted) or None. ``layout`` (``parallel.Layout``): rows and tokens
    sharded on its mesh, attention by all-gather over ``sequence`` (``attention="ring"``: the
    ring), the loss on each device's tokens; with ``layout.zigzag`` tokens, targets, positions
    and weights are put in zigzag order first (the loss is a sum: no inverse needed). None: one
    device.
    """
    b, l = tokens.shape
    fn = _attention(attention, q_chunk, layout)
    model = Transformer(cfg, fn) if layout is None else Transformer(cfg, fn, layout.constrain)
    # Position i predicts token i + 1; the last position predicts nothing (weight 0), so hidden
    # states and targets keep the row's length and its sharding.
    targets = jnp.roll(tokens, -1, axis=1)
    w = jnp.ones((b, l - 1), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    w = jnp.pad(w, [(0, 0), (0, 1)])
    positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
    if layout is not None and layout.zigzag:
        from longrope_jax.parallel import zigzag

        n = layout.mesh.shape["sequence"]
        tokens, targets, w, positions = (zigzag.apply(x, n) for x in (tokens, targets, w, positions))
    hidden = model.apply({"params": params}, tokens, positions, rope=spec, return_hidden=True, seq_len=l)
    if layout is None:
        total = chunked_nll(model, params, hidden, targets, loss_chunk, w)
    else:
        total = _sharded_nll(model, params, hidden, targets, loss_chunk, w, layout)
    return total / jnp.sum(w, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "q_chunk", "loss_chunk", "layout"))
def window_nll(params, tokens, spec, *, cfg: ModelConfig, attention: str = "dense", q_chunk: int | None = None,
               loss_chunk: int = 1024, layout=None):
    """Mean NLL of each window over its ``L - 1`` next-token predictions (:func:`mean_nll`, jitted).

    Args:
      params: model params.
      tokens: int32[S, L] windows.
      spec: RopeSpec for the call (no candidate axis).
    Returns:
      float32[S].
    """
    return mean_nll(params, tokens, spec, cfg=cfg, attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk,
                    layout=layout)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "q_chunk", "loss_chunk", "sequential", "layout"))
def candidates_nll(params, tokens, specs, *, cfg: ModelConfig, attention: str = "blockwise",
                   q_chunk: int | None = None, loss_chunk: int = 1024, weights=None, sequential: bool = False,
                   layout=None):
    """Mean NLL of K candidate RoPE specs on S windows in one call: float32[K, S].

    ``specs`` carries a leading candidate axis (``rope.stack``); the weights are shared by every
    candidate (unbatched params), never copied. New factor values reuse the compiled function: it
    is compiled once per (K, S, L, model) shape. ``weights``: float32[S, L - 1] per prediction
    (e.g. 1 on a needle's answer tokens, 0 elsewhere; the mean is weighted), or None.
    ``sequential``: candidates one after another inside the call (``lax.map``) instead of
    ``vmap``: on a CPU one window already fills the cores, and K windows' activations at once
    only spill the caches; accelerators want the batch. ``layout``: on a mesh, the candidates go
    over ``data`` (``vmap(spmd_axis_name="data")``) and the windows over ``layout.batch_axes``.
    """
    def one(sp):
        return mean_nll(params, tokens, sp, cfg=cfg, attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk,
                        weights=weights, layout=layout)

    if sequential:
        return jax.lax.map(one, specs)
    data = layout is not None and layout.mesh.shape["data"] > 1
    return jax.vmap(one, spmd_axis_name="data" if data else None)(specs)


def item_bytes(cfg: ModelConfig, length: int, block: int = 512, loss_chunk: int = 1024) -> int:
    """Estimated peak activation bytes of one (candidate, window) pair in a forward pass.

    Inference keeps one layer's activations at a time: the residual stream, q/k/v, the MLP
    intermediates, one attention block's float32 scores, cos/sin, and one loss chunk's logits.
    """
    f32 = 4
    d, f, h, kv, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                          cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    per_token = 4 * d + 2 * h * hd + 4 * kv * hd + 3 * f + 2 * cfg.rotary_dim
    attn_block = 3 * h * min(block, length) * min(block, length)
    loss = 2 * min(loss_chunk, length) * v
    return int(f32 * (length * per_token + attn_block + loss))


def default_budget() -> int:
    """Bytes the evaluator may use: 80% of the first device's free memory where it reports one,
    else 4 GiB (set ``memory_budget`` explicitly on CPU hosts)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # backends without memory stats
        stats = {}
    if "bytes_limit" in stats:
        return int(0.8 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    return 4 << 30


def plan(k: int, s: int, per_item: int, budget: int, n_devices: int = 1) -> tuple[int, int]:
    """(candidates per call, windows per call): as few calls as fit ``budget`` bytes per device.

    Calls are balanced (K = 10 at most 4 per call gives 3 calls of 4, the last padded); with
    several devices the candidates per call are a multiple of the device count.
    """
    budget = max(budget, per_item)
    if s * per_item > budget:
        return 1, max(1, budget // per_item)
    cap = n_devices * max(1, budget // (s * per_item))
    calls = -(-k // cap)
    kc = -(-k // calls)
    if n_devices > 1:
        kc = -(-kc // n_devices) * n_devices
    return kc, s


def one_cpu(devices=None) -> bool:
    """Whether scoring runs on a single CPU device, where candidates go one after another (a
    call's memory and time are then one candidate's times K, so callers may as well make K = 1
    calls and report each)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return len(devices) == 1 and devices[0].platform == "cpu"


def score(params, cfg: ModelConfig, tokens, specs, *, memory_budget: int | None = None,
          attention: str = "blockwise", q_chunk: int | None = None, loss_chunk: int = 1024,
          mesh=None, devices=None, weights=None, sequential: bool | None = None) -> np.ndarray:
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
    """
    from longrope_jax import parallel

    tokens = np.asarray(tokens, np.int32)
    k = specs.long_factor.shape[0]
    s, length = tokens.shape
    if mesh is None:
        devices = list(devices) if devices is not None else jax.local_devices()
        mesh = parallel.build({"data": len(devices)}, devices) if len(devices) > 1 else None
    sizes = parallel.axis_sizes(mesh) if mesh is not None else {a: 1 for a in parallel.AXES}
    if sequential is None:
        sequential = one_cpu(list(mesh.devices.flat) if mesh is not None else devices)
    nd, nf = sizes["data"], sizes["fsdp"]
    per_item = item_bytes(cfg, length, q_chunk or 512, loss_chunk)
    budget = memory_budget or default_budget()
    if sequential:  # memory is one candidate's at a time: every candidate in one call
        kc, sc = k, plan(1, s, per_item, budget, 1)[1]
    else:
        kc, sc = plan(k, s, per_item, budget, nd)
    kc = -(-kc // nd) * nd  # a whole number of candidates per data shard
    sc = -(-sc // nf) * nf
    layout = layout_for(mesh, attention, ("fsdp",))
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
    for c in range(n_calls):
        chunk = jax.tree.map(lambda a: place(a[c * kc:(c + 1) * kc], P("data" if nd > 1 else None)), padded)
        rows = []
        for w in range(0, s, sc):
            res = candidates_nll(params, place(tokens[w:w + sc], layout and layout.rows()), chunk, cfg=cfg,
                                 attention=attention, q_chunk=q_chunk, loss_chunk=loss_chunk,
                                 weights=None if weights is None else place(weights[w:w + sc],
                                                                            layout and P(layout.batch, None)),
                                 sequential=sequential, layout=layout)
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
        t = time.time()
        res = score(params, cfg, tokens, rope_lib.stack([specs[n] for n in names]), **score_kw)
        dt = time.time() - t
        if log is not None:
            log(f"length {tokens.shape[1]}: scored {', '.join(names)} on {tokens.shape[0]} window(s) in {dt:.1f}s "
                f"({len(names) * tokens.size / dt:.0f} tok/s incl. compilation)")
        for i, n in enumerate(names):
            out[n] = (res[i], dt / len(names))
    return out
