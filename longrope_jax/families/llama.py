"""LLaMA (LLaMA-2, Llama-3 with the ``llama3`` rope type and a list of eos ids, SmolLM2...)."""

from longrope_jax.families import Family

FAMILY = Family(
    name="llama",
    architecture="LlamaForCausalLM",
    defaults={"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    biases=True,
)
