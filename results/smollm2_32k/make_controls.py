"""Writes the exact controls of the 32k result (issue 17, section 1) under
``results/smollm2_32k/controls/``: the 16k factors (``results/smollm2_16k/search/factors.json``)
times exact ``lambda_2`` at s = 32768 / 16384 = 2, in the search's own template (attention factor
and start tokens as its baselines ``base*ntk:2`` and ``base*yarn:2`` had them):

  base_ntk2.json     lambda_16k * NTK's per-pair factors at s = 2
  base_yarn2.json    lambda_16k * YaRN's per-pair factors at s = 2

The search's best (``search/factors.json``) is the NTK seed rounded onto the 0.01 grid, so scoring
these beside it on the held-out document says what the rounding and the search added. And the
attention-factor controls at 4x, as at 16k (``results/smollm2_16k_domains/make_controls.py``):

  yarn4_longrope_attention.json      YaRN's factors at s = 4 (from 8k) with the LongRoPE attention
                                     factor sqrt(1 + ln 4 / ln 8192) = 1.074 (YaRN's own: 1.139)
  search_gen1_yarn_attention.json    the generation's best (``search_gen1/``) with YaRN's 1.139
    python results/smollm2_32k/make_controls.py
"""

import json
import os

import numpy as np

from longrope_jax import factors as factors_lib
from longrope_jax import rope as rope_lib
from longrope_jax.atomic import write_json
from longrope_jax.search.fitness import base_document
from longrope_jax.search.plan import reference_factors

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
F16 = "results/smollm2_16k/search/factors.json"
LENGTH = 32768
NAMES = {"ntk": "NTK", "yarn": "YaRN"}


class _Cfg:  # what base_document and reference_factors read of a model config: SmolLM2's rotary numbers
    rope_theta, rotary_dim = 100000.0, 64


def main() -> None:
    f16 = json.load(open(os.path.join(ROOT, F16)))
    window, switch = int(f16["max_position_embeddings"]), int(f16["original_max_position_embeddings"])
    scale = LENGTH / window
    lam1 = np.asarray(f16["long_factor"], np.float64)
    out = os.path.join(HERE, "controls")
    os.makedirs(out, exist_ok=True)
    for name, lam2 in reference_factors(_Cfg, scale, window).items():
        if name == "pi":
            continue  # base*pi:2 is one of the search's seeds, scored there already (32.4 on its window)
        d = base_document(_Cfg, original_max=switch, length=LENGTH)
        d.update(short_factor=f16["short_factor"], attention_factor=f16.get("attention_factor"),
                 long_factor=np.round(lam1 * lam2, 10).tolist(),
                 provenance={"control": f"16k factors x exact {NAMES[name]} lambda_2 at s={scale:g}",
                             "parent": f16.get("provenance")})
        fname = f"base_{name}{scale:g}.json"
        factors_lib.validate(d, fname)
        write_json(os.path.join(out, fname), d)
    original = LENGTH / switch
    yarn = base_document(_Cfg, original_max=switch, length=LENGTH)
    yarn["long_factor"] = rope_lib.yarn_factors(_Cfg.rope_theta, _Cfg.rotary_dim, original, switch).tolist()
    yarn["provenance"] = {"control": f"YaRN s={original:g} factors, LongRoPE attention factor"}
    factors_lib.validate(yarn, "yarn4_longrope_attention.json")
    write_json(os.path.join(out, "yarn4_longrope_attention.json"), yarn)
    gen1 = os.path.join(HERE, "search_gen1")
    if os.path.exists(os.path.join(gen1, "result.json")):  # a running search's factors.json is its best so far
        d = json.load(open(os.path.join(gen1, "factors.json")))
        d["attention_factor"] = rope_lib.yarn_attention_factor(original)
        d["provenance"] = {"control": f"search_gen1 with YaRN's attention factor (s={original:g})",
                           "parent": d.get("provenance")}
        factors_lib.validate(d, "search_gen1_yarn_attention.json")
        write_json(os.path.join(out, "search_gen1_yarn_attention.json"), d)
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
