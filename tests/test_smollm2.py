"""SmolLM2-135M-Instruct (the real model of the tests): import, logits and perplexity against
transformers' own GGUF loading. Marked slow; run in CI."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import evaluate, hf
from longrope_jax import model as model_lib
from longrope_jax.data import read_documents
from longrope_jax.loading import load_model, smollm2_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model():
    p = smollm2_path()
    m = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(p), gguf_file=os.path.basename(p), dtype=torch.float32
    )
    tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
    m.eval()
    return m, tok


@pytest.fixture(scope="module")
def ours():
    return load_model("smollm2")


@pytest.fixture(scope="module")
def text():
    return read_documents("pydoc:")[0].text[:40000]


def test_config_matches(hf_model, ours):
    c = hf_model[0].config
    cfg = ours.cfg
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (
        c.vocab_size, c.max_position_embeddings, c.rope_parameters["rope_theta"])
    assert cfg.rms_norm_eps == c.rms_norm_eps and cfg.tie_word_embeddings == c.tie_word_embeddings


def test_gguf_import_equals_transformers_tensor_for_tensor(hf_model, ours):
    sd = hf_model[0].state_dict()
    names = set()
    for name, arr in hf.tensors_from_params(ours.params, ours.cfg):
        ref = sd[name].numpy()
        assert arr.shape == ref.shape, name
        np.testing.assert_array_equal(np.asarray(arr), ref, err_msg=name)
        names.add(name)
    # Everything transformers holds is covered (its lm_head is the tied embedding).
    assert set(sd) - names == {"lm_head.weight"}
    np.testing.assert_array_equal(sd["lm_head.weight"].numpy(), sd["model.embed_tokens.weight"].numpy())


def test_tokenizer_matches_transformers(hf_model, ours, text):
    assert ours.tokenizer.encode(text) == hf_model[1](text)["input_ids"]
    assert ours.tokenizer.describe()["adds_special_tokens"] is False


def test_logits_match_transformers_512(hf_model, ours, text):
    ids = np.asarray(ours.tokenizer.encode(text)[:512], np.int32)[None]
    with torch.no_grad():
        ref = hf_model[0](torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(model_lib.Transformer(ours.cfg).apply({"params": ours.params}, jnp.asarray(ids)))
    assert np.abs(got - ref).max() <= 1e-3


def test_perplexity_matches_transformers_2048(hf_model, ours, text):
    ids = np.asarray(ours.tokenizer.encode(text)[:2048], np.int32)[None]
    with torch.no_grad():
        loss = hf_model[0](torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long)).loss.item()
    res = evaluate.perplexity(ours.params, ours.cfg, ids, model_lib.rope_spec(ours.cfg), q_chunk=512)
    assert res["predictions"] == 2047
    assert abs(res["ppl"] / np.exp(loss) - 1) <= 1e-3
    blk = evaluate.perplexity(ours.params, ours.cfg, ids, model_lib.rope_spec(ours.cfg), attention="blockwise",
                              q_chunk=512)
    assert abs(blk["ppl"] / np.exp(loss) - 1) <= 1e-3
    assert abs(blk["nll"] - res["nll"]) <= 1e-5


def test_greedy_generation_matches_transformers(hf_model, ours, text):
    from longrope_jax import generate

    ids = ours.tokenizer.encode(text)[:96]
    with torch.no_grad():
        ref = hf_model[0].generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                   eos_token_id=ours.cfg.eos_token_id, pad_token_id=ours.cfg.eos_token_id)
    ref_new = ref[0, len(ids):].tolist()
    g = generate.greedy(ours.params, ours.cfg, ids, 32, model_lib.rope_spec(ours.cfg),
                        eos_token_id=ours.cfg.eos_token_id)
    assert len(ref_new) >= 8
    assert g.tokens == ref_new
