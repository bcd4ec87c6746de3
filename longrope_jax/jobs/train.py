"""The ``train`` job: one fine-tuning stage (or a tiny model pretrained from scratch) with fixed
RoPE factors, checkpointed by Orbax and resumable to the bit.

``RUN/`` holds ``settings.json`` (what determines the run; a resume with other settings, ``steps``
aside, is refused naming the keys), ``tokenizer.json``, ``data/chunks.npy`` (the chunk index,
built once), ``checkpoints/`` (Orbax ``CheckpointManager``: train state and metadata, async,
the last ``keep`` plus the final), ``metrics.jsonl`` (one object per step: ``step``, ``loss``,
``lr``, ``grad_norm``, ``tokens_per_s``; cut back to the restored step on resume), ``tb/``
(TensorBoard events) and, at the end, ``final/``: a checkpoint every command takes as
``--model``, the stage's factors attached.

The same command after a kill resumes from the last checkpoint (``steps`` may change: a decaying
schedule then follows the new total; so may the mesh); the batch of step t depends only
on ``(seed, t)`` (:mod:`longrope_jax.train.data`), so the resumed losses equal an uninterrupted
run's. SIGTERM and a first Ctrl-C (SIGINT) save the step and exit 0; a second Ctrl-C stops at
once (the last checkpoint stays). A non-finite loss stops the run; the last checkpoint stays.

The stage itself is the library's trainer (:mod:`longrope_jax.train.trainer`) with this job's
hooks (metrics, checkpoints); :func:`run` also starts from a model in memory (a pipeline's
previous stage) and hands the trained params back in memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

from longrope_jax import atomic, config_files, parallel, storage
from longrope_jax import factors as factors_lib
from longrope_jax.loading import LoadedModel
from longrope_jax.train import trainer as trainer_lib
from longrope_jax.train.settings import KINDS, check, resolve, section  # noqa: F401  (the command's settings)
from longrope_jax.train.trainer import TrainError

# Settings that may change when a run is resumed: its length, and where it runs (the batch of a
# step does not depend on the devices or processes).
RESUMABLE = ("steps", "out", *parallel.SETTINGS)
FORMAT = "longrope-train/1"


def _effective(settings: dict) -> dict:
    """Settings as they act: JSON values, an unset ``q_chunk`` as the block it stands for, keys
    a run directory written before they existed at their defaults."""
    s = {**config_files.defaults("train").to_dict(), **json.loads(json.dumps(settings))}
    if s.get("q_chunk") is None and s.get("seq_len"):
        s["q_chunk"] = min(512, s["seq_len"])
    return s


def _check_settings(path: str, settings) -> None:
    """``settings.json`` of a run being resumed against this one's by effective values
    (``RESUMABLE`` keys aside); written by process 0 when the run is new."""
    fixed = {k: v for k, v in settings.to_dict().items() if k not in RESUMABLE}
    if not os.path.exists(path):
        if parallel.is_main():
            atomic.write_json(path, {"format": FORMAT, "settings": fixed})
        return
    with open(path) as fh:
        recorded = json.load(fh).get("settings", {})
    old, new = _effective(recorded), _effective(fixed)
    diff = sorted(k for k in set(old) | set(new) if k not in RESUMABLE and old.get(k) != new.get(k))
    if diff:
        raise TrainError(f"{path}: this run was started with other settings ({', '.join(diff)}: "
                         + "; ".join(f"{k} was {json.dumps(old.get(k))[:40]}, now {json.dumps(new.get(k))[:40]}"
                                     for k in diff[:3])
                         + "); only steps and the mesh may change on resume; use another --out")


def initial_model(s: dict, run: str, log, model: LoadedModel | None = None):
    """The run's starting point: (cfg, params, tokenizer, tokenizer file, factors attached to the
    source, source record); writes ``RUN/tokenizer.json`` (process 0) when it is not there.
    ``model``: a model in memory (a previous stage's) instead of ``s["model"]``'s path."""
    import jax

    from longrope_jax.loading import model_from
    from longrope_jax.model import init_params

    tok_path = os.path.join(run, "tokenizer.json")
    if model is not None or s["model"]:
        m = model_from(model if model is not None else s["model"], param_dtype=s["param_dtype"],
                       tokenizer=s["tokenizer"], sliding_window=not s["no_sliding_window"])
        tok = m.need_tokenizer()
        cfg, params, factors, source = m.cfg, m.params, m.factors, {"path": m.source, "sha256": m.sha256}
    else:
        cfg, tok = scratch(s)
        params, factors, source = init_params(cfg, s["init_seed"]), None, {"init_seed": s["init_seed"]}
        log(f"a model from scratch: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params")
    if not os.path.exists(tok_path) and parallel.is_main():
        tmp = tok_path + ".tmp"
        tok.save(tmp)
        os.replace(tmp, tok_path)
    return cfg, params, tok, tok_path, factors, source


def scratch(s):
    """The config and tokenizer of a model trained from scratch (``model_config``; the byte-level
    tokenizer unless ``tokenizer`` names one)."""
    from longrope_jax.model import ModelConfig
    from longrope_jax.tokenizer import Tokenizer

    try:
        cfg = ModelConfig(**{**s["model_config"].to_dict(), "param_dtype": s["param_dtype"]})
    except TypeError as e:
        raise TrainError(f"model_config: {e}") from None
    tok = Tokenizer.from_file(s["tokenizer"]) if s["tokenizer"] else Tokenizer.byte_level()
    if tok.backend.get_vocab_size() > cfg.vocab_size:
        raise TrainError(f"model_config.vocab_size: expected at least the tokenizer's "
                         f"{tok.backend.get_vocab_size()}, got {cfg.vocab_size}")
    return cfg, tok


def _special_ids(tok, cfg):
    """BOS and EOS ids for the paper's BOS + doc + EOS (the model's, else the tokenizer's <s>, </s>)."""
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.token_id("<s>")
    return bos, eos if eos is not None else tok.token_id("</s>")


INDEX_FILES = {"tokens": "chunks.npy", "segment_ids": "segment_ids.npy", "positions": "positions.npy"}
# What a run on an object store keeps in its local mirror (the rest are Orbax's checkpoints).
MIRRORED = ["settings.json", "tokenizer.json", "metrics.jsonl", "tb", "data"]


def build_rows(s, tok, cfg, window: int, log) -> dict:
    """The stage's rows from its data sources, by kind: ``{"long": {"tokens": int32[N, seq_len],
    ...}}`` (with ``packing`` also segment ids and positions) and, with ``short_microbatches``,
    ``"short"`` (documents within the original ``window``, packed into rows of it; the long rows
    then hold only the longer documents); each kind checked to fill one step."""
    from longrope_jax.data import read_sources
    from longrope_jax.train.data import chunk_index, pack_index

    t = time.time()
    mixed = bool(s["short_microbatches"])
    docs = [d for _, ds in read_sources(s["data"], s["field"], log=log) for d in ds]
    bos, eos = _special_ids(tok, cfg)
    ids = [tok.encode_plain(d.text) for d in docs]
    specials = (bos is not None) + (eos is not None)
    short_docs = [x for x in ids if mixed and len(x) + specials <= window]
    long_docs = [x for x in ids if not (mixed and len(x) + specials <= window)]
    kw = dict(bos=bos, eos=eos, min_document_tokens=s["min_document_tokens"])
    built = {"long": (pack_index(long_docs, s["seq_len"], **kw) if s["packing"]
                      else {"tokens": chunk_index(long_docs, s["seq_len"], **kw)})}
    if mixed:
        built["short"] = pack_index(short_docs, window, **kw)
    for k, rows in built.items():
        _check_rows(s, k, rows["tokens"].shape, f"from {len(docs)} documents", window if mixed else None)
        log(f"data: {len(docs)} documents -> {rows['tokens'].shape[0]} {k + ' ' if mixed else ''}rows of "
            f"{rows['tokens'].shape[1]} tokens" + (" (packed)" if "segment_ids" in rows else "")
            + f" ({time.time() - t:.1f}s)")
    return built


def _check_rows(s, kind: str, shape, source: str, window: int | None) -> None:
    """A kind's rows against one step's need (a one-line error naming the data)."""
    micro = s["batch"] // s["accum"]
    need = {"long": (s["accum"] - s["short_microbatches"]) * micro, "short": s["short_microbatches"] * micro}[kind]
    if shape[0] < need:
        which = "" if window is None else \
            f" ({kind} documents: {'at most' if kind == 'short' else 'over'} {window} tokens)"
        raise TrainError(f"data: {shape[0]} rows of {shape[1]} tokens {source}{which}, fewer than one step's {need}; "
                         "give more data or a shorter seq_len")


def check_prepared(s, tok_path: str | None = None):
    """The rows of ``s["prepared"]`` (``longrope-jax prepare-data``) after checking that they are
    this stage's: the same row length, packing and document filter (and, given the run's
    ``tokenizer.json``, the same tokenizer); checked before any work."""
    from longrope_jax.data import rows as rows_lib

    d = s["prepared"]
    r = rows_lib.Rows(storage.local(d))  # on a store: copied once per machine
    m = r.manifest
    where = os.path.join(d, rows_lib.MANIFEST)
    for key in ("seq_len", "packing", "min_document_tokens"):
        if m[key] != s[key]:
            raise TrainError(f"{where}: {key}: the rows were prepared with {json.dumps(m[key])}, the stage has "
                             f"{json.dumps(s[key])}; prepare them again or use the same setting")
    if s["short_microbatches"]:
        raise TrainError("prepared: short_microbatches needs the short rows, which prepare-data does not write; "
                         "use data for a mixed stage")
    if tok_path is not None and m["tokenizer_sha256"] != rows_lib.sha256(tok_path):
        raise TrainError(f"{where}: tokenizer_sha256: the rows were tokenised with another tokenizer than the "
                         f"model's ({tok_path}); prepare them with this model")
    _check_rows(s, "long", r.shape, f"in {d}", None)
    return r.fields


def _rows(s, run: str, tok, cfg, window: int, log):
    """The stage's rows: a prepared directory's (``prepared``), or built once under ``RUN/data``
    and memory-mapped: the chunk index ``int32[N, seq_len]`` (``chunks.npy``), or with
    ``packing`` its tokens, segment ids and positions; with ``short_microbatches`` also the short
    rows (``short_*.npy``). Every process builds them alike when the files are not there; process 0
    writes them (the tokens last: their file marks the index as complete)."""
    import numpy as np

    if s["prepared"]:
        fields = check_prepared(s, os.path.join(run, "tokenizer.json"))
        log(f"data: {len(fields['tokens'])} rows of {s['seq_len']} tokens prepared in {s['prepared']}")
        return fields
    mixed = bool(s["short_microbatches"])
    kinds = {"long": ""} | ({"short": "short_"} if mixed else {})
    packed = {"long": s["packing"], "short": True}  # short rows are always packed
    paths = {k: {n: os.path.join(run, "data", prefix + INDEX_FILES[n])
                 for n in (["segment_ids", "positions", "tokens"] if packed[k] else ["tokens"])}
             for k, prefix in kinds.items()}
    if not all(os.path.exists(p["tokens"]) for p in paths.values()):
        built = build_rows(s, tok, cfg, window, log)
        if not parallel.is_main():
            return _by_kind(built)
        os.makedirs(os.path.join(run, "data"), exist_ok=True)
        for k, rows in built.items():
            for n, path in paths[k].items():  # the tokens last
                with atomic.file(path, "wb") as fh:
                    np.save(fh, rows[n])
    return _by_kind({k: {n: np.load(p, mmap_mode="r") for n, p in ps.items()} for k, ps in paths.items()})


def _by_kind(pools: dict):
    """What the trainer reads: one kind's index alone (a bare array when only tokens), or the
    indexes by kind."""
    pools = {k: v["tokens"] if set(v) == {"tokens"} else v for k, v in pools.items()}
    return pools["long"] if set(pools) == {"long"} else pools


def _eval_windows(s: dict, tok, log) -> dict:
    """{length: int32[S, length]}: the held-out windows (``eval_samples`` per length, split over
    ``eval_data``'s sources), read once."""
    from longrope_jax.data import read_sources, windows_from

    sources = read_sources(s["eval_data"], s["field"], log=log)
    return {length: windows_from(sources, tok, length, s["eval_samples"], s["seed"]).tokens
            for length in s["eval_lengths"]}


def _metrics_file(path: str, start: int):
    """``metrics.jsonl`` cut back to the steps before ``start``, open for appending."""
    keep = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line torn by the kill
                if rec.get("step", math.inf) < start:
                    keep.append(line if line.endswith("\n") else line + "\n")
    with atomic.file(path) as fh:
        fh.writelines(keep)
    return open(path, "a")


class _Metrics:
    """Each step's record to ``RUN/metrics.jsonl`` and TensorBoard (``RUN/tb``), both cut back to
    ``start`` on resume; on processes other than 0 it writes nothing (one writer per run)."""

    def __init__(self, run_dir: str, start: int):
        self.on = parallel.is_main()
        if self.on:
            from tensorboardX import SummaryWriter

            self.file = _metrics_file(os.path.join(run_dir, "metrics.jsonl"), start)
            self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start)

    def __call__(self, done: int, state, rec: dict, last: bool) -> None:
        """A trainer hook: writes step ``done - 1``'s record."""
        if self.on:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def flush(self) -> None:
        if self.on and not self.file.closed:
            self.file.flush()
            self.tb.flush()

    def close(self) -> None:
        if self.on:
            self.file.close()
            self.tb.close()


@dataclasses.dataclass
class Trained:
    """What a run leaves in memory: its summary (what ``main`` prints), and when it finished (not
    stopped), the trained params (on the run's mesh), their config and the stage's factors."""

    summary: dict
    params: Any = None
    cfg: Any = None
    factors: dict | None = None


def stage_span(s) -> int:
    """The stage's window: its rows' length, or the span positional skips cover."""
    return max(s["seq_len"], s["skip_to"] or 0)


def stage_config(s, base):
    """The model config a stage trains: ``base`` at the stage's dtype and remat, its window at
    least :func:`stage_span`."""
    return dataclasses.replace(base, dtype=s["dtype"], remat=s["remat"],
                               max_position_embeddings=max(base.max_position_embeddings, stage_span(s)))


def run(s: dict, *, mesh=None, model: LoadedModel | None = None, log=print) -> Trained:
    """Trains per settings ``s`` (:func:`resolve`) on ``mesh`` (None: the one ``s`` names, else
    one device; the multi-process runtime is started by the caller, ``parallel.from_settings``),
    from ``model`` in memory when given (else ``s["model"]``, else a fresh init), resuming the run
    directory ``s["out"]`` where it stopped. The summary is also ``RUN/summary.json``."""
    import jax
    import orbax.checkpoint as ocp

    from longrope_jax import __version__, checkpoint
    from longrope_jax.model import rope_spec

    out = s["out"]
    # A run directory on an object store: Orbax's checkpoints there, the other files in a local
    # mirror (this process's), pulled now and pushed whole at each checkpoint and at the end.
    rd = storage.RunDir(out, MIRRORED, log=log)
    remote, run_dir = rd.remote, rd.local
    where = rd.show()  # what messages name
    os.makedirs(run_dir, exist_ok=True)
    mesh = parallel.mesh_for(s) if mesh is None else mesh
    if s["prepared"]:
        check_prepared(s)  # before the run directory is written to
    _check_settings(os.path.join(run_dir, "settings.json"), s)
    if mesh is not None:
        parallel.check(mesh, length=s["seq_len"], batch=s["batch"] // s["accum"])
    base, params, tok, tok_path, model_factors, source = initial_model(s, run_dir, log, model)
    # The stage's RoPE, on the model as it comes (``yarn:4`` is 4x its own window).
    rope = factors_lib.parse_rope(s["rope"])
    spec = factors_lib.resolve_rope(rope, base, length=stage_span(s), model_factors=model_factors)
    stage_factors = rope.factors if rope.kind == "file" else (model_factors if rope.kind == "model" else None)
    window = base.max_position_embeddings  # the model's own (the short rows' length under mixing)
    cfg = stage_config(s, base)
    rows = _rows(s, run_dir, tok, cfg, window, log)

    short = (rope_spec(base), window)
    trainer = trainer_lib.Trainer(cfg, spec, s, mesh=mesh, short=short if s["short_microbatches"] else None)
    if s["attention"] == "auto":
        log(f"attention auto: {trainer.attention} at {s['seq_len']} tokens")
    state = trainer.init_state(params)
    del params
    options = ocp.CheckpointManagerOptions(max_to_keep=s["keep"], save_interval_steps=s["checkpoint_every"],
                                           enable_async_checkpointing=True, create=True)
    ckpt_dir = rd.show("checkpoints")
    if remote and parallel.is_main():
        reader = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
        dropped = storage.drop_uncommitted(ckpt_dir, reader.all_steps())
        if dropped:
            log(f"{ckpt_dir}: removed step(s) {', '.join(dropped)}, left uncommitted by a killed save")
    mngr = ocp.CheckpointManager(ckpt_dir, options=options)
    start = mngr.latest_step() or 0
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        log(f"resumed from {ckpt_dir} step {start}")
    meta = {"format": FORMAT, "settings": s.to_dict(), "model_config": cfg.to_dict(), "factors": stage_factors,
            "rope": s["rope"], "source": source, "version": __version__}
    pushed = set()

    def push(names=MIRRORED):
        """The mirror's files to the store (process 0; the row index once)."""
        if remote and parallel.is_main():
            metrics.flush()
            rd.push([n for n in names if n not in pushed])
            pushed.add("data")

    def save(done, state, rec, last):
        saved = mngr.save(done, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)), force=last)
        if saved:
            push()

    evaluate_fn = None
    if s["eval_every"]:
        evaluate_fn = trainer_lib.held_out(cfg, spec, _eval_windows(s, tok, log), mesh=mesh,
                                           loss_chunk=s["loss_chunk"], q_chunk=trainer.q_chunk)
    stop = {"signal": None}

    def on_signal(signum, frame):
        """SIGTERM or a first Ctrl-C: save at the end of this step and exit; a second Ctrl-C: now,
        leaving the files as they are (checkpoints are committed whole, metrics line by line)."""
        name = signal.Signals(signum).name
        # "\n" first: the progress bar's line may be half written (it ends in "\r", not "\n").
        if name == "SIGINT" and stop["signal"] is not None:
            log(f"\nSIGINT again: stopped at once; the same command resumes from the last checkpoint in "
                f"{ckpt_dir}")
            os._exit(130)  # not an exception: it could land inside a checkpoint's asynchronous save
        stop["signal"] = name
        if name == "SIGINT":
            log("\nSIGINT: saving at the end of this step (Ctrl-C again to stop at once)")

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics = _Metrics(run_dir, start)
    try:
        result = trainer.fit(state, trainer.batches(rows, start), start=start, hooks=[metrics, save],
                             should_stop=lambda: stop["signal"], evaluate_fn=evaluate_fn,
                             eval_every=s["eval_every"])
    except trainer_lib.NonFiniteLoss as e:
        raise TrainError(f"{e} (the last checkpoint, step {mngr.latest_step() or 0} in {ckpt_dir}, "
                         "is intact)") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        mngr.wait_until_finished()
        push()
        metrics.close()
    if result.stopped:
        log(f"{result.stopped}: saved step {result.step} in {ckpt_dir}; the same command resumes")
        mngr.close()
        return Trained({"stopped": result.stopped, "step": result.step})
    final = os.path.join(run_dir, "final")
    summary = {"steps": s["steps"], "final_loss": result.record["loss"] if result.record else None,
               "final": rd.show("final"), "checkpoints": mngr.all_steps()}
    host = jax.tree.map(parallel.fetch, result.params)
    # final/'s own RoPE is the stage's: a built-in method in its config, factors attached.
    final_cfg = dataclasses.replace(cfg, remat="none", **factors_lib.as_config(rope, base))
    if parallel.is_main():  # process 0 writes final/ and summary.json
        checkpoint.save(final, final_cfg, host, tokenizer_file=tok_path,
                        factors=stage_factors, source={"trained_by": "longrope-jax train", "run": where, **source},
                        overwrite=True)
        atomic.write_json(os.path.join(run_dir, "summary.json"), summary)
        push(["final", "summary.json"])  # the summary last: the run is complete when the store has it
    mngr.close()
    return Trained(summary, result.params, final_cfg, stage_factors)


def main(s: dict, log) -> int:
    """``longrope-jax train`` with resolved settings ``s``: starts the processes, trains, prints
    the summary (process 0)."""
    trained = run(s, mesh=parallel.from_settings(s), log=log)
    if parallel.is_main():
        print(json.dumps(trained.summary))
    return 0
