"""The ``prepare-data`` job: a training stage's rows tokenised once into a prepared directory of
ArrayRecord shards (``longrope_jax.data.rows``), which ``train --config.prepared=DIR`` (and an
``extend`` train stage's ``prepared``) reads by random access on every process, instead of each
process tokenising the corpus at start-up. The rows are the ones ``train`` builds from the same
``data`` and row settings, in the same order, so a run reads the same batches either way.

    longrope-jax prepare-data --config TRAIN_CONFIG [--model PATH] [--data SOURCE] --out DIR

Its settings are a training stage's (``configs/train/``: the model or ``model_config`` for its
tokenizer and special tokens, ``data``, ``field``, ``seq_len``, ``packing``,
``min_document_tokens``; the others are not used), so the rows are prepared from the same config
the stage runs with. Written into a temporary directory beside ``--out`` and renamed when complete; an interrupted run
leaves nothing and starts again. ``--out gs://...`` writes the directory in a local mirror, then copies
it to the store with ``prepared.json`` last (a reader that finds it finds every shard); ``train``
copies a prepared directory on a store to each machine once (``storage.local``).
"""

from __future__ import annotations

import json
import os
import time

from longrope_jax import atomic, storage
from longrope_jax.data import rows as rows_lib

ROWS_PER_SHARD = 4096


def resolve(config: str | None = None, overrides=(), flags=None):
    """A training stage's settings (``longrope-jax train``'s resolution: its configs, overrides
    and flags), with ``rows_per_shard`` and ``overwrite`` from the flags."""
    from longrope_jax.train import settings

    flags = dict(flags or {})
    s = settings.resolve(config, overrides, flags)
    return {"stage": s, "rows_per_shard": flags.get("rows_per_shard") or ROWS_PER_SHARD,
            "overwrite": bool(flags.get("overwrite"))}


def run(s, rows_per_shard: int = ROWS_PER_SHARD, overwrite: bool = False, log=print) -> dict:
    """The rows of the training stage ``s`` (train settings) in the prepared directory
    ``s["out"]``; returns its manifest."""
    from longrope_jax.jobs import train

    t = time.time()
    out = s["out"]
    remote = storage.is_remote(out)
    # Refused before any work. On a store: written whole in the local mirror, then copied up with
    # prepared.json last.
    (storage.check_new if remote else atomic.check_dir)(out, overwrite, "prepared data")
    if s["model"]:
        from longrope_jax.loading import load_model

        m = load_model(s["model"], tokenizer=s["tokenizer"], sliding_window=not s["no_sliding_window"],
                       weights=False, to_device=False)
        cfg, tok = m.cfg, m.need_tokenizer()
    else:  # a model trained from scratch (the train settings have one or the other)
        cfg, tok = train.scratch(s)
    one_row = {**s.to_dict(), "short_microbatches": 0, "batch": 1, "accum": 1}  # at least a row
    built = train.build_rows(one_row, tok, cfg, cfg.max_position_embeddings, log)["long"]
    bos, eos = train._special_ids(tok, cfg)
    with atomic.directory(storage.mirror(out) if remote else out, overwrite=overwrite or remote,
                          what="prepared data") as tmp:
        tok.save(os.path.join(tmp, rows_lib.TOKENIZER))
        shards = rows_lib.write(tmp, built, rows_per_shard)
        manifest = {"format": rows_lib.FORMAT, "seq_len": s["seq_len"], "packing": s["packing"],
                    "min_document_tokens": s["min_document_tokens"],
                    "fields": [f for f in rows_lib.FIELDS if f in built],
                    "rows": int(len(built["tokens"])), "tokens": int(built["tokens"].size), "bos": bos, "eos": eos,
                    "tokenizer_sha256": rows_lib.sha256(os.path.join(tmp, rows_lib.TOKENIZER)),
                    "data": list(s["data"]), "field": s["field"], "model": s["model"], "shards": shards}
        atomic.write_json(os.path.join(tmp, rows_lib.MANIFEST), manifest)
    if remote:
        storage.publish(storage.mirror(out), out, last=rows_lib.MANIFEST, overwrite=overwrite, what="prepared data")
    log(f"prepared {manifest['rows']} rows of {s['seq_len']} tokens in {len(shards)} shard(s) in {s['out']} "
        f"({time.time() - t:.1f}s)")
    return manifest


def main(r, log) -> int:
    s = r["stage"]
    manifest = run(s, r["rows_per_shard"], r["overwrite"], log)
    print(json.dumps({"out": storage.where(s["out"]), **{k: manifest[k] for k in ("rows", "tokens", "shards")}}))
    return 0
