"""Flax (Linen) decoder of the LLaMA family (LLaMA, Mistral, Phi-3: ``longrope_jax.families``) with
pluggable attention and a functional RoPE.

The model never knows which RoPE or attention it runs: the RoPE arrives as a ``RopeSpec`` call
argument (so factors are traced and the search can vmap over candidates) and the attention as a
module attribute with the contract of :mod:`longrope_jax.attention.dense`. Params are a plain
nested dict whose leaf names follow HF's (``q_proj``, ``input_layernorm`` ...); the layers are
stacked on a leading axis and run under ``nn.scan``.

    params = Transformer(cfg).init(rng, tokens)["params"]
    logits = Transformer(cfg).apply({"params": params}, tokens, positions, segment_ids, spec)
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import flax.linen as nn

from longrope_jax import rope as rope_lib
from longrope_jax.attention import dense_attention

# "attention": recompute a layer in the backward but keep the flash kernel's output and
# log-sum-exp (``checkpoint_name`` "attention_out" / "attention_lse"), so attention's forward is
# not run twice.
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "nothing_saveable", "attention")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (HF names where HF has one).

    ``rope_parameters`` is the standardised HF rope block (``rope_type`` and its keys, with
    ``original_max_position_embeddings`` resolved); it and the tokenizer ids (``bos_token_id``,
    ``eos_token_id``: an int or a list, as Llama-3 configs have; ``pad_token_id``) are excluded from hashing and
    equality: the config is a static jit argument, and neither changes the computation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    partial_rotary_factor: float = 1.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    architecture: str = "llama"
    layout: str = rope_lib.HALF
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    # RoPE angles exact to ~1e-6 rad up to 2**22 positions (rope.precise_angles) instead of
    # transformers' float32 product (off by up to 0.12 rad near 2M positions).
    precise_rope: bool = False
    bos_token_id: int | None = dataclasses.field(default=None, compare=False, hash=False)
    eos_token_id: Any = dataclasses.field(default=None, compare=False, hash=False)
    pad_token_id: int | None = dataclasses.field(default=None, compare=False, hash=False)
    rope_parameters: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False, hash=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: expected one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.layout not in rope_lib.LAYOUTS:
            raise ValueError(f"layout: expected one of {rope_lib.LAYOUTS}, got {self.layout!r}")

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def rope_spec(cfg: ModelConfig, source: str = "config.json") -> rope_lib.RopeSpec:
    """The model's own RoPE, from its HF rope block (``source`` names it in errors)."""
    return rope_lib.from_hf(
        cfg.rope_parameters,
        theta=cfg.rope_theta,
        rotary_dim=cfg.rotary_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        source=source,
    )


def linear_features(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """A block's linear layers (``self_attn.q_proj`` ...) -> (in, out) features."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"self_attn.q_proj": (D, q), "self_attn.k_proj": (D, kv), "self_attn.v_proj": (D, kv),
            "self_attn.o_proj": (q, D), "mlp.gate_proj": (D, F), "mlp.up_proj": (D, F), "mlp.down_proj": (F, D)}


def has_bias(cfg: ModelConfig, linear: str) -> bool:
    return cfg.attention_bias if linear.startswith("self_attn.") else cfg.mlp_bias


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Leaf name (``a/b/c``) -> shape of the params :func:`init_params` makes, layers stacked on
    the leading axis; the same for every family (families map their files onto this tree)."""
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    out = {"embed_tokens/embedding": (cfg.vocab_size, D), "norm/weight": (D,)}
    if not cfg.tie_word_embeddings:
        out["lm_head/kernel"] = (D, cfg.vocab_size)
    for name, (i, o) in linear_features(cfg).items():
        base = "layers/" + name.replace(".", "/")
        out[base + "/kernel"] = (L, i, o)
        if has_bias(cfg, name):
            out[base + "/bias"] = (L, o)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"layers/{norm}/weight"] = (L, D)
    return out


def _dt(name: str):
    return jnp.dtype(name)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back before the scale (as transformers does)."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return weight.astype(x.dtype) * y.astype(x.dtype)


class _Dense(nn.Dense):
    """``nn.Dense`` over ``[..., D]`` as one ``[N, D]`` matmul: XLA's CPU backward of a
    dot_general contracting two leading dims is 2.5x slower than of the flattened one (the same
    parameters, the same numbers; on a mesh the merged dim keeps the batch and sequence shardings)."""

    def __call__(self, x):
        y = super().__call__(x.reshape(-1, x.shape[-1]))
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _dense(features, bias, cfg, name):
    return _Dense(
        features,
        use_bias=bias,
        dtype=_dt(cfg.dtype),
        param_dtype=_dt(cfg.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class Attention(nn.Module):
    cfg: ModelConfig
    attention_fn: Callable = dense_attention

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, cache=None):
        """x: [B, L, D]; cos, sin: float32[B, L, P]; positions, segment_ids: int[B, L].

        With a ``cache`` (one layer of :func:`init_cache`), the new keys/values are written at
        ``cache["index"]`` and the queries attend to everything cached; returns ``(out, cache)``.
        """
        cfg = self.cfg
        b, l, _ = x.shape
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q = _dense(h * d, cfg.attention_bias, cfg, "q_proj")(x).reshape(b, l, h, d)
        k = _dense(kv * d, cfg.attention_bias, cfg, "k_proj")(x).reshape(b, l, kv, d)
        v = _dense(kv * d, cfg.attention_bias, cfg, "v_proj")(x).reshape(b, l, kv, d)
        q = rope_lib.apply_rotary(q, cos, sin, cfg.layout)
        k = rope_lib.apply_rotary(k, cos, sin, cfg.layout)
        kv_pos, kv_seg = positions, segment_ids
        if cache is not None:
            i = cache["index"]
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, i, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, i, 0, 0))
            kv_pos = jax.lax.dynamic_update_slice(cache["positions"], positions.astype(jnp.int32), (0, i))
            kv_seg = segment_ids = None
            cache = {"k": k, "v": v, "positions": kv_pos, "index": i + l}
        o = self.attention_fn(
            q,
            k,
            v,
            q_positions=positions,
            kv_positions=kv_pos,
            q_segment_ids=segment_ids,
            kv_segment_ids=kv_seg,
            sliding_window=cfg.sliding_window,
            scale=d**-0.5,
        )
        out = _dense(cfg.hidden_size, cfg.attention_bias, cfg, "o_proj")(o.reshape(b, l, h * d))
        return out if cache is None else (out, cache)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, cfg.mlp_bias, cfg, "up_proj")(x)
        return _dense(cfg.hidden_size, cfg.mlp_bias, cfg, "down_proj")(nn.silu(gate) * up)


def _same(x):
    return x


class Block(nn.Module):
    """Pre-norm decoder block; returns ``(x, cache)`` so it can be scanned. ``constrain`` holds
    its output (the residual stream ``[B, L, D]``) to a sharding (``parallel.Layout.constrain``);
    ``layer_hook(layer)``, when given, is called on the host after the block (progress)."""

    cfg: ModelConfig
    attention_fn: Callable = dense_attention
    constrain: Callable = _same
    layer_hook: Callable | None = None

    @nn.compact
    def __call__(self, x, cos, sin, positions, segment_ids, cache=None, layer=None):
        cfg = self.cfg
        pd = _dt(cfg.param_dtype)
        h = RMSNorm(cfg.rms_norm_eps, pd, name="input_layernorm")(x)
        a = Attention(cfg, self.attention_fn, name="self_attn")(h, cos, sin, positions, segment_ids, cache)
        if cache is not None:
            a, cache = a
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, pd, name="post_attention_layernorm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        if self.layer_hook is not None:
            jax.debug.callback(self.layer_hook, layer, ordered=False)
        return self.constrain(x), cache


def _remat_policy(name: str):
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
        "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
        "attention": jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    }[name]


class Transformer(nn.Module):
    """Decoder-only LM. ``__call__`` returns logits ``[B, L, V]`` or final hidden states.

    ``attention_fn``: the attention contract (:mod:`longrope_jax.attention`); ``constrain``: the
    residual stream's sharding at every block boundary (identity on one device); ``layer_hook``:
    a host function called with each layer's index as it finishes (``progress.layer_done``;
    None: no callback in the program).
    """

    cfg: ModelConfig
    attention_fn: Callable = dense_attention
    constrain: Callable = _same
    layer_hook: Callable | None = None

    def setup(self):
        cfg = self.cfg
        pd, dt = _dt(cfg.param_dtype), _dt(cfg.dtype)
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pd, embedding_init=nn.initializers.normal(0.02)
        )
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, prevent_cse=False, policy=_remat_policy(cfg.remat))
        self.layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast,) * 4 + (0, 0),
            length=cfg.num_hidden_layers,
        )(cfg, self.attention_fn, self.constrain, self.layer_hook)
        self.norm = RMSNorm(cfg.rms_norm_eps, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg.vocab_size, False, cfg, "lm_head")

    def __call__(self, tokens, positions=None, segment_ids=None, rope=None, return_hidden: bool = False,
                 cache=None, seq_len=None):
        """
        Args:
          tokens: int32[B, L].
          positions: int32[B, L] global positions (default ``arange(L)``), any order.
          segment_ids: int32[B, L] document ids for packed rows, or None.
          rope: RopeSpec without candidate axes (vmap the call over candidates), default the
            model's own.
          return_hidden: return the final normed hidden states ``[B, L, D]`` instead of logits.
          cache: a KV cache from :func:`init_cache`; then returns ``(output, new_cache)``.
          seq_len: the whole call's length for the short/long choice (``rope.cos_sin``), when
            ``positions`` are a shard or a packed row; None: ``max(positions) + 1``.
        """
        b, l = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
        spec = rope_spec(self.cfg) if rope is None else rope
        if spec.long_factor.ndim != 1:
            raise ValueError(
                f"rope: expected a single spec (factors [P]), got factors {spec.long_factor.shape}: "
                "vmap the model over the candidate axis"
            )
        cos, sin = rope_lib.cos_sin(positions, spec, seq_len, precise=self.cfg.precise_rope)
        x = self.constrain(self.embed_tokens(tokens))
        layers = jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32) if self.layer_hook is not None else None
        x, new_cache = self.layers(x, cos, sin, positions, segment_ids, cache, layers)
        x = self.norm(x)
        out = x if return_hidden else self.project(x)
        return out if cache is None else (out, new_cache)

    def project(self, hidden):
        """Hidden states ``[..., D]`` -> logits ``[..., V]`` (tied or untied head)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden)
        return self.lm_head(hidden)


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random params (a plain nested dict) for ``cfg``; used for tiny test models."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return Transformer(cfg).init(jax.random.PRNGKey(seed), tokens)["params"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for ``max_len`` tokens, layers stacked on the leading axis.

    k, v: [layers, B, max_len, KV, D]; positions: int32[layers, B, max_len] (empty slots hold
    int32 max, so causal masking hides them); index: int32[layers] (next write offset).
    """
    n, kv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    dtype = dtype or _dt(cfg.dtype)
    return {
        "k": jnp.zeros((n, batch, max_len, kv, d), dtype),
        "v": jnp.zeros((n, batch, max_len, kv, d), dtype),
        "positions": jnp.full((n, batch, max_len), jnp.iinfo(jnp.int32).max, jnp.int32),
        "index": jnp.zeros((n,), jnp.int32),
    }
