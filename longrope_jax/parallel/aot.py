"""Ahead-of-time compilation: programs for a TPU topology on a machine without a TPU
(docs/parallel.md).

``libtpu`` (``pip install "jax[tpu]"`` at the pinned jax version) compiles TPU programs for
compile-only devices from ``get_topology_desc``; nothing runs. What the compiled program needs
per device (``memory_analysis()``) is how a launch is checked to fit before it takes a pod, and
how the benchmarks read TPU memory here. Run it with ``JAX_PLATFORMS=cpu`` (the devices are
described, not opened).

    devices = topology_devices("v5p:2x2x1")
    mesh = parallel.build("sequence=4", devices)
    report = compile_report(jax.jit(fn), *abstract_args)  # bytes per device, FLOPs, seconds

``longrope_jax.train.aot.loss_report`` compiles a model's loss (or its gradient) this way.
"""

from __future__ import annotations

import importlib.util
import re
import time

import jax

# On-chip memory of each generation (GiB per chip) and bf16 peak (TFLOP/s per chip).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
PEAK_BF16_TFLOPS = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}


def available() -> bool:
    """Whether ``libtpu`` is installed (TPU programs can be compiled here)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str, chips_per_host_bounds=(2, 2, 1), num_slices: int = 1) -> list:
    """The compile-only devices of a TPU topology such as ``v5p:2x2x1`` or ``v5e:4x4``."""
    if not available():
        raise ValueError(f"topology {name!r}: libtpu is not installed (pip install 'jax[tpu]=={jax.__version__}')")
    if not re.fullmatch(r"v(4|5e|5p|6e):\d+(x\d+)+", name):
        raise ValueError(f"topology: expected GENERATION:AxB[xC] with generation v4, v5e, v5p or v6e, got {name!r}")
    import os

    from jax.experimental import topologies

    # Compile-only devices need no exclusive hold on a chip: let libtpu load beside another
    # process that holds its lock file (a job started without JAX_PLATFORMS=cpu).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                             chips_per_host_bounds=chips_per_host_bounds,
                                             num_slices=num_slices).devices)


def abstract(tree, shardings):
    """``ShapeDtypeStruct`` leaves of ``tree`` (arrays or shape structs) with ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_report(jitted, *args) -> dict:
    """Lowers and compiles ``jitted`` for abstract ``args``; per-device bytes (argument, output,
    temporary, alias, and the peak estimate argument + output + temporary - alias), FLOPs,
    compile seconds and ``kernels``, the Pallas (Mosaic) custom calls in the compiled program.
    A program over the chip's memory is reported (``over_hbm``) with the
    temporary bytes the compiler asked for, not raised."""
    t = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what exceeds the chip's HBM
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        if "RESOURCE_EXHAUSTED" not in str(e) or not need:
            raise
        return {"over_hbm": True, "temp_bytes": int(float(need.group(1)) * 2**30),
                "compile_seconds": round(time.perf_counter() - t, 2)}
    seconds = time.perf_counter() - t
    m = compiled.memory_analysis()
    out = {"over_hbm": False, "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes),
           "compile_seconds": round(seconds, 2)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out["flops"] = float((cost or {}).get("flops", 0.0))  # a scanned body (layers, microbatches) counted once
    if (cost or {}).get("optimal_seconds") is not None:
        out["optimal_seconds"] = float(cost["optimal_seconds"])  # the compiler's estimate, same caveat
    try:  # the text of some programs with Mosaic kernels fails a RET_CHECK though they compiled
        out["kernels"] = compiled.as_text().count('custom_call_target="tpu_custom_call"')
    except Exception:  # noqa: BLE001 - a report without the count rather than none
        out["kernels"] = None
    out["versions"] = versions()
    return out


def versions() -> dict:
    """The jax and libtpu versions a compiled report came from."""
    from importlib import metadata

    def of(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"jax": jax.__version__, "jaxlib": of("jaxlib"), "libtpu": of("libtpu")}
