"""Mistral: LLaMA's tensors with a sliding attention window (``sliding_window``, off when
``use_sliding_window`` is false)."""

from longrope_jax.families import Family


def _window(d):
    return None if d.get("use_sliding_window") is False else d.get("sliding_window")


FAMILY = Family(
    name="mistral",
    architecture="MistralForCausalLM",
    defaults={"max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "sliding_window": 4096},
    sliding_window=_window,
    config_fields=lambda cfg: {"sliding_window": cfg.sliding_window},
    gguf_name="mistral",
)
