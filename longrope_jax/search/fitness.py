"""The search's fitness: perplexity of candidates on fixed windows through the candidate evaluator.

A candidate becomes a LongRoPE spec (``rope.longrope``): long factors = ``base_factors *
candidate factors`` (``base_factors`` is 1 unless a progressive search multiplies onto earlier
factors), short factors 1, start tokens = the candidate's ``n_hat``, ``original_max`` = the model's
window, ``max_position_embeddings`` = the target length and the default attention factor
``sqrt(1 + ln s / ln L_orig)``; exactly the spec ``factors.to_spec`` builds from the factors file
the search writes. A generation's candidates are stacked and scored by ``evaluate.score``, one per
device of the candidates' axis per call (see ``batch_size``). A candidate whose spec is exactly one already scored by name (a baseline:
``score_named``) takes that score instead of a forward pass, e.g. a progressive search's seed
lambda_2 = 1 is its baseline ``base``; its log record says ``same_as``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Sequence

import jax
import numpy as np

from longrope_jax import evaluate, factors as factors_lib, rope as rope_lib
from longrope_jax.attention import select
from longrope_jax.search.genome import Candidate, Space


def _per_candidate(nll: np.ndarray) -> list[dict]:
    out = []
    for row in np.asarray(nll, np.float64):
        mean = float(row.mean())
        ppl = math.exp(mean) if mean < 700 else math.inf
        out.append({"ppl": ppl, "nll": mean, "nll_per_window": row.tolist()})
    return out


SLOTS = ("long", "short", "per_length")


def base_document(cfg, *, original_max: int, length: int, attention_factor: float | None = None) -> dict:
    """The factors dict (``longrope-factors/1`` without provenance) a plain search fills in: long
    and short factors 1, start tokens 0, switching at ``original_max``, made for ``length``."""
    p = cfg.rotary_dim // 2
    return {"format": factors_lib.FORMAT, "rope_type": "longrope", "rope_theta": float(cfg.rope_theta),
            "rotary_dim": int(cfg.rotary_dim), "original_max_position_embeddings": int(original_max),
            "max_position_embeddings": int(length), "long_factor": [1.0] * p, "short_factor": [1.0] * p,
            "attention_factor": attention_factor, "start_tokens": 0, "critical_dim": None}


class PerplexityFitness:
    """``fitness(candidates) -> [{"ppl", "nll", "nll_per_window"}]`` on windows ``tokens: int32[S, L]``.

    A candidate is placed into a factors document (``template``) and scored with the spec
    ``factors.to_spec(document, L)`` builds, i.e. exactly what ``ppl --rope factors.json`` uses:

    - ``slot="long"``: the top-level long factors and start tokens (a plain or progressive search);
    - ``slot="short"``: the short factors (short-context readjust at or below the original window);
    - ``slot="per_length"``: a ``per_length[L]`` entry (readjust between the windows).

    ``batch_size``: candidates per call, one per device of the candidates' axis (1 on one
    device); the search passes at most that many, and calls are padded to it.

    Args:
      params, cfg: the model (weights are shared by every call; never reloaded).
      tokens: int32[S, L] the search windows (L = the target length).
      space: the search space (grid -> factor values).
      original_max: the model's original window (the switching threshold); sets up the default
        template when ``template`` is None.
      base_factors: float64[P] multiplied onto every candidate's factors (None: 1).
      attention_factor: the default template's (None: the LongRoPE default from the two lengths).
      template, slot: where candidates go (default: a plain search's document, slot ``long``).
      weights: float32[S, L - 1] per-prediction weights (needle-driven fitness), or None.
      memory_budget, attention, q_chunk, loss_chunk, mesh: passed to ``evaluate.score``
        (``attention`` ``auto`` picks as ``ppl`` does; ``mesh``: candidates over its ``data`` axis).
    """

    def __init__(self, params, cfg, tokens, space: Space, *, original_max: int, base_factors=None,
                 attention_factor: float | None = None, template: dict | None = None, slot: str = "long",
                 weights=None, memory_budget: int | None = None, attention: str = "auto",
                 q_chunk: int | None = None, loss_chunk: int = 1024, mesh=None):
        if mesh is not None and mesh.devices.size > 1:  # placed once, not by every score call
            from longrope_jax import parallel

            params = parallel.put_params(params, mesh)
        self.params, self.cfg, self.space, self.mesh = params, cfg, space, mesh
        self.tokens = np.asarray(tokens, np.int32)
        self.length = int(self.tokens.shape[1])
        p = cfg.rotary_dim // 2
        self.base = np.ones(p) if base_factors is None else np.asarray(base_factors, np.float64)
        if self.base.shape != (p,):
            raise ValueError(f"base_factors: expected {p} factors, got shape {self.base.shape}")
        if slot not in SLOTS:
            raise ValueError(f"slot: expected one of {SLOTS}, got {slot!r}")
        self.template = dict(template) if template is not None else base_document(
            cfg, original_max=original_max, length=self.length, attention_factor=attention_factor)
        self.slot = slot
        self.weights = None if weights is None else np.asarray(weights, np.float32)
        self.memory_budget = memory_budget
        self.attention = select.pick(attention, self.length, cfg=cfg, mesh=mesh, memory_budget=memory_budget,
                                     windows=self.tokens.shape[0])
        self.q_chunk = select.default_block(self.length, q_chunk)
        self.known: dict[tuple, tuple[str, dict]] = {}  # rope.value_key -> (name, score): see remember
        self.loss_chunk = loss_chunk
        # One candidate per device of the candidates' axis (the mesh's data axis; else the local
        # devices) in every call, padded: a candidate's score then never depends on which others
        # share its call (a resumed search ends exactly where an uninterrupted one does), and on
        # one CPU device the search logs (and reports) each candidate as it finishes.
        self.batch_size = (int(mesh.shape["data"]) if mesh is not None else 1 if evaluate.one_cpu()
                           else len(jax.local_devices()))
        self.channel = None  # process 0 of several: sends each call's specs first (search.run.leading)

    def long_factor(self, c: Candidate) -> np.ndarray:
        """The factors a candidate stands for: float64[P] (rounded as the file stores them)."""
        return np.round(self.base * self.space.factors(c), 10)

    def document(self, c: Candidate) -> dict:
        """The factors dict with ``c`` in its slot (no provenance)."""
        d = json.loads(json.dumps(self.template))
        f = self.long_factor(c).tolist()
        if self.slot == "long":
            d["long_factor"], d["start_tokens"] = f, int(c.start_tokens)
        elif self.slot == "short":
            d["short_factor"] = f
        else:
            per = {int(k): v for k, v in (d.get("per_length") or {}).items()}
            per[self.length] = {"long_factor": f, "start_tokens": int(c.start_tokens),
                                "attention_factor": d.get("attention_factor")}
            d["per_length"] = {k: per[k] for k in sorted(per)}
        if c.critical_dim is not None:
            d["critical_dim"] = int(c.critical_dim)
        if c.attention is not None:  # the gene (a plain or progressive search: slot long)
            d["attention_factor"] = self.space.attention_factor(c)
        return d

    def spec(self, c: Candidate) -> rope_lib.RopeSpec:
        return factors_lib.to_spec(self.document(c), self.length, "search candidate")

    def score_specs(self, specs: Sequence[rope_lib.RopeSpec]) -> np.ndarray:
        """NLL of specs sharing one static structure: float64[K, S], in calls of ``batch_size``
        (the last padded with copies of the last spec)."""
        specs = list(specs)
        if self.channel is not None:
            self.channel(specs)
        padded = specs + specs[-1:] * (-len(specs) % self.batch_size)
        return evaluate.score(self.params, self.cfg, self.tokens, rope_lib.stack(padded),
                              memory_budget=self.memory_budget, attention=self.attention, q_chunk=self.q_chunk,
                              loss_chunk=self.loss_chunk, weights=self.weights, mesh=self.mesh)[:len(specs)]

    def remember(self, name: str, spec: rope_lib.RopeSpec, record: dict) -> None:
        """Keeps ``record`` (a ``score_named`` result on these windows) for candidates whose spec
        is exactly ``spec``."""
        self.known.setdefault(rope_lib.value_key(spec), (name, record))

    def __call__(self, candidates: Sequence[Candidate]) -> list[dict]:
        specs = [self.spec(c) for c in candidates]
        hits = [self.known.get(rope_lib.value_key(sp)) for sp in specs]
        todo = [sp for sp, hit in zip(specs, hits) if hit is None]
        scored = iter(_per_candidate(self.score_specs(todo)) if todo else [])
        return [next(scored) if hit is None else {**hit[1], "same_as": hit[0]} for hit in hits]


def baseline_names(scale: float) -> list[str]:
    """The baselines' ``--rope`` names at ``scale``, in the order they are reported."""
    return ["none", f"pi:{scale:g}", f"ntk:{scale:g}", f"yarn:{scale:g}", f"dynamic:{scale:g}"]


def baseline_specs(cfg, scale: float, original_max: int) -> dict[str, rope_lib.RopeSpec]:
    """The baselines by their ``--rope`` names: none, PI, NTK, YaRN and dynamic NTK at ``scale``."""
    theta, rd = cfg.rope_theta, cfg.rotary_dim
    specs = [rope_lib.default(theta, rd), rope_lib.pi(theta, rd, scale), rope_lib.ntk(theta, rd, scale),
             rope_lib.yarn(theta, rd, scale, original_max), rope_lib.dynamic_ntk(theta, rd, scale, original_max)]
    return dict(zip(baseline_names(scale), specs))


def score_named(fitness: PerplexityFitness, specs: dict[str, rope_lib.RopeSpec], *, done: dict | None = None,
                on_scored=None) -> dict[str, dict]:
    """Scores named specs on the fitness's windows (and weights): ``{name: {"ppl", "nll",
    "nll_per_window"}}`` in the given order; specs of one static structure go through together
    (one at a time where ``fitness.batch_size`` is 1).

    ``done``: results already known (e.g. from a run cut short), not scored again.
    ``on_scored(name, record, seconds)``: called after each call, for each spec it scored.
    Every result (``done`` ones too) is remembered by the fitness, so a candidate with the same
    spec is not scored again (``PerplexityFitness.remember``).
    """
    out = dict(done or {})
    step = getattr(fitness, "batch_size", None)
    for names in rope_lib.stackable({n: sp for n, sp in specs.items() if n not in out}):
        for i in range(0, len(names), step or len(names)):
            part = names[i:i + (step or len(names))]
            t = time.monotonic()
            recs = _per_candidate(fitness.score_specs([specs[n] for n in part]))
            for name, rec in zip(part, recs):
                out[name] = rec
                if on_scored is not None:
                    on_scored(name, rec, (time.monotonic() - t) / len(part))
    if hasattr(fitness, "remember"):
        for name, sp in specs.items():
            fitness.remember(name, sp, out[name])
    return {name: out[name] for name in specs}
