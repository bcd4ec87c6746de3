"""HF export with LongRoPE factors, checked by the installed transformers.

Tiny random LLaMA (GQA, tied) and Mistral (sliding window, untied) models are built with
transformers with the default RoPE and an original window of ``L_ORIG`` tokens, randomised with a
wide spread as in ``test_model.py``, and saved. A factors file with distinct short and long sets
(target ``4 * L_ORIG``) is attached and exported with ``longrope-jax convert`` (HF -> checkpoint
-> HF). transformers' ``from_pretrained`` of the export must give our logits (our model with
``factors.to_spec``) within 1e-4 at ``L_ORIG - 1``, ``L_ORIG + 1`` and ``2 * L_ORIG``.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longrope_jax import cli, export, hf  # noqa: E402
from longrope_jax.jobs import convert  # noqa: E402
from longrope_jax import factors as factors_lib  # noqa: E402
from longrope_jax.model import Transformer  # noqa: E402

from tiny import byte_tokenizer_file  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEAD_DIM = 256, 64, 128, 2, 16
L_ORIG, L_MAX = 32, 128
LENGTHS = (L_ORIG - 1, L_ORIG + 1, 2 * L_ORIG)
TOL = 1e-4
P = HEAD_DIM // 2
SHORT = [round(float(x), 4) for x in np.linspace(1.0, 1.6, P)]
LONG = [round(float(x), 4) for x in np.linspace(1.5, 6.0, P)]
ARCHS = {
    # name: (family, heads, kv heads, tied, sliding window, attention_factor in the factors file)
    "llama": ("llama", 4, 2, True, None, None),  # the sqrt default: not written
    "mistral": ("mistral", 4, 2, False, 20, 1.3),  # explicit: written and used
}


def factors_dict(rotary_dim=HEAD_DIM, **kw):
    d = {"format": factors_lib.FORMAT, "rope_type": "longrope", "rope_theta": 10000.0, "rotary_dim": rotary_dim,
         "original_max_position_embeddings": L_ORIG, "max_position_embeddings": L_MAX,
         "long_factor": LONG, "short_factor": SHORT, "attention_factor": None, "start_tokens": 0}
    d.update(kw)
    return d


def write_factors(path, **kw) -> str:
    with open(path, "w") as fh:
        json.dump(factors_dict(**kw), fh)
    return str(path)


def hf_source(root, arch: str, seed: int = 0) -> str:
    """A tiny transformers model (default RoPE, window L_ORIG) saved with a byte tokenizer."""
    family, heads, kv, tied, window, _ = ARCHS[arch]
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=HEAD_DIM,
              max_position_embeddings=L_ORIG, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = (transformers.MistralConfig(sliding_window=window, **kw) if family == "mistral"
              else transformers.LlamaConfig(**kw))
    torch.manual_seed(seed)
    cls = transformers.MistralForCausalLM if family == "mistral" else transformers.LlamaForCausalLM
    model = cls(config)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    path = os.path.join(str(root), f"src-{arch}")
    model.save_pretrained(path)
    byte_tokenizer_file(path)
    return path


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    return jax.jit(lambda params, tokens, spec: Transformer(cfg).apply({"params": params}, tokens, rope=spec))


def our_logits(cfg, params, tokens, spec):
    return np.asarray(_jitted(cfg)(params, jnp.asarray(tokens), spec))


def tokens_for(length, batch=2):
    return np.random.default_rng(length).integers(0, VOCAB, (batch, length)).astype(np.int32)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, [json.loads(x) for x in out.splitlines() if x.strip()], err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """arch -> (source dir, factors path, exported dir, result of the export), built once each."""
    cache = {}

    def get(arch):
        if arch not in cache:
            root = tmp_path_factory.mktemp(f"export-{arch}")
            src = hf_source(root, arch)
            fac = write_factors(root / "factors.json", attention_factor=ARCHS[arch][5])
            ckpt, out = str(root / "ckpt"), str(root / "hf")
            convert.run(src, ckpt, factors=fac)  # attached to the checkpoint ...
            res = convert.run(ckpt, out)  # ... and written to HF by default
            cache[arch] = (src, fac, out, res)
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_exported_longrope_matches_transformers(exported, arch):
    src, fac, out, res = exported(arch)
    assert res["to"] == "hf" and res["source_kind"] == "checkpoint" and res["rope_type"] == "longrope"
    d = json.load(open(os.path.join(out, "config.json")))
    assert d["rope_scaling"] == d["rope_parameters"]
    block = d["rope_scaling"]
    assert block["rope_type"] == "longrope" and block["short_factor"] == SHORT and block["long_factor"] == LONG
    assert block["original_max_position_embeddings"] == L_ORIG and block["rope_theta"] == 10000.0
    assert d["max_position_embeddings"] == L_MAX and d["original_max_position_embeddings"] == L_ORIG
    assert "factor" not in block
    af = ARCHS[arch][5]
    assert ("attention_factor" in block) == (af is not None) and block.get("attention_factor") == af
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen == {"bos_token_id": 1, "eos_token_id": 2}

    ref = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert ref.config.rope_parameters["rope_type"] == "longrope"
    cfg, params = hf.load(src)
    fd = factors_lib.load(fac)
    errs = {}
    for length in LENGTHS:
        t = tokens_for(length)
        with torch.no_grad():
            want = ref(torch.from_numpy(t.astype(np.int64))).logits.numpy()
        got = our_logits(cfg, params, t, factors_lib.to_spec(fd, length))
        errs[length] = float(np.abs(got - want).max())
    print(f"{arch}: max |logit diff| vs transformers {errs}")
    assert max(errs.values()) <= TOL, errs
    # The factors matter at every length tested: the default RoPE gives other logits.
    plain = our_logits(cfg, params, tokens_for(2 * L_ORIG), factors_lib.resolve_rope("none", cfg))
    assert np.abs(plain - got).max() > 100 * TOL


def test_exported_longrope_round_trips_through_a_checkpoint(exported, tmp_path):
    """An exported LongRoPE directory -> checkpoint -> HF: the same config.json, the same tensors."""
    _, _, out, _ = exported("mistral")
    convert.run(out, str(tmp_path / "ckpt"))
    res = convert.run(str(tmp_path / "ckpt"), str(tmp_path / "again"))
    assert res["rope_type"] == "longrope" and res["dropped_start_tokens"] is None
    assert json.load(open(tmp_path / "again" / "config.json")) == json.load(open(os.path.join(out, "config.json")))
    a = {n: x for n, x, _ in hf.iter_safetensors(hf.safetensors_files(out))}
    b = {n: x for n, x, _ in hf.iter_safetensors(hf.safetensors_files(str(tmp_path / "again")))}
    assert a.keys() == b.keys() and all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_exported_tokenizer_loads_in_transformers(exported):
    src, _, out, res = exported("llama")
    assert res["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert open(os.path.join(out, "tokenizer.json"), "rb").read() == open(os.path.join(src, "tokenizer.json"), "rb").read()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    from tokenizers import Tokenizer

    text = "Hello, LongRoPE! ünïcödé\n  spaces"
    assert tok(text)["input_ids"] == Tokenizer.from_file(os.path.join(src, "tokenizer.json")).encode(text).ids


def test_hf_source_with_factors_straight_to_hf(tmp_path, exported, capsys):
    """HF + factors -> HF (no checkpoint in between) via the CLI: same config as via a checkpoint."""
    src, fac, out, _ = exported("llama")
    rc, recs, err = run_cli(["convert", "--model", src, "--factors", fac, "--to", "hf",
                             "--out", str(tmp_path / "direct")], capsys)
    assert rc == 0, err
    assert recs[0]["source_kind"] == "hf" and recs[0]["rope_type"] == "longrope" and "writing HF" in err
    a = json.load(open(os.path.join(out, "config.json")))
    b = json.load(open(tmp_path / "direct" / "config.json"))
    assert a == b


def test_start_tokens_refused_unless_allowed(tmp_path, exported, capsys):
    src, _, _, _ = exported("llama")
    for kw, field in ((dict(start_tokens=4), "start_tokens = 4"),
                      (dict(per_length={"64": {"long_factor": LONG, "start_tokens": 2}}),
                       "per_length.64.start_tokens = 2")):
        fac = write_factors(tmp_path / "f.json", **kw)
        out = tmp_path / "out"
        rc, recs, err = run_cli(["convert", "--model", src, "--factors", fac, "--to", "hf", "--out", str(out)],
                                capsys)
        assert rc == 2 and not recs
        assert f"{fac}: field 'start_tokens': expected 0 for an HF export, got {field}" in err
        assert "--allow-drop-start-tokens" in err and "reading" not in err  # refused before the model is read
        assert not out.exists() and sorted(os.listdir(tmp_path)) == ["f.json"]
        rc, recs, err = run_cli(["convert", "--model", src, "--factors", fac, "--to", "hf", "--out", str(out),
                                 "--allow-drop-start-tokens"], capsys)
        assert rc == 0, err
        assert recs[0]["dropped_start_tokens"] == ({"start_tokens": 4} if "start_tokens" in kw
                                                   else {"per_length": {"64": 2}})
        assert "warning: start tokens dropped" in err
        assert "start_tokens" not in json.dumps(json.load(open(out / "config.json")))
        import shutil

        shutil.rmtree(out)


def test_attention_factor_equal_to_default_is_not_written(tmp_path):
    from longrope_jax import rope as rope_lib
    from tiny import tiny_config

    cfg = tiny_config(head_dim=HEAD_DIM, hidden_size=64, max_position_embeddings=L_ORIG)
    default = rope_lib.longrope_attention_factor(L_MAX, L_ORIG)
    c, notes = export.longrope_config(cfg, factors_dict(attention_factor=default))
    assert "attention_factor" not in c.rope_parameters and notes["attention_factor"] == default
    c, notes = export.longrope_config(cfg, factors_dict(attention_factor=1.25))
    assert c.rope_parameters["attention_factor"] == 1.25 and c.max_position_embeddings == L_MAX
    with pytest.raises(factors_lib.FactorsError, match=r"factors: field 'rope_theta': expected 10000.0"):
        export.longrope_config(cfg, factors_dict(rope_theta=500000.0))


@pytest.mark.slow
def test_smollm2_gguf_to_checkpoint_to_hf_loads_in_transformers(tmp_path):
    """GGUF -> checkpoint -> HF: transformers' load of the export against its own GGUF loading."""
    from longrope_jax.data import read_documents
    from longrope_jax.loading import smollm2_path

    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    r1 = convert.run("smollm2", ckpt)
    assert r1["source_kind"] == "gguf" and r1["to"] == "checkpoint"
    assert r1["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    r2 = convert.run(ckpt, out)
    assert r2["to"] == "hf" and r2["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]

    p = smollm2_path()
    gg_tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = read_documents("pydoc:")[0].text[:4000]
    ids = gg_tok(text)["input_ids"]
    assert tok(text)["input_ids"] == ids
    assert tok.eos_token == gg_tok.eos_token and tok.chat_template == gg_tok.chat_template

    ids = torch.tensor([ids[:256]], dtype=torch.long)
    gg = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(p), gguf_file=os.path.basename(p),
                                                           dtype=torch.float32).eval()
    with torch.no_grad():
        want = gg(ids).logits.numpy()
    del gg
    m = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = m(ids).logits.numpy()
    err = float(np.abs(got - want).max())
    print(f"smollm2 GGUF -> checkpoint -> HF: max |logit diff| vs transformers' GGUF load {err:.3g}")
    assert err <= 1e-3
