"""Progress from inside compiled calls: a heartbeat per model layer, reported as a line on stderr.

A forward over a long window is one jitted call that can run for minutes on a CPU. The model
calls :func:`layer_done` (through ``jax.debug.callback``) after each layer when it is given it as
its ``layer_hook``; whoever runs the calls opens a :func:`Tracker` saying how many calls and
passes make up the work, and the tracker prints what is done and an estimate of what is left,
at most every ``every`` seconds and only once the work has run that long (short calls print
nothing); while no layer reports (compiling, or a layer longer than ``every``), a thread says
so at the same pace. Only on CPU (a TPU program is not slowed by host callbacks); only process 0
writes.

    with progress.tracking(calls=3, passes=1, layers=30, label="length 16384: none, yarn:2"):
        for c in range(3):
            progress.call_started(c)
            run(...)                      # jitted with layer_hook=progress.layer_done
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import numpy as np

_ACTIVE: "Tracker | None" = None
_LOCK = threading.Lock()
EVERY = 10.0  # seconds between lines (and before the first)
ENABLED = True  # False: no callback in any program (benchmarks/progress_overhead.py measures both)


class Tracker:
    """``calls`` calls of ``passes`` forwards each (a call's candidates one after another) of
    ``layers`` layers."""

    def __init__(self, calls: int, passes: int, layers: int, label: str, every: float | None = None, write=None):
        self.calls, self.passes, self.layers, self.label = calls, passes, layers, label
        self.every = EVERY if every is None else every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = time.monotonic()
        self.call, self.pass_, self.layer = 0, 0, -1

    def call_started(self, index: int) -> None:
        self.call, self.pass_, self.layer = index, 0, -1

    def layer_done(self, layer: int) -> None:
        if self.passes > 1 and layer < self.layer:  # the next candidate of a sequential call
            self.pass_ = min(self.pass_ + 1, self.passes - 1)
        self.layer = max(self.layer, layer) if self.passes == 1 else layer
        self.report()

    def report(self) -> None:
        """A line, if none was written for ``every`` seconds: what is done and what is left, or,
        before a call's first layer, that it is compiling or starting."""
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        spent = now - self.start
        what = f"call {self.call + 1}/{self.calls}"
        if self.passes > 1:
            what += f", forward {self.pass_ + 1}/{self.passes}"
        if self.layer < 0:
            self.write(f"{self.label}: {what}: compiling or starting, {spent:.0f}s so far")
            return
        done = ((self.call * self.passes + self.pass_) * self.layers + self.layer + 1) / (
            self.calls * self.passes * self.layers)
        left = spent * (1 - done) / done
        self.write(f"{self.label}: {what}, layer {self.layer + 1}/{self.layers} ({100 * done:.0f}%), "
                   f"{spent:.0f}s so far, about {left:.0f}s left")


def layer_done(layer) -> None:
    """The model's per-layer heartbeat (a host callback): tells the active tracker, if any."""
    tracker = _ACTIVE
    if tracker is not None:
        with _LOCK:
            tracker.layer_done(int(np.asarray(layer)))


def call_started(index: int) -> None:
    if _ACTIVE is not None:
        _ACTIVE.call_started(index)


def enabled(devices) -> bool:
    """Whether calls on ``devices`` carry the heartbeat: CPU devices (every process alike, so
    all run one program; only process 0's tracker writes)."""
    devices = list(devices)
    return ENABLED and bool(devices) and all(d.platform == "cpu" for d in devices)


@contextlib.contextmanager
def tracking(calls: int, passes: int, layers: int, label: str, every: float | None = None, write=None):
    """Makes a :class:`Tracker` the active one for the calls inside (nested: the inner one)."""
    import jax

    global _ACTIVE
    if jax.process_index() != 0:
        write = lambda line: None  # noqa: E731  (one writer)
    tracker = Tracker(calls, passes, layers, label, every, write)
    stop = threading.Event()

    def heartbeat():  # lines while no layer reports: compiling, or one layer longer than `every`
        while not stop.wait(tracker.every):
            with _LOCK:
                tracker.report()

    beat = threading.Thread(target=heartbeat, daemon=True) if tracker.every > 0 else None
    previous, _ACTIVE = _ACTIVE, tracker
    if beat is not None:
        beat.start()
    try:
        yield tracker
    finally:
        stop.set()
        _ACTIVE = previous
