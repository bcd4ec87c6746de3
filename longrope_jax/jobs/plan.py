"""``longrope-jax plan``: whether each training and search stage of a train or extend config fits the
chips of a TPU topology, found by compiling the stage's real train step (a search stage: one
evaluator call, as the search splits its candidates) for that topology here, with no TPU
(``libtpu``; docs/parallel.md). Nothing runs and no weights are read: the model's shape comes from
its ``config.json`` fields (``configs/models/`` for the Hub ids the shipped pipelines name).

Per stage: the compiled per-device bytes (arguments, outputs, temporaries, aliased, peak) against
the chip's HBM, ``fits``, the analytic estimate beside it (``memory.train_step_bytes``), the model
FLOPs of a step and the step time and MFU they imply at the chip's peak rate (an estimate: the
compiler's own cost analysis counts a scanned layer once). A stage that does not fit is compiled
again with each change that could make it fit (full remat, the ring instead of k/v all-gathered,
half the rows per microbatch) and the first that fits is named; the command then exits 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from longrope_jax import config_files, memory
from longrope_jax.config_files import ConfigError

KINDS = dict(topology="str?", mesh="str?", stage="strs?", suggest="bool", gpu="h100|h200?")
# One GPU, analytically only (no GPU program compiles here): memory (GiB) and dense bf16 peak (TFLOP/s).
GPUS = {"h100": (80, 989), "h200": (141, 989)}


def resolve(config: str | None = None, overrides=(), flags=None) -> dict:
    """The plan's own settings (``configs/plan/default.py``, from flags) and the target's: ``config``
    names a train or an extend config, and ``--config.KEY=VALUE`` overrides go to it."""
    from longrope_jax.jobs import extend as extend_job
    from longrope_jax.jobs import train as train_job

    own = config_files.resolve("plan", KINDS, flags=flags, listy=("stage",)).to_dict()
    if (flags or {}).get("suggest") is False:  # --no-suggest (a False flag is "not given" to resolve)
        own["suggest"] = False
    if not config:
        raise ConfigError("missing --config: the train or extend config to plan (a built-in NAME or a PATH)")
    given = config_files.load(config, "extend")
    target = "extend" if "stages" in given else "train"
    job = extend_job if target == "extend" else train_job
    flags_out = {"out": "(plan)"}
    s = job.resolve(config, overrides, flags_out)
    return {**own, "target": target, "config": config, "settings": s}


def _model_config(model: str | None, model_config) -> Any:
    """A ``ModelConfig`` of the shape named: ``model_config`` fields, a Hub id of ``configs/models``,
    or a model here (its config only, where the format allows)."""
    from longrope_jax import checkpoint, hf
    from longrope_jax.configs import models
    from longrope_jax.loading import load_model, resolve_path
    from longrope_jax.model import ModelConfig

    if model_config:  # a model trained from scratch (an empty section: none)
        return ModelConfig(**model_config.to_dict())
    fields = models.config_json(model)
    if fields is not None:
        return hf.config_from_hf(fields, f"configs/models ({model})")
    path = resolve_path(model)
    if os.path.isdir(path) and os.path.exists(os.path.join(path, hf.CONFIG)):
        return hf.read_config(path)
    if checkpoint.is_checkpoint(path):
        return ModelConfig.from_dict(checkpoint.read_metadata(path)["config"])
    if os.path.exists(path):
        return load_model(model).cfg
    raise ConfigError(f"model {model!r}: not a model here and no configs/models file names it as its Hub id "
                      f"(add its config.json fields there)")


def _n_params(cfg) -> int:
    from longrope_jax.model import param_shapes

    return sum(math.prod(x) for x in param_shapes(cfg).values())


def _base(p: dict):
    """The model config every stage starts from: the config's model, else (a pipeline that
    trains its model from scratch) its first training stage's ``model_config``."""
    s = p["settings"]
    if s["model"] or p["target"] == "train":
        return _model_config(s["model"], s.get("model_config"))
    from longrope_jax.pipeline import stages as stages_lib

    for st in stages_lib.read(s):
        if st.kind == "train" and st.settings["model_config"]:
            return _model_config(None, st.settings["model_config"])
    raise ConfigError(f"{p['config']}: model: expected a model, or a training stage with model_config")


def _stages(p: dict) -> list[tuple[str, str, Any]]:
    """(name, kind, settings) of each training and search stage to plan."""
    from longrope_jax.pipeline import stages as stages_lib

    s = p["settings"]
    if p["target"] == "train":
        out = [("train", "train", s)]
    else:
        out = [(st.name, "train" if st.kind == "train" else "search", st.settings) for st in stages_lib.read(s)
               if st.kind in ("train", "search", "readjust")]
    if p["stage"]:
        unknown = sorted(set(p["stage"]) - {n for n, _, _ in out})
        if unknown:
            raise ConfigError(f"--stage {unknown[0]}: not a training or search stage of {p['config']} "
                              f"(those stages: {', '.join(n for n, _, _ in out)})")
        out = [x for x in out if x[0] in p["stage"]]
    return out


def _spec(stage: Any, base, span: int):
    """The stage's RoPE where it can be resolved here; else (factors a stage has yet to search) a
    LongRoPE spec of the same shape: the compiled step is the same program whatever the values."""
    from longrope_jax import factors as factors_lib
    from longrope_jax import rope as rope_lib

    try:
        return factors_lib.resolve_rope(factors_lib.parse_rope(stage["rope"]), base, length=span)
    except (factors_lib.FactorsError, rope_lib.RopeError, ValueError):
        scale = span / base.max_position_embeddings
        return rope_lib.longrope(base.rope_theta, base.rotary_dim, [max(scale, 1.0)] * (base.rotary_dim // 2),
                                 original_max=base.max_position_embeddings, max_position_embeddings=span)


def plan_stage(stage: Any, base, mesh, hbm_bytes: int, peak_flops: float) -> dict:
    """The compiled and analytic report of one training stage on ``mesh`` (compile-only devices)."""
    from longrope_jax.jobs import train as train_job
    from longrope_jax.model import rope_spec
    from longrope_jax.train import aot as train_aot
    from longrope_jax.train.flops import model_flops_per_token
    from longrope_jax.train.trainer import Trainer

    span = train_job.stage_span(stage)
    base = dataclasses.replace(base, param_dtype=stage["param_dtype"],
                               sliding_window=None if stage["no_sliding_window"] else base.sliding_window)
    cfg = train_job.stage_config(stage, base)
    short = (rope_spec(base), base.max_position_embeddings) if stage["short_microbatches"] else None
    trainer = Trainer(cfg, _spec(stage, base, span), stage, mesh=mesh, short=short)
    rep = train_aot.step_report(trainer)
    est = memory.train_step_bytes(cfg, _n_params(cfg), stage, mesh)
    devices = mesh.devices.size
    flops = sum(model_flops_per_token(cfg, k.length) * k.microbatches * trainer.micro * k.length
                for k in trainer.kinds.values())
    out = {"seq_len": stage["seq_len"], "batch": stage["batch"], "accum": stage["accum"], "remat": stage["remat"],
           "attention": stage["attention"], "dtype": stage["dtype"], "param_dtype": stage["param_dtype"],
           "compiled": rep, "estimate": est, "hbm_bytes": hbm_bytes}
    peak = rep.get("peak_bytes", rep.get("temp_bytes"))
    out["fits"] = (not rep["over_hbm"]) and peak <= hbm_bytes
    out["estimate_over_compiled"] = round(est["peak_bytes"] / peak, 3) if peak else None
    out["model_flops_per_step"] = flops
    if peak_flops:
        out["step_seconds_at_peak"] = flops / (devices * peak_flops)
        out["note"] = ("step_seconds_at_peak: the model FLOPs at the chips' peak bf16 rate, a lower bound "
                       "(MFU 100%); a run's MFU is this over its measured step time")
    return out


def plan_search(stage: Any, base, mesh, hbm_bytes: int) -> dict:
    """The compiled report of a search stage's evaluator call: the first generation's candidates
    (``population``) on its ``samples`` windows of ``target_length`` tokens, split into calls as
    the search splits them within its memory budget (default 80% of the chip), one call compiled."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from longrope_jax import evaluate, parallel
    from longrope_jax import rope as rope_lib
    from longrope_jax.attention import select
    from longrope_jax.model import init_params
    from longrope_jax.parallel.aot import abstract, compile_report

    algo = stage["settings"]  # the search's SearchSettings; the rest are the job's arguments
    length, k, s = stage["target_length"], algo.population, stage["samples"]
    cfg = dataclasses.replace(base, param_dtype=stage["param_dtype"],
                              sliding_window=base.sliding_window if stage["sliding_window"] else None)
    budget = stage["memory_budget"] or int(0.8 * hbm_bytes)
    attention = select.pick(stage["attention"], length, cfg=cfg, mesh=mesh, memory_budget=budget, windows=s)
    kc, sc, layout = evaluate.call_shape(cfg, k, s, length, mesh, budget=budget, attention=attention,
                                         q_chunk=stage["q_chunk"], loss_chunk=stage["loss_chunk"])
    params = jax.eval_shape(lambda: init_params(cfg, 0))
    one = _spec({"rope": "(searched)"}, cfg, length)
    specs = jax.eval_shape(lambda: rope_lib.stack([one] * kc))
    sharding = (lambda spec: None) if layout is None else layout.sharding
    nd = parallel.axis_sizes(mesh)["data"]
    args = (abstract(params, parallel.param_shardings(params, mesh)),
            jax.ShapeDtypeStruct((sc, length), jnp.int32, sharding=sharding(layout.rows()) if layout else None),
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(
                P("data" if nd > 1 else None))), specs))
    weights = None
    if algo.fitness == "needle":
        weights = jax.ShapeDtypeStruct((sc, length - 1), jnp.float32,
                                       sharding=sharding(P(layout.batch, None)) if layout else None)

    def call(p, tokens, sp, w):
        return evaluate.candidates_nll(p, tokens, sp, cfg=cfg, attention=attention, q_chunk=stage["q_chunk"],
                                       loss_chunk=stage["loss_chunk"], weights=w, layout=layout)

    rep = compile_report(jax.jit(call), *args, weights)
    peak = rep.get("peak_bytes", rep.get("temp_bytes"))
    calls = -(-k // kc) * -(-s // sc)
    return {"target_length": length, "population": k, "samples": s, "attention": attention,
            "candidates_per_call": kc, "windows_per_call": sc, "calls_per_generation_0": calls,
            "compiled": rep, "hbm_bytes": hbm_bytes, "fits": (not rep["over_hbm"]) and peak <= hbm_bytes}


# What may make a stage fit, in order: (applies to these settings, the change).
SUGGESTIONS = (
    (lambda st: st["remat"] != "full", lambda st: {"remat": "full"}),
    (lambda st: st["attention"] in ("blockwise", "auto"), lambda st: {"attention": "ring"}),
    (lambda st: (st["batch"] // st["accum"]) % 2 == 0, lambda st: {"accum": st["accum"] * 2}),  # half the rows
)


def suggest(stage, base, mesh, hbm_bytes, peak_flops, log) -> dict | None:
    """The first change (alone, then with the ones before it) that makes ``stage`` fit, checked by
    compiling it; None when none does."""
    from longrope_jax.train import settings as train_settings

    changes: dict = {}
    for applies, change in SUGGESTIONS:
        if not applies(stage):
            continue
        alone = change(stage)
        changes.update(alone)
        for attempt in [alone] + ([dict(changes)] if changes != alone else []):
            trial = train_settings.replaced(stage, attempt)
            log(f"  trying {', '.join(f'{k}={v}' for k, v in attempt.items())} ...")
            try:
                rep = plan_stage(trial, base, mesh, hbm_bytes, peak_flops)
            except ValueError as e:  # the mesh refuses the change (e.g. the rows no longer divide)
                log(f"  {e}")
                continue
            if rep["fits"]:
                return {"change": attempt, "peak_bytes": rep["compiled"].get("peak_bytes")}
    return None


def run_gpu(p: dict, log=print) -> dict:
    """The analytic estimate of each training stage on one GPU (``memory.train_step_bytes`` with
    every mesh axis 1): nothing is compiled, and the result says so."""
    import types

    from longrope_jax import parallel
    from longrope_jax.jobs import train as train_job
    from longrope_jax.train.flops import model_flops_per_token

    gib, tflops = GPUS[p["gpu"]]
    one = types.SimpleNamespace(shape={a: 1 for a in parallel.AXES}, axis_names=parallel.AXES)
    base = _base(p)
    result = {"config": p["config"], "gpu": p["gpu"], "memory_bytes": gib * 2**30, "analytic_only": True,
              "note": "no GPU program compiles here: the analytic estimate alone, unchecked by a compiler",
              "stages": {}}
    for name, kind, stage in _stages(p):
        if kind != "train":
            continue
        cfg = train_job.stage_config(stage, dataclasses.replace(base, param_dtype=stage["param_dtype"]))
        est = memory.train_step_bytes(cfg, _n_params(cfg), stage, one)
        flops = model_flops_per_token(cfg, stage["seq_len"]) * stage["batch"] * stage["seq_len"]
        result["stages"][name] = {"seq_len": stage["seq_len"], "estimate": est,
                                  "fits": est["peak_bytes"] <= gib * 2**30,
                                  "step_seconds_at_peak": flops / (tflops * 1e12)}
        log(f"stage {name}: estimate {est['peak_bytes'] / 2**30:.1f} GiB of {gib} on one {p['gpu']} "
            f"({'fits' if result['stages'][name]['fits'] else 'does not fit'}; analytic only)")
    result["fits"] = all(r["fits"] for r in result["stages"].values())
    return result


def run(p: dict, log=print) -> dict:
    from longrope_jax import parallel
    from longrope_jax.configs import meshes
    from longrope_jax.parallel import aot

    s = p["settings"]
    mesh_str = p["mesh"] or s["mesh"]
    topology = p["topology"] or (meshes.topology_for(mesh_str) if mesh_str else None)
    if topology is None:
        known = ", ".join(f"{n} ({t})" for n, (t, _) in sorted(meshes.slices().items()))
        raise ConfigError(f"--topology: expected a TPU topology such as v5p:4x4x4 (the config's mesh "
                          f"{mesh_str!r} names no single slice of configs/meshes: {known})")
    devices = aot.topology_devices(topology)
    mesh = parallel.build(mesh_str or "sequence=-1", devices, source="mesh")
    gen, dims = topology.split(":")
    chips = math.prod(int(x) for x in dims.split("x"))
    # Per device: a v4 chip shows as two devices (its TensorCores) to the compiler, with half its HBM each.
    hbm = aot.HBM_GIB[gen] * 2**30 * chips // len(devices)
    peak = aot.PEAK_BF16_TFLOPS[gen] * 1e12 * chips / len(devices)
    base = _base(p)
    result = {"config": p["config"], "topology": topology, "mesh": parallel.describe(parallel.axis_sizes(mesh)),
              "chips": chips, "devices": len(devices), "hbm_bytes_per_device": hbm, "model": s["model"], "stages": {}}
    for name, kind, stage in _stages(p):
        what = "train step" if kind == "train" else "evaluator call"
        log(f"stage {name}: compiling the {what} for {topology} ({parallel.describe(parallel.axis_sizes(mesh))}) ...")
        if kind == "search":
            rep = plan_search(stage, base, mesh, hbm)
            peak_b = rep["compiled"].get("peak_bytes", rep["compiled"]["temp_bytes"])
            log(f"stage {name}: {peak_b / 2**30:.2f} GiB per device of {hbm / 2**30:.0f} "
                f"({'fits' if rep['fits'] else 'does not fit'}); {rep['candidates_per_call']} candidate(s) x "
                f"{rep['windows_per_call']} window(s) a call, {rep['attention']}")
            result["stages"][name] = rep
            continue
        rep = plan_stage(stage, base, mesh, hbm, peak)
        peak_b = rep["compiled"].get("peak_bytes", rep["compiled"]["temp_bytes"])
        log(f"stage {name}: {peak_b / 2**30:.2f} GiB per chip of {hbm / 2**30:.0f} "
            f"({'fits' if rep['fits'] else 'does not fit'}); estimate {rep['estimate']['peak_bytes'] / 2**30:.2f} GiB")
        if not rep["fits"] and p["suggest"]:
            rep["suggestion"] = suggest(stage, base, mesh, hbm, peak, log)
            log(f"stage {name}: " + (f"fits with {rep['suggestion']['change']}" if rep["suggestion"]
                                     else "no single change tried makes it fit: more chips, or a shorter row"))
        result["stages"][name] = rep
    result["fits"] = all(r["fits"] for r in result["stages"].values())
    return result


def main(p: dict, log) -> int:
    """``longrope-jax plan``: one JSON object on stdout; exit 1 when a stage does not fit."""
    result = run_gpu(p, log) if p["gpu"] else run(p, log)
    print(json.dumps(result, default=str), flush=True)
    return 0 if result["fits"] else 1
