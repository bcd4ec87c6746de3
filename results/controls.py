"""The attention-factor controls of the results (issue 17), shared by ``results/*/make_controls.py``:
factors files that separate what searched factors do from what the attention factor does.

  yarn_longrope_attention(...)   YaRN's per-pair factors with LongRoPE's attention factor
                                 sqrt(1 + ln s / ln L_orig) (``attention_factor: null``, the default)
  with_yarn_attention(...)       a factors file with YaRN's attention factor 0.1 ln s + 1 instead
  write(...)                     validated, then written atomically
"""

from __future__ import annotations

import json
import os

from longrope_jax import factors as factors_lib
from longrope_jax import rope as rope_lib
from longrope_jax.atomic import write_json
from longrope_jax.search.fitness import base_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SmolLM2:  # what base_document and the factor builders read of a model config: SmolLM2's rotary numbers
    rope_theta, rotary_dim = 100000.0, 64


def yarn_longrope_attention(window: int, length: int, cfg=SmolLM2) -> dict:
    """YaRN's factors at ``s = length / window`` in a LongRoPE file (LongRoPE's attention factor)."""
    scale = length / window
    d = base_document(cfg, original_max=window, length=length)
    d["long_factor"] = rope_lib.yarn_factors(cfg.rope_theta, cfg.rotary_dim, scale, window).tolist()
    d["provenance"] = {"control": f"YaRN s={scale:g} factors, LongRoPE attention factor (null: the sqrt default)"}
    return d


def with_yarn_attention(path: str) -> dict:
    """The factors file at ``path`` (relative to the repository) with YaRN's attention factor at its
    own scale (``max_position_embeddings / original_max_position_embeddings``)."""
    with open(os.path.join(ROOT, path)) as fh:
        d = json.load(fh)
    d["attention_factor"] = rope_lib.yarn_attention_factor(
        d["max_position_embeddings"] / d["original_max_position_embeddings"])
    d["provenance"] = {"control": f"{path} with YaRN's attention factor", "parent": d.get("provenance")}
    return d


def write(out: str, fname: str, d: dict) -> None:
    factors_lib.validate(d, fname)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, fname), d)
