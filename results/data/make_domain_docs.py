"""Builds the documents of issue 17's re-run: search windows from two domains, held-out text from two
other domains that no search sees.

Every text is on the machine image (offline): the committed files are what the results used, and
this script says how they were made. Each document keeps the head of its source (whole lines) that
holds at least 16,400 SmolLM2 tokens (32,800 for the 32k file; the protocol scores the first N
tokens).

    python results/data/make_domain_docs.py   # writes the four files below

Files (JSONL, field ``text``; ``source`` names the file a document was cut from):
  search_code.jsonl    Python 3.11 standard-library modules (PSF licence): code; a search's seed
                       picks its windows among them. With ``search_16k.jsonl`` (pydoc, prose) the
                       search windows come from two domains.
  heldout_vim.jsonl    Vim's help files (``vim-runtime``, Vim licence): a manual in Vim's help
                       format; never searched on.
  heldout_nodejs.jsonl Node.js API docs (``nodejs``, MIT licence): Markdown reference; never
                       searched on.
  heldout_domains_32k.jsonl
                       the 32k held-out text of those two domains (one Vim help file, one Node.js
                       API file), for the 4x result; never searched on.
  heldout_ft_32k.jsonl the fine-tuning study's held-out text (results/smollm2_32k_ft): two Vim help
                       files and two Node.js API files, 32k tokens each; never searched or trained on
                       (the study trains on the Python standard library, stdlib:).
"""

import json
import os
import sys
import sysconfig

STDLIB = sysconfig.get_paths()["stdlib"]
VIM, NODEJS = "/usr/share/vim/vim90/doc", "/usr/share/doc/nodejs/api"
SOURCES = {  # file -> (sources, the least number of tokens each document holds)
    "search_code.jsonl": ([os.path.join(STDLIB, f) for f in
                           ("argparse.py", "inspect.py", "subprocess.py", "tarfile.py", "typing.py", "zipfile.py")],
                          16_400),
    "heldout_vim.jsonl": ([f"{VIM}/{f}" for f in ("eval.txt", "options.txt")], 16_400),
    "heldout_nodejs.jsonl": ([f"{NODEJS}/{f}" for f in ("crypto.md", "fs.md")], 16_400),
    "heldout_domains_32k.jsonl": ([f"{VIM}/eval.txt", f"{NODEJS}/fs.md"], 32_800),
    "heldout_ft_32k.jsonl": ([f"{VIM}/eval.txt", f"{VIM}/options.txt", f"{NODEJS}/crypto.md", f"{NODEJS}/fs.md"],
                             32_800),
}


def head(text: str, tokenizer, min_tokens: int) -> tuple[str, int]:
    """The shortest run of whole lines from the start of ``text`` with ``min_tokens`` tokens."""
    lines = text.splitlines(keepends=True)
    lo, hi = 1, len(lines)
    if len(tokenizer.encode(text)) < min_tokens:
        raise SystemExit(f"too short: {len(tokenizer.encode(text))} tokens")
    while lo < hi:  # tokens grow with the number of lines
        mid = (lo + hi) // 2
        if len(tokenizer.encode("".join(lines[:mid]))) >= min_tokens:
            hi = mid
        else:
            lo = mid + 1
    out = "".join(lines[:lo])
    return out, len(tokenizer.encode(out))


def main() -> None:
    from longrope_jax.loading import load_model

    tok = load_model("smollm2").tokenizer
    here = os.path.dirname(os.path.abspath(__file__))
    for name, (paths, min_tokens) in SOURCES.items():
        docs = []
        for p in paths:
            with open(p, encoding="utf-8") as fh:
                text, n = head(fh.read(), tok, min_tokens)
            docs.append({"text": text, "source": p, "tokens": n})
        path = os.path.join(here, name)
        with open(path + ".tmp", "w") as fh:
            for d in docs:
                fh.write(json.dumps(d) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{path}: {len(docs)} document(s), tokens {[d['tokens'] for d in docs]}", file=sys.stderr)


if __name__ == "__main__":
    main()
