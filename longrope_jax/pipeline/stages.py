"""A pipeline config read into stages: kinds, what each stage reads from earlier ones, and each
stage's command settings checked by that command's rules, all before any work starts.

A stage reads weights (``base`` or an earlier ``train`` stage's) and, depending on its kind,
factors (an earlier ``search``/``readjust`` stage's result, the factors an earlier ``train`` stage
fine-tuned with, a factors file, or a ``--rope`` value). Errors are one line naming the dotted key
(``stages.ft8x.factors``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from longrope_jax.config_files import ConfigError
from longrope_jax.search import settings as search_settings
from longrope_jax.train import settings as train_settings

KINDS = ("train", "search", "readjust", "evaluate", "export")
# What each kind produces for later stages: weights (a model), factors (a factors file).
MAKES = {"train": ("weights", "factors"), "search": ("factors",), "readjust": ("factors",), "evaluate": (),
         "export": ()}
PIPELINE_KEYS = ("kind", "weights", "factors")
# The settings of an evaluate stage (the ppl command's, which it runs, and the passkey command's:
# ``passkey_trials`` at each of ``passkey_lengths``, none when empty) and of an export stage.
EVALUATE_KEYS = {"lengths": [], "ropes": [], "samples": 1, "seed": 0, "needles": 0, "q_chunk": None,
                 "loss_chunk": 1024, "passkey_lengths": [], "passkey_trials": 5}
EXPORT_KEYS = {"allow_drop_start_tokens": False}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    kind: str
    index: int
    weights: str  # "base" or a train stage's name
    factors: str | None  # a stage's name, a factors file, a --rope value, or None
    factors_from: str | None  # the stage ``factors`` names, when it names one
    settings: Any  # the command's settings (a locked ConfigDict), or a dict for evaluate/export

    @property
    def directory(self) -> str:
        """The stage's folder in the run: ``NN-name``."""
        return f"{self.index + 1:02d}-{self.name}"


def read(config, window_check=None) -> list[Stage]:
    """The stages of a resolved pipeline config, in ``order``, each checked.

    ``config``: ``model``, ``data``, ``heldout``, ``stages`` (name -> section), ``order`` and the
    mesh settings. Train and search sections get the pipeline's ``data`` and mesh unless they say
    otherwise; ``model``, ``out`` and ``rope`` are the pipeline's to fill.
    """
    order = list(config["order"])
    sections = config["stages"]
    if not order:
        raise ConfigError("order: expected the stages' names in the order they run, got none")
    unknown = sorted(set(order) - set(sections.keys()))
    if unknown:
        raise ConfigError(f"order: {unknown[0]!r} is not a stage (stages: {', '.join(sorted(sections.keys()))})")
    unlisted = sorted(set(sections.keys()) - set(order))
    if unlisted:
        raise ConfigError(f"stages.{unlisted[0]}: not in order (a stage runs only when order lists it)")
    if len(set(order)) != len(order):
        raise ConfigError("order: a stage is listed twice")
    shared = {"data": list(config["data"]), **{k: config[k] for k in ("mesh", "coordinator", "num_processes",
                                                                       "process_id")}}
    made: dict[str, tuple[str, ...]] = {"base": ("weights",)}
    last_weights = "base"
    out = []
    for i, name in enumerate(order):
        where = f"stages.{name}"
        section = sections[name]
        section = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        kind = section.pop("kind", None)
        if kind not in KINDS:
            raise ConfigError(f"{where}.kind: expected one of {list(KINDS)}, got {kind!r}")
        weights = section.pop("weights", None) or last_weights
        if made.get(weights) is None or "weights" not in made[weights]:
            raise ConfigError(f"{where}.weights: expected 'base' or an earlier train stage, got {weights!r}")
        if weights == "base" and not config["model"] and kind != "train":
            raise ConfigError(f"{where}.weights: the pipeline has no base model (model is unset: its first train "
                              f"stage trains one from model_config); name a train stage")
        factors = section.pop("factors", None)
        factors_from = None
        if factors is not None and factors in sections.keys():
            if factors not in made or "factors" not in made[factors]:
                raise ConfigError(f"{where}.factors: stage {factors!r} writes no factors before this stage "
                                  f"(it must be an earlier search, readjust or train stage)")
            factors_from = factors
        elif kind == "readjust" and factors is None:
            raise ConfigError(f"{where}.factors: a readjust stage needs the factors it works on (an earlier stage)")
        if kind == "train":
            model = (config["model"] or None) if weights == "base" else f"(stage {weights})"
            given = {**shared, **section, "out": "(the pipeline's)", "model": model}
            if factors is not None and factors_from is None:
                given["rope"] = factors
            settings = train_settings.section(given, where)
        elif kind in ("search", "readjust"):
            given = {**shared, **section, "out": "(the pipeline's)", "model": config["model"] or "(the pipeline's)"}
            if kind == "search" and factors is not None and factors_from is None:
                given["base_factors"] = factors
            settings = search_settings.section(given, where)
        else:
            allowed = EVALUATE_KEYS if kind == "evaluate" else EXPORT_KEYS
            bad = sorted(set(section) - set(allowed))
            if bad:
                raise ConfigError(f"{where}: unknown setting {bad[0]!r} for a {kind} stage (known: "
                                  f"{', '.join(sorted(allowed))})")
            settings = {**allowed, **section}
            if kind == "evaluate" and not settings["lengths"]:
                raise ConfigError(f"{where}.lengths: expected the lengths to score, got none")
        if window_check is not None:
            window_check(where, kind, settings)
        out.append(Stage(name, kind, i, weights, factors, factors_from, settings))
        made[name] = MAKES[kind]
        if kind == "train":
            last_weights = name
    return out


def factors_path(stage: Stage, outputs: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The factors file a stage reads: an earlier stage's output, or the file it names."""
    if stage.factors_from is not None:
        return outputs[stage.factors_from].get("factors")
    if stage.factors is not None and os.path.exists(stage.factors):
        return stage.factors
    return None
