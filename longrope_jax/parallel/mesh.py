"""The device mesh: its four named axes, parsing ``--mesh``, validation, multi-host start-up.

Axes, outermost first: ``data`` (independent rows; the evaluator's K candidates), ``fsdp``
(rows, with the weights sharded over it), ``sequence`` (the tokens of a row; weights sharded
over it too) and ``tensor`` (attention heads and the MLP's width). An absent axis has size 1, so
every mesh has all four and code never asks whether an axis exists.

    mesh = build(parse("data=2,sequence=4"))       # 8 devices
    check(mesh, cfg=cfg, length=16384, batch=4)    # one-line ValueError naming the value
"""

from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

AXES = ("data", "fsdp", "sequence", "tensor")
# The axes a batch of rows is split over (the evaluator puts candidates on ``data`` and windows
# on ``fsdp``).
BATCH_AXES = ("data", "fsdp")


def parse(text: str | Mapping[str, int] | None, source: str = "--mesh") -> dict[str, int]:
    """``"data=2,sequence=-1"`` (or a mapping) -> ``{axis: size}`` over :data:`AXES`; ``-1`` takes
    the remaining devices (resolved by :func:`build`); absent axes are 1."""
    if text is None or text == "":
        return {a: 1 for a in AXES}
    items = dict(text) if isinstance(text, Mapping) else {}
    if not isinstance(text, Mapping):
        for part in str(text).split(","):
            name, eq, size = part.strip().partition("=")
            if not eq:
                raise ValueError(f"{source}: expected AXIS=SIZE items separated by commas (axes {', '.join(AXES)}), "
                                 f"got {part.strip()!r}")
            if name in items:
                raise ValueError(f"{source}: axis {name!r} given twice")
            try:
                items[name] = int(size)
            except ValueError:
                raise ValueError(f"{source}: {name}: expected an integer size (or -1), got {size!r}") from None
    out = {a: 1 for a in AXES}
    for name, size in items.items():
        if name not in AXES:
            raise ValueError(f"{source}: unknown axis {name!r}; expected one of {', '.join(AXES)}")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"{source}: {name}: expected a size >= 1 or -1, got {size!r}")
        out[name] = size
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError(f"{source}: at most one axis may be -1, got {describe(out)}")
    return out


def describe(shape: Mapping[str, int]) -> str:
    return ",".join(f"{a}={shape[a]}" for a in AXES if shape.get(a, 1) != 1) or "one device"


def resolve(shape: Mapping[str, int], n_devices: int, source: str = "--mesh") -> dict[str, int]:
    """``shape`` with its ``-1`` axis filled in; the sizes must multiply to ``n_devices``."""
    shape = dict(shape)
    known = math.prod(v for v in shape.values() if v != -1)
    free = [a for a, v in shape.items() if v == -1]
    if free:
        if n_devices % known:
            raise ValueError(f"{source}: {describe(shape)} leaves no whole size for {free[0]} on {n_devices} devices")
        shape[free[0]] = n_devices // known
    if math.prod(shape.values()) != n_devices:
        raise ValueError(f"{source}: axis sizes {describe(shape)} multiply to {math.prod(shape.values())}, "
                         f"expected the device count {n_devices}")
    return shape


def build(shape: str | Mapping[str, int] | None = None, devices=None, source: str = "--mesh"):
    """A ``jax.sharding.Mesh`` over ``devices`` (default all, every process) with :data:`AXES`.

    Devices are laid out by ``mesh_utils`` so inner axes (sequence, tensor) sit on neighbouring
    chips; on a multi-slice TPU the ``sequence`` and ``tensor`` axes must stay inside one slice.
    """
    import jax
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve(parse(shape, source), len(devices), source)
    dims = tuple(sizes[a] for a in AXES)
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})
    if n_slices > 1:  # data across slices (DCN); fsdp, sequence and tensor inside one slice (ICI)
        if sizes["data"] % n_slices:
            raise ValueError(f"{source}: {n_slices} slices need data divisible by {n_slices} (sequence and tensor "
                             f"stay inside one slice), got data={sizes['data']}")
        grid = mesh_utils.create_hybrid_device_mesh((sizes["data"] // n_slices,) + dims[1:], (n_slices, 1, 1, 1),
                                                    devices=devices)
        return Mesh(grid, AXES)
    try:
        grid = mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # a shape the topology helper cannot tile
        grid = np.asarray(devices).reshape(dims)
    return Mesh(grid, AXES)


def axis_sizes(mesh) -> dict[str, int]:
    """``{axis: size}`` of a mesh built by :func:`build`."""
    return {a: int(mesh.shape[a]) for a in AXES}


def check(mesh, *, cfg=None, length: int | None = None, batch: int | None = None, source: str = "--mesh") -> None:
    """One-line ``ValueError`` unless the mesh can run these shapes: ``length`` divisible by
    2 x sequence (the ring's zigzag halves), ``batch`` by data x fsdp, the query and kv heads by
    tensor."""
    s = axis_sizes(mesh)
    if length is not None and s["sequence"] > 1 and length % (2 * s["sequence"]):
        raise ValueError(f"{source}: sequence={s['sequence']} needs a length divisible by {2 * s['sequence']} "
                         f"(2 x sequence), got {length}")
    if batch is not None and batch % (s["data"] * s["fsdp"]):
        raise ValueError(f"{source}: data x fsdp = {s['data'] * s['fsdp']} must divide the batch, got {batch}")
    if cfg is not None:
        for name in ("num_attention_heads", "num_key_value_heads"):
            if getattr(cfg, name) % s["tensor"]:
                raise ValueError(f"{source}: tensor={s['tensor']} must divide {name}, which is {getattr(cfg, name)}")


_STARTED: dict = {}  # how this process's runtime was started (initialize runs it once)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Starts JAX's multi-process runtime where there is more than one process; once per process.

    Explicit (``--coordinator HOST:PORT --num-processes N --process-id I``, any platform; on CPU
    the collectives use gloo), or detected on a TPU pod slice (its workers' environment), where
    ``jax.distributed.initialize()`` finds everything itself. Does nothing on one host. Called
    again in the same process (a second job: a pipeline's next stage, a notebook's next cell) it
    does nothing, unless it names another runtime than the one started: a one-line error.
    """
    import jax

    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id: give all three or none")
    if all(given) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id: expected 0 <= id < {num_processes}, got {process_id}")
    asked = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if _STARTED or jax.distributed.is_initialized():  # started here before, or by the caller itself
        if _STARTED and all(given) and asked != _STARTED:
            raise ValueError(f"--coordinator: this process already joined {_STARTED['coordinator']} as process "
                             f"{_STARTED['process_id']} of {_STARTED['num_processes']}; got {coordinator} as "
                             f"{process_id} of {num_processes}")
        return
    if all(given):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        _keep_stdout_for_python()
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
        _STARTED.update(asked)
        return
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
        _STARTED.update(coordinator="the TPU pod's", num_processes=jax.process_count(),
                        process_id=jax.process_index())


def _keep_stdout_for_python() -> None:
    """Gloo's C++ logger writes connection lines to file descriptor 1; the commands' stdout is
    JSON lines. Descriptor 1 becomes stderr, and Python's ``sys.stdout`` keeps the real stdout."""
    import sys

    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)


def is_main() -> bool:
    """Whether this process writes stdout and files (process 0)."""
    import jax

    return jax.process_index() == 0


# The settings every command on a mesh takes (``ppl``, ``search``, ``train``; flags, config keys;
# their defaults: ``configs/common.py``).
SETTINGS = ("mesh", "coordinator", "num_processes", "process_id")
SETTINGS_KINDS = dict(mesh="str?", coordinator="str?", num_processes="int?", process_id="int0?")


def mesh_for(s) -> "object | None":
    """The mesh of resolved settings ``s`` (keys of :data:`SETTINGS`) in the running runtime:
    None on one process without ``mesh``; every device of every process over ``data`` when
    several processes run without one."""
    import jax

    if s.get("mesh") is None and jax.process_count() == 1:
        return None
    return build(s.get("mesh") or "data=-1")


def from_settings(s) -> "object | None":
    """Starts the processes (:func:`initialize`, once per process) and builds :func:`mesh_for`
    ``s``: what every command's ``main`` does first."""
    initialize(s.get("coordinator"), s.get("num_processes"), s.get("process_id"))
    return mesh_for(s)
