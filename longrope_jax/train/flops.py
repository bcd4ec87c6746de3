"""Model FLOPs of a train step and the peak rate of the chip it runs on: the MFU a run reports."""

from __future__ import annotations

from longrope_jax.parallel.aot import PEAK_BF16_TFLOPS


def model_flops_per_token(cfg, length: int) -> float:
    """Training FLOPs per token of ``cfg`` (a ``ModelConfig``) on rows of ``length`` tokens: 6 x
    the matmul parameters (projections, MLP, LM head) plus causal attention's QK^T and PV over
    half the row (3 x 4 L H d / 2 per layer)."""
    d, h, kv, hd, f, v = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    matmul = cfg.num_hidden_layers * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f) + v * d
    return 6.0 * matmul + 6.0 * cfg.num_hidden_layers * length * h * hd


def peak_flops(device) -> float:
    """Peak bf16 FLOP/s of one TPU chip (``parallel.aot.PEAK_BF16_TFLOPS``); 0 elsewhere (no MFU
    then)."""
    kind = getattr(device, "device_kind", "").lower()
    for gen, tflops in PEAK_BF16_TFLOPS.items():
        if device.platform == "tpu" and gen in kind.replace(" ", ""):
            return tflops * 1e12
    return 0.0
