"""Tiny models and tokenizers written as HF directories by our own code (no torch needed)."""

import os

from longrope_jax import hf
from longrope_jax.model import ModelConfig, init_params


def byte_tokenizer_file(path: str) -> str:
    """A byte-level BPE tokenizer with one token per byte (vocab 256) saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    f = os.path.join(path, "tokenizer.json")
    tok.save(f)
    return f


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, rope_theta=10000.0,
                tie_word_embeddings=True, rope_parameters={"rope_type": "default"})
    base.update(kw)
    return ModelConfig(**base)


def make_hf_dir(root: str, name: str = "tiny", seed: int = 0, **kw) -> str:
    """Writes a tiny random LLaMA as an HF directory with a byte tokenizer; returns its path."""
    cfg = tiny_config(**kw)
    params = init_params(cfg, seed)
    os.makedirs(root, exist_ok=True)
    tf = byte_tokenizer_file(root)
    out = os.path.join(root, name)
    hf.save(out, cfg, params, tokenizer_file=tf)
    return out


def sentencepiece_like_tokenizer_file(path: str, texts) -> str:
    """A LLaMA-2/Mistral-style tokenizer.json: Metaspace pre-tokenizer ("▁" before words) and a
    post-processor that adds BOS ``<s>`` (id 1) to every encoding; BPE trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set("".join(texts)) | set("0123456789"))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=alphabet, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    f = os.path.join(path, "tokenizer.json")
    tok.save(f)
    return f


def largest_residual(fn, capsys, *args) -> int:
    """Elements of the largest array ``jax.grad(fn)`` saves from the forward for the backward
    (``jax.ad_checkpoint.print_saved_residuals``, read through pytest's ``capsys``)."""
    import re

    import numpy as np
    from jax.ad_checkpoint import print_saved_residuals

    capsys.readouterr()
    print_saved_residuals(fn, *args)
    shapes = re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, flags=re.M)
    assert shapes
    return max(int(np.prod([int(x) for x in s.split(",") if x] or [1])) for s in shapes)


def word_corpus(d, sizes=(600,) * 6) -> str:
    """Six (by default) Python-like documents of random keywords in folder ``d``, seeded: the
    training corpus of the subprocess tests."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i, n in enumerate(sizes):
        (d / f"doc{i}.py").write_text(" ".join(rng.choice(words, n)))
    return str(d)
