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
run's. SIGTERM saves and exits. A non-finite loss stops the run; the last checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time

from longrope_jax import atomic, parallel
from longrope_jax import factors as factors_lib

DEFAULTS = dict(
    model=None, model_config={}, init_seed=0, rope="model", data=["stdlib:"], field="text", tokenizer=None,
    seq_len=256, min_document_tokens=0, batch=8, accum=1, steps=100,
    lr=1e-3, warmup_steps=10, schedule="linear", end_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
    clip_norm=1.0, seed=0, dtype="float32", param_dtype="float32", remat="none", attention="blockwise",
    q_chunk=None, loss_chunk=1024, checkpoint_every=50, keep=3, eval_every=0, eval_data=None, eval_lengths=None,
    eval_samples=1, out=None, **parallel.SETTINGS)
KINDS = dict(
    **parallel.SETTINGS_KINDS, model="str?", model_config="dict", init_seed="int0", rope="str", data="strs",
    field="str", tokenizer="str?", seq_len="int", min_document_tokens="int0", batch="int", accum="int", steps="int",
    lr="number", warmup_steps="int0", schedule="linear|cosine|constant", end_lr_ratio="number0", b1="number0",
    b2="number0", eps="number", weight_decay="number0", clip_norm="number0", seed="int0",
    dtype="float32|bfloat16", param_dtype="float32|bfloat16", remat="none|full|dots|attention",
    attention="dense|blockwise|ring|ring_splash", q_chunk="int?", loss_chunk="int", checkpoint_every="int",
    keep="int", eval_every="int0", eval_data="strs?", eval_lengths="ints?", eval_samples="int", out="str")
REQUIRED = ("out",)
# Settings that may change when a run is resumed: its length, and where it runs (the batch of a
# step does not depend on the devices or processes).
RESUMABLE = ("steps", "out", *parallel.SETTINGS)
FORMAT = "longrope-train/1"


class TrainError(ValueError):
    """A run that cannot start or go on; names the file or setting."""


def resolve(config_path: str | None = None, overrides=(), flags=None) -> dict:
    from longrope_jax import config_files

    s = config_files.merge(DEFAULTS, KINDS, config_path=config_path, overrides=overrides, flags=flags,
                           required=REQUIRED, listy=("data", "eval_data", "eval_lengths"),
                           unset_if_falsy=("model", "tokenizer", "q_chunk", "mesh", "eval_data", "eval_lengths"))
    if s["eval_every"] and not (s["eval_data"] and s["eval_lengths"]):
        raise TrainError("eval_every: held-out perplexity needs eval_data and eval_lengths")
    if s["batch"] % s["accum"]:
        raise TrainError(f"batch: expected a multiple of accum ({s['accum']}), got {s['batch']}")
    if not s["model"] and not s["model_config"]:
        raise TrainError("model: expected a model path, or model_config for a model trained from scratch")
    return s


def _check_settings(path: str, settings: dict) -> None:
    """``settings.json`` of a run being resumed against this one's (``RESUMABLE`` keys aside);
    written by process 0 when the run is new."""
    fixed = {k: v for k, v in settings.items() if k not in RESUMABLE}
    if not os.path.exists(path):
        if parallel.is_main():
            atomic.write_json(path, {"format": FORMAT, "settings": fixed})
        return
    with open(path) as fh:
        old = json.load(fh).get("settings", {})
    old = json.loads(json.dumps(old))
    new = json.loads(json.dumps(fixed))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise TrainError(f"{path}: this run was started with other settings ({', '.join(diff)}: "
                         + "; ".join(f"{k} was {json.dumps(old.get(k))[:40]}, now {json.dumps(new.get(k))[:40]}"
                                     for k in diff[:3])
                         + "); only steps and the mesh may change on resume; use another --out")


def initial_model(s: dict, run: str, log):
    """The run's starting point: (cfg, params, tokenizer, tokenizer file, factors attached to the
    source, source record); writes ``RUN/tokenizer.json`` (process 0) when it is not there."""
    import jax

    from longrope_jax.loading import model_from
    from longrope_jax.model import ModelConfig, init_params
    from longrope_jax.tokenizer import Tokenizer

    tok_path = os.path.join(run, "tokenizer.json")
    if s["model"]:
        m = model_from(s["model"], param_dtype=s["param_dtype"], tokenizer=s["tokenizer"])
        tok = m.need_tokenizer()
        cfg, params, factors, source = m.cfg, m.params, m.factors, {"path": s["model"], "sha256": m.sha256}
    else:
        try:
            cfg = ModelConfig(**{**s["model_config"], "param_dtype": s["param_dtype"]})
        except TypeError as e:
            raise TrainError(f"model_config: {e}") from None
        tok = Tokenizer.from_file(s["tokenizer"]) if s["tokenizer"] else Tokenizer.byte_level()
        if tok.backend.get_vocab_size() > cfg.vocab_size:
            raise TrainError(f"model_config.vocab_size: expected at least the tokenizer's "
                             f"{tok.backend.get_vocab_size()}, got {cfg.vocab_size}")
        params, factors, source = init_params(cfg, s["init_seed"]), None, {"init_seed": s["init_seed"]}
        log(f"a model from scratch: {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params")
    if not os.path.exists(tok_path) and parallel.is_main():
        tmp = tok_path + ".tmp"
        tok.save(tmp)
        os.replace(tmp, tok_path)
    cfg = dataclasses.replace(cfg, dtype=s["dtype"], remat=s["remat"],
                              max_position_embeddings=max(cfg.max_position_embeddings, s["seq_len"]))
    return cfg, params, tok, tok_path, factors, source


def _special_ids(tok, cfg):
    """BOS and EOS ids for the paper's BOS + doc + EOS (the model's, else the tokenizer's <s>, </s>)."""
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, (list, tuple)) else cfg.eos_token_id
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else tok.token_id("<s>")
    return bos, eos if eos is not None else tok.token_id("</s>")


def _chunks(s: dict, run: str, tok, cfg, log):
    """The chunk index ``int32[N, seq_len]``, built once under ``RUN/data`` and memory-mapped.
    Every process builds it alike when the file is not there yet; process 0 writes it."""
    import numpy as np

    from longrope_jax.data import read_sources
    from longrope_jax.train.data import chunk_index

    path = os.path.join(run, "data", "chunks.npy")
    if not os.path.exists(path):
        t = time.time()
        docs = [d for _, ds in read_sources(s["data"], s["field"], log=log) for d in ds]
        bos, eos = _special_ids(tok, cfg)
        chunks = chunk_index((tok.encode_plain(d.text) for d in docs), s["seq_len"], bos=bos, eos=eos,
                             min_document_tokens=s["min_document_tokens"])
        if len(chunks) < s["batch"]:
            raise TrainError(f"data: {len(chunks)} chunks of {s['seq_len']} tokens from {len(docs)} documents, "
                             f"fewer than one batch ({s['batch']}); give more data or a shorter seq_len")
        log(f"data: {len(docs)} documents -> {len(chunks)} chunks of {s['seq_len']} tokens ({time.time() - t:.1f}s)")
        if not parallel.is_main():
            return chunks
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic.file(path, "wb") as fh:
            np.save(fh, chunks)
    return np.load(path, mmap_mode="r")


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

    def write(self, rec: dict) -> None:
        if self.on:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
            for k, v in rec.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.on:
            self.file.close()
            self.tb.close()


def model_flops_per_token(cfg, length: int) -> float:
    """Training FLOPs per token: 6 x the matmul parameters (projections, MLP, LM head) plus causal
    attention's QK^T and PV over half the row (3 x 4 L H d / 2 per layer)."""
    d, h, kv, hd, f, v = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    matmul = cfg.num_hidden_layers * (2 * d * h * hd + 2 * d * kv * hd + 3 * d * f) + v * d
    return 6.0 * matmul + 6.0 * cfg.num_hidden_layers * length * h * hd


def run(s: dict, log=print) -> dict:
    """Trains per settings ``s`` (:func:`resolve`); returns the summary (also ``RUN/summary.json``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    from longrope_jax import __version__, checkpoint, evaluate
    from longrope_jax.train import data as data_lib
    from longrope_jax.train import step as step_lib

    run_dir = os.path.abspath(s["out"])
    os.makedirs(run_dir, exist_ok=True)
    mesh = parallel.from_settings(s)
    _check_settings(os.path.join(run_dir, "settings.json"), s)
    if mesh is not None:
        parallel.check(mesh, length=s["seq_len"], batch=s["batch"] // s["accum"])
    cfg, params, tok, tok_path, model_factors, source = initial_model(s, run_dir, log)
    rope = factors_lib.parse_rope(s["rope"])
    spec = factors_lib.resolve_rope(rope, cfg, length=s["seq_len"], model_factors=model_factors)
    stage_factors = rope.factors if rope.kind == "file" else (model_factors if rope.kind == "model" else None)
    chunks = _chunks(s, run_dir, tok, cfg, log)

    layout = evaluate.layout_for(mesh, s["attention"])
    q_chunk = s["q_chunk"] or min(512, s["seq_len"])

    def loss_fn(p, tokens):
        return jnp.mean(evaluate.mean_nll(p, tokens, spec, cfg=cfg, attention=s["attention"], q_chunk=q_chunk,
                                          loss_chunk=s["loss_chunk"], layout=layout))

    tx = step_lib.optimizer(s)
    lr = step_lib.schedule(s)
    train_step = jax.jit(step_lib.make_step(loss_fn, tx, lr), donate_argnums=0)
    if layout is not None:
        params = parallel.put_params(params, mesh)
    state = step_lib.init_state(params, tx)
    if layout is not None:  # the counters too: a restore places each leaf as the state has it
        whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                             else parallel.put(x, whole), state)

    options = ocp.CheckpointManagerOptions(max_to_keep=s["keep"], save_interval_steps=s["checkpoint_every"],
                                           enable_async_checkpointing=True, create=True)
    mngr = ocp.CheckpointManager(os.path.join(run_dir, "checkpoints"), options=options)
    start = mngr.latest_step() or 0
    if start:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(start, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
        log(f"resumed from {run_dir}/checkpoints step {start}")
    meta = {"format": FORMAT, "settings": s, "model_config": cfg.to_dict(), "factors": stage_factors,
            "rope": s["rope"], "source": source, "version": __version__}

    def save(step, force=False):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                  force=force)

    evals = _eval_windows(s, tok, log) if s["eval_every"] else {}

    def held_out(params):
        """{"eval_ppl_L": perplexity} of the params in memory on the held-out windows (the stage's spec)."""
        from longrope_jax import rope as rope_lib

        out = {}
        for length, tokens in evals.items():
            nll = evaluate.score(params, cfg, tokens, rope_lib.stack([spec]), mesh=mesh, q_chunk=q_chunk,
                                 loss_chunk=s["loss_chunk"],
                                 attention=evaluate.pick_attention("auto", length, cfg=cfg, mesh=mesh))
            out[f"eval_ppl_{length}"] = float(np.exp(nll.mean()))
        return out

    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal="SIGTERM"))
    primary = parallel.is_main()  # process 0 writes the metrics, final/ and summary.json
    metrics = _Metrics(run_dir, start)
    a, micro = s["accum"], s["batch"] // s["accum"]
    per_token = model_flops_per_token(cfg, s["seq_len"])
    peak = _peak_flops(jax.devices()[0]) * (mesh.devices.size if mesh is not None else 1)
    tokens_per_step = s["batch"] * s["seq_len"]
    # Step t's tokens [accum, micro, L]; this process reads only the micro rows its devices hold.
    shape = (a, micro, s["seq_len"])
    rows = None if layout is None else layout.sharding(jax.sharding.PartitionSpec(None, *layout.rows()))
    mine = np.arange(micro) if rows is None else parallel.local_rows(rows, shape, 1)
    it = data_lib.batches(chunks, batch=s["batch"], seed=s["seed"], start=start, stop=s["steps"],
                          positions=(np.arange(a)[:, None] * micro + mine).ravel())
    bar = tqdm(total=s["steps"], initial=start, desc="train", unit="step", disable=not primary)
    last = {"loss": None}
    t_prev = time.perf_counter()
    try:
        for t in range(start, s["steps"]):
            local = next(it).reshape(a, len(mine), s["seq_len"])
            tokens = jnp.asarray(local) if rows is None else parallel.put_rows(local, mine, rows, shape, 1)
            state, m = train_step(state, tokens)
            loss = float(m["loss"])
            now = time.perf_counter()
            if not math.isfinite(loss):
                raise TrainError(f"step {t}: the loss is {loss}; stopping (the last checkpoint, step "
                                 f"{mngr.latest_step() or 0} in {run_dir}/checkpoints, is intact)")
            rate = tokens_per_step / (now - t_prev)
            t_prev = now
            rec = {"step": t, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                   "tokens_per_s": round(rate, 1)}
            if peak:
                rec["mfu"] = round(rate * per_token / peak, 4)
            if evals and (t + 1) % s["eval_every"] == 0:
                rec.update(held_out(state["params"]))
                t_prev = time.perf_counter()  # the evaluation is not the next step's time
            metrics.write(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
            last = rec
            # One read of the flag per step: a signal landing after it (even during the allgather)
            # stays in `stop` for the next step instead of being overwritten or seen by one process.
            stopping = _agreed_stop(stop["signal"])
            save(t + 1, force=t + 1 == s["steps"] or stopping is not None)
            if stopping:
                mngr.wait_until_finished()
                log(f"{stopping}: saved step {t + 1} in {run_dir}/checkpoints; the same command resumes")
                return {"stopped": stopping, "step": t + 1}
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        metrics.close()
        mngr.wait_until_finished()
    final = os.path.join(run_dir, "final")
    host = jax.tree.map(parallel.fetch, state["params"])
    summary = {"steps": s["steps"], "final_loss": last["loss"], "final": final, "checkpoints": mngr.all_steps()}
    if primary:
        checkpoint.save(final, dataclasses.replace(cfg, remat="none"), host, tokenizer_file=tok_path,
                        factors=stage_factors, source={"trained_by": "longrope-jax train", "run": run_dir, **source},
                        overwrite=True)
        atomic.write_json(os.path.join(run_dir, "summary.json"), summary)
    mngr.close()
    return summary


def _agreed_stop(signal_name: str | None) -> str | None:
    """"SIGTERM" on every process when any process has received it (schedulers signal the hosts
    of a pod at different moments; all must save the same step). One process: its own signal."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return signal_name
    anyone = multihost_utils.process_allgather(np.int32(signal_name is not None)).any()
    return signal_name or ("SIGTERM" if anyone else None)


def _peak_flops(device) -> float:
    """Peak bf16 FLOP/s of one TPU chip (``aot.PEAK_BF16_TFLOPS``); 0 elsewhere (no MFU then)."""
    from longrope_jax.parallel.aot import PEAK_BF16_TFLOPS

    kind = getattr(device, "device_kind", "").lower()
    for gen, tflops in PEAK_BF16_TFLOPS.items():
        if device.platform == "tpu" and gen in kind.replace(" ", ""):
            return tflops * 1e12
    return 0.0


def main(s: dict, log) -> int:
    summary = run(s, log)
    if parallel.is_main():
        print(json.dumps(summary))
    return 0
