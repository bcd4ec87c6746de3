"""HF directory reading and writing: round trips and clear errors on bad input."""

import json
import os

import numpy as np
import pytest

from longrope_jax import hf
from longrope_jax.model import init_params

from tiny import make_hf_dir, tiny_config


def _edit_config(path, **changes):
    f = os.path.join(path, "config.json")
    d = json.load(open(f))
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    json.dump(d, open(f, "w"))
    return f


def test_save_load_round_trip_single_and_sharded(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    params = init_params(cfg)
    for shard_bytes, expect_index in ((1 << 30, False), (20_000, True)):
        out = str(tmp_path / f"m{shard_bytes}")
        hf.save(out, cfg, params, shard_bytes=shard_bytes)
        assert os.path.exists(os.path.join(out, hf.INDEX)) == expect_index
        cfg2, params2 = hf.load(out)
        assert cfg2 == cfg.replace()
        a = dict(hf.tensors_from_params(params, cfg))
        b = dict(hf.tensors_from_params(params2, cfg2))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k])


def test_bfloat16_weights_load(tmp_path):
    import ml_dtypes

    cfg = tiny_config()
    params = init_params(cfg)
    out = str(tmp_path / "bf16")
    hf.save(out, cfg, params, dtype=ml_dtypes.bfloat16)
    _, p = hf.load(out)
    assert p["embed_tokens"]["embedding"].dtype == ml_dtypes.bfloat16
    _, p32 = hf.load(out, dtype=np.float32)
    assert p32["embed_tokens"]["embedding"].dtype == np.float32


def test_unknown_architecture(tmp_path):
    d = make_hf_dir(str(tmp_path))
    f = _edit_config(d, architectures=["GPT2LMHeadModel"])
    with pytest.raises(hf.HFError, match=r"config.json: field 'architectures': unsupported architecture "
                                         r"'GPT2LMHeadModel'.*LlamaForCausalLM"):
        hf.load(d)
    assert f in str(pytest.raises(hf.HFError, hf.load, d).value)


def test_missing_config_key(tmp_path):
    d = make_hf_dir(str(tmp_path))
    _edit_config(d, hidden_size=None)
    with pytest.raises(hf.HFError, match=r"config.json: field 'hidden_size' is missing \(expected int\)"):
        hf.load(d)


def test_shard_named_in_index_but_missing(tmp_path):
    cfg = tiny_config()
    out = str(tmp_path / "sharded")
    hf.save(out, cfg, init_params(cfg), shard_bytes=20_000)
    index = json.load(open(os.path.join(out, hf.INDEX)))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(out, victim))
    with pytest.raises(hf.HFError, match=rf"{hf.INDEX}: field 'weight_map' names shard '{victim}', which is missing"):
        hf.load(out)


def test_truncated_safetensors(tmp_path):
    d = make_hf_dir(str(tmp_path))
    f = os.path.join(d, hf.SINGLE)
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(hf.HFError, match=r"model.safetensors: cannot read safetensors .*truncated or corrupt"):
        hf.load(d)


def test_wrong_tensor_shape_names_tensor(tmp_path):
    d = make_hf_dir(str(tmp_path))
    _edit_config(d, intermediate_size=48)
    with pytest.raises(hf.HFError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight': expected shape .*48.*got"):
        hf.load(d)


def test_no_weights(tmp_path):
    d = make_hf_dir(str(tmp_path))
    os.remove(os.path.join(d, hf.SINGLE))
    with pytest.raises(hf.HFError, match="no model.safetensors or model.safetensors.index.json"):
        hf.load(d)


def test_config_rope_schemas():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=8, hidden_size=8, intermediate_size=8,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64)
    v4 = dict(base, rope_theta=5e5, rope_scaling={"type": "su", "short_factor": [1] * 2, "long_factor": [2] * 2,
                                                  "original_max_position_embeddings": 16})
    c = hf.config_from_hf(v4)
    assert c.rope_parameters["rope_type"] == "longrope" and c.rope_theta == 5e5
    v5 = dict(base, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    c = hf.config_from_hf(v5)
    assert c.rope_parameters["original_max_position_embeddings"] == 64 and c.rope_theta == 1e4
    both = dict(v5, rope_scaling={"rope_type": "linear", "factor": 3.0}, original_max_position_embeddings=32)
    c = hf.config_from_hf(both)
    assert c.rope_parameters["rope_type"] == "linear"
    top = dict(v5, original_max_position_embeddings=32)
    assert hf.config_from_hf(top).rope_parameters["original_max_position_embeddings"] == 32
