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
import sys

import numpy as np

from longrope_jax.search.fitness import base_document
from longrope_jax.search.setup import reference_factors

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from controls import ROOT, SmolLM2, with_yarn_attention, write, yarn_longrope_attention  # noqa: E402

F16 = "results/smollm2_16k/search/factors.json"
GEN1 = "results/smollm2_32k/search_gen1/factors.json"
LENGTH = 32768
NAMES = {"ntk": "NTK", "yarn": "YaRN"}


def main() -> None:
    f16 = json.load(open(os.path.join(ROOT, F16)))
    window, switch = int(f16["max_position_embeddings"]), int(f16["original_max_position_embeddings"])
    scale = LENGTH / window
    lam1 = np.asarray(f16["long_factor"], np.float64)
    out = os.path.join(HERE, "controls")
    for name, lam2 in reference_factors(SmolLM2, scale, window).items():
        if name == "pi":
            continue  # base*pi:2 is one of the search's seeds, scored there already (32.4 on its window)
        d = base_document(SmolLM2, original_max=switch, length=LENGTH)
        d.update(short_factor=f16["short_factor"], attention_factor=f16.get("attention_factor"),
                 long_factor=np.round(lam1 * lam2, 10).tolist(),
                 provenance={"control": f"16k factors x exact {NAMES[name]} lambda_2 at s={scale:g}",
                             "parent": f16.get("provenance")})
        write(out, f"base_{name}{scale:g}.json", d)
    write(out, "yarn4_longrope_attention.json", yarn_longrope_attention(switch, LENGTH))
    if os.path.exists(os.path.join(ROOT, os.path.dirname(GEN1), "result.json")):  # else: a search's best so far
        write(out, "search_gen1_yarn_attention.json", with_yarn_attention(GEN1))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
