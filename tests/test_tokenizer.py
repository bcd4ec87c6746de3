"""Tokenizers rebuilt from GGUF metadata: the special-token flags llama.cpp writes."""

import pytest

from longrope_jax.tokenizer import Tokenizer


def _metadata(**flags):
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = sorted(ByteLevel.alphabet()) + ["<s>", "</s>"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [],
          "tokenizer.ggml.token_type": [1] * (len(tokens) - 2) + [3, 3],
          "tokenizer.ggml.bos_token_id": len(tokens) - 2, "tokenizer.ggml.eos_token_id": len(tokens) - 1}
    md.update({f"tokenizer.ggml.{k}": v for k, v in flags.items()})
    return md, len(tokens) - 2, len(tokens) - 1


@pytest.mark.parametrize("bos,eos", [(False, False), (True, False), (False, True), (True, True)])
def test_gguf_add_bos_and_add_eos_flags(bos, eos):
    md, b, e = _metadata(add_bos_token=bos, add_eos_token=eos)
    tok = Tokenizer.from_gguf_metadata(md, "model.gguf")
    plain = tok.encode_plain("ab")
    assert len(plain) == 2 and tok.encode("ab") == [b] * bos + plain + [e] * eos
    ids, offsets = tok.encode_offsets("ab")
    assert ids == tok.encode("ab") and offsets == [(0, 0)] * bos + [(0, 1), (1, 2)] + [(0, 0)] * eos
    assert tok.describe()["adds_special_tokens"] == (bos or eos)
