"""The ``passkey`` job: trials (``passkey.run_trials``), accuracy per length and depth, a heat map,
and a trial log under ``--out`` that a rerun resumes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from longrope_jax import config_files, storage, passkey, runlog
from longrope_jax.factors import parse_rope, resolve_rope
from longrope_jax.loading import LoadedModel, model_from

# What each setting of ``longrope-jax passkey`` must hold (its defaults: configs/passkey/default.py).
KINDS = dict(**config_files.MODEL_KINDS, lengths="ints", trials="int", rope="str", seed="int0", out="str?")

LOG_FORMAT = "longrope-passkey-log/1"
LOG_FILE, HEATMAP_PNG = "trials.jsonl", "passkey.png"


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def run(model: str | LoadedModel, lengths: list[int], trials: int, rope: str = "model", *, seed: int = 0,
        param_dtype: str = "float32", tokenizer: str | None = None, sliding_window: bool = True,
        out_dir: str | None = None, log=None) -> dict:
    """Trials, per-length accuracy, per-(length, depth) accuracy, heat map.

    With ``out_dir``, every finished trial is appended to ``out_dir/trials.jsonl`` (fsynced), and a
    rerun of the same command takes the logged trials instead of decoding them again, so an
    interrupted run loses at most the trial in flight. A log of other settings is refused.
    """
    log = log or (lambda msg: None)
    if trials < 1:
        raise ValueError(f"--trials: expected at least 1, got {trials}")
    parsed = parse_rope(rope)
    name = model.source if isinstance(model, LoadedModel) else model
    journal = rd = None
    if out_dir:
        # On an object store: the log in a local mirror (pulled now), rewritten whole on the store
        # after each trial (an object cannot be appended to).
        rd = storage.RunDir(out_dir, [LOG_FILE], log=log)
        out_dir = rd.local
        os.makedirs(out_dir, exist_ok=True)
        header = {"format": LOG_FORMAT, "model": name, "rope": rope, "seed": seed, "lengths": list(lengths),
                  "trials": trials, "param_dtype": param_dtype, "tokenizer": tokenizer,
                  "sliding_window": sliding_window}
        for what, path in (("model", name), ("rope", rope), ("tokenizer", tokenizer)):
            if path and os.path.isfile(path):  # a file named in the header: its content counts, not its name
                header[f"{what}_sha256"] = _file_digest(path)
        fields = {f.name for f in dataclasses.fields(passkey.Trial)}
        # Checked before the model loads, so a wrong --out fails at once.
        runlog.check_file(os.path.join(out_dir, LOG_FILE), header, "passkey run")
        journal = runlog.RunLog(os.path.join(out_dir, LOG_FILE), header, what="passkey run",
                                record_name="trial record", is_record=lambda r: fields | {"index"} <= set(r))
    try:
        done = {}
        if journal is not None:
            for r in journal.records:
                done[(r["length"], r["index"])] = passkey.Trial(**{k: r[k] for k in fields})
            if done:
                log(f"{journal.path}: {len(done)} trial(s) done, resumed")
        m = model_from(model, param_dtype=param_dtype, tokenizer=tokenizer, sliding_window=sliding_window)

        def on_trial(t, trial):
            journal.append(dict(dataclasses.asdict(trial), index=t))
            rd.push([LOG_FILE])

        ts = passkey.run_trials(m.params, m.cfg, m.need_tokenizer(),
                                lambda n: resolve_rope(parsed, m.cfg, n, m.factors), lengths, trials, seed, log,
                                done=done, on_trial=on_trial if journal else None)
    finally:
        if journal is not None:
            journal.close()
    rows = passkey.summarise(ts)
    result = {
        "model": name, "rope": rope, "seed": seed, "trials_per_length": trials,
        "accuracy": {str(n): sum(t.correct for t in ts if t.length == n) / trials for n in lengths},
        "by_depth": rows,
        "trials": [dataclasses.asdict(t) for t in ts],
    }
    if out_dir:
        from longrope_jax.plots import passkey_heatmap

        passkey_heatmap(rows, os.path.join(out_dir, HEATMAP_PNG), f"passkey: {name}, rope {rope}")
        rd.push([HEATMAP_PNG])
        result["heatmap"], result["log"] = rd.show(HEATMAP_PNG), rd.show(LOG_FILE)
    return result


def resolve(config: str | None = None, overrides=(), flags=None):
    return config_files.resolve("passkey", KINDS, config=config, overrides=overrides, flags=flags,
                                required=("model", "lengths"), listy=("lengths",))


def main(s, log) -> int:
    """``longrope-jax passkey`` with resolved settings ``s`` (:func:`resolve`)."""
    res = run(s.model, list(s.lengths), s.trials, s.rope, seed=s.seed, param_dtype=s.param_dtype,
              tokenizer=s.tokenizer, sliding_window=not s.no_sliding_window, out_dir=s.out, log=log)
    for row in res["by_depth"]:
        print(json.dumps(dict(row, model=res["model"], rope=res["rope"])), flush=True)
    print(json.dumps({k: v for k, v in res.items() if k != "by_depth"}), flush=True)
    log("  length  accuracy")
    for n, acc in res["accuracy"].items():
        log(f"{n:>8}  {acc:8.0%}")
    if res.get("heatmap"):
        log(f"wrote {res['heatmap']}")
    return 0
