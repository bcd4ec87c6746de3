"""Meshes for the slices users have: each module names the slice's TPU topology (``TOPOLOGY``, what
``plan`` compiles for) and the mesh a pipeline stage runs on there (``MESH``)."""

import importlib
import pkgutil


def slices() -> dict[str, tuple[str, str]]:
    """Module name -> (TOPOLOGY, MESH) of every slice here."""
    out = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        out[info.name] = (module.TOPOLOGY, module.MESH)
    return out


def topology_for(mesh: str) -> str | None:
    """The topology of the one slice here whose mesh is ``mesh`` (None: none, or several)."""
    found = {topo for topo, m in slices().values() if m == mesh}
    return found.pop() if len(found) == 1 else None
