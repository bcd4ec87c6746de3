"""Writes the factors files of the attention-factor controls (issue 17, section 1) under
``results/smollm2_16k_domains/controls/``:

  yarn_longrope_attention.json    YaRN's factors at s = 2 with the LongRoPE attention factor
                                  sqrt(1 + ln 2 / ln 8192) = 1.0377 (YaRN's own is 0.1 ln 2 + 1 = 1.0693)
  SEARCH_yarn_attention.json      each searched factors file (SEARCH: search16k, search16k_lr2, and the
                                  re-run's searches once they exist) with YaRN's attention factor

Scored beside the files as they are, these separate what the factors do from what the attention factor
does.    python results/smollm2_16k_domains/make_controls.py
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from controls import ROOT, with_yarn_attention, write, yarn_longrope_attention  # noqa: E402  (results/controls.py)

SEARCHES = {  # each used once its result.json exists (a running search's factors.json is its best so far)
            "search16k": "results/smollm2_16k/search/factors.json",
            "search16k_lr2": "results/smollm2_16k/search_longrope2/factors.json",
            "search": "results/smollm2_16k_domains/search/factors.json",
            "search_gene": "results/smollm2_16k_domains/search_gene/factors.json"}
WINDOW, LENGTH = 8192, 16384


def main() -> None:
    out = os.path.join(HERE, "controls")
    write(out, "yarn_longrope_attention.json", yarn_longrope_attention(WINDOW, LENGTH))
    for name, path in SEARCHES.items():
        if os.path.exists(os.path.join(ROOT, os.path.dirname(path), "result.json")):
            write(out, f"{name}_yarn_attention.json", with_yarn_attention(path))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
