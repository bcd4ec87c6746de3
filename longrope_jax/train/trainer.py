"""The trainer: one fine-tuning stage over params in memory, with a RoPE spec fixed for the stage.

    trainer = Trainer(cfg, spec, settings, mesh=mesh)
    state = trainer.init_state(params)          # placed on the mesh; the caller's arrays are kept
    result = trainer.fit(state, trainer.batches(chunks, start=0), start=0, hooks=[...])
    params = result.params

or, params in and params out, :func:`train`. A pipeline stage calls it with the previous stage's
params; the ``train`` job (``jobs/train.py``) adds what touches paths around it: the chunk index
on disk, Orbax checkpoints and resumption, ``metrics.jsonl`` and TensorBoard, ``final/``.

``settings`` is a mapping with the step's ``seq_len``, ``batch`` (rows per step), ``accum``
(microbatches per step), ``steps``, ``seed`` (the data order), ``attention``, ``q_chunk``
(None: ``min(512, seq_len)``), ``loss_chunk`` and the optimizer's settings
(:func:`longrope_jax.train.step.optimizer`, :func:`~longrope_jax.train.step.schedule`).

Hooks see every step after its update: ``hook(done, state, record, last)`` with ``done`` the
steps completed, ``record`` the step's metrics (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``mfu`` on TPU, ``eval_ppl_L`` on evaluation steps) and ``last`` true on the
step the loop ends with (the final step, or a stop). A stop request (``should_stop``, e.g. a
signal handler's flag) is agreed by every process before the hooks run, so all processes save
the same step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from longrope_jax import evaluate, parallel
from longrope_jax import rope as rope_lib
from longrope_jax.attention import select
from longrope_jax.loss import mean_nll
from longrope_jax.train import data as data_lib
from longrope_jax.train import step as step_lib
from longrope_jax.train.flops import model_flops_per_token, peak_flops

Hook = Callable[[int, dict, dict, bool], None]


class TrainError(ValueError):
    """A run that cannot start or go on; names the file or setting."""


class NonFiniteLoss(TrainError):
    """A step whose loss is NaN or infinite: the loop stops before any hook sees that step."""

    def __init__(self, step: int, loss: float):
        super().__init__(f"step {step}: the loss is {loss}; stopping")
        self.step, self.loss = step, loss


@dataclasses.dataclass
class Result:
    state: dict  # {"step", "params", "opt_state"} after the last step run
    step: int  # steps completed
    stopped: str | None  # what stopped the loop early ("SIGTERM"), or None
    record: dict | None  # the last step's metrics (None when no step ran)

    @property
    def params(self):
        return self.state["params"]


def check(settings: Mapping[str, Any]) -> Mapping[str, Any]:
    """``settings`` unless the batch cannot be split as they say: a one-line :class:`TrainError`."""
    accum, short = settings["accum"], settings.get("short_microbatches") or 0
    if settings["batch"] % accum:
        raise TrainError(f"batch: expected a multiple of accum ({accum}), got {settings['batch']}")
    if not 0 <= short < accum:
        raise TrainError(f"short_microbatches: expected 0 to accum - 1 ({accum - 1}): every step keeps a long "
                         f"microbatch, got {short}")
    skip_to = settings.get("skip_to")
    if skip_to is not None and skip_to < settings["seq_len"]:
        raise TrainError(f"skip_to: expected at least seq_len ({settings['seq_len']}), got {skip_to}")
    return settings


@dataclasses.dataclass(frozen=True)
class Kind:
    """One kind of microbatch in a step: rows of ``length`` tokens trained under ``spec`` (fixed),
    ``microbatches`` of each step's ``accum``; ``seq_len``: the span the short/long choice sees
    (PoSE: the span the skipped positions cover); ``skip_to``/``skip_chunks``: positional skips."""

    spec: rope_lib.RopeSpec
    length: int
    microbatches: int
    seq_len: int | None = None
    skip_to: int | None = None
    skip_chunks: int = 2
    seed: int = 0  # the order of this kind's rows


class Trainer:
    """The jitted train step of one stage on ``mesh`` (None: one device) and its data layout.

    ``spec``: the stage's RopeSpec (no candidate axis), a constant of the compiled step. With
    ``settings["skip_to"]`` (positional skips: rows of ``seq_len`` tokens whose positions span
    ``skip_to``) the stage trains with ``spec``'s long set, fixed for that span, whatever the
    row's length. ``short``: ``(spec, length)`` of LongRoPE2's short microbatches
    (``settings["short_microbatches"]`` of each step's ``accum``: rows of the original window
    under the original RoPE); the others are the stage's long rows.
    """

    def __init__(self, cfg, spec: rope_lib.RopeSpec, settings: Mapping[str, Any], *, mesh=None,
                 short: tuple[rope_lib.RopeSpec, int] | None = None):
        s = check(settings)
        self.cfg, self.mesh = cfg, mesh
        self.seq_len, self.batch, self.accum = int(s["seq_len"]), int(s["batch"]), int(s["accum"])
        self.steps, self.seed = int(s["steps"]), int(s["seed"])
        n_short = int(s.get("short_microbatches") or 0)
        skip_to = s.get("skip_to")
        # Skipped rows: the long set, fixed for the span the positions cover, whatever the rows' length.
        self.kinds = {"long": Kind(spec=rope_lib.fixed(spec, "long") if skip_to else spec, length=self.seq_len,
                                   microbatches=self.accum - n_short, seq_len=skip_to, skip_to=skip_to,
                                   skip_chunks=int(s.get("skip_chunks") or 2), seed=self.seed)}
        if n_short:
            if short is None:
                raise TrainError("short_microbatches: mixed windows need the original RoPE and window (short=...)")
            self.kinds["short"] = Kind(spec=short[0], length=int(short[1]), microbatches=n_short,
                                       seed=_derived_seed(self.seed, 1))
        self.spec = self.kinds["long"].spec
        micro = self.batch // self.accum
        if mesh is not None:
            for kind in self.kinds.values():
                parallel.check(mesh, cfg=cfg, length=kind.length, batch=micro)
        # ``auto`` (select.pick for a train step: blockwise on one device, by memory on a sequence
        # axis); resolved once here, the job logs it.
        self.attention = attention = select.pick(s["attention"], self.seq_len, cfg=cfg, mesh=mesh, train=True)
        self.layout = select.layout_for(mesh, attention)
        loss_chunk = int(s["loss_chunk"])
        self.q_chunk = s.get("q_chunk") or min(512, self.seq_len)
        layout, q_chunk = self.layout, self.q_chunk

        def loss_of(kind: Kind):
            def loss_fn(p, rows):
                return jnp.mean(mean_nll(p, rows["tokens"], kind.spec, cfg=cfg, attention=attention, q_chunk=q_chunk,
                                         loss_chunk=loss_chunk, positions=rows.get("positions"),
                                         segment_ids=rows.get("segment_ids"), seq_len=kind.seq_len, layout=layout))
            return loss_fn

        losses = {k: loss_of(kind) for k, kind in self.kinds.items()}
        self.tx = step_lib.optimizer(s)
        self.train_step = jax.jit(step_lib.make_step(losses if n_short else losses["long"], self.tx,
                                                     step_lib.schedule(s)), donate_argnums=0)
        # A kind's rows of step t: [microbatches, micro, length]; this process reads only the micro
        # rows its devices hold, the same for every kind.
        self.micro = micro
        self.rows = None if layout is None else layout.sharding(P(None, *layout.rows()))
        self.mine = (np.arange(micro) if self.rows is None
                     else parallel.local_rows(self.rows, (self.accum, micro, self.seq_len), 1))
        # ... which are these positions of the kind's batch (microbatch a holds rows a*micro..).
        self.positions = {k: (np.arange(kind.microbatches)[:, None] * micro + self.mine).ravel()
                          for k, kind in self.kinds.items()}
        self.tokens_per_step = sum(kind.microbatches * micro * kind.length for kind in self.kinds.values())

    def init_state(self, params) -> dict:
        """The train state of ``params`` (host or device arrays) placed on the mesh by the
        partition rules. The state owns its buffers (the step donates them): device arrays of
        the caller's, which placement may alias, are copied, so ``params`` stay valid."""
        placed = (parallel.put_params(params, self.mesh) if self.layout is not None
                  else jax.tree.map(jnp.asarray, params))
        placed = jax.tree.map(lambda new, old: new.copy() if isinstance(old, jax.Array) else new, placed, params)
        state = step_lib.init_state(placed, self.tx)
        if self.layout is not None:  # the counters too: a restore places each leaf as the state has it
            whole = NamedSharding(self.mesh, P())
            state = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else parallel.put(x, whole),
                                 state)
        return state

    def batches(self, rows, start: int, stop: int | None = None) -> Iterator[dict]:
        """This process's rows of steps ``start..stop-1`` (default ``steps``), in the order fixed
        by ``(seed, step)`` (:mod:`longrope_jax.train.data`): from the stage's index (a
        :func:`~longrope_jax.train.data.chunk_index` array or a
        :func:`~longrope_jax.train.data.pack_index` mapping), or a mapping of such indexes by kind
        (``long``, ``short``). Each step: ``{kind: {name: int32[microbatches x len(mine), length]}}``
        (one kind: its mapping alone), skipped positions included."""
        pools = rows if isinstance(rows, Mapping) and set(rows) <= set(self.kinds) and "long" in rows else \
            {"long": rows}
        stop = self.steps if stop is None else stop
        its = {k: data_lib.batches(pools[k], batch=kind.microbatches * self.micro, seed=kind.seed, start=start,
                                   stop=stop, positions=self.positions[k], transform=self._skips(kind, k))
               for k, kind in self.kinds.items()}
        while True:
            try:
                step = {k: next(it) for k, it in its.items()}
            except StopIteration:
                return
            yield step if len(step) > 1 else step["long"]

    def _skips(self, kind: Kind, name: str):
        """The transform that gives a kind's rows their skipped positions (None: no skips)."""
        if kind.skip_to is None:
            return None
        where = self.positions[name]

        def skip(t, rows):
            base = rows.get("positions")
            if base is None:
                base = np.broadcast_to(np.arange(kind.length, dtype=np.int32), rows["tokens"].shape)
            return {**rows, "positions": data_lib.skip_positions(base, kind.skip_to, kind.skip_chunks, kind.seed, t,
                                                                 where)}

        return skip

    def place(self, local):
        """Global arrays ``[microbatches, micro, length]`` of one step from this process's rows
        (:meth:`batches`' form; a bare array: tokens)."""
        if not isinstance(local, Mapping):
            local = {"tokens": local}
        if set(local) <= set(self.kinds) and "long" in local:
            return {k: self._place(self.kinds[k], v) for k, v in local.items()}
        return self._place(self.kinds["long"], local)

    def _place(self, kind: Kind, local: Mapping[str, np.ndarray]) -> dict:
        shape = (kind.microbatches, self.micro, kind.length)
        out = {}
        for name, x in local.items():
            x = np.asarray(x).reshape(kind.microbatches, len(self.mine), kind.length)
            out[name] = jnp.asarray(x) if self.rows is None else parallel.put_rows(x, self.mine, self.rows, shape, 1)
        return out

    def fit(self, state: dict, batches: Iterator[np.ndarray], *, start: int = 0, stop: int | None = None,
            hooks: Sequence[Hook] = (), should_stop: Callable[[], str | None] | None = None,
            evaluate_fn: Callable[[Any], dict] | None = None, eval_every: int = 0,
            progress: bool = True) -> Result:
        """Runs steps ``start..stop-1`` (default ``steps``) from ``state`` over ``batches``
        (:meth:`batches`, or any iterator of this process's rows).

        ``evaluate_fn(params) -> {name: value}`` every ``eval_every`` steps, merged into the
        record (its time is not the step's). A non-finite loss raises :class:`NonFiniteLoss`
        before any hook sees the step. ``progress``: a tqdm bar on process 0's stderr.
        """
        from tqdm import tqdm

        stop = self.steps if stop is None else stop
        tokens_per_step = self.tokens_per_step
        per_token = model_flops_per_token(self.cfg, self.seq_len)
        peak = peak_flops(jax.devices()[0]) * (self.mesh.devices.size if self.mesh is not None else 1)
        bar = tqdm(total=stop, initial=start, desc="train", unit="step", disable=not (progress and parallel.is_main()))
        rec = None
        t_prev = time.perf_counter()
        try:
            for t in range(start, stop):
                state, m = self.train_step(state, self.place(next(batches)))
                loss = float(m["loss"])
                now = time.perf_counter()
                if not math.isfinite(loss):
                    raise NonFiniteLoss(t, loss)
                rate = tokens_per_step / (now - t_prev)
                t_prev = now
                rec = {"step": t, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "tokens_per_s": round(rate, 1), **{k: float(v) for k, v in m.items() if k.startswith("loss_")}}
                if peak:
                    rec["mfu"] = round(rate * per_token / peak, 4)
                if evaluate_fn is not None and eval_every and (t + 1) % eval_every == 0:
                    rec.update(evaluate_fn(state["params"]))
                    t_prev = time.perf_counter()  # the evaluation is not the next step's time
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
                # One read of the flag per step: a signal landing after it (even during the allgather)
                # stays for the next step instead of being overwritten or seen by one process only.
                stopping = agreed_stop(should_stop() if should_stop is not None else None)
                for hook in hooks:
                    hook(t + 1, state, rec, t + 1 == stop or stopping is not None)
                if stopping:
                    return Result(state, t + 1, stopping, rec)
        finally:
            bar.close()
        return Result(state, max(start, stop), None, rec)


def _derived_seed(seed: int, stream: int) -> int:
    """An independent seed for another stream of the same run (the short rows' order)."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def agreed_stop(signal_name: str | None) -> str | None:
    """``signal_name`` on every process when any process has received it (schedulers signal the
    hosts of a pod at different moments; all must save the same step). One process: its own."""
    if jax.process_count() == 1:
        return signal_name
    from jax.experimental import multihost_utils

    anyone = multihost_utils.process_allgather(np.int32(signal_name is not None)).any()
    return signal_name or ("SIGTERM" if anyone else None)


def held_out(cfg, spec: rope_lib.RopeSpec, windows: Mapping[int, np.ndarray], *, mesh=None, loss_chunk: int = 1024,
             q_chunk: int | None = None) -> Callable[[Any], dict]:
    """An ``evaluate_fn`` for :meth:`Trainer.fit`: ``{"eval_ppl_L": perplexity}`` of the params
    in memory under the stage's ``spec`` on held-out ``windows`` (``{L: int32[S, L]}``), through
    the candidate evaluator (attention chosen as ``ppl`` chooses it)."""
    specs = rope_lib.stack([spec])

    def run(params) -> dict:
        out = {}
        for length, tokens in windows.items():
            nll = evaluate.score(params, cfg, tokens, specs, mesh=mesh, q_chunk=q_chunk, loss_chunk=loss_chunk,
                                 attention=select.pick("auto", length, cfg=cfg, mesh=mesh))
            out[f"eval_ppl_{length}"] = float(np.exp(nll.mean()))
        return out

    return run


def train(params, cfg, spec: rope_lib.RopeSpec, settings: Mapping[str, Any], rows, *, mesh=None,
          short: tuple[rope_lib.RopeSpec, int] | None = None, hooks: Sequence[Hook] = (),
          should_stop: Callable[[], str | None] | None = None, evaluate_fn: Callable[[Any], dict] | None = None,
          eval_every: int = 0, progress: bool = True) -> Result:
    """``settings["steps"]`` steps from ``params`` on the stage's rows (:meth:`Trainer.batches`'
    index or indexes by kind): a fresh optimizer state, step 0's batch first. ``result.params``
    are the trained params (on the mesh); ``params`` are left as they were."""
    trainer = Trainer(cfg, spec, settings, mesh=mesh, short=short)
    return trainer.fit(trainer.init_state(params), trainer.batches(rows, 0), hooks=hooks, should_stop=should_stop,
                       evaluate_fn=evaluate_fn, eval_every=eval_every, progress=progress)
