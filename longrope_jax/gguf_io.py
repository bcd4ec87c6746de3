"""GGUF (llama.cpp) files of the llama architecture -> (ModelConfig, params, tokenizer).

Weights are dequantised to float32 with the ``gguf`` package. llama.cpp stores the q and k
projection rows in the interleaved RoPE order; they are permuted back to HF's half-split order
so the result equals transformers' GGUF loading tensor for tensor. The tokenizer is rebuilt
from the file's metadata as transformers does (byte-level BPE files).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from longrope_jax import families
from longrope_jax import rope as rope_lib
from longrope_jax.hf import HFError, params_from_tensors
from longrope_jax.model import ModelConfig

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFError(HFError):
    pass


def _reader(path: str):
    import gguf

    if not os.path.exists(path):
        raise GGUFError(f"{path}: not found (expected a GGUF file)")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # gguf raises ValueError / struct errors on bad files
        raise GGUFError(f"{path}: cannot read GGUF ({type(e).__name__}: {e})") from None


def metadata(reader) -> dict[str, Any]:
    """All scalar / string / array metadata fields as Python values."""
    out = {}
    for k, field in reader.fields.items():
        if k.startswith("GGUF."):
            continue
        try:
            out[k] = field.contents()
        except Exception:  # pragma: no cover - unreadable exotic field
            continue
    return out


def config_from_metadata(md: dict[str, Any], tensor_names: set[str], source: str) -> ModelConfig:
    arch = md.get("general.architecture")
    if arch != "llama":  # llama.cpp's name for LLaMA and Mistral files
        hint = (" (GGUF files of other families, Phi-3's included, are not read: load the model's HF directory)"
                if arch else "")
        raise GGUFError(f"{source}: field 'general.architecture': expected 'llama', got {arch!r}{hint}")

    def need(key):
        k = f"llama.{key}"
        if k not in md:
            raise GGUFError(f"{source}: field {k!r} is missing")
        return md[k]

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    kv = int(md.get("llama.attention.head_count_kv", heads))
    head_dim = int(md.get("llama.rope.dimension_count", hidden // heads))
    vocab = md.get("llama.vocab_size") or len(md.get("tokenizer.ggml.tokens", []))
    name = str(md.get("general.name", "")).lower()
    family = next((f.name for f in families.FAMILIES.values() if f.gguf_name and f.gguf_name in name), "llama")
    max_pos = int(need("context_length"))
    rope_block: dict[str, Any] = {"rope_type": "default", "rope_theta": float(md.get("llama.rope.freq_base", 10000.0))}
    stype = md.get("llama.rope.scaling.type")
    if stype in ("linear", "yarn"):
        rope_block["rope_type"] = stype
        rope_block["factor"] = float(md["llama.rope.scaling.factor"])
        if stype == "yarn":
            rope_block["original_max_position_embeddings"] = int(
                md.get("llama.rope.scaling.original_context_length", max_pos)
            )
    elif stype not in (None, "none"):
        raise GGUFError(f"{source}: field 'llama.rope.scaling.type': unsupported value {stype!r}")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_theta=rope_block["rope_theta"],
        rms_norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        sliding_window=None,
        architecture=family,
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=md.get("tokenizer.ggml.eos_token_id"),
        rope_parameters=rope_block,
    )


def _hf_name(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk":
        base = _LAYER_NAMES.get(parts[2])
        return None if base is None else f"model.layers.{parts[1]}.{base}.{parts[-1]}"
    base = _TOP_NAMES.get(parts[0])
    return None if base is None else f"{base}.{parts[-1]}"


def load(path: str, dtype=np.float32) -> tuple[ModelConfig, dict, dict]:
    """Reads and dequantises a llama GGUF file: ``(ModelConfig, params, metadata)``."""
    from gguf import dequantize

    reader = _reader(path)
    md = metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = config_from_metadata(md, names, path)

    def tensors():
        for t in reader.tensors:
            hf = _hf_name(t.name)
            if hf is None:
                if t.name.startswith("rope_freqs"):
                    raise GGUFError(f"{path}: tensor 'rope_freqs' (per-pair RoPE factors) is not supported")
                continue
            w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
            if ".attn_q." in t.name:
                w = rope_lib.interleaved_to_half(w, cfg.num_attention_heads)
            elif ".attn_k." in t.name:
                w = rope_lib.interleaved_to_half(w, cfg.num_key_value_heads)
            yield hf, w, path

    params = params_from_tensors(tensors(), cfg, dtype, source=path)
    return cfg, params, md
