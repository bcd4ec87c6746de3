"""The ``extend`` job: the progressive extension as one command. A pipeline config
(``configs/extend/``) names the base model, the data its stages share and its stages in order
(:mod:`longrope_jax.pipeline.stages`); each stage runs its command's job in ``RUN/NN-name/``
with the files that command writes, and the weights pass to the next stage in memory (a train
stage's ``final/`` is on disk too).

``RUN/pipeline.json`` records each finished stage: its kind, settings, inputs (the stages it read
and the digests of the files), outputs and a key that digests all of them. The same command after
a kill resumes: a finished stage whose key is unchanged is skipped (its weights read back from its
``final/``), an unfinished one resumes as its command does (a search from its log, a training stage
from its last checkpoint), so the pipeline ends where an uninterrupted one ends. A finished stage
whose settings or inputs changed is refused, naming the stage and the keys, unless ``--redo
STAGE`` discards it and the stages after it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Mapping

import jax

from longrope_jax import atomic, config_files, parallel, storage
from longrope_jax.config_files import ConfigError
from longrope_jax.loading import LoadedModel
from longrope_jax.pipeline import stages as stages_lib

FORMAT = "longrope-extend/1"
MANIFEST = "pipeline.json"
KINDS = dict(**parallel.SETTINGS_KINDS, model="str?", data="strs", heldout="strs", order="strs", stages="dict",
             shared="dict", out="str", redo="str?")


def resolve(config: str | None = None, overrides=(), flags=None):
    """The pipeline's settings (``configs/extend/``); its stages are checked when it is read
    (:func:`longrope_jax.pipeline.stages.read`), before any work."""
    s = config_files.resolve("extend", KINDS, config=config, overrides=overrides, flags=flags,
                             required=("order", "out"), listy=("data", "heldout"))
    stages_lib.read(s)
    return s


def _jsonable(x):
    return json.loads(json.dumps(x.to_dict() if hasattr(x, "to_dict") else x, default=str))


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


def stage_record(stage: stages_lib.Stage, keys: Mapping[str, str], base: str | None) -> dict:
    """What identifies a stage's result: its kind and settings, and its inputs' identities (the
    weights' stage key, the factors' stage key or file digest). ``keys``: earlier stages' keys."""
    factors = None
    if stage.factors_from is not None:
        factors = {"stage": stage.factors_from, "key": keys[stage.factors_from]}
    elif stage.factors is not None:
        factors = ({"file": os.path.abspath(stage.factors), "sha256": _file_digest(stage.factors)}
                   if os.path.isfile(stage.factors) else {"rope": stage.factors})
    weights = {"stage": "base", "model": base} if stage.weights == "base" else {"stage": stage.weights,
                                                                                  "key": keys[stage.weights]}
    settings = {k: v for k, v in _jsonable(stage.settings).items() if k not in parallel.SETTINGS}
    rec = {"kind": stage.kind, "settings": settings, "inputs": {"weights": weights, "factors": factors}}
    rec["key"] = _digest(rec)
    return rec


def _changed(old: Mapping, new: Mapping) -> list[str]:
    keys = [f"settings.{k}" for k in sorted(set(old["settings"]) | set(new["settings"]))
            if old["settings"].get(k) != new["settings"].get(k)]
    return keys + [f"inputs.{k}" for k in ("weights", "factors") if old["inputs"].get(k) != new["inputs"].get(k)]


def _mesh_check(mesh):
    """Every length a stage runs at against the mesh (one-line errors naming the stage's key)."""
    def check(where, kind, settings):
        lengths = {"train": lambda: {"seq_len": [settings["seq_len"]]},
                   "search": lambda: {"target_length": [settings["target_length"]]},
                   "readjust": lambda: {"target_length": [settings["target_length"]]},
                   "evaluate": lambda: {"lengths": list(settings["lengths"])},
                   "export": dict}[kind]()
        for key, values in lengths.items():
            for n in values:
                parallel.check(mesh, length=n, source=f"{where}.{key}")
        if kind == "train":  # each microbatch's rows split over data x fsdp
            parallel.check(mesh, batch=settings["batch"] // settings["accum"], source=f"{where}.batch")
    return check


class Pipeline:
    """One run of a pipeline config in ``run_dir``: its stages checked, its manifest read."""

    def __init__(self, s, run_dir: str, *, redo: str | None = None, mesh=None, log=print):
        self.s, self.mesh, self.log = s, mesh, log
        # On an object store: the manifest and the stages' small files in a local mirror, pushed
        # as each is written; train and search stages mirror their own directories (the same
        # places: a child URL's mirror is the child of the parent's), Orbax checkpoints on the store.
        self.rd = storage.RunDir(run_dir, [MANIFEST])
        self.run_dir = self.rd.local
        self.stages = stages_lib.read(s, None if mesh is None else _mesh_check(mesh))
        names = [st.name for st in self.stages]
        if redo is not None and redo not in names:
            raise ConfigError(f"--redo {redo}: not a stage (stages: {', '.join(names)})")
        path = os.path.join(self.run_dir, MANIFEST)
        manifest = None
        if parallel.is_main() and os.path.exists(path):
            with open(path) as fh:
                manifest = json.load(fh)
            if manifest.get("format") != FORMAT:
                raise ConfigError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
        self.manifest = parallel.broadcast(manifest) or {"format": FORMAT, "stages": {}}
        keys, self.records = {}, {}
        for st in self.stages:
            rec = stage_record(st, keys, s["model"])
            keys[st.name], self.records[st.name] = rec["key"], rec
        if redo is not None:
            self._discard(names[names.index(redo):])
        for st in self.stages:  # every finished stage still valid, before any work
            old = self.manifest["stages"].get(st.name)
            if old is not None and old["key"] != self.records[st.name]["key"]:
                changed = _changed(old, self.records[st.name])
                raise ConfigError(f"stages.{st.name}: finished with other settings or inputs "
                                  f"({', '.join(changed[:4]) or 'its key'}); give --redo {st.name} to discard it and "
                                  f"the stages after it")

    def _discard(self, names) -> None:
        for st in self.stages:
            if st.name in names:
                self.manifest["stages"].pop(st.name, None)
                d = os.path.join(self.run_dir, st.directory)
                if parallel.is_main() and os.path.exists(d):
                    shutil.rmtree(d)
                if parallel.is_main() and self.rd.remote:
                    storage.remove(self.rd.show(st.directory))
        self._save()

    def _save(self) -> None:
        if parallel.is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            atomic.write_json(os.path.join(self.run_dir, MANIFEST), self.manifest)
            self.rd.push([MANIFEST])

    def local(self, path: str | None) -> str | None:
        """A stage's output to read here (on a store: its copy on this machine)."""
        return path if path is None else storage.local(path, log=self.log)

    def publish(self, directory: str, names) -> None:
        """Files a stage wrote in its local ``directory`` to the store (process 0)."""
        if parallel.is_main() and self.rd.remote:
            storage.push(directory, self.rd.show(os.path.relpath(directory, self.run_dir)), list(names))

    def run(self, until: str | None = None) -> dict:
        """Runs (or skips) every stage in order, or those up to ``until`` (a notebook goes stage by
        stage: each call skips what is done); returns ``{stage: outputs}`` of the stages reached."""
        from longrope_jax.loading import model_from

        names = [st.name for st in self.stages]
        if until is not None and until not in names:
            raise ConfigError(f"until {until}: not a stage (stages: {', '.join(names)})")

        models: dict[str, LoadedModel | None] = {}
        outputs: dict[str, dict] = {}

        def weights(name: str):
            if name not in models:
                if name == "base":
                    models[name] = model_from(self.s["model"]) if self.s["model"] else None
                else:  # a finished train stage, read back from its final/ (named as when it was trained)
                    final = outputs[name]["final"]
                    models[name] = dataclasses.replace(model_from(self.local(final)), source=final)
            return models[name]

        for st in self.stages:
            done = self.manifest["stages"].get(st.name)
            directory = os.path.join(self.run_dir, st.directory)
            if done is not None:
                outputs[st.name] = done["outputs"]
                self.log(f"stage {st.directory} ({st.kind}): done, skipped")
                if st.name == until:
                    break
                continue
            t = time.time()
            self.log(f"stage {st.directory} ({st.kind}) ...")
            out, model = RUNNERS[st.kind](self, st, directory, weights(st.weights), outputs)
            if model is not None:
                models[st.name] = model
            outputs[st.name] = out
            self.manifest["stages"][st.name] = {**self.records[st.name], "outputs": out, "state": "done",
                                                "seconds": round(time.time() - t, 1)}
            self._save()
            self.log(f"stage {st.directory} ({st.kind}): done in {time.time() - t:.1f}s")
            if st.name == until:
                break
        return outputs


def _train(p: Pipeline, st: stages_lib.Stage, directory: str, model: LoadedModel | None, outputs):
    import ml_collections

    from longrope_jax.jobs import train as train_job
    from longrope_jax.tokenizer import Tokenizer

    s = ml_collections.ConfigDict(st.settings.to_dict())
    s.out = p.rd.show(st.directory)  # train mirrors a directory on a store into ``directory`` itself
    factors = stages_lib.factors_path(st, outputs)
    if st.factors_from is not None:
        if factors is None:
            raise ConfigError(f"stages.{st.name}.factors: stage {st.factors_from!r} wrote no factors file")
        s.rope = factors
    s.model = None if model is None else model.source
    trained = train_job.run(s, mesh=p.mesh, model=model, log=p.log)
    if "stopped" in trained.summary:
        raise KeyboardInterrupt  # the stage saved and stopped (a signal): so does the pipeline
    final = trained.summary["final"]
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    loaded = LoadedModel(trained.cfg, trained.params, tok, final, None, trained.factors)
    kept = factors and (storage.is_remote(factors) or os.path.isfile(factors))
    return {"final": final, "factors": factors if kept else None}, loaded


def _search(p: Pipeline, st: stages_lib.Stage, directory: str, model: LoadedModel | None, outputs):
    from longrope_jax.jobs import search as search_job

    job = {k: v for k, v in st.settings.items() if k not in parallel.SETTINGS}
    job.update(model=model if model is not None else job["model"], out=p.rd.show(st.directory), mesh=p.mesh,
               log=p.log)
    factors = stages_lib.factors_path(st, outputs)
    if st.kind == "readjust":
        job["readjust"] = factors
    elif st.factors is not None:
        if factors is None:
            raise ConfigError(f"stages.{st.name}.factors: no factors file to search on top of (progressive)")
        job["base_factors"] = factors
    line = search_job.run(**job)
    return {"factors": p.rd.show(st.directory, search_job.FACTORS_FILE), "ppl": line and line.get("ppl")}, None


def _evaluate(p: Pipeline, st: stages_lib.Stage, directory: str, model: LoadedModel | None, outputs):
    from longrope_jax.jobs import ppl as ppl_job

    s = st.settings
    factors = stages_lib.factors_path(st, outputs)
    ropes = ([factors] if factors else ["model"]) + list(s["ropes"])
    rows = list(ppl_job.run(model if model is not None else p.s["model"], list(p.s["heldout"]),
                            list(s["lengths"]), ropes, samples=s["samples"], seed=s["seed"], q_chunk=s["q_chunk"],
                            loss_chunk=s["loss_chunk"], needles=s["needles"], mesh=p.mesh, log=p.log))
    path = os.path.join(directory, "ppl.jsonl")
    if parallel.is_main():
        os.makedirs(directory, exist_ok=True)
        with atomic.file(path) as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
        from longrope_jax.plots import ppl_vs_length

        ppl_vs_length(rows, os.path.join(directory, "ppl_vs_length.png"))
        p.log(ppl_job.table(rows))
    p.publish(directory, ["ppl.jsonl", "ppl_vs_length.png"])
    out = {"ppl": p.rd.show(st.directory, "ppl.jsonl"),
           "results": {f"{r['rope']}@{r['length']}": r["ppl"] for r in rows}}
    if s["passkey_lengths"]:
        out["passkey"] = _passkey(p, s, directory, model, ropes)
    return out, None


def _passkey(p: Pipeline, s, directory: str, model: LoadedModel | None, ropes: list[str]) -> dict:
    """Passkey accuracy per rope and length; each rope's trials in ``passkey/NN/`` (resumable).
    Decoding runs whole on every process (on a host copy of the weights), process 0 writes."""
    from longrope_jax.jobs import passkey as passkey_job

    if model is not None and not all(x.is_fully_addressable for x in jax.tree.leaves(model.params)):
        model = dataclasses.replace(model, params=jax.tree.map(parallel.fetch, model.params))
    accuracy = {}
    for i, rope in enumerate(ropes):
        res = passkey_job.run(model if model is not None else p.s["model"], list(s["passkey_lengths"]),
                              s["passkey_trials"], rope, seed=s["seed"], log=p.log,
                              out_dir=os.path.join(directory, "passkey", f"{i:02d}") if parallel.is_main() else None)
        accuracy.update({f"{rope}@{n}": acc for n, acc in res["accuracy"].items()})
        p.publish(directory, ["passkey"])  # each rope's trials whole, once it is done
    return accuracy


def _export(p: Pipeline, st: stages_lib.Stage, directory: str, model: LoadedModel | None, outputs):
    from longrope_jax.jobs import convert

    if st.weights == "base":
        raise ConfigError(f"stages.{st.name}.weights: an export ships a fine-tuned model (an earlier train stage)")
    if parallel.is_main():
        convert.run(p.local(outputs[st.weights]["final"]), os.path.join(directory, "hf"),
                    factors=p.local(stages_lib.factors_path(st, outputs)), to="hf", overwrite=True,
                    allow_drop_start_tokens=st.settings["allow_drop_start_tokens"], log=p.log)
    p.publish(directory, ["hf"])
    return {"hf": p.rd.show(st.directory, "hf")}, None


RUNNERS = {"train": _train, "search": _search, "readjust": _search, "evaluate": _evaluate, "export": _export}


def run(s, *, mesh=None, log=print, until: str | None = None) -> dict:
    """Runs the pipeline ``s`` (:func:`resolve`) in ``s.out`` (up to stage ``until``); returns
    each stage's outputs."""
    return Pipeline(s, s["out"], redo=s["redo"], mesh=mesh, log=log).run(until)


def main(s, log) -> int:
    """``longrope-jax extend``: starts the processes, runs the pipeline, prints its outputs."""
    mesh = parallel.from_settings(s)
    outputs = run(s, mesh=mesh, log=log if parallel.is_main() else (lambda msg: None))
    if parallel.is_main():
        print(json.dumps({"out": storage.where(s["out"]), "stages": outputs}, default=str))
    return 0
