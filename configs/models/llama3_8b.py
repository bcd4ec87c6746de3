"""Llama-3-8B (meta-llama/Meta-Llama-3-8B): 8k window, GQA 32:8, rope base 5e5, 128k vocabulary
(LongRoPE2 extends it to 128k)."""

import ml_collections

HUB = "meta-llama/Meta-Llama-3-8B"


def get_config():
    c = ml_collections.ConfigDict()
    c.hub = HUB
    c.config_json = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
    return c
