"""The Flax model against transformers on tiny random LLaMA / Mistral models, plus self-consistency.

Reference models are built with transformers (float32, fixed seed, eager attention), their weights
randomised with a larger spread than HF's init (so attention and RoPE actually matter), saved with
``save_pretrained`` and loaded back with ``hf.load``. Our logits use the model's own RoPE spec,
``model.rope_spec(cfg)``, and must match HF's within 1e-4 (fp32) at ``L_orig - 1``, ``L_orig`` and
``L_orig + 1``: the lengths around the short/long factor switch (strict ``>``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from longrope_jax import hf  # noqa: E402
from longrope_jax import rope as rope_lib  # noqa: E402
from longrope_jax.model import Transformer, rope_spec  # noqa: E402

VOCAB, HIDDEN, INTER, LAYERS, HEAD_DIM = 128, 64, 128, 2, 16
L_ORIG, L_MAX = 32, 128
LENGTHS = (L_ORIG - 1, L_ORIG, L_ORIG + 1)
TOL = 1e-4  # max abs logit difference against transformers, fp32
SELF_TOL = 2e-5  # our model against itself by another route (different shapes, same math)
THETA = 10000.0
P = HEAD_DIM // 2

SHORT = [round(x, 4) for x in np.linspace(1.0, 1.6, P)]
LONG = [round(x, 4) for x in np.linspace(1.5, 6.0, P)]

ARCHS = {
    # name: (HF family, heads, kv heads, tied embeddings, sliding window)
    "llama-mha-untied": ("llama", 4, 4, False, None),
    "llama-gqa-tied": ("llama", 4, 2, True, None),
    "mistral-gqa-swa": ("mistral", 4, 2, False, 12),  # window 12 < every length tested
}
ROPES = {
    "default": {"rope_type": "default"},
    "yarn": {"rope_type": "yarn", "factor": L_MAX / L_ORIG, "original_max_position_embeddings": L_ORIG},
    "longrope": {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": L_ORIG,
    },
}


def _hf_config(arch: str, rope: str):
    family, heads, kv, tied, window = ARCHS[arch]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=HEAD_DIM,
        max_position_embeddings=L_MAX,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        rope_parameters={"rope_theta": THETA, **copy.deepcopy(ROPES[rope])},
    )
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=window, **kw)
    return transformers.LlamaConfig(**kw)


def _hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    cls = transformers.MistralForCausalLM if config.model_type == "mistral" else transformers.LlamaForCausalLM
    model = cls(config)
    with torch.no_grad():  # a wider spread than HF's 0.02 init so RoPE / masks change the logits
        for _, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))  # RMSNorm weights
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def _tokens(length: int, batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed + length).integers(0, VOCAB, (batch, length)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _jitted(cfg):
    """One jitted forward per config (the RoPE spec is an argument, so specs share compilations)."""

    def forward(params, tokens, spec, positions, segment_ids):
        return Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids, rope=spec)

    return jax.jit(forward)


def _apply(cfg, params, tokens, spec=None, positions=None, segment_ids=None):
    """Our logits with ``spec`` (default: the model's own, ``rope_spec(cfg)``)."""
    spec = rope_spec(cfg) if spec is None else spec
    return _jitted(cfg)(params, jnp.asarray(tokens), spec, positions, segment_ids)


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """``reference(arch, rope)`` -> (hf model, directory, ModelConfig, params); built once each."""
    cache = {}

    def get(arch: str, rope: str):
        if (arch, rope) not in cache:
            model = _hf_model(_hf_config(arch, rope))
            path = str(tmp_path_factory.mktemp(f"{arch}-{rope}"))
            model.save_pretrained(path)
            cfg, params = hf.load(path)
            cache[arch, rope] = (model, path, cfg, params)
        return cache[arch, rope]

    return get


# --------------------------------------------------------------------------------------------
# Logits against transformers.


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_logits_match_transformers(reference, arch, rope):
    model, _, cfg, params = reference(arch, rope)
    family, heads, kv, tied, window = ARCHS[arch]
    assert (cfg.architecture, cfg.num_attention_heads, cfg.num_key_value_heads) == (family, heads, kv)
    assert cfg.tie_word_embeddings == tied and cfg.sliding_window == window
    assert ("lm_head" in params) == (not tied)
    spec = rope_spec(cfg)
    if rope == "longrope":
        assert spec.original_max == L_ORIG
        np.testing.assert_allclose(spec.attention_factor, math.sqrt(1 + math.log(4) / math.log(L_ORIG)), rtol=1e-6)
    for length in LENGTHS:
        tokens = _tokens(length)
        ref = _hf_logits(model, tokens)
        ours = np.asarray(_apply(cfg, params, tokens, spec))
        assert ours.shape == ref.shape == (2, length, VOCAB)
        err = _maxdiff(ours, ref)
        assert err <= TOL, f"{arch}/{rope} L={length}: max |logit diff| {err:.3g} > {TOL}"


def test_comparison_has_teeth(reference):
    """The wrong factor set at the boundary, or no sliding window, is far outside the tolerance."""
    model, _, cfg, params = reference("llama-gqa-tied", "longrope")
    spec = rope_spec(cfg)
    all_long = spec.replace(short_factor=spec.long_factor)
    all_short = spec.replace(long_factor=spec.short_factor)
    t = _tokens(L_ORIG)  # exactly L_orig: still short
    assert _maxdiff(_apply(cfg, params, t, all_long), _hf_logits(model, t)) > 100 * TOL
    t = _tokens(L_ORIG + 1)  # one past: long
    assert _maxdiff(_apply(cfg, params, t, all_short), _hf_logits(model, t)) > 100 * TOL

    model, _, cfg, params = reference("mistral-gqa-swa", "default")
    t = _tokens(L_ORIG + 1)
    assert _maxdiff(_apply(cfg.replace(sliding_window=None), params, t), _hf_logits(model, t)) > 100 * TOL


@pytest.mark.parametrize("arch", ["llama-mha-untied", "llama-gqa-tied", "mistral-gqa-swa"])
@pytest.mark.parametrize("path", ["dense", "flash"])
def test_gradients_match_torch_autograd(reference, arch, path):
    """d(mean next-token NLL)/d(params) against torch autograd of HF's loss: through dense
    attention and full logits, and through the training path (blockwise attention's flash
    backward over 16-token blocks, the loss in 16-token chunks)."""
    from longrope_jax.loss import mean_nll

    model, _, cfg, params = reference(arch, "longrope")
    tokens = _tokens(L_ORIG + 1)

    model.zero_grad()
    out = model(torch.from_numpy(tokens.astype(np.int64)), labels=torch.from_numpy(tokens.astype(np.int64)))
    out.loss.backward()
    hf_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    model.zero_grad()

    spec = rope_spec(cfg)

    def loss_fn(p):
        if path == "flash":  # every window has L - 1 predictions: the mean of the means is HF's mean
            return jnp.mean(mean_nll(p, jnp.asarray(tokens), spec, cfg=cfg, q_chunk=16, loss_chunk=16))
        logits = Transformer(cfg).apply({"params": p}, jnp.asarray(tokens), rope=spec)
        logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)
        return jnp.mean(nll)

    params_j = jax.tree.map(jnp.asarray, params)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params_j)
    hf_loss = float(out.loss.detach())
    assert abs(float(loss) - hf_loss) <= 1e-5 * max(1.0, hf_loss)
    ours = dict(hf.tensors_from_params(jax.tree.map(np.asarray, grads), cfg))
    assert "model.layers.0.self_attn.q_proj.weight" in ours and "model.embed_tokens.weight" in ours
    assert set(ours) == set(hf_grads)  # every weight (tied: the embedding carries both uses)
    for name in ours:
        ref = hf_grads[name]
        err = _maxdiff(ours[name], ref)
        scale = float(np.max(np.abs(ref)))
        assert scale > 0
        assert err <= 1e-5 * scale + 1e-8, f"{arch} {name}: grad max diff {err:.3g} (max |grad| {scale:.3g})"


# --------------------------------------------------------------------------------------------
# Config schemas (hand-edited config.json) against our spec and against transformers.


def _spec_equal(a: rope_lib.RopeSpec, b: rope_lib.RopeSpec):
    for f in ("theta", "rotary_dim", "original_max", "dynamic_scale", "dynamic_max"):
        assert getattr(a, f) == getattr(b, f), f
    for f in ("short_factor", "long_factor", "attention_factor", "start_tokens"):
        np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)), err_msg=f)


def _variant(src: str, dst: str, edit) -> str:
    shutil.copytree(src, dst)
    f = os.path.join(dst, "config.json")
    with open(f) as fh:
        d = json.load(fh)
    edit(d)
    with open(f, "w") as fh:
        json.dump(d, fh, indent=2)
    return dst


def _check_against_transformers(path: str, lengths):
    """Our logits from a hand-edited directory against HF's ``from_pretrained`` of the same."""
    cfg, params = hf.load(path)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    for length in lengths:
        t = _tokens(length)
        err = _maxdiff(_apply(cfg, params, t), _hf_logits(ref_model, t))
        assert err <= TOL, f"{os.path.basename(path)} L={length}: {err:.3g}"
    return cfg


def test_config_schemas(reference, tmp_path):
    _, src, _, _ = reference("llama-gqa-tied", "longrope")
    theta = 5000.0  # not the default, so a schema whose theta is lost cannot pass
    block = {
        "rope_type": "longrope",
        "short_factor": SHORT,
        "long_factor": LONG,
        "original_max_position_embeddings": L_ORIG,
    }

    def v5(d):  # 5.x: rope_parameters only (theta inside the block)
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        d["rope_parameters"] = {**block, "rope_theta": theta}

    def v4(d):  # 4.x: rope_scaling + top-level rope_theta
        d.pop("rope_parameters", None)
        d["rope_scaling"] = dict(block)
        d["rope_theta"] = theta

    def both(d):  # both blocks, disagreeing: rope_scaling must win
        v4(d)
        d["rope_parameters"] = {**block, "short_factor": LONG, "long_factor": SHORT, "rope_theta": theta,
                                "original_max_position_embeddings": 16}

    def top_level_orig(d):  # a top-level original_max_position_embeddings overrides the block
        v5(d)
        d["original_max_position_embeddings"] = 40

    at_32 = (L_ORIG, L_ORIG + 1)  # around the block's threshold
    cfg5 = _check_against_transformers(_variant(src, str(tmp_path / "v5"), v5), at_32)
    cfg4 = _check_against_transformers(_variant(src, str(tmp_path / "v4"), v4), at_32)
    cfgb = _check_against_transformers(_variant(src, str(tmp_path / "both"), both), at_32)
    # 40: short factors only if the top-level 40 is used (long with the block's 32); 41: long
    cfgo = _check_against_transformers(_variant(src, str(tmp_path / "orig"), top_level_orig), (40, 41))

    s5, s4, sb, so = (rope_spec(c) for c in (cfg5, cfg4, cfgb, cfgo))
    assert s5.theta == theta and s5.original_max == L_ORIG
    np.testing.assert_array_equal(s5.short_factor, np.float32(SHORT))
    np.testing.assert_array_equal(s5.long_factor, np.float32(LONG))
    _spec_equal(s4, s5)
    _spec_equal(sb, s5)
    assert so.original_max == 40
    np.testing.assert_allclose(so.attention_factor, math.sqrt(1 + math.log(L_MAX / 40) / math.log(40)), rtol=1e-6)
    _spec_equal(so.replace(original_max=L_ORIG, attention_factor=s5.attention_factor), s5)


# --------------------------------------------------------------------------------------------
# Self-consistency of our own model.


def test_a_shard_takes_the_whole_calls_factors(reference):
    """The causal prefix of a sequence beyond the window, run alone with ``seq_len`` = the whole
    call's length, gives transformers' logits of the whole sequence at those positions: a shard
    below the window still uses the long factors. From its own length it takes the short ones."""
    model, _, cfg, params = reference("llama-gqa-tied", "longrope")
    n, cut = L_ORIG + 8, L_ORIG // 2
    tokens = _tokens(n)
    ref = _hf_logits(model, tokens)[:, :cut]
    fwd = jax.jit(lambda p, t, seq_len: Transformer(cfg).apply({"params": p}, t, rope=rope_spec(cfg), seq_len=seq_len))
    err = _maxdiff(fwd(params, jnp.asarray(tokens[:, :cut]), n), ref)
    assert err <= TOL, f"max |logit diff| {err:.3g} > {TOL}"
    assert _maxdiff(fwd(params, jnp.asarray(tokens[:, :cut]), None), ref) > 10 * TOL


def test_packed_documents_equal_alone(reference):
    _, _, cfg, params = reference("mistral-gqa-swa", "longrope")  # GQA, sliding window, LongRoPE
    spec = rope_spec(cfg)
    # Every document <= L_orig, so the call-wide short/long choice is "short" packed and alone.
    rows = [(L_ORIG, 17, 9), (17, 9, L_ORIG)]
    n = sum(rows[0])
    assert all(sum(r) == n for r in rows)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, VOCAB, (len(rows), n)).astype(np.int32)
    positions = np.stack([np.concatenate([np.arange(k) for k in r]) for r in rows]).astype(np.int32)
    segments = np.stack([np.concatenate([np.full(k, i + 1) for i, k in enumerate(r)]) for r in rows]).astype(np.int32)
    packed = np.asarray(
        _apply(cfg, params, tokens, spec, positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    )
    for b, r in enumerate(rows):
        start = 0
        for k in r:
            alone = np.asarray(_apply(cfg, params, tokens[b : b + 1, start : start + k], spec))
            err = _maxdiff(packed[b : b + 1, start : start + k], alone)
            assert err <= SELF_TOL, f"row {b} doc at {start} (len {k}): {err:.3g}"
            start += k


def test_vmap_over_candidate_specs(reference):
    _, _, cfg, params = reference("llama-gqa-tied", "longrope")
    s1 = rope_spec(cfg)
    s2 = s1.replace(
        short_factor=s1.short_factor * 1.1,
        long_factor=s1.long_factor[::-1],
        attention_factor=jnp.float32(1.05),
        start_tokens=jnp.int32(4),  # exercises the start-token branch under vmap
    )
    s3 = s1.replace(long_factor=jnp.ones_like(s1.long_factor), attention_factor=jnp.float32(1.0))
    stacked = rope_lib.stack([s1, s2, s3])
    assert stacked.long_factor.shape == (3, P)
    model = Transformer(cfg)
    for length in (L_ORIG, L_ORIG + 1):
        tokens = jnp.asarray(_tokens(length))
        many = jax.jit(jax.vmap(lambda s: model.apply({"params": params}, tokens, rope=s)))(stacked)
        alone = [_apply(cfg, params, tokens, s) for s in (s1, s2, s3)]
        for k, a in enumerate(alone):
            assert _maxdiff(many[k], a) <= SELF_TOL, (length, k)
        assert _maxdiff(alone[0], alone[1]) > 1e-2  # the candidates really differ


def test_stack_different_builders():
    """Specs from different builders (same statics) stack, and share one tree structure: no
    label in the spec makes methods compile apart."""
    s = rope_lib.stack([rope_lib.pi(THETA, HEAD_DIM, 2.0), rope_lib.ntk(THETA, HEAD_DIM, 2.0)])
    assert s.long_factor.shape == (2, P)
    assert (jax.tree.structure(rope_lib.pi(THETA, HEAD_DIM, 2.0))
            == jax.tree.structure(rope_lib.yarn(THETA, HEAD_DIM, 2.0, 64)))
    with pytest.raises(rope_lib.RopeError):
        rope_lib.stack([rope_lib.pi(THETA, HEAD_DIM, 2.0), rope_lib.pi(2 * THETA, HEAD_DIM, 2.0)])


@pytest.mark.parametrize("arch", ["llama-gqa-tied", "mistral-gqa-swa"])
def test_interleaved_layout(reference, arch):
    _, _, cfg, params = reference(arch, "longrope")
    attn = params["layers"]["self_attn"]
    permuted = copy.deepcopy(params)
    pa = permuted["layers"]["self_attn"]
    # kernels are [layer, in, out]: permute the output features per head
    pa["q_proj"]["kernel"] = rope_lib.half_to_interleaved(attn["q_proj"]["kernel"], cfg.num_attention_heads, axis=-1)
    pa["k_proj"]["kernel"] = rope_lib.half_to_interleaved(attn["k_proj"]["kernel"], cfg.num_key_value_heads, axis=-1)
    np.testing.assert_array_equal(
        rope_lib.interleaved_to_half(pa["k_proj"]["kernel"], cfg.num_key_value_heads, axis=-1), attn["k_proj"]["kernel"]
    )
    icfg = cfg.replace(layout="interleaved")
    for length in (L_ORIG, L_ORIG + 1):
        t = _tokens(length)
        half = _apply(cfg, params, t)
        inter = _apply(icfg, permuted, t)
        assert _maxdiff(half, inter) <= SELF_TOL
        # and the permutation is not a no-op: the half layout on permuted weights is different
        assert _maxdiff(half, _apply(cfg, permuted, t)) > 1e-2


def test_remat_same_logits_and_grads(reference):
    _, _, cfg, params = reference("mistral-gqa-swa", "longrope")
    rcfg = cfg.replace(remat="full")
    tokens = jnp.asarray(_tokens(L_ORIG + 1))
    spec = rope_spec(cfg)
    params = jax.tree.map(jnp.asarray, params)

    def total(c):
        return lambda p: jnp.sum(Transformer(c).apply({"params": p}, tokens, rope=spec))

    assert _maxdiff(_apply(cfg, params, tokens, spec), _apply(rcfg, params, tokens, spec)) <= 1e-6
    g0 = jax.jit(jax.grad(total(cfg)))(params)
    g1 = jax.jit(jax.grad(total(rcfg)))(params)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
        scale = float(jnp.max(jnp.abs(a)))
        assert _maxdiff(a, b) <= 1e-5 * scale + 1e-7, jax.tree_util.keystr(path)


def test_bfloat16_smoke(reference):
    """bf16 params and compute run and stay near fp32. A smoke check only: the tolerance is loose."""
    _, _, cfg, params = reference("llama-gqa-tied", "longrope")
    bcfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bparams = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    t = _tokens(L_ORIG + 1)
    ref = np.asarray(_apply(cfg, params, t))
    out = _apply(bcfg, bparams, t)
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.all(np.isfinite(out))
    scale = float(np.max(np.abs(ref)))
    assert _maxdiff(out, ref) <= 0.1 * scale  # bf16 has ~3 significant digits; 2 layers of drift
    # the predictions mostly agree
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.8


def test_precise_rope_keeps_relative_positions_at_two_million():
    """RoPE is relative: with no scaling, the logits of a window placed at position 2,000,000 equal
    those at position 0. With ``precise_rope`` they do to 1e-4; transformers' float32 angles
    (the default) drift by far more there."""
    from tiny import tiny_config

    from longrope_jax.model import init_params

    cfg = tiny_config(num_hidden_layers=1, head_dim=32, num_attention_heads=2, num_key_value_heads=1, hidden_size=64,
                      max_position_embeddings=1 << 22)
    params = jax.tree.map(lambda a: a * 8.0 if a.ndim == 3 else a, init_params(cfg, 1))  # peaked attention
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 32)), jnp.int32)
    pos = jnp.arange(32, dtype=jnp.int32)[None]

    def logits(c, offset):
        return np.asarray(Transformer(c).apply({"params": params}, tokens, pos + offset))

    at0 = logits(cfg, 0)
    precise = logits(cfg.replace(precise_rope=True), 2_000_000)
    plain = logits(cfg, 2_000_000)
    scale = np.abs(at0).max()
    assert np.abs(precise - at0).max() <= 1e-4 * scale
    assert np.abs(plain - at0).max() > 30 * np.abs(precise - at0).max()
