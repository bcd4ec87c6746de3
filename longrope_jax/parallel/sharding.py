"""Partition rules over the parameters' HF-style names, placement of host arrays on a mesh, and
the :class:`Layout` a sharded computation runs under.

Weights are split over ``fsdp`` and ``sequence`` together (``WEIGHTS``), so a sequence axis does
not replicate them; the head dimension of q/k/v/o and the MLP's width over ``tensor``; norms
and biases of the hidden size are replicated. A dimension an axis does not divide stays whole on
that axis (a tiny model's 32-wide hidden on 64 devices), so every model places on every mesh.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from longrope_jax.parallel.mesh import BATCH_AXES

WEIGHTS = ("fsdp", "sequence")
# (regex over the '/'-joined param path, mesh axes per dimension). Layer params carry a leading
# layer axis (the model's ``nn.scan``), which is never sharded. First match wins.
RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens/embedding$", ("tensor", WEIGHTS)),  # [V, D]
    (r"lm_head/kernel$", (WEIGHTS, "tensor")),  # [D, V]
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", (None, WEIGHTS, "tensor")),  # [layers, D, heads*d]
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", (None, "tensor")),  # [layers, heads*d]
    (r"self_attn/o_proj/kernel$", (None, "tensor", WEIGHTS)),  # [layers, heads*d, D]
    (r"mlp/(gate_proj|up_proj)/kernel$", (None, WEIGHTS, "tensor")),  # [layers, D, F]
    (r"mlp/(gate_proj|up_proj)/bias$", (None, "tensor")),  # [layers, F]
    (r"mlp/down_proj/kernel$", (None, "tensor", WEIGHTS)),  # [layers, F, D]
    (r"(bias|weight)$", ()),  # norms, o/down biases: replicated
)


def _path(keys) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def _fit(axes, dim: int, mesh: Mesh):
    """The longest prefix of ``axes`` (one name or a tuple) whose sizes divide ``dim``."""
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for a in names:
        if dim % (math.prod(mesh.shape[n] for n in kept) * mesh.shape[a]):
            break
        kept.append(a)
    kept = [a for a in kept if mesh.shape[a] > 1] or None
    return kept if kept is None or len(kept) > 1 else kept[0]


def spec_for(path: str, shape, mesh: Mesh) -> P:
    """The ``PartitionSpec`` of one parameter; a name no rule matches is an error."""
    for pattern, axes in RULES:
        if re.search(pattern, path):
            if len(axes) > len(shape):
                raise ValueError(f"partition rule {pattern!r}: {path} has shape {tuple(shape)}, fewer than "
                                 f"{len(axes)} dimensions")
            return P(*(_fit(a, d, mesh) for a, d in zip(axes, shape)))
    raise ValueError(f"partition rules: no rule for parameter {path!r}")


def param_specs(params, mesh: Mesh):
    """A pytree of ``PartitionSpec`` matching ``params`` (arrays or ``ShapeDtypeStruct``)."""
    return jax.tree_util.tree_map_with_path(lambda k, x: spec_for(_path(k), x.shape, mesh), params)


def param_shardings(params, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh))


def put(x, sharding: NamedSharding):
    """A host array (the same on every process) or a global array as a global array with
    ``sharding``; each process supplies only its own devices' pieces, so this works across hosts."""
    if isinstance(x, jax.Array) and getattr(x, "sharding", None) == sharding:
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and jax.process_count() == 1:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # a global array: resharded on device
        return jax.jit(lambda a: a, out_shardings=sharding)(x)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def local_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Sorted indices along ``axis`` of a global array of ``shape`` that this process's devices
    hold under ``sharding``: the only rows a process needs to read."""
    rows = set()
    for index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.array(sorted(rows), np.int64)


def put_rows(local: np.ndarray, rows: np.ndarray, sharding: NamedSharding, shape: tuple[int, ...], axis: int):
    """A global array of ``shape`` from this process's part: ``local`` holds the global array's
    ``rows`` (:func:`local_rows`) along ``axis``, everything along the other axes."""
    def piece(index):
        at = np.searchsorted(rows, np.arange(*index[axis].indices(shape[axis])))
        return np.take(local, at, axis=axis)[tuple(slice(None) if i == axis else ix for i, ix in enumerate(index))]

    return jax.make_array_from_callback(shape, sharding, piece)


def put_params(params, mesh: Mesh):
    """``params`` placed by :data:`RULES` on ``mesh``."""
    return jax.tree.map(put, params, param_shardings(params, mesh))


def fetch(x) -> np.ndarray:
    """A global array as host numpy on every process (gathered where it spans other hosts)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a model call is laid out on a mesh: rows over ``batch_axes``, tokens over ``sequence``
    (in zigzag order with ``zigzag``).

    Hashable (a static jit argument). ``batch_axes`` is :data:`BATCH_AXES` for a batch of
    windows; the evaluator, whose candidates take ``data`` (``vmap(spmd_axis_name="data")``),
    puts its windows on ``("fsdp",)``.
    """

    mesh: Mesh
    batch_axes: tuple[str, ...] = BATCH_AXES
    zigzag: bool = False  # tokens in zigzag order over ``sequence`` (parallel.zigzag): the ring's balance

    @property
    def batch(self) -> Any:
        axes = tuple(a for a in self.batch_axes if self.mesh.shape[a] > 1)
        return axes or None

    def rows(self) -> P:
        """tokens, positions, segment ids: ``[B, L]``."""
        return P(self.batch, "sequence")

    def heads(self) -> P:
        """q, k, v, attention output: ``[B, L, heads, D]``."""
        return P(self.batch, "sequence", "tensor", None)

    def hidden(self) -> P:
        """The residual stream ``[B, L, D]``."""
        return P(self.batch, "sequence", None)

    def constrain(self, x):
        """The residual stream held to :meth:`hidden` (at every block boundary)."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.hidden()))

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)
