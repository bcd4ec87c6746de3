"""LLaMA-2-7B (meta-llama/Llama-2-7b-hf): 4k window, 32 heads of 128, MHA, rope base 1e4."""

import ml_collections

HUB = "meta-llama/Llama-2-7b-hf"


def get_config():
    c = ml_collections.ConfigDict()
    c.hub = HUB
    c.config_json = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=4096,
                         intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return c
