"""The device mesh, partition rules and sharded evaluation (8 virtual CPU devices, conftest.py).

References: the same computation on one device. ``ppl`` on a mesh equals one device within 1e-5
relative, and parameter gradients of the loss within 1e-5 x max|ref|, for a tiny LongRoPE
Mistral with a sliding window on both sides of its short/long switch.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longrope_jax import evaluate, parallel
from longrope_jax import rope as rope_lib
from longrope_jax.loss import mean_nll
from longrope_jax.model import init_params, rope_spec

from processes import free_port, two_processes
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ORIG = 32  # the original window: 64 tokens run on the long factors, 32 on the short ones
P = 4  # rotary pairs (head_dim 8)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.5, 4.0, 6.0],
            "original_max_position_embeddings": ORIG}


def _cfg(**kw):
    base = dict(architecture="mistral", sliding_window=12, max_position_embeddings=4 * ORIG,
                rope_parameters=dict(LONGROPE), tie_word_embeddings=False)
    base.update(kw)
    return tiny_config(**base)


def _params(cfg, seed=0):
    """Random params with q/k projections scaled up: peaked attention, so the RoPE factors (and the
    short/long switch) move the loss well beyond the tolerances."""
    params = init_params(cfg, seed)
    attn = params["layers"]["self_attn"]
    for name in ("q_proj", "k_proj"):
        attn[name]["kernel"] = attn[name]["kernel"] * 20.0
    return params


@pytest.fixture(scope="module")
def model():
    cfg = _cfg()
    return cfg, _params(cfg)


def _tokens(s, length, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (s, length)).astype(np.int32)


def _one_device():
    return parallel.build(None, jax.devices()[:1])


# --------------------------------------------------------------------------------------------
# The mesh and its validation


def test_parse_and_build():
    assert parallel.parse("data=2,sequence=-1") == {"data": 2, "fsdp": 1, "sequence": -1, "tensor": 1}
    mesh = parallel.build("data=2,sequence=-1")
    assert parallel.axis_sizes(mesh) == {"data": 2, "fsdp": 1, "sequence": 4, "tensor": 1}
    assert mesh.axis_names == parallel.AXES
    assert parallel.axis_sizes(parallel.build(None, jax.devices()[:1])) == dict.fromkeys(parallel.AXES, 1)
    assert parallel.axis_sizes(parallel.build({"fsdp": 2, "sequence": 4})) == {"data": 1, "fsdp": 2, "sequence": 4,
                                                                               "tensor": 1}


@pytest.mark.parametrize("text, match", [
    ("data=2,sequence=2", "multiply to 4, expected the device count 8"),
    ("data=3,sequence=-1", "leaves no whole size for sequence on 8 devices"),
    ("data=-1,sequence=-1", "at most one axis may be -1"),
    ("pipeline=8", "unknown axis 'pipeline'"),
    ("data=two", "data: expected an integer size"),
    ("data=0,sequence=8", "data: expected a size >= 1 or -1"),
    ("sequence", "expected AXIS=SIZE"),
    ("data=2,data=4", "axis 'data' given twice"),
])
def test_bad_mesh_is_one_line_error(text, match):
    with pytest.raises(ValueError, match=match) as e:
        parallel.build(text)
    assert str(e.value).startswith("--mesh: ") and "\n" not in str(e.value)


def test_shape_checks(model):
    cfg, _ = model
    mesh = parallel.build("data=2,sequence=4")
    parallel.check(mesh, cfg=cfg, length=64, batch=4)
    with pytest.raises(ValueError, match=r"--mesh: sequence=4 needs a length divisible by 8 \(2 x sequence\), got 36"):
        parallel.check(mesh, length=36)
    with pytest.raises(ValueError, match="--mesh: data x fsdp = 2 must divide the batch, got 3"):
        parallel.check(mesh, batch=3)
    with pytest.raises(ValueError, match="--mesh: tensor=8 must divide num_attention_heads, which is 4"):
        parallel.check(parallel.build("tensor=8"), cfg=cfg)
    with pytest.raises(ValueError, match="--mesh: tensor=4 must divide num_key_value_heads, which is 2"):
        parallel.check(parallel.build("tensor=4,data=2"), cfg=cfg)


# --------------------------------------------------------------------------------------------
# Partition rules


def test_rules_cover_every_parameter_and_shard_weights_over_fsdp_and_sequence(model):
    cfg, params = model
    mesh = parallel.build("fsdp=2,sequence=4")
    specs = {"/".join(k.key for k in path): s for path, s in
             jax.tree_util.tree_flatten_with_path(parallel.param_specs(params, mesh))[0]}
    w = ("fsdp", "sequence")
    assert specs["layers/self_attn/q_proj/kernel"] == jax.sharding.PartitionSpec(None, w, None)
    assert specs["layers/self_attn/o_proj/kernel"] == jax.sharding.PartitionSpec(None, None, w)
    assert specs["layers/mlp/down_proj/kernel"] == jax.sharding.PartitionSpec(None, None, w)
    assert specs["embed_tokens/embedding"] == jax.sharding.PartitionSpec(None, w)
    assert specs["lm_head/kernel"] == jax.sharding.PartitionSpec(w, None)
    assert specs["layers/input_layernorm/weight"] == jax.sharding.PartitionSpec()
    placed = parallel.put_params(params, mesh)
    q = placed["layers"]["self_attn"]["q_proj"]["kernel"]  # [2, 32, 32]: 8 pieces of 4 hidden rows
    assert {s.data.shape for s in q.addressable_shards} == {(2, 4, 32)}
    # An axis that does not divide a dimension leaves it whole (hidden 32 over tensor=... is fine;
    # vocab 256 over 8 is, but 12 is not).
    assert parallel.spec_for("lm_head/kernel", (12, 12), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="no rule for parameter 'layers/router/kernel'"):
        parallel.spec_for("layers/router/kernel", (2, 4, 4), mesh)


def test_tensor_axis_splits_heads(model):
    cfg, params = model
    mesh = parallel.build("tensor=2,data=4")
    spec = parallel.param_specs(params, mesh)["layers"]["self_attn"]["k_proj"]["kernel"]
    assert spec == jax.sharding.PartitionSpec(None, None, "tensor")


# --------------------------------------------------------------------------------------------
# Sharded evaluation against one device

MESHES = ["sequence=8", "fsdp=2,sequence=4", "data=2,sequence=4", "data=2,tensor=2,sequence=2"]


@pytest.mark.parametrize("mesh_text", MESHES)
@pytest.mark.parametrize("length", [ORIG, 2 * ORIG])  # the short factors, then the long ones
def test_score_on_a_mesh_equals_one_device(model, mesh_text, length):
    cfg, params = model
    tokens = _tokens(2, length)
    base = rope_spec(cfg)
    specs = rope_lib.stack([base, base.replace(long_factor=base.long_factor * 0.8)])  # K = 2
    kw = dict(attention="blockwise", q_chunk=8, loss_chunk=8)
    ref = evaluate.score(params, cfg, tokens, specs, mesh=_one_device(), **kw)
    got = evaluate.score(params, cfg, tokens, specs, mesh=parallel.build(mesh_text), **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    # The control: the long factors change the 64-token score, so the switch was exercised.
    if length > ORIG:
        short = evaluate.score(params, cfg, tokens, rope_lib.stack([rope_lib.fixed(rope_spec(cfg), "short")]),
                               mesh=_one_device(), **kw)
        assert np.abs(short[0] - ref[0]).max() > 1e-3


def test_k_candidates_on_data_and_sequence_equal_one_device(model):
    cfg, params = model
    tokens = _tokens(2, 2 * ORIG, seed=1)
    base = rope_spec(cfg)
    specs = rope_lib.stack([base.replace(long_factor=base.long_factor * f) for f in (0.7, 1.0, 1.3, 2.0)])
    kw = dict(attention="blockwise", q_chunk=16, loss_chunk=16)
    ref = evaluate.score(params, cfg, tokens, specs, mesh=_one_device(), **kw)
    got = evaluate.score(params, cfg, tokens, specs, mesh=parallel.build("data=2,sequence=4"), **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)
    assert np.ptp(ref[:, 0]) > 1e-3  # the candidates really differ


@pytest.mark.parametrize("mesh_text", ["sequence=8", "fsdp=2,sequence=4", "data=2,sequence=4"])
def test_loss_gradients_on_a_mesh_equal_one_device(model, mesh_text):
    cfg, params = model
    tokens = _tokens(4, 2 * ORIG, seed=2)
    spec = rope_spec(cfg)
    mesh = parallel.build(mesh_text)
    layout = parallel.Layout(mesh)

    def loss(p, t, layout):
        return jnp.mean(mean_nll(p, t, spec, cfg=cfg, q_chunk=8, loss_chunk=8, layout=layout))

    ref_loss, ref = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, jnp.asarray(tokens), None)
    placed = parallel.put_params(params, mesh)
    t = parallel.put(tokens, layout.sharding(layout.rows()))
    got_loss, got = jax.jit(jax.value_and_grad(loss), static_argnums=2)(placed, t, layout)
    assert abs(float(got_loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(ref)):
        scale = float(jnp.max(jnp.abs(r)))
        assert scale > 0
        err = float(jnp.max(jnp.abs(np.asarray(g) - np.asarray(r))))
        assert err <= 1e-5 * scale, f"{jax.tree_util.keystr(path)}: {err:.3g} (max |ref| {scale:.3g})"


# --------------------------------------------------------------------------------------------
# Two processes on localhost, 4 devices each


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import make_hf_dir

    root = tmp_path_factory.mktemp("multihost")
    d = make_hf_dir(str(root), **{k: v for k, v in _cfg().to_dict().items()
                                  if k in ("architecture", "sliding_window", "max_position_embeddings",
                                           "rope_parameters", "tie_word_embeddings")})
    data = root / "doc.txt"
    data.write_text("Pack my box with five dozen liquor jugs. " * 10)
    return d, str(data)


@pytest.mark.parametrize("attention", ["blockwise", "ring"])
def test_two_processes_ppl_equals_one_process(tiny_dir, attention):
    """``ppl`` over 2 processes x 4 devices on ``sequence=8`` (k/v all-gathered, or the ring)
    against one process on one device."""
    d, data = tiny_dir
    port = free_port()
    base = [sys.executable, "-m", "longrope_jax.cli", "ppl", "--model", d, "--data", data, "--length", str(ORIG),
            "--length", str(2 * ORIG), "--q-chunk", "8"]
    res = two_processes(lambda i: base + ["--attention", attention, "--mesh", "sequence=8", "--coordinator",
                                           f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
                         os.getcwd())
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    assert res[1][1] == ""  # process 1 writes nothing to stdout
    got = [json.loads(line) for line in res[0][1].splitlines()]
    one = subprocess.run(base + ["--attention", "blockwise"], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu",
                              "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert one.returncode == 0, one.stderr[-3000:]
    ref = [json.loads(line) for line in one.stdout.splitlines()]
    assert [r["length"] for r in got] == [ORIG, 2 * ORIG] and got[0]["mesh"] == "sequence=8"
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g["nll_per_window"], r["nll_per_window"], rtol=1e-5)


def test_two_jobs_in_one_process_start_the_runtime_once(tiny_dir, tmp_path):
    """A ``ppl`` then a ``train`` of 2 steps in the same Python process, over 2 processes x 4
    devices (what a pipeline does between its stages): each job's ``main`` asks for the runtime,
    which starts once; a third job asking for another runtime is a one-line error."""
    d, data = tiny_dir
    port, run = free_port(), tmp_path / "run"
    procs = ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    ppl = ["ppl", "--model", d, "--data", data, "--length", str(ORIG), "--mesh", "sequence=8", *procs]
    train = ["train", "--config", os.path.join(ROOT, "configs", "train", "tiny.py"), "--model", d, "--data", data,
             "--out", str(run), "--config.steps=2", "--config.seq_len=32", "--config.batch=2",
             "--config.loss_chunk=32", "--mesh", "data=2,sequence=4", *procs]
    other = ["ppl", "--model", d, "--data", data, "--length", str(ORIG), "--coordinator", "localhost:1",
             "--num-processes", "2"]
    script = ("import json, sys; from longrope_jax import cli; "
              "print('exit codes', [cli.main(job) for job in json.loads(sys.argv[1])], file=sys.stderr)")

    def argv(i):
        pid = ["--process-id", str(i)]
        return [sys.executable, "-c", script, json.dumps([ppl + pid, train + pid, other + pid])]

    res = two_processes(argv, ROOT, env={"PYTHONPATH": ROOT})
    for i, (rc, _, err) in enumerate(res):
        assert rc == 0 and err.strip().splitlines()[-1] == "exit codes [0, 0, 2]", err[-3000:]
        assert err.strip().splitlines()[-2] == (
            f"longrope-jax ppl: error: --coordinator: this process already joined localhost:{port} as process {i} "
            f"of 2; got localhost:1 as {i} of 2")
    out = [json.loads(line) for line in res[0][1].splitlines()]
    assert out[0]["length"] == ORIG and out[0]["mesh"] == "sequence=8"  # ppl's record
    assert out[1]["steps"] == 2 and out[1]["checkpoints"][-1] == 2  # train's summary
    with open(run / "metrics.jsonl") as fh:
        assert [json.loads(line)["step"] for line in fh] == [0, 1]


def test_two_processes_gradients_equal_one_process(tiny_dir, tmp_path):
    import multihost_worker as worker
    from longrope_jax import hf

    d, _ = tiny_dir
    port, out = free_port(), tmp_path / "grads.npz"
    worker_py = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
    res = two_processes(lambda i: [sys.executable, worker_py, str(port), str(i), d, str(out)], os.getcwd())
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    cfg, params = hf.load(d)
    loss, ref = jax.jit(jax.value_and_grad(worker.loss_fn(cfg, None)))(params, jnp.asarray(worker.tokens()))
    got = np.load(out)
    assert abs(float(got["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    flat = jax.tree_util.tree_flatten_with_path(ref)[0]
    assert len(flat) == len(got.files) - 1
    for path, r in flat:
        r = np.asarray(r)
        err = np.abs(got[jax.tree_util.keystr(path)] - r).max()
        assert err <= 1e-5 * np.abs(r).max(), f"{jax.tree_util.keystr(path)}: {err:.3g}"


# --------------------------------------------------------------------------------------------
# Compiling for a TPU topology here (libtpu; in a subprocess: the compile-only TPU devices need
# JAX_PLATFORMS=cpu and no virtual CPU devices)

TPU_SCRIPT = """
import json, sys
from longrope_jax import parallel
from longrope_jax.parallel import aot
from longrope_jax.train.aot import loss_report
from test_parallel import _cfg
cfg = _cfg(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
           max_position_embeddings=8192, rope_parameters={"rope_type": "default"}, dtype="bfloat16",
           param_dtype="bfloat16")
devices = aot.topology_devices("v5p:2x2x1")
out = {"kind": devices[0].device_kind}
for mesh in ("sequence=1", "sequence=4", "fsdp=2,sequence=2"):
    m = parallel.build(mesh, devices[:1] if mesh == "sequence=1" else devices)
    b = 2 if mesh.startswith("fsdp") else 1
    out[mesh] = {"forward": loss_report(cfg, m, length=1024, batch=b, block=512),
                 "grad": loss_report(cfg, m, length=1024, batch=b, block=512, grad=True)}
# The ring with splash kernels per step (no sliding window: splash's masks are static).
import dataclasses
m, splash = parallel.build("sequence=4", devices), dataclasses.replace(cfg, sliding_window=None)
out["ring_splash"] = {"forward": loss_report(splash, m, length=1024, block=512, attention="ring_splash"),
                      "grad": loss_report(splash, m, length=1024, block=512, grad=True, attention="ring_splash")}
two = aot.topology_devices("v5p:2x2x1", num_slices=2)  # 2 slices of 4 chips
out["slices"] = sorted({d.slice_index for d in two})
out["across_slices"] = parallel.axis_sizes(parallel.build("data=2,sequence=4", two))
try:
    parallel.build("sequence=8", two)
except ValueError as e:
    out["slice_error"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(not importlib.util.find_spec("libtpu"), reason="libtpu is not installed (the test extra has it)")
def test_sharded_forward_and_gradient_compile_for_a_tpu_topology():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    r = subprocess.run([sys.executable, "-c", TPU_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["kind"].startswith("TPU v5")
    one, seq4, mixed, splash = out["sequence=1"], out["sequence=4"], out["fsdp=2,sequence=2"], out["ring_splash"]
    for rep in (one, seq4, mixed, splash):
        for what in ("forward", "grad"):
            assert not rep[what]["over_hbm"] and rep[what]["temp_bytes"] > 0 and rep[what]["flops"] > 0
    # Weights over fsdp x sequence: each of 4 devices holds a quarter of the parameters (the
    # vocab-sized embedding and head divide; norms are small).
    assert seq4["forward"]["argument_bytes"] < 0.3 * one["forward"]["argument_bytes"]
    assert mixed["forward"]["argument_bytes"] < 0.3 * one["forward"]["argument_bytes"]
    # Tokens split over 4 devices: less temporary memory per device than one device's.
    assert seq4["grad"]["temp_bytes"] < one["grad"]["temp_bytes"]
    assert splash["grad"]["temp_bytes"] < one["grad"]["temp_bytes"]
    # Mosaic kernels in the splash ring (forward: full and causal per pair; backward adds the
    # fused dq/dk/dv ones), none in the XLA programs.
    assert splash["forward"]["kernels"] > 0 and splash["grad"]["kernels"] > splash["forward"]["kernels"]
    assert seq4["grad"]["kernels"] == 0
    # Two slices: data goes across them; a sequence axis may not.
    assert out["slices"] == [0, 1] and out["across_slices"]["data"] == 2
    assert out["slice_error"] == "--mesh: 2 slices need data divisible by 2 (sequence and tensor stay inside one " \
                                 "slice), got data=1"
