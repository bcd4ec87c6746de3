"""Test setup: 8 virtual CPU devices (set before jax is imported) and float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-model tests (SmolLM2); run in CI")


@pytest.fixture(scope="session")
def extend_whole(tmp_path_factory):
    """The shrunk demo pipeline (``tests/pipelines.py``) run once, uninterrupted: the reference
    of the resumed, notebook and object-store runs. ``(run directory, printed outputs)``."""
    import json

    from pipelines import extend

    out = tmp_path_factory.mktemp("extend") / "whole"
    r = extend(out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads(r.stdout.splitlines()[-1])
