"""The factors file and ``--rope`` values."""

import json

import numpy as np
import pytest

from longrope_jax import factors, rope
from tiny import tiny_config

P = 4  # tiny_config: head_dim 8


def _file(tmp_path, **kw):
    d = {"format": factors.FORMAT, "rope_type": "longrope", "rope_theta": 10000.0, "rotary_dim": 8,
         "original_max_position_embeddings": 64, "max_position_embeddings": 256,
         "long_factor": [1.0, 1.5, 2.0, 4.0], "short_factor": [1.0, 1.0, 1.1, 1.2], "attention_factor": None,
         "start_tokens": 0, "per_length": {}}
    d.update(kw)
    f = tmp_path / "factors.json"
    f.write_text(json.dumps(d))
    return str(f)


def test_file_to_spec(tmp_path):
    f = _file(tmp_path, per_length={"128": {"long_factor": [1.0, 1.2, 1.4, 2.0], "start_tokens": 4}})
    cfg = tiny_config()
    s = factors.resolve_rope(f, cfg, length=100)
    np.testing.assert_allclose(s.long_factor, [1.0, 1.2, 1.4, 2.0])
    assert int(s.start_tokens) == 4 and s.original_max == 64
    np.testing.assert_allclose(float(s.attention_factor), np.sqrt(1 + np.log(4) / np.log(64)), rtol=1e-6)
    s = factors.resolve_rope(f, cfg, length=200)  # beyond the largest entry: top-level set
    np.testing.assert_allclose(s.long_factor, [1.0, 1.5, 2.0, 4.0])
    np.testing.assert_allclose(s.short_factor, [1.0, 1.0, 1.1, 1.2])


@pytest.mark.parametrize("field,value,msg", [
    ("long_factor", [1.0, 2.0, 3.0], r"long_factor: expected 4 factors \(rotary_dim / 2\), got 3"),
    ("long_factor", [1.0, float("nan"), 2.0, 3.0], r"long_factor\[1\]: expected a finite factor > 0, got nan"),
    ("short_factor", [1.0, 0.0, 2.0, 3.0], r"short_factor\[1\]: expected a finite factor > 0, got 0.0"),
    ("long_factor", [1.0, -2.0, 2.0, 3.0], r"long_factor\[1\]: expected a finite factor > 0, got -2.0"),
    ("format", "longrope-factors/2", r"field 'format': expected 'longrope-factors/1'"),
    ("rotary_dim", 16, r"long_factor: expected 8 factors \(rotary_dim / 2\), got 4"),  # the file disagrees with itself
    ("rope_theta", 5e5, r"field 'rope_theta': expected 10000.0 \(the model's\), got 500000.0"),
])
def test_bad_factor_files(tmp_path, field, value, msg):
    f = _file(tmp_path, **{field: value})
    with pytest.raises(factors.FactorsError, match=msg) as e:
        factors.resolve_rope(f, tiny_config())
    assert str(f) in str(e.value)


def test_a_file_of_another_rotary_dim_is_refused(tmp_path):
    f = _file(tmp_path, rotary_dim=16, long_factor=[1.0] * 8, short_factor=[1.0] * 8)
    factors.load(f)  # a valid file ...
    with pytest.raises(factors.FactorsError, match=r"field 'rotary_dim': expected 8 \(the model's rotary dim\), got 16"):
        factors.resolve_rope(f, tiny_config())  # ... of another model


def test_rope_values():
    cfg = tiny_config()
    assert factors.rope_label("none", cfg) == "none"
    np.testing.assert_allclose(factors.resolve_rope("pi:4", cfg).long_factor, [4.0] * P)
    np.testing.assert_allclose(factors.resolve_rope("ntk:4", cfg).long_factor, rope.ntk_factors(8, 4.0), rtol=1e-6)
    assert factors.resolve_rope("dynamic:2", cfg).dynamic_scale == 2.0
    assert abs(float(factors.resolve_rope("yarn:4", cfg).attention_factor) - (0.1 * np.log(4) + 1)) < 1e-6
    assert factors.rope_label("llama3:8", cfg) == "llama3:8"
    assert factors.rope_label("model", cfg) == "none"  # tiny_config: the default rope block
    yarn_cfg = cfg.replace(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    assert factors.rope_label("model", yarn_cfg) == "yarn:4"
    for bad in ("pi:x", "pi:-1", "bogus", "yarn:0"):
        with pytest.raises(factors.FactorsError, match=r"--rope"):
            factors.resolve_rope(bad, cfg)


@pytest.mark.parametrize("value", ["pi:4", "yarn:4", "ntk:4", "llama3:4"])
def test_a_built_in_method_as_the_model_s_own_rope(value):
    """What a stage trained with a built-in method writes into its model's config: the model's
    own RoPE (``--rope model``) is then that method on the original window, whatever window the
    trained model states (a 32k stage of an 8k model: 4x of 8k, not of 32k)."""
    import dataclasses

    from longrope_jax.factors import as_config, parse_rope, resolve_rope
    from longrope_jax.model import ModelConfig, rope_spec

    cfg = ModelConfig(vocab_size=16, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=8192,
                      rope_theta=10000.0, rope_parameters={"rope_type": "default"})
    method = parse_rope(value)
    want = resolve_rope(method, cfg, 32768)
    trained = dataclasses.replace(cfg, max_position_embeddings=32768, **as_config(method, cfg))
    def inverse_frequencies(spec):  # in float64: what a spec means (NTK as a base or as factors alike)
        i = np.arange(spec.rotary_dim // 2, dtype=np.float64)
        return 1.0 / (np.asarray(spec.long_factor, np.float64) * float(spec.theta) ** (2 * i / spec.rotary_dim))

    got = rope_spec(trained)
    np.testing.assert_allclose(inverse_frequencies(got), inverse_frequencies(want), rtol=1e-6)
    np.testing.assert_allclose(float(got.attention_factor), float(want.attention_factor), rtol=1e-6)
    assert as_config(parse_rope("model"), cfg) == {} and as_config(parse_rope("dynamic:4"), cfg) == {}
