"""Needle-driven windows (LongRoPE2's fitness)."""

import numpy as np
import pytest

from longrope_jax import needle
from longrope_jax.tokenizer import Tokenizer

from tiny import byte_tokenizer_file

TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 12


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_file(byte_tokenizer_file(str(tmp_path_factory.mktemp("tok"))))


def test_plant_places_needles_and_scores_only_the_answers(tok):
    text = tok.encode(TEXT)
    ids, w, depths, values = needle.plant(tok, text, 400, np.random.default_rng(3), needles=3)
    assert ids.shape == (400,) and w.shape == (399,) and ids.dtype == np.int32
    assert depths == sorted(depths) and all(0 <= d < 1 for d in depths)
    assert len(values) == 3 and all(len(v) == 5 and v.isdigit() for v in values)
    prompt = tok.decode(ids.tolist())
    for key, v in zip(needle.KEYS, values):
        assert needle.NEEDLE.format(key=key, value=v) in prompt  # planted in the text
        assert prompt.count(v) == 2  # and answered at the end
    # The scored predictions are exactly the answers' tokens (a space and five digits each).
    scored = ids[1:][w > 0]
    assert tok.decode(scored.tolist()) == "".join(" " + v for v in values)
    assert prompt.endswith(needle.ANSWER.format(key=needle.KEYS[2]) + " " + values[2])
    # Needles go in order of depth, the filler in order.
    pos = [prompt.index(needle.NEEDLE.format(key=k, value=v)) for k, v in zip(needle.KEYS, values)]
    assert pos == sorted(pos)


def test_needle_windows_are_seeded(tok):
    rows = np.stack([np.asarray(tok.encode(TEXT)[i:i + 300], np.int32) for i in (0, 5)])
    a = needle.needle_windows(tok, rows, seed=1, needles=2)
    b = needle.needle_windows(tok, rows, seed=1, needles=2)
    c = needle.needle_windows(tok, rows, seed=2, needles=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert a.values == b.values and a.values != c.values and a.values[0] != a.values[1]
    assert a.tokens.shape == (2, 300) and a.weights.shape == (2, 299)


def test_bad_needle_requests_are_clear_errors(tok):
    text = tok.encode(TEXT)
    with pytest.raises(ValueError, match="too short for 2 needle"):
        needle.plant(tok, text, 100, np.random.default_rng(0), needles=2)
    with pytest.raises(ValueError, match="needles: expected 1 to 12, got 0"):
        needle.plant(tok, text, 400, np.random.default_rng(0), needles=0)
    with pytest.raises(ValueError, match="the document has 50 tokens"):
        needle.plant(tok, text[:50], 400, np.random.default_rng(0), needles=1)


def test_prompts_are_encoded_once_with_a_bos_and_metaspace_tokenizer(tmp_path):
    """With a LLaMA-2-style tokenizer (BOS on every encode, "▁" before each piece) the needle
    window and the passkey prompt are one encoding of their text: one BOS, and the answer tokens
    found by offsets."""
    from longrope_jax import passkey
    from tiny import sentencepiece_like_tokenizer_file

    tok = Tokenizer.from_file(sentencepiece_like_tokenizer_file(str(tmp_path), [TEXT, passkey.INTRO, passkey.FILLER,
                                                                                needle.NEEDLE, needle.QUESTION]))
    assert tok.encode("a")[0] == 1 and tok.describe()["adds_special_tokens"]
    doc = tok.encode(TEXT * 2)
    ids, w, depths, values = needle.plant(tok, doc, 500, np.random.default_rng(3), needles=3)
    assert ids.shape == (500,) and ids.tolist().count(1) == 1 and ids[0] == 1
    prompt = tok.decode(ids.tolist())
    for key, v in zip(needle.KEYS, values):
        assert needle.NEEDLE.format(key=key, value=v).strip() in prompt
    assert prompt.endswith(needle.ANSWER.format(key=needle.KEYS[2]) + " " + values[2])
    scored = tok.decode(ids[1:][w > 0].tolist()).replace(" ", "")
    assert scored == "".join(values)  # exactly the answers' digits are scored
    p = passkey.build_prompt(tok, 300, 0.5, "41867")
    assert len(p) <= 300 and p.count(1) == 1
    assert any(p == tok.encode(passkey.prompt_text(n, 0.5, "41867")) for n in range(300))  # one encode
    assert "The pass key is 41867." in tok.decode(p)
