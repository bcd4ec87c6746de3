"""``longrope-jax plan``: the real train step compiled for a TPU topology here (libtpu, no TPU).

A tiny config's report equals a direct compile of the same step (its state and batch built by
hand from the partition rules); a 7B-shaped stage (two layers, CI-sized) that does not fit a v5e
chip exits 1 with a change that fits, checked by compiling it; a mesh the topology cannot hold is
a one-line error naming the axes; the shipped models and meshes validate.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import pytest

from longrope_jax.parallel import aot

pytestmark = pytest.mark.skipif(not aot.available(), reason="libtpu is not installed")

TINY = ["--config.seq_len=256", "--config.attention=ring", "--config.batch=4", "--config.accum=2"]


def _plan(capsys, *argv):
    from longrope_jax import cli

    rc = cli.main(["plan", *argv])
    out, err = capsys.readouterr()
    lines = [x for x in out.splitlines() if x.startswith("{")]
    return rc, (json.loads(lines[-1]) if lines else None), err


def test_a_tiny_stage_reports_what_a_direct_compile_reports(capsys):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from longrope_jax import parallel
    from longrope_jax.jobs import train as train_job
    from longrope_jax.model import ModelConfig, init_params, rope_spec
    from longrope_jax.train import step as step_lib
    from longrope_jax.train.trainer import Trainer

    rc, got, err = _plan(capsys, "--config", "train/tiny", "--topology", "v5p:2x2x1", "--mesh", "fsdp=2,sequence=2",
                         *TINY)
    assert rc == 0, err[-2000:]
    assert got["chips"] == got["devices"] == 4 and got["mesh"] == "fsdp=2,sequence=2" and got["fits"]
    rep = got["stages"]["train"]
    # By hand: the settings, the step, its state laid out by the partition rules, the rows' layout.
    s = train_job.resolve("train/tiny", [*TINY, "--config.out=x"])
    cfg = ModelConfig(**s["model_config"].to_dict()).replace(remat=s["remat"])
    mesh = parallel.build("fsdp=2,sequence=2", aot.topology_devices("v5p:2x2x1"))
    trainer = Trainer(cfg, rope_spec(cfg), s, mesh=mesh)
    params = jax.eval_shape(lambda: init_params(cfg))
    shard = parallel.param_shardings(params, mesh)
    p = aot.abstract(params, shard)
    moments = aot.abstract(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params), shard)
    state = jax.eval_shape(lambda q: step_lib.init_state(q, trainer.tx), params)
    whole = NamedSharding(mesh, P())
    adam, rest = state["opt_state"][1][0], state["opt_state"]
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=whole), "params": p,
             "opt_state": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), rest)}
    state["opt_state"] = (state["opt_state"][0], (adam._replace(
        count=jax.ShapeDtypeStruct((), jnp.int32, sharding=whole), mu=moments, nu=moments),
        *state["opt_state"][1][1:]), *state["opt_state"][2:])
    rows = NamedSharding(mesh, P(None, ("data", "fsdp"), "sequence"))
    batch = {"tokens": jax.ShapeDtypeStruct((2, 2, 256), jnp.int32, sharding=rows)}
    m = trainer.train_step.lower(state, batch).compile().memory_analysis()
    assert (rep["compiled"]["argument_bytes"], rep["compiled"]["temp_bytes"], rep["compiled"]["alias_bytes"]) == (
        m.argument_size_in_bytes, m.temp_size_in_bytes, m.alias_size_in_bytes)
    assert rep["compiled"]["versions"]["libtpu"] and rep["compiled"]["alias_bytes"] > 0.9 * rep["compiled"][
        "argument_bytes"]  # the state is donated: the new one lives where the old one was
    for key in ("fits", "estimate", "estimate_over_compiled", "model_flops_per_step", "step_seconds_at_peak",
                "hbm_bytes"):
        assert key in rep


def test_a_stage_that_does_not_fit_exits_1_with_a_change_that_fits(capsys, tmp_path):
    """LLaMA-2-7B's shapes with 2 layers at 48k on a v5e-4 (16 GiB chips), every activation kept
    (no remat) and k/v all-gathered: over the chip; the suggestion is compiled and fits."""
    config = tmp_path / "stage.py"
    config.write_text(
        "from longrope_jax import hf\nfrom longrope_jax.configs.train import default\n"
        "from longrope_jax.configs.models import llama2_7b\n\n"
        "def get_config():\n    c = default.get_config()\n"
        "    fields = dict(llama2_7b.get_config().config_json, num_hidden_layers=2)\n"
        "    c.model_config = hf.config_from_hf(fields).to_dict()\n    return c\n")
    rc, got, err = _plan(capsys, "--config", str(config), "--topology", "v5e:2x2", "--mesh", "sequence=4",
                         "--config.seq_len=49152", "--config.batch=1", "--config.dtype=bfloat16",
                         "--config.param_dtype=bfloat16", "--config.remat=none", "--config.attention=blockwise")
    assert rc == 1, err[-2000:]
    rep = got["stages"]["train"]
    assert not rep["fits"] and not got["fits"]
    assert rep["suggestion"] is not None and rep["suggestion"]["peak_bytes"] <= 16 * 2**30, rep["suggestion"]
    assert "fits with" in err


def test_a_mesh_the_topology_cannot_hold_is_one_line(capsys):
    rc, got, err = _plan(capsys, "--config", "train/tiny", "--topology", "v5p:2x2x1", "--mesh", "fsdp=4,sequence=16",
                         *TINY)
    lines = [x for x in err.splitlines() if x.startswith("longrope-jax")]
    assert rc == 2 and got is None and len(lines) == 1 and "mesh" in lines[0] and "64" in lines[0], err[-2000:]


def test_the_shipped_models_and_meshes_validate():
    """Every configs/models shape reads as its family's config (the 7B ones at their published
    sizes), every configs/meshes slice's mesh holds its topology's chips, and the 7B pipelines
    name a mesh of a slice there whose rows divide their microbatches."""
    import math
    import pkgutil

    from longrope_jax import config_files, hf, parallel
    from longrope_jax.configs import meshes, models
    from longrope_jax.model import param_shapes

    sizes = {}
    for info in pkgutil.iter_modules(models.__path__):
        fields = dict(config_files.load(os.path.join(models.__path__[0], info.name + ".py")).config_json)
        cfg = hf.config_from_hf(fields, info.name)
        sizes[info.name] = sum(math.prod(s) for s in param_shapes(cfg).values()) / 1e9
    assert sizes.keys() >= {"llama2_7b", "mistral_7b", "llama3_8b", "phi3_mini_4k"}
    expected = {"llama2_7b": 6.74, "mistral_7b": 7.24, "llama3_8b": 8.03, "phi3_mini_4k": 3.82}  # published sizes
    for name, billions in expected.items():
        assert abs(sizes[name] - billions) < 0.01, (name, sizes[name])
    for name, (topology, mesh) in meshes.slices().items():  # a v4 chip is two devices (TensorCores)
        n = len(aot.topology_devices(topology))
        assert math.prod(parallel.mesh.resolve(parallel.mesh.parse(mesh), n).values()) == n, name
    for name in ("llama2_7b_2048k", "mistral_7b_256k"):
        c = config_files.load(name, "extend")
        assert meshes.topology_for(c.mesh) is not None
        axes = parallel.mesh.parse(c.mesh)
        rows = axes.get("data", 1) * axes.get("fsdp", 1)
        assert (c.shared.batch // c.shared.accum) % rows == 0, name


def test_an_extend_config_plans_its_training_and_search_stages(capsys):
    """The demo's pipeline at a 64-token window on v5p:2x2x1: a report per training stage (the
    train step) and per search stage (one evaluator call, the candidates split as the search
    splits them); evaluate and export stages are not planned."""
    from longrope_jax import config_files

    rc, got, err = _plan(capsys, "--config", "tiny", "--topology", "v5p:2x2x1", "--mesh", "sequence=4",
                         "--config.shared.window=64", "--config.shared.lengths=[64,512,1024]",
                         "--config.shared.population=6", "--no-suggest")
    assert rc == 0, err[-2000:]
    order = config_files.load("tiny", "extend").order
    kinds = dict(config_files.load("tiny", "extend").stages.items())
    assert list(got["stages"]) == [n for n in order if kinds[n]["kind"] in ("train", "search", "readjust")]
    search = got["stages"]["search16x"]
    assert search["target_length"] == 1024 and search["population"] == 6 and search["fits"]
    assert search["candidates_per_call"] * search["windows_per_call"] * search["calls_per_generation_0"] >= 6 * 2
    assert got["stages"]["ft_longrope"]["seq_len"] == 512 and got["stages"]["ft_longrope"]["fits"]


def test_one_gpu_is_planned_analytically_and_says_so(capsys):
    """Phi-3-mini at 128k does not fit one H200 (its AdamW state and activations alone); at 16k with
    4 microbatches of one row it does. Nothing is compiled: the JSON says the estimate is alone."""
    rc, got, err = _plan(capsys, "--config", "phi3_mini_128k", "--gpu", "h200")
    assert rc == 1 and got["analytic_only"] and not got["stages"]["ft128k"]["fits"]
    est = got["stages"]["ft128k"]["estimate"]
    assert est["state_bytes"] == 3 * 4 * 3_821_079_552  # fp32 parameters and two moments, unsharded
    rc, got, err = _plan(capsys, "--config", "phi3_mini_128k", "--gpu", "h200", "--config.shared.l1=16384",
                         "--config.shared.batch=4", "--config.shared.accum=4")
    assert rc == 0 and got["stages"]["ft128k"]["fits"]
