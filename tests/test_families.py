"""Model families as data (``longrope_jax.families``): Phi-3 and a Llama-3-style model against
transformers on tiny random configs (logits on both sides of the short/long switch, partial rotary,
tied and untied heads, a sliding window, the v4 and v5 config schemas), the HF round trip (import,
export, transformers loads the export with our logits), and ``ppl``, ``search`` and ``train`` on
Phi-3 through the CLI; the family table itself (the params tree it maps onto is the model's)."""

from __future__ import annotations

import copy
import json
import math
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longrope_jax import export, families, hf  # noqa: E402
from longrope_jax.model import Transformer, init_params, param_shapes, rope_spec  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEADS = 256, 64, 96, 2, 4  # 256: the byte tokenizer of tests/tiny.py
L_ORIG, L_MAX = 32, 128
LENGTHS = (L_ORIG - 1, L_ORIG, L_ORIG + 1)  # the switch to the long factors is strict (> L_orig)
REL = 1e-5  # max |logit diff| relative to the largest |logit|, fp32


def _factors(partial: float, lo: float, hi: float) -> list[float]:
    p = int(HIDDEN // HEADS * partial) // 2
    return [round(x, 4) for x in np.linspace(lo, hi, p)]


PHI3 = {
    # name: (kv heads, partial rotary, tied, sliding window)
    "mini-128k": (4, 1.0, False, None),  # Phi-3-mini-128k / Phi-3.5-mini: full rotary, untied
    "phi4-mini": (2, 0.75, True, None),  # Phi-4-mini: GQA, 3/4 of each head rotated, tied
    "window": (2, 1.0, False, 12),  # a sliding window shorter than every length tested
}


def _phi3_config(name: str):
    kv, partial, tied, window = PHI3[name]
    return transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=kv, max_position_embeddings=L_MAX,
        original_max_position_embeddings=L_ORIG, tie_word_embeddings=tied, sliding_window=window,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": partial,
                         "short_factor": _factors(partial, 1.0, 1.6), "long_factor": _factors(partial, 1.5, 6.0)})


def _llama3_config():
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=L_MAX, eos_token_id=[2, 3],
        bos_token_id=1, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": L_ORIG})


def _randomised(config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a wider spread than HF's init, so RoPE and the masks move the logits
        for _, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0.0, 0.15)
    return model.eval()


def _tokens(length: int) -> np.ndarray:
    return np.random.default_rng(length).integers(0, VOCAB, (2, length)).astype(np.int32)


def _logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


def _ours(cfg, params, tokens) -> np.ndarray:
    return np.asarray(Transformer(cfg).apply({"params": params}, tokens, rope=rope_spec(cfg)))


def _assert_close(ours, ref, what):
    err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
    assert err <= REL * float(np.max(np.abs(ref))), f"{what}: max |logit diff| {err:.3g}"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``saved(name)`` -> (transformers model, its save_pretrained directory); built once each."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _randomised(_llama3_config() if name == "llama3" else _phi3_config(name))
            path = str(tmp_path_factory.mktemp(name))
            model.save_pretrained(path)
            cache[name] = model, path
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(PHI3) + ["llama3"])
def test_logits_equal_transformers_on_both_sides_of_the_switch(saved, name):
    model, path = saved(name)
    cfg, params = hf.load(path)
    if name == "llama3":
        assert cfg.architecture == "llama" and cfg.eos_token_id == [2, 3]
    else:
        kv, partial, tied, window = PHI3[name]
        assert (cfg.architecture, cfg.num_key_value_heads, cfg.rotary_dim) == ("phi3", kv, int(16 * partial))
        assert (cfg.tie_word_embeddings, cfg.sliding_window) == (tied, window)
        spec = rope_spec(cfg)  # the attention factor from max / original, applied in short mode too
        assert spec.original_max == L_ORIG and math.isclose(
            float(spec.attention_factor), math.sqrt(1 + math.log(L_MAX / L_ORIG) / math.log(L_ORIG)), rel_tol=1e-6)
    for n in LENGTHS:
        tokens = _tokens(n)
        _assert_close(_ours(cfg, params, tokens), _logits(model, tokens), f"{name} at {n}")


def test_the_comparison_has_teeth(saved):
    """The other factor set at the switch, or the fused tensors split in the other order, is far
    outside the tolerance."""
    model, path = saved("phi4-mini")
    cfg, params = hf.load(path)
    spec = rope_spec(cfg)
    tokens = _tokens(L_ORIG + 1)
    ref = _logits(model, tokens)
    wrong = np.asarray(Transformer(cfg).apply({"params": params}, tokens, rope=spec.replace(
        long_factor=spec.short_factor)))
    assert np.max(np.abs(wrong - ref)) > 100 * REL * np.max(np.abs(ref))
    mlp = params["layers"]["mlp"]
    swapped = {**params, "layers": {**params["layers"], "mlp": {
        **mlp, "gate_proj": mlp["up_proj"], "up_proj": mlp["gate_proj"]}}}
    assert np.max(np.abs(_ours(cfg, swapped, tokens) - ref)) > 100 * REL * np.max(np.abs(ref))


@pytest.mark.parametrize("rope_key, rope_type", [("rope_scaling", "su"), ("rope_scaling", "longrope"),
                                                 ("rope_parameters", "longrope")],
                         ids=["v4-su", "v4-longrope", "v5"])
def test_the_v4_and_v5_schemas_read_as_transformers_reads_them(saved, tmp_path, rope_key, rope_type):
    """A Phi-3 ``config.json`` as the Hub's files have it (v4: ``rope_scaling`` with ``type``, the
    window and partial rotary at the top level) or v5 (``rope_parameters``): the same model."""
    import shutil

    model, path = saved("phi4-mini")
    d = json.load(open(os.path.join(path, hf.CONFIG)))
    block = d.pop("rope_parameters")
    d.pop("rope_scaling", None)
    if rope_key == "rope_scaling":
        d["rope_theta"] = block.pop("rope_theta")
        d["partial_rotary_factor"] = block.pop("partial_rotary_factor")
        block.pop("rope_type")
        block.pop("original_max_position_embeddings", None)
        block["type"] = rope_type
    d[rope_key] = block
    d["original_max_position_embeddings"] = L_ORIG
    out = tmp_path / "model"
    shutil.copytree(path, out)
    (out / hf.CONFIG).write_text(json.dumps(d))
    cfg, params = hf.load(str(out))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for n in (L_ORIG, L_ORIG + 1):
        tokens = _tokens(n)
        ref = _logits(reloaded, tokens)
        _assert_close(_ours(cfg, params, tokens), ref, f"{rope_key}/{rope_type} at {n}")
        _assert_close(ref, _logits(model, tokens), "transformers itself")


@pytest.mark.parametrize("name", ["phi4-mini", "llama3"])
def test_hf_round_trip_with_new_factors(saved, tmp_path, name):
    """Import, then export with other LongRoPE factors: transformers loads the export (fused tensors
    fused back) and gives our logits with those factors on both sides of the switch."""
    from longrope_jax import factors as factors_lib

    _, path = saved(name)
    cfg, params = hf.load(path)
    p = cfg.rotary_dim // 2
    fac = {"format": factors_lib.FORMAT, "rope_type": "longrope", "rope_theta": cfg.rope_theta,
           "rotary_dim": cfg.rotary_dim, "original_max_position_embeddings": L_ORIG, "max_position_embeddings": L_MAX,
           "long_factor": list(np.linspace(2.0, 5.0, p)), "short_factor": list(np.linspace(1.0, 1.3, p))}
    out = str(tmp_path / "export")
    export.save_hf(out, cfg, params, factors=fac)
    written = json.load(open(os.path.join(out, hf.CONFIG)))
    assert written["architectures"] == [families.get(cfg.architecture).architecture]
    if name == "phi4-mini":
        from safetensors import safe_open

        with safe_open(os.path.join(out, hf.SINGLE), "np") as fh:
            assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(
                fh.keys())
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    cfg2, params2 = hf.load(out)
    for a, b in zip(*map(jax.tree.leaves, (params, params2))):
        np.testing.assert_array_equal(a, b)
    for n in (L_ORIG, L_ORIG + 1):
        tokens = _tokens(n)
        _assert_close(_ours(cfg2, params2, tokens), _logits(model, tokens), f"export at {n}")


def test_phi3_rope_types_other_than_longrope_are_one_line_errors(saved, tmp_path):
    """Read (a config transformers would refuse) and written (a YaRN arm of a Phi-3 model)."""
    from longrope_jax import factors as factors_lib

    _, path = saved("window")
    d = json.load(open(os.path.join(path, hf.CONFIG)))
    d["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(hf.HFError, match=r"field 'rope_scaling.rope_type': a phi3 model takes one of "
                                         r"\['default', 'longrope'\] in transformers, got 'linear'"):
        hf.config_from_hf(d)
    cfg, params = hf.load(path)
    yarn = cfg.replace(**factors_lib.as_config(factors_lib.parse_rope("yarn:4"), cfg))
    with pytest.raises(export.ExportError, match=r"^rope_type: Phi3ForCausalLM takes one of \['default', "
                                                 r"'longrope'\] in transformers, got 'yarn'"):
        export.save_hf(str(tmp_path / "out"), yarn, params)
    assert not (tmp_path / "out").exists()


def test_phi3_cli_ppl_search_train_convert(saved, tmp_path, capsys):
    """The commands on a Phi-3 directory: ``ppl`` gives transformers' perplexity, ``search`` and
    ``train`` run, and the trained model exports to an HF directory transformers loads."""
    from longrope_jax import cli

    from tiny import byte_tokenizer_file

    import shutil

    model, path = saved("phi4-mini")
    d = tmp_path / "phi"
    shutil.copytree(path, d)
    byte_tokenizer_file(str(d))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! " * 40)

    def run(*argv):
        rc = cli.main(list(argv))
        out, err = capsys.readouterr()
        assert rc == 0, err[-3000:]
        return [json.loads(x) for x in out.splitlines() if x.startswith("{")]

    rows = run("ppl", "--model", str(d), "--data", str(corpus), "--length", "48", "--samples", "1")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    ids = np.array(tok(corpus.read_text())["input_ids"])
    assert ids.max() < VOCAB
    ids = ids[None, :48]
    with torch.no_grad():
        loss = model(torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.item()
    np.testing.assert_allclose(rows[0]["ppl"], math.exp(loss), rtol=1e-4)
    run("search", "--model", str(d), "--data", str(corpus), "--target-length", "256", "--out", str(tmp_path / "s"),
        "--samples", "1", "--config.population=4", "--config.iterations=1", "--config.mutations=1",
        "--config.crossovers=1", "--config.parents=2", "--config.start_tokens=[0]")
    assert os.path.exists(tmp_path / "s" / "factors.json")
    # On top of the factors the model ships (a progressive search, lambda_2 over its long factors).
    run("search", "--model", str(d), "--data", str(corpus), "--target-length", "256", "--out", str(tmp_path / "p"),
        "--samples", "1", "--config.population=4", "--config.iterations=0", "--config.parents=2",
        "--config.base_factors=model")
    header = json.loads(open(tmp_path / "p" / "log.jsonl").readline())
    shipped = json.load(open(d / hf.CONFIG))["rope_parameters"]["long_factor"]
    np.testing.assert_allclose(header["context"]["base_factors"], shipped)
    run("train", "--model", str(d), "--data", str(corpus), "--out", str(tmp_path / "t"), "--config.seq_len=256",
        "--config.steps=2", "--config.batch=1", "--config.checkpoint_every=2",
        f"--rope={tmp_path / 's' / 'factors.json'}")
    run("convert", "--model", str(tmp_path / "t" / "final"), "--out", str(tmp_path / "hf"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    cfg, params = hf.load(str(tmp_path / "hf"))
    tokens = _tokens(L_ORIG + 1)
    _assert_close(_ours(cfg, params, tokens), _logits(reloaded, tokens), "trained export")


def test_every_family_maps_onto_the_model_s_params():
    """The params tree is the model's for every family (``param_shapes`` against ``init``), and a
    family's tensor table covers it once: every leaf is written by exactly one HF tensor."""
    for name, fam in families.FAMILIES.items():
        cfg = hf.config_from_hf({"architectures": [fam.architecture], "vocab_size": 64, "hidden_size": 32,
                                 "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "num_key_value_heads": 2, "tie_word_embeddings": False,
                                 "max_position_embeddings": 64})
        shapes = jax.eval_shape(lambda: init_params(cfg))
        flat = {"/".join(k.key for k in path): tuple(x.shape)
                for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
        assert flat == param_shapes(cfg), name
        params = jax.tree.map(np.asarray, init_params(cfg))
        names = [n for n, _ in hf.tensors_from_params(params, cfg)]
        back = hf.params_from_tensors(((n, a, "x") for n, a in hf.tensors_from_params(params, cfg)), cfg)
        for a, b in zip(*map(jax.tree.leaves, (params, back))):
            np.testing.assert_array_equal(a, b)
        assert len(names) == len(set(names))


def test_a_family_is_one_module_found_by_the_registry():
    """Every module of ``longrope_jax.families`` with a ``FAMILY`` is registered under its name and
    architecture; a family whose tensors miss one of the model's linears is refused."""
    import pkgutil

    modules = {m.name for m in pkgutil.iter_modules(families.__path__)}
    assert modules == {"llama", "mistral", "phi3"} and set(families.FAMILIES) == modules
    assert families.BY_ARCHITECTURE["Phi3ForCausalLM"] is families.FAMILIES["phi3"]
    with pytest.raises(ValueError, match="must hold each of"):
        families.Family("x", "XForCausalLM", {}, linears={"self_attn.qkv_proj": families.Linear(
            ("self_attn.q_proj", "self_attn.k_proj"))})
    fused = copy.deepcopy(families.FAMILIES["phi3"].linears["mlp.gate_up_proj"])
    a = np.arange(12.0).reshape(6, 2)
    np.testing.assert_array_equal(fused.fuse(fused.split(a, (3, 3))), a)


def test_phi3_gguf_files_are_a_one_line_error():
    from longrope_jax import gguf_io

    with pytest.raises(gguf_io.GGUFError, match=r"^phi.gguf: field 'general.architecture': expected 'llama', got "
                                                r"'phi3' \(GGUF files of other families, Phi-3's included, are not "
                                                r"read: load the model's HF directory\)$"):
        gguf_io.config_from_metadata({"general.architecture": "phi3"}, set(), "phi.gguf")


@pytest.mark.parametrize("name, family", [("Mistral 7B Instruct v0.2", "mistral"), ("SmolLM2 135M", "llama")])
def test_a_gguf_file_s_family_comes_from_the_family_table(name, family):
    """llama.cpp writes LLaMA and Mistral as one architecture; the family's ``gguf_name`` tells them
    apart by the file's ``general.name``."""
    from longrope_jax import gguf_io

    md = {"general.architecture": "llama", "general.name": name, "llama.attention.head_count": 4,
          "llama.embedding_length": 32, "llama.context_length": 64, "llama.feed_forward_length": 64,
          "llama.block_count": 2, "llama.vocab_size": 256}
    assert gguf_io.config_from_metadata(md, {"output.weight"}, "x.gguf").architecture == family
