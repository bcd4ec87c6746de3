"""Phi-3 (Phi-3-mini-4k/128k, Phi-3.5-mini, Phi-4-mini): the models that ship LongRoPE.

Fused ``qkv_proj`` (q, k, v along the output axis) and ``gate_up_proj`` (gate, then up); partial
rotary (``partial_rotary_factor``, Phi-4-mini's 0.75); rope types ``default`` and ``longrope``
(``su`` and ``yarn`` are old names of ``longrope`` for this family in transformers); the
pretraining window in a top-level ``original_max_position_embeddings`` (default 4096), which wins
over the rope block's; an optional sliding window.
"""

from longrope_jax.families import Family, Linear


def _fields(cfg):
    out = {"sliding_window": cfg.sliding_window}
    orig = (cfg.rope_parameters or {}).get("original_max_position_embeddings")
    out["original_max_position_embeddings"] = orig if orig is not None else cfg.max_position_embeddings
    return out


FAMILY = Family(
    name="phi3",
    architecture="Phi3ForCausalLM",
    defaults={"max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 32000,
              "pad_token_id": 32000},
    linears={
        "self_attn.qkv_proj": Linear(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        "self_attn.o_proj": Linear(("self_attn.o_proj",)),
        "mlp.gate_up_proj": Linear(("mlp.gate_proj", "mlp.up_proj")),
        "mlp.down_proj": Linear(("mlp.down_proj",)),
    },
    sliding_window=lambda d: d.get("sliding_window"),
    rope_types=("default", "longrope"),
    rope_aliases={"su": "longrope", "yarn": "longrope"},
    config_fields=_fields,
)
