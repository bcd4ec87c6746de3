"""longrope-jax: LongRoPE context extension for LLaMA, Mistral and Phi-3 in JAX / Flax."""

__version__ = "0.1.0"
