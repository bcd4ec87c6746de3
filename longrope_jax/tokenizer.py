"""Tokenizers from an HF directory (``tokenizer.json``) or from GGUF metadata.

Built on the ``tokenizers`` library only (no transformers). Encoding uses the tokenizer's default
special-token behaviour (its post-processor), as ``transformers`` does by default.
"""

from __future__ import annotations

import os
from typing import Any

from longrope_jax.hf import HFError


class Tokenizer:
    """A thin wrapper: ``encode(text) -> list[int]``, ``decode(ids) -> str``, ``describe()``."""

    def __init__(self, backend, source: str):
        self.backend = backend
        self.source = source

    @classmethod
    def from_file(cls, path: str) -> "Tokenizer":
        from tokenizers import Tokenizer as _T

        if not os.path.exists(path):
            raise HFError(f"{path}: not found (expected a tokenizer.json)")
        try:
            return cls(_T.from_file(path), path)
        except Exception as e:
            raise HFError(f"{path}: cannot read tokenizer ({e})") from None

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any], source: str) -> "Tokenizer":
        """Byte-level BPE (``tokenizer.ggml.model == 'gpt2'``), built as transformers does."""
        from tokenizers import AddedToken, Tokenizer as _T, decoders, models, pre_tokenizers, processors

        kind = md.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise HFError(
                f"{source}: field 'tokenizer.ggml.model': only byte-level BPE ('gpt2') tokenizers are rebuilt "
                f"from GGUF metadata, got {kind!r}; pass --tokenizer PATH/tokenizer.json"
            )
        tokens = list(md["tokenizer.ggml.tokens"])
        merges = [tuple(m.split(" ")) for m in md.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = _T(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(md.get("tokenizer.ggml.add_space_prefix", False)))
        tok.decoder = decoders.ByteLevel()
        ends = []  # (token, id) added before / after each sequence, as llama.cpp's flags say
        for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
            i = md.get(f"tokenizer.ggml.{key}")
            ends.append((tokens[i], i) if md.get(f"tokenizer.ggml.{flag}", False) and i is not None else None)
        bos, eos = ends
        if bos or eos:
            pre, post = (f"{bos[0]}:0 " if bos else ""), (f" {eos[0]}:0" if eos else "")
            tok.post_processor = processors.TemplateProcessing(
                single=f"{pre}$A:0{post}", pair=f"{pre}$A:0{post} $B:1{post}",
                special_tokens=list(dict.fromkeys(e for e in ends if e)))
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        from tokenizers.pre_tokenizers import ByteLevel

        alphabet = set(ByteLevel.alphabet())
        types = md.get("tokenizer.ggml.token_type") or []
        # Control tokens stay whole; one spelled outside the byte alphabet is a llama.cpp mislabel.
        control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
                   if ty == 3 and set(t) <= alphabet]
        if control:
            tok.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == 4]
        if user:
            tok.add_tokens(user)
        return cls(tok, source)

    @classmethod
    def byte_level(cls) -> "Tokenizer":
        """One token per byte (id = the byte's value, GPT-2's byte-to-character map), then
        ``<s>`` (256) and ``</s>`` (257) as special tokens; none is added by ``encode``. For
        models pretrained from scratch: it is saved with the run as a ``tokenizer.json``."""
        from tokenizers import AddedToken, Tokenizer as _T, decoders, models, pre_tokenizers

        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        chars, extra = {}, 0
        for b in range(256):  # GPT-2's bytes_to_unicode: printable bytes map to themselves
            if b in keep:
                chars[b] = chr(b)
            else:
                chars[b] = chr(256 + extra)
                extra += 1
        tok = _T(models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[], fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
        return cls(tok, "byte-level")

    def save(self, path: str) -> None:
        self.backend.save(path)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def encode_plain(self, text: str) -> list[int]:
        """Ids without special tokens (BOS/EOS): to measure a piece of a prompt."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids with special tokens, and each token's ``(start, end)`` character span in ``text``
        (``(0, 0)`` for a special token): a prompt is encoded once, its spans found by offsets."""
        e = self.backend.encode(text)
        special = e.special_tokens_mask
        return list(e.ids), [(0, 0) if sp else (int(a), int(b)) for (a, b), sp in zip(e.offsets, special)]

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids))

    def describe(self) -> dict:
        """The special-token behaviour of ``encode`` (for the perplexity output)."""
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a").ids
        extra = [i for i in full if i not in plain] if full != plain else []
        return {
            "source": self.source,
            "adds_special_tokens": full != plain,
            "special_tokens_added": [self.backend.id_to_token(i) for i in extra],
        }


def load_for(model_path: str, gguf_metadata: dict | None = None) -> Tokenizer | None:
    """The tokenizer that belongs to a model path, or None when the directory has none."""
    if gguf_metadata is not None:
        return Tokenizer.from_gguf_metadata(gguf_metadata, model_path)
    f = os.path.join(model_path, "tokenizer.json")
    return Tokenizer.from_file(f) if os.path.exists(f) else None
