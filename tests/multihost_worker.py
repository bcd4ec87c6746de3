"""One process of a multi-process run on localhost (``tests/test_parallel.py``), 4 CPU devices:

    python multihost_worker.py PORT PROCESS_ID MODEL_DIR OUT.npz

Joins the 2-process runtime, places the model on an ``fsdp=2,sequence=4`` mesh over both
processes' 8 devices, and writes (process 0) the loss and its parameter gradients of fixed
tokens, gathered from both processes.
"""

import os
import sys

if __name__ == "__main__":  # a process of its own; imported (by the test, for its loss) it changes nothing
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longrope_jax import hf, parallel  # noqa: E402
from longrope_jax.loss import mean_nll  # noqa: E402
from longrope_jax.model import rope_spec  # noqa: E402

TOKENS_SEED, ROWS, LENGTH = 5, 4, 64


def tokens() -> np.ndarray:
    return np.random.default_rng(TOKENS_SEED).integers(0, 256, (ROWS, LENGTH)).astype(np.int32)


def loss_fn(cfg, layout):
    spec = rope_spec(cfg)
    return lambda p, t: jnp.mean(mean_nll(p, t, spec, cfg=cfg, q_chunk=8, loss_chunk=8, layout=layout))


def main(port: str, process_id: str, model_dir: str, out: str) -> None:
    parallel.initialize(f"localhost:{port}", 2, int(process_id))
    assert jax.process_count() == 2 and len(jax.devices()) == 8 and len(jax.local_devices()) == 4
    cfg, params = hf.load(model_dir)
    mesh = parallel.build("fsdp=2,sequence=4")
    layout = parallel.Layout(mesh)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn(cfg, layout)))(
        parallel.put_params(params, mesh), parallel.put(tokens(), layout.sharding(layout.rows())))
    flat = {jax.tree_util.keystr(k): parallel.fetch(g) for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    if parallel.is_main():
        np.savez(out, loss=parallel.fetch(loss), **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
