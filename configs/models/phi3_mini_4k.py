"""Phi-3-mini-4k (microsoft/Phi-3-mini-4k-instruct): 3.8B, 4k window, 32 heads of 96, fused qkv and
gate/up, a 2047-token sliding window (switched off to extend it, as for Mistral). Its 128k sibling
is this model with LongRoPE factors fine-tuned in."""

import ml_collections

HUB = "microsoft/Phi-3-mini-4k-instruct"


def get_config():
    c = ml_collections.ConfigDict()
    c.hub = HUB
    c.config_json = dict(architectures=["Phi3ForCausalLM"], model_type="phi3", vocab_size=32064, hidden_size=3072,
                         intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1,
                         eos_token_id=32000, pad_token_id=32000)
    return c
