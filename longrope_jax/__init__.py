"""longrope-jax: LongRoPE context extension for LLaMA, Mistral and Phi-3 in JAX / Flax."""

__version__ = "0.1.0"


def _configs_from_the_source_tree() -> None:
    """Run from a source tree that is not installed (``python -m longrope_jax`` in a checkout, as
    the TPU launcher runs a shipped revision), the top-level ``configs/`` folder is this package's
    ``configs`` subpackage, as ``setup.py``'s ``package_dir`` makes it in an install."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    init = os.path.join(os.path.dirname(here), "configs", "__init__.py")
    name = f"{__name__}.configs"
    if os.path.isdir(os.path.join(here, "configs")) or not os.path.isfile(init) or name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


_configs_from_the_source_tree()
