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
    """``settings`` unless the batch cannot be split: a one-line :class:`TrainError`."""
    if settings["batch"] % settings["accum"]:
        raise TrainError(f"batch: expected a multiple of accum ({settings['accum']}), got {settings['batch']}")
    return settings


class Trainer:
    """The jitted train step of one stage on ``mesh`` (None: one device) and its data layout.

    ``spec``: the stage's RopeSpec (no candidate axis), a constant of the compiled step.
    """

    def __init__(self, cfg, spec: rope_lib.RopeSpec, settings: Mapping[str, Any], *, mesh=None):
        s = check(settings)
        self.cfg, self.spec, self.mesh = cfg, spec, mesh
        self.seq_len, self.batch, self.accum = int(s["seq_len"]), int(s["batch"]), int(s["accum"])
        self.steps, self.seed = int(s["steps"]), int(s["seed"])
        micro = self.batch // self.accum
        if mesh is not None:
            parallel.check(mesh, cfg=cfg, length=self.seq_len, batch=micro)
        self.layout = select.layout_for(mesh, s["attention"])
        attention, loss_chunk = s["attention"], int(s["loss_chunk"])
        self.q_chunk = s.get("q_chunk") or min(512, self.seq_len)
        layout, q_chunk = self.layout, self.q_chunk

        def loss_fn(p, tokens):
            return jnp.mean(mean_nll(p, tokens, spec, cfg=cfg, attention=attention, q_chunk=q_chunk,
                                     loss_chunk=loss_chunk, layout=layout))

        self.tx = step_lib.optimizer(s)
        self.train_step = jax.jit(step_lib.make_step(loss_fn, self.tx, step_lib.schedule(s)), donate_argnums=0)
        # Step t's tokens [accum, micro, L]; this process reads only the micro rows its devices hold.
        self.shape = (self.accum, micro, self.seq_len)
        self.rows = None if layout is None else layout.sharding(P(None, *layout.rows()))
        self.mine = np.arange(micro) if self.rows is None else parallel.local_rows(self.rows, self.shape, 1)
        # ... which are these positions of the step's global batch (microbatch a holds rows a*micro..).
        self.positions = (np.arange(self.accum)[:, None] * micro + self.mine).ravel()

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

    def batches(self, chunks, start: int, stop: int | None = None) -> Iterator[np.ndarray]:
        """This process's rows of steps ``start..stop-1`` (default ``steps``) from the chunk index
        ``chunks: int32[N, seq_len]``: ``int32[accum x len(mine), seq_len]`` per step, in the
        order fixed by ``(seed, step)`` (:mod:`longrope_jax.train.data`)."""
        return data_lib.batches(chunks, batch=self.batch, seed=self.seed, start=start,
                                stop=self.steps if stop is None else stop, positions=self.positions)

    def place(self, local: np.ndarray):
        """``int32[accum, micro, L]`` global tokens of one step from this process's rows."""
        local = np.asarray(local).reshape(self.accum, len(self.mine), self.seq_len)
        if self.rows is None:
            return jnp.asarray(local)
        return parallel.put_rows(local, self.mine, self.rows, self.shape, 1)

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
        tokens_per_step = self.batch * self.seq_len
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
                       "tokens_per_s": round(rate, 1)}
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


def train(params, cfg, spec: rope_lib.RopeSpec, settings: Mapping[str, Any], chunks, *, mesh=None,
          hooks: Sequence[Hook] = (), should_stop: Callable[[], str | None] | None = None,
          evaluate_fn: Callable[[Any], dict] | None = None, eval_every: int = 0, progress: bool = True) -> Result:
    """``settings["steps"]`` steps from ``params`` on the chunk index ``chunks: int32[N, seq_len]``
    (:func:`longrope_jax.train.data.chunk_index`): a fresh optimizer state, step 0's batch first.
    ``result.params`` are the trained params (on the mesh); ``params`` are left as they were."""
    trainer = Trainer(cfg, spec, settings, mesh=mesh)
    return trainer.fit(trainer.init_state(params), trainer.batches(chunks, 0), hooks=hooks, should_stop=should_stop,
                       evaluate_fn=evaluate_fn, eval_every=eval_every, progress=progress)
