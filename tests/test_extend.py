"""The progressive extension as one command (``extend``) on the demo's pipeline shrunk by overrides:
every stage kind runs and the weights pass between stages; a SIGKILL in a training stage and one in
a search stage each resume to the uninterrupted pipeline's results; finished stages are skipped,
changed ones refused unless redone; bad pipelines are one-line errors before any work."""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from longrope_jax import config_files

from pipelines import ROOT, SHRINK, extend as _extend, extend_argv as _extend_argv, results as _results


@pytest.fixture(scope="module")
def whole(extend_whole):
    return extend_whole


def test_every_stage_kind_runs_and_the_export_loads_in_transformers(whole):
    out, printed = whole
    with open(out / "pipeline.json") as fh:
        manifest = json.load(fh)
    order = config_files.load("tiny", "extend").order
    assert list(manifest["stages"]) == list(order) and all(s["state"] == "done" for s in manifest["stages"].values())
    assert sorted(printed["stages"]) == sorted(order)
    # The fine-tuned LongRoPE arm trained with the searched factors; the secondary search ran on its
    # weights on top of them (progressive); the readjust amended that file's short factors.
    ft = json.load(open(out / "03-ft_longrope" / "settings.json"))["settings"]
    assert ft["rope"] == str(out / "02-search8x" / "factors.json") and ft["seq_len"] == 512
    sec = json.load(open(out / "06-search16x" / "factors.json"))
    assert sec["max_position_embeddings"] == 1024 and sec["provenance"]["search"]["base_factors_file"] == str(
        out / "02-search8x" / "factors.json")
    readjusted = json.load(open(out / "07-readjust" / "factors.json"))
    assert readjusted["long_factor"] == sec["long_factor"] and readjusted["max_position_embeddings"] == 1024
    # The export: transformers loads it and gives this project's logits (short factors at 64 tokens).
    transformers = pytest.importorskip("transformers")
    import torch

    from longrope_jax import factors as factors_lib
    from longrope_jax.loading import load_model
    from longrope_jax.model import Transformer

    ref = transformers.AutoModelForCausalLM.from_pretrained(out / "12-export" / "hf").eval()
    m = load_model(str(out / "03-ft_longrope" / "final"))
    tokens = np.random.default_rng(0).integers(0, m.cfg.vocab_size, (1, 64))
    spec = factors_lib.to_spec(readjusted, 64)
    got = np.asarray(Transformer(m.cfg).apply({"params": m.params}, tokens, rope=spec, seq_len=64))
    with torch.no_grad():
        want = ref(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("stage, marker, count", [("03-ft_longrope", "metrics.jsonl", 2),
                                                   ("06-search16x", "log.jsonl", 3)], ids=["train", "search"])
def test_a_killed_pipeline_resumes_to_the_uninterrupted_results(tmp_path, whole, stage, marker, count):
    ref, _ = whole
    out = tmp_path / "cut"
    p = _extend(out, wait=False)
    path, deadline = out / stage / marker, time.time() + 600
    while not (path.exists() and len(path.read_text().splitlines()) >= count):
        assert time.time() < deadline and p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=120)
    with open(out / "pipeline.json") as fh:
        assert stage[3:] not in json.load(fh)["stages"]  # killed inside it
    r = _extend(out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done, skipped" in r.stderr
    assert _results(out) == _results(ref)


def test_finished_stages_are_skipped_and_changed_ones_refused_unless_redone(tmp_path, whole):
    import shutil

    ref, _ = whole
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    with open(out / "pipeline.json") as fh:  # the copy's manifest names the copy's files
        text = fh.read().replace(str(ref), str(out))
    with open(out / "pipeline.json", "w") as fh:
        fh.write(text)
    r = _extend(out, "--config.stages.ft_pi.lr=0.5")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        "longrope-jax extend: error: stages.ft_pi: finished with other settings or inputs (settings.lr); give --redo "
        "ft_pi to discard it and the stages after it")
    r = _extend(out, "--config.stages.eval_yarn.weights=ft_pi", "--redo", "eval_yarn")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done, skipped") == 10 and "stage 11-eval_yarn (evaluate) ..." in r.stderr


def _config(tmp_path, body: str) -> str:
    f = tmp_path / "pipeline.py"
    f.write_text("import ml_collections\nfrom longrope_jax.configs.extend import default\n\n"
                 "def get_config():\n    c = default.get_config()\n    c.model = 'smollm2'\n" + body + "    return c\n")
    return str(f)


@pytest.mark.parametrize("body, message", [
    ("    c.stages = ml_collections.ConfigDict({'a': {'kind': 'bake'}})\n    c.order = ['a']\n",
     "stages.a.kind: expected one of ['train', 'search', 'readjust', 'evaluate', 'export'], got 'bake'"),
    ("    c.stages = ml_collections.ConfigDict({'ft': {'kind': 'train', 'seq_len': 64, 'factors': 's'}, "
     "'s': {'kind': 'search', 'target_length': 128}})\n    c.order = ['ft', 's']\n",
     "stages.ft.factors: stage 's' writes no factors before this stage"),
    ("    c.stages = ml_collections.ConfigDict({'s': {'kind': 'search', 'target_length': 128, 'populaton': 4}})\n"
     "    c.order = ['s']\n", "stages.s: unknown setting 'populaton'"),
    ("    c.stages = ml_collections.ConfigDict({'e': {'kind': 'evaluate', 'lengths': [100]}})\n    c.order = ['e']\n"
     "    c.mesh = 'sequence=8'\n", "stages.e.lengths: sequence=8 needs a length divisible by 16 (2 x sequence), got 100"),
    ("    c.stages = ml_collections.ConfigDict({'ft': {'kind': 'train', 'seq_len': 64, 'batch': 6, 'accum': 4}})\n"
     "    c.order = ['ft']\n", "batch: expected a multiple of accum (4), got 6"),
    ("    c.stages = ml_collections.ConfigDict({'a': {'kind': 'search', 'target_length': 64}})\n    c.order = ['a', 'b']\n",
     "order: 'b' is not a stage (stages: a)"),
], ids=["kind", "factors before", "unknown setting", "mesh", "batch", "order"])
def test_bad_pipelines_are_one_line_errors_before_any_work(tmp_path, body, message):
    from longrope_jax import cli

    import io
    import contextlib

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["extend", "--config", _config(tmp_path, body), "--out", str(tmp_path / "run")])
    lines = [x for x in err.getvalue().splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "run").exists()


def test_the_demo_reports_every_stage_and_the_paper_s_claims(whole):
    """``demo``'s report on the shrunk pipeline: a row per stage, the perplexity table, each claim
    with both numbers and whether it holds (computed from the evaluation files), and the PNGs."""
    from longrope_jax.jobs import demo

    out, printed = whole
    s = demo.resolve(None, SHRINK, {"out": str(out)})
    claims = demo.report(s, str(out), printed["stages"])
    text = (out / "report.md").read_text()
    assert all(f"| {name} |" in text for name in printed["stages"])
    assert len(claims) == 4 and all(v["holds"] == (v["ours"] <= v["against"] * (1.02 if "2%" in k else 1.0))
                                    for k, v in claims.items())
    rows = [json.loads(x) for x in open(out / "08-eval_base" / "ppl.jsonl")]
    searched = [r["ppl"] for r in rows if r["length"] == 512 and r["rope"].endswith("factors.json")]
    first = claims["search beats PI and YaRN without fine-tuning (at 8x)"]
    assert first["ours"] == searched[0]  # at 8x the window: 512 tokens here
    assert (out / "ppl_vs_length.png").stat().st_size > 0 and (out / "factors.png").stat().st_size > 0


def _scaled(name: str) -> list[str]:
    """A pipeline's lengths and budgets scaled down to a tiny model (window 32)."""
    shared = config_files.load(name, "extend").shared
    small = {"window": 32, "l1": 64, "l2": 128, "l3": 256, "short2": 64, "eval_lengths": [32, 128], "batch": 2,
             "accum": 2, "short_microbatches": 1, "remat": "none", "attention": "blockwise", "samples": 1, "population": 4, "iterations": 0,
             "mutations": 1, "parents": 2}
    out = []
    for k in shared.keys():
        base = k[:-len("_long")] if k.endswith("_long") else k
        value = 1 if base.startswith("steps") else small[base]
        out.append(f"--config.shared.{k}={value}")
    return out


# LongRoPE2's needle fitness needs windows of hundreds of tokens: the scaled-down structure scores perplexity.
@pytest.mark.parametrize("name, family, extra", [
    ("llama2_7b_2048k", "llama", []), ("mistral_7b_256k", "mistral", []), ("phi3_mini_128k", "phi3", []),
    ("llama3_8b_128k", "llama", ["--config.stages.search128k.fitness=ppl"]), ("smollm2_64k", "llama", [])])
def test_the_shipped_pipelines_run_their_structure_on_a_tiny_model_of_their_family(tmp_path, name, family, extra,
                                                                                      capsys):
    """Every stage of the paper's pipelines (LLaMA-2-7B, Mistral-7B, Phi-3-mini, LongRoPE2's
    Llama-3-8B, and SmolLM2's), in order, on a tiny model of the same family with the lengths
    scaled down 2048 times (budgets to one step, seeds only)."""
    from longrope_jax import cli

    from tiny import make_hf_dir

    model = make_hf_dir(str(tmp_path / "model"), architecture=family, max_position_embeddings=32,
                        **({"sliding_window": 16} if family == "mistral" else {}))
    docs = tmp_path / "docs"
    docs.mkdir()
    corpus = docs / "corpus.txt"
    corpus.write_text("Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! " * 40)
    (docs / "short.txt").write_text("Judge my vow.")  # within the window: mixed-window training's short rows
    rc = cli.main(["extend", "--config", name, "--out", str(tmp_path / "run"), f"--config.model={model}",
                   f"--config.data=['{docs}']", f"--config.heldout=['{corpus}']", "--config.mesh=None",
                   *_scaled(name), *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    stages = json.loads(out.splitlines()[-1])["stages"]
    assert list(stages) == list(config_files.load(name, "extend").order)
    assert os.path.exists(stages["export"]["hf"])


def test_two_processes_run_the_pipeline_of_one(tmp_path):
    """2 processes x 4 devices on ``data=2,sequence=4`` run a pipeline of every stage kind, the
    weights passing in memory as global arrays from training to a search, to the next training
    stage, to an evaluation, to the results of 1 process x 8 devices on that mesh: losses and
    perplexities within 1e-5, and the search's first generation (its candidates are drawn before
    any is scored) the same candidates within 1e-6. Later generations rank candidates whose
    perplexities differ by less than the processes' rounding (1e-7 here), so they may part; the
    fine-tuning starts from YaRN to keep the rest independent of that. Process 0 alone prints and
    exports."""
    from processes import free_port, two_processes

    from longrope_jax import checkpoint

    config = tmp_path / "pipeline.py"
    config.write_text(
        "from longrope_jax.configs.extend import tiny\n\n"
        "def get_config():\n    c = tiny.get_config()\n"
        "    c.order = ['pretrain', 'search8x', 'ft_yarn', 'eval_yarn', 'export']\n"
        "    for name in set(c.stages.keys()) - set(c.order):\n        del c.stages[name]\n"
        "    c.stages.ft_yarn.batch = 2\n    c.stages.ft_yarn.checkpoint_every = 2\n"
        "    c.stages.eval_yarn.lengths = [64, 512]\n    c.stages.eval_yarn.passkey_lengths = [256]\n"
        "    c.stages.eval_yarn.passkey_trials = 2\n    c.stages.export.weights = 'ft_yarn'\n"
        "    c.stages.export.factors = None\n    return c\n")
    kw = {"config": str(config), "shrink": [a for a in SHRINK if "checkpoint_every" not in a]}
    mesh = "--config.mesh=data=2,sequence=4"
    r = _extend(tmp_path / "one", mesh, devices=8, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    res = two_processes(lambda i: _extend_argv(
        tmp_path / "two", mesh, f"--config.coordinator=localhost:{port}", "--config.num_processes=2",
        f"--config.process_id={i}", **kw), ROOT, timeout=900, env={"PYTHONPATH": ROOT})
    for rc, _, err in res:
        assert rc == 0, err[-3000:]
    assert res[1][1] == "" and json.loads(res[0][1].splitlines()[-1])["stages"]["export"]["hf"] == str(
        tmp_path / "two" / "05-export" / "hf")
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    one, two = _results(tmp_path / "one"), _results(tmp_path / "two")
    for stage in ("01-pretrain", "03-ft_yarn"):
        np.testing.assert_allclose(two[stage], one[stage], rtol=1e-5)
    assert [r[:2] for r in two["04-eval_yarn"]] == [r[:2] for r in one["04-eval_yarn"]]
    np.testing.assert_allclose([r[2] for r in two["04-eval_yarn"]], [r[2] for r in one["04-eval_yarn"]], rtol=1e-5)

    def first_generation(out):
        rows = [json.loads(x) for x in open(out / "02-search8x" / "log.jsonl").read().splitlines()[1:]]
        return [r for r in rows if r["generation"] == 0]

    a, b = first_generation(tmp_path / "two"), first_generation(tmp_path / "one")
    assert len(a) == 4 and [r["factors"] for r in a] == [r["factors"] for r in b]
    np.testing.assert_allclose([r["ppl"] for r in a], [r["ppl"] for r in b], rtol=1e-6)
    _, x, _ = checkpoint.restore(str(tmp_path / "two" / "03-ft_yarn" / "final"))
    _, y, _ = checkpoint.restore(str(tmp_path / "one" / "03-ft_yarn" / "final"))
    for u, v in zip(*map(jax.tree.leaves, (x, y))):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two" / "05-export" / "hf" / "config.json").exists()
    # Passkey in the evaluate stage: the trials of the passkey command on the stage's weights on disk.
    from longrope_jax.jobs import passkey

    want = passkey.run(str(tmp_path / "two" / "03-ft_yarn" / "final"), [256], 2)["trials"]
    got = [json.loads(x) for x in open(tmp_path / "two" / "04-eval_yarn" / "passkey" / "00" / "trials.jsonl")][1:]
    assert [{k: r[k] for k in want[0]} for r in got] == want
