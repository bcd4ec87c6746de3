"""Model families as data: one module per family, each defining ``FAMILY``.

A family says how its Hugging Face ``config.json`` and safetensors map onto this project's one
model (``longrope_jax.model``): the architecture name and ``model_type``, the defaults of
transformers' config class for fields a file may leave out, how the sliding window is read, which
rope types transformers accepts for it, and its tensor table: HF tensor names per layer -> the
model's linear layers, where a *fused* HF tensor holds several of them along its output axis
(Phi-3's ``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up), split on import and fused back on
export by the entry's hooks. Everything else (norms, embeddings, the head, the shapes) is common
to every family and derived from the model's config.

Adding a family is adding a module here with a ``FAMILY = Family(...)`` (the registry below finds
it); docs/formats.md says which fields each family reads.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Callable, Mapping, Sequence

import numpy as np


def _split(arr: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
    return np.split(arr, np.cumsum(sizes)[:-1], axis=0)


def _fuse(parts: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts, axis=0)


@dataclasses.dataclass(frozen=True)
class Linear:
    """One HF linear tensor (``weight [out, in]``, optional ``bias [out]``) holding ``parts``, the
    model's linear layers (``self_attn.q_proj`` ...), stacked along its output axis.

    ``split(arr, sizes)`` cuts an HF tensor (weight or bias) into the parts' pieces (``sizes``:
    their output features) and ``fuse(pieces)`` joins them back; the defaults concatenate in
    ``parts`` order, as Phi-3 does. A family whose fused layout interleaves gives its own hooks.
    """

    parts: tuple[str, ...]
    split: Callable[[np.ndarray, Sequence[int]], list[np.ndarray]] = _split
    fuse: Callable[[Sequence[np.ndarray]], np.ndarray] = _fuse


# The model's own linear layers in a block (HF-style names: ``longrope_jax.model``).
MODEL_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
UNFUSED = {name: Linear((name,)) for name in MODEL_LINEARS}


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family (see the module docstring).

    name: HF ``model_type`` and ``ModelConfig.architecture``.
    architecture: HF ``architectures[0]`` (the ``*ForCausalLM`` class).
    defaults: transformers' config-class defaults of the fields this project reads, used where
      ``config.json`` leaves them out.
    linears: per-layer HF tensor name (without ``.weight``) -> :class:`Linear`; together they
      hold every one of :data:`MODEL_LINEARS` once.
    sliding_window: an HF config dict (defaults applied) -> the attention window or None.
    rope_types: the rope types transformers' class accepts (None: any), after ``rope_aliases``
      (old names read as their new one, as transformers does for this family).
    config_fields: a ModelConfig -> the family's own ``config.json`` fields on export.
    biases: whether ``attention_bias`` / ``mlp_bias`` are read (LLaMA's config has them).
    gguf_name: a word of a GGUF file's ``general.name`` that marks this family among files of
      llama.cpp's ``llama`` architecture (which holds LLaMA and Mistral alike), or None.
    """

    name: str
    architecture: str
    defaults: Mapping[str, Any]
    linears: Mapping[str, Linear] = dataclasses.field(default_factory=lambda: UNFUSED)
    sliding_window: Callable[[Mapping[str, Any]], int | None] = lambda d: None
    rope_types: tuple[str, ...] | None = None
    rope_aliases: Mapping[str, str] = dataclasses.field(default_factory=lambda: {"su": "longrope"})
    config_fields: Callable[[Any], dict] = lambda cfg: {}
    biases: bool = False
    gguf_name: str | None = None

    def __post_init__(self):
        held = sorted(p for lin in self.linears.values() for p in lin.parts)
        if held != sorted(MODEL_LINEARS):
            raise ValueError(f"family {self.name}: linears must hold each of {MODEL_LINEARS} once, hold {held}")


def _discover() -> dict[str, Family]:
    out = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        fam = getattr(module, "FAMILY", None)
        if isinstance(fam, Family):
            out[fam.name] = fam
    return out


FAMILIES: dict[str, Family] = _discover()
BY_ARCHITECTURE: dict[str, Family] = {f.architecture: f for f in FAMILIES.values()}


def get(name: str) -> Family:
    """The family of ``ModelConfig.architecture`` (its ``model_type``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r}: expected one of {sorted(FAMILIES)}") from None
