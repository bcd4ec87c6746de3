"""Mistral-7B-v0.1 (mistralai/Mistral-7B-v0.1): GQA 32:8, 4k sliding window (LongRoPE switches it
off), rope base 1e4."""

import ml_collections

HUB = "mistralai/Mistral-7B-v0.1"


def get_config():
    c = ml_collections.ConfigDict()
    c.hub = HUB
    c.config_json = dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, sliding_window=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return c
