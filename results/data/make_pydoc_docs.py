"""Builds the long documents of the SmolLM2 results from Python's pydoc topics (PSF licence).

The machines here are offline, so the one long English text every Python installation has, the
standard library's pydoc topics, is cut into documents: topics in sorted order are packed, whole,
into parts of at least 16,400 SmolLM2 tokens. The files are committed because the topics differ
between Python versions; this script says how they were made (Python 3.11.7 here).

    python results/data/make_pydoc_docs.py   # writes results/data/*.jsonl

Files (JSONL, field ``text``; ``topics`` names what a document holds):
  search_16k.jsonl   part 0: the only text the 16k searches see
  heldout_16k.jsonl  parts 1-4: the 16k held-out documents
  search_32k.jsonl   parts 0+1 joined: the 32k search document
  heldout_32k.jsonl  parts 2+3 joined: the 32k held-out document
"""

import json
import os
import sys

MIN_TOKENS = 16_400


def parts(tokenizer, min_tokens: int = MIN_TOKENS) -> list[dict]:
    from pydoc_data import topics

    out, cur, n = [], [], 0
    for k in sorted(topics.topics):
        cur.append(k)
        n = len(tokenizer.encode("\n\n".join(topics.topics[t] for t in cur)))
        if n >= min_tokens:
            out.append({"topics": cur, "text": "\n\n".join(topics.topics[t] for t in cur), "tokens": n})
            cur = []
    if cur:  # a short tail joins the last part
        last = out[-1]
        last["topics"] += cur
        last["text"] = "\n\n".join(topics.topics[t] for t in last["topics"])
        last["tokens"] = len(tokenizer.encode(last["text"]))
    return out


def join(a: dict, b: dict, tokenizer) -> dict:
    text = a["text"] + "\n\n" + b["text"]
    return {"topics": a["topics"] + b["topics"], "text": text, "tokens": len(tokenizer.encode(text))}


def write(path: str, docs: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d["text"], "topics": d["topics"], "tokens": d["tokens"]}) + "\n")
    os.replace(tmp, path)
    print(f"{path}: {len(docs)} document(s), tokens {[d['tokens'] for d in docs]}", file=sys.stderr)


def main() -> None:
    from longrope_jax.loading import load_model

    tok = load_model("smollm2").tokenizer
    p = parts(tok)
    if len(p) < 5:
        raise SystemExit(f"pydoc topics give {len(p)} parts of {MIN_TOKENS}+ tokens; 5 are needed")
    here = os.path.dirname(os.path.abspath(__file__))
    write(os.path.join(here, "search_16k.jsonl"), p[:1])
    write(os.path.join(here, "heldout_16k.jsonl"), p[1:])
    write(os.path.join(here, "search_32k.jsonl"), [join(p[0], p[1], tok)])
    write(os.path.join(here, "heldout_32k.jsonl"), [join(p[2], p[3], tok)])


if __name__ == "__main__":
    main()
