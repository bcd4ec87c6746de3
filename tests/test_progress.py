"""Progress from inside compiled calls: the model's per-layer host callback reaches the active
tracker while a call runs (lines with what is done and what is left), in the evaluator (one
candidate after another, or vmapped on a mesh), in generation's prompt encoding and in ``ppl``;
never in a program for a device that is not a CPU."""

from __future__ import annotations

import re
import types

import jax
import numpy as np
import pytest

from longrope_jax import evaluate, progress
from longrope_jax import rope as rope_lib
from longrope_jax.model import init_params, rope_spec

from tiny import tiny_config


@pytest.fixture
def every_layer(monkeypatch):
    """A line per callback, collected (the default waits 10 s between lines)."""
    lines = []
    monkeypatch.setattr(progress, "EVERY", 0.0)
    real = progress.Tracker.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self.write = lines.append

    monkeypatch.setattr(progress.Tracker, "__init__", init)
    return lines


def test_the_tracker_counts_calls_passes_and_layers():
    lines = []
    t = progress.Tracker(2, 3, 4, "work", every=0.0, write=lines.append)
    t.call_started(1)
    for layer in (0, 1, 2, 3, 0, 1):  # the second forward of call 2's three
        t.layer_done(layer)
    assert lines[-1].startswith("work: call 2/2, forward 2/3, layer 2/4 (75%), ")  # (1*3 + 1)*4 + 2 = 18 of 24
    assert re.search(r"\d+s so far, about \d+s left$", lines[-1])
    quiet = []
    t = progress.Tracker(1, 1, 4, "work", every=3600.0, write=quiet.append)
    for layer in range(4):
        t.layer_done(layer)
    assert quiet == []  # nothing before the work has run `every` seconds


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config(num_hidden_layers=3)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 32)).astype(np.int32)
    return cfg, init_params(cfg, 0), tokens


def test_a_scoring_call_reports_each_layer_from_inside(model, every_layer):
    cfg, params, tokens = model
    specs = rope_lib.stack([rope_spec(cfg), rope_lib.pi(cfg.rope_theta, cfg.rotary_dim, 2.0),
                            rope_lib.ntk(cfg.rope_theta, cfg.rotary_dim, 2.0)])
    one = jax.local_devices()[:1]  # one CPU device: the three candidates one after another in one call
    got = evaluate.score(params, cfg, tokens, specs, attention="dense", devices=one, sequential=True, label="three")
    assert [re.match(r"three: call 1/1, forward (\d)/3, layer (\d)/3 \((\d+)%\)", x).groups() for x in every_layer] \
        == [(str(f), str(layer), str(round(100 * ((f - 1) * 3 + layer) / 9))) for f in (1, 2, 3) for layer in (1, 2, 3)]
    every_layer.clear()
    ref = evaluate.score(params, cfg, tokens, specs, attention="dense", mesh=__import__(
        "longrope_jax.parallel", fromlist=["build"]).build("data=2,fsdp=2,sequence=2"), label="mesh")
    np.testing.assert_allclose(got, ref, rtol=1e-5)  # the callback changes nothing computed
    assert every_layer and every_layer[-1].startswith("mesh: call 1/1, layer 3/3 (100%)")  # vmapped: one pass


def test_prompt_encoding_reports_its_layers(model, every_layer):
    from longrope_jax.generate import greedy

    cfg, params, tokens = model
    greedy(params, cfg, tokens[0].tolist(), 2, rope_spec(cfg))
    assert [x.split(",")[1].strip() for x in every_layer] == ["layer 1/3 (33%)", "layer 2/3 (67%)",
                                                              "layer 3/3 (100%)"]
    assert every_layer[0].startswith("encoding 32 tokens: call 1/1")


def test_ppl_shows_progress_within_its_call(tmp_path, capsys, monkeypatch):
    """The ``ppl`` command: a line before the call, and lines from inside it."""
    from longrope_jax import cli

    from tiny import make_hf_dir

    monkeypatch.setattr(progress, "EVERY", 0.0)
    d = make_hf_dir(str(tmp_path), num_hidden_layers=3)
    doc = tmp_path / "doc.txt"
    doc.write_text("Sphinx of black quartz, judge my vow. " * 10)
    assert cli.main(["ppl", "--model", d, "--data", str(doc), "--length", "64", "--rope", "none",
                     "--rope", "pi:2"]) == 0
    err = capsys.readouterr().err.splitlines()
    start = err.index("length 64: scoring none, pi:2 on 1 window(s) ...")
    inside = [x for x in err if x.startswith("length 64: none, pi:2: call 1/1, ")]
    assert len(inside) >= 3 and err.index(inside[0]) > start and inside[-1].split(", ")[-3] == "layer 3/3 (100%)"


def test_no_callback_for_devices_that_are_not_cpus():
    cpu, tpu = types.SimpleNamespace(platform="cpu"), types.SimpleNamespace(platform="tpu")
    assert progress.enabled([cpu, cpu]) and not progress.enabled([tpu]) and not progress.enabled([cpu, tpu])


def test_a_thread_says_so_while_no_layer_reports(monkeypatch):
    """Compiling, or a layer longer than the interval: lines keep coming."""
    import time

    lines = []
    monkeypatch.setattr(progress, "EVERY", 0.05)
    with progress.tracking(2, 1, 4, "slow", write=lines.append) as t:
        time.sleep(0.3)
        assert lines and lines[0].startswith("slow: call 1/2: compiling or starting, ")
        t.layer_done(0)
        time.sleep(0.3)
    assert any(x.startswith("slow: call 1/2, layer 1/4 (12%), ") for x in lines)
