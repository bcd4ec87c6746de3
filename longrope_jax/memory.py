"""The memory model: predicted bytes of a forward pass, the budget a device offers, and how many
candidates and windows go into one evaluator call.

Predictions, not measurements: compiled programs are measured by ``compiled.memory_analysis()``
(``parallel.aot.compile_report``); these figures size calls before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def item_bytes(cfg, length: int, block: int = 512, loss_chunk: int = 1024) -> int:
    """Estimated peak activation bytes of one (candidate, window) pair in a forward pass of
    ``cfg`` (a ``ModelConfig``) over ``length`` tokens.

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


def attention_bytes(cfg, length: int, mesh, strategy: str, *, windows: int = 1, block: int = 512) -> int:
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


def calls_within(k: int, s: int, per_item: int, budget: int, n_devices: int = 1) -> tuple[int, int]:
    """(candidates per call, windows per call): as few calls as fit ``budget`` bytes per device,
    for ``k`` candidates on ``s`` windows of ``per_item`` bytes each.

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


def train_step_bytes(cfg, n_params: int, s, mesh) -> dict:
    """Predicted per-device bytes of one train step of ``cfg`` (a ``ModelConfig`` of ``n_params``
    parameters) under train settings ``s`` on ``mesh``: the state (parameters and AdamW's two
    moments, sharded over fsdp x sequence x tensor), the gradients (the float32 accumulator, one
    microbatch's float32 gradient and the update), and one microbatch's activations: what the backward keeps per layer (the residual
    stream under full remat, every layer's activations without), one layer's forward and backward
    working set, and the k/v a device holds during attention (the whole row's when all-gathered,
    two chunks under the ring). An estimate beside the compiled ``memory_analysis()``, not a
    substitute for it."""
    sizes = {a: int(mesh.shape[a]) for a in mesh.axis_names}
    n = n_params
    pb, ab = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize
    shards = sizes["fsdp"] * sizes["sequence"] * sizes["tensor"]  # parallel.WEIGHTS, and tensor
    state = n * 3 * pb / shards
    grads = n * (8 + pb) / shards
    rows = max(1, (s["batch"] // s["accum"]) // (sizes["data"] * sizes["fsdp"]))
    t = s["seq_len"] // sizes["sequence"]
    layers, d = cfg.num_hidden_layers, cfg.hidden_size
    one_layer = item_bytes(cfg, t, min(512, s["seq_len"]), int(s["loss_chunk"]))
    saved = layers * rows * t * d * ab if cfg.remat == "full" else layers * rows * one_layer
    working = 2 * rows * one_layer
    held = s["seq_len"] if s["attention"] in ("blockwise", "auto", "dense") and sizes["sequence"] > 1 else 2 * t
    kv = rows * 2 * (cfg.num_key_value_heads // sizes["tensor"]) * cfg.head_dim * ab * held
    activations = saved + working + kv
    return {"state_bytes": int(state), "gradient_bytes": int(grads), "activation_bytes": int(activations),
            "peak_bytes": int(state + grads + activations)}
