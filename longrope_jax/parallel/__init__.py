"""Sequence parallelism: the device mesh and multi-process start-up (:mod:`.mesh`), partition
rules and placement (:mod:`.sharding`), process 0's objects on every process (:mod:`.broadcast`),
compiling for a TPU topology here (:mod:`.aot`).
Attention over a sharded layout lives with the other implementations
(:mod:`longrope_jax.attention.gather`)."""

from longrope_jax.parallel.broadcast import broadcast
from longrope_jax.parallel.mesh import (AXES, BATCH_AXES, SETTINGS, SETTINGS_KINDS, axis_sizes, build, check, describe,
                                        from_settings, initialize, is_main, mesh_for, parse)
from longrope_jax.parallel.sharding import (RULES, Layout, fetch, local_rows, param_shardings, param_specs, put,
                                            put_params, put_rows, spec_for)

__all__ = ["AXES", "BATCH_AXES", "Layout", "RULES", "SETTINGS", "SETTINGS_KINDS", "axis_sizes", "broadcast", "build",
           "check",
           "describe", "fetch", "from_settings", "initialize", "is_main", "local_rows", "mesh_for", "param_shardings",
           "param_specs", "parse", "put", "put_params", "put_rows", "spec_for"]
