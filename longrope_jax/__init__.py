"""longrope-jax: LongRoPE context extension for LLaMA / Mistral in JAX / Flax."""

__version__ = "0.1.0"
