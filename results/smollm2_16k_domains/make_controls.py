"""Writes the factors files of the attention-factor controls (issue 17, section 1) under
``results/smollm2_16k_domains/controls/``:

  yarn_longrope_attention.json    YaRN's factors at s = 2 with the LongRoPE attention factor
                                  sqrt(1 + ln 2 / ln 8192) = 1.0377 (YaRN's own is 0.1 ln 2 + 1 = 1.0693)
  SEARCH_yarn_attention.json      each searched factors file (SEARCH: search16k, search16k_lr2, and the
                                  re-run's searches once they exist) with YaRN's attention factor

Scored beside the files as they are, these separate what the factors do from what the attention factor
does.    python results/smollm2_16k_domains/make_controls.py
"""

import json
import os

from longrope_jax import factors as factors_lib
from longrope_jax import rope as rope_lib
from longrope_jax.atomic import write_json
from longrope_jax.search.fitness import base_document

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SEARCHES = {  # each used once its result.json exists (a running search's factors.json is its best so far)
            "search16k": "results/smollm2_16k/search/factors.json",
            "search16k_lr2": "results/smollm2_16k/search_longrope2/factors.json",
            "search": "results/smollm2_16k_domains/search/factors.json",
            "search_gene": "results/smollm2_16k_domains/search_gene/factors.json"}
THETA, ROTARY, WINDOW, LENGTH = 100000.0, 64, 8192, 16384


class _Cfg:  # what base_document reads of a model config: SmolLM2's rotary numbers
    rope_theta, rotary_dim = THETA, ROTARY


def main() -> None:
    out = os.path.join(HERE, "controls")
    os.makedirs(out, exist_ok=True)
    scale = LENGTH / WINDOW
    yarn = base_document(_Cfg, original_max=WINDOW, length=LENGTH)
    yarn["long_factor"] = rope_lib.yarn_factors(THETA, ROTARY, scale, WINDOW).tolist()
    yarn["provenance"] = {"control": "YaRN s=2 factors, LongRoPE attention factor (null: the sqrt default)"}
    factors_lib.validate(yarn, "yarn_longrope_attention.json")
    write_json(os.path.join(out, "yarn_longrope_attention.json"), yarn)
    for name, path in SEARCHES.items():
        path = os.path.join(ROOT, path)
        if not os.path.exists(os.path.join(os.path.dirname(path), "result.json")):
            continue  # a running search's factors.json is its best so far
        d = json.load(open(path))
        d["attention_factor"] = rope_lib.yarn_attention_factor(scale)
        d["provenance"] = {"control": f"{os.path.relpath(path, ROOT)} with YaRN's attention factor",
                           "parent": d.get("provenance")}
        factors_lib.validate(d, name)
        write_json(os.path.join(out, f"{name}_yarn_attention.json"), d)
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
