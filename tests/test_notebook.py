"""notebooks/{search,evaluate,extend}.ipynb executed headless on tiny models (their install cell
finds this install and keeps it), checked against the commands; and the install cell itself,
run in a fresh environment, installing the package from this source tree offline."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from longrope_jax import factors, hf
from longrope_jax.model import init_params

from processes import command_argv
from pipelines import SHRINK
from tiny import byte_tokenizer_file, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 8
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny HF model (window 32) and three documents."""
    d = tmp_path_factory.mktemp("tiny")
    cfg = tiny_config(max_position_embeddings=32)
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, 3))
    model = str(d / "tiny")
    hf.save(model, cfg, params, tokenizer_file=byte_tokenizer_file(str(d)))
    data = d / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in (0, 7, 19)))
    return cfg, model, str(data)


def _execute(name, tmp_path, parameters):
    """Runs notebook ``name`` with ``parameters`` (code) after its parameters cell, in ``tmp_path``;
    returns the executed notebook, its outputs and their text. The defaults a Colab user gets stay:
    INSTALL is True, so the install cell must keep this (editable) install."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    (i,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert "INSTALL = True" in nb.cells[i].source and 'SOURCE = ".."' in nb.cells[i].source
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(parameters))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, "\n".join(errors[0].get("traceback", []))[-3000:]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "is installed (" in text and "not reinstalling" in text
    return nb, outputs, text


def _pngs(outputs):
    return sum("image/png" in o.get("data", {}) for o in outputs)


def test_every_notebook_installs_with_the_same_cell():
    cells = set()
    for name in ("search", "evaluate", "extend"):
        nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
        (cell,) = [c for c in nb.cells if "install" in c.get("metadata", {}).get("tags", [])]
        cells.add(cell.source)
    assert len(cells) == 1


def test_search_notebook_runs_headless(tmp_path, tiny):
    cfg, model, data = tiny
    nb, outputs, text = _execute("search", tmp_path, (
        f"MODEL = {model!r}\nDATA = {data!r}\nTARGET_LENGTH = 64\nSAMPLES = 2\n"
        f"OUT = {str(tmp_path / 'search')!r}\nEXPORT = {str(tmp_path / 'hf')!r}"))
    assert _pngs(outputs) >= 3  # live plot, progress, factors
    summary = json.load(open(tmp_path / "search" / "summary.json"))
    assert summary["stopped"] == "completed" and summary["evaluations"] == 6 + 2 * 4
    assert sorted(os.listdir(tmp_path)) == ["hf", "search"]  # no leftovers
    (ppl,) = re.findall(r"factors\.json  ppl ([0-9.]+)", text)
    np.testing.assert_allclose(float(ppl), summary["ppl"], rtol=1e-4)  # `ppl` reproduces the search
    d = factors.load(str(tmp_path / "search" / "factors.json"))
    block = json.load(open(tmp_path / "hf" / "config.json"))["rope_scaling"]
    assert block["rope_type"] == "longrope"
    np.testing.assert_allclose(block["long_factor"], d["long_factor"], rtol=1e-9)


def test_evaluate_notebook_scores_plots_and_retrieves(tmp_path, tiny):
    """Perplexity at two lengths under five scalings (four built in, one factors file), passkey
    heat maps for YaRN and the file, the file's factors plotted; its perplexities are the
    ``ppl`` command's on the same windows."""
    from longrope_jax.search.setup import reference_factors

    cfg, model, data = tiny
    ntk = [float(x) for x in reference_factors(cfg, 2.0, 32)["ntk"]]
    f = tmp_path / "ntk2.json"
    f.write_text(json.dumps(factors.validate({
        "format": "longrope-factors/1", "rope_type": "longrope", "rope_theta": cfg.rope_theta,
        "rotary_dim": cfg.rotary_dim, "original_max_position_embeddings": 32, "max_position_embeddings": 64,
        "long_factor": ntk, "short_factor": [1.0] * len(ntk), "attention_factor": None, "start_tokens": 0,
        "critical_dim": None})))
    out = tmp_path / "eval"
    nb, outputs, text = _execute("evaluate", tmp_path, (
        f"MODEL = {model!r}\nDATA = {data!r}\nLENGTHS = [32, 64]\nSAMPLES = 2\nFACTORS = [{str(f)!r}]\n"
        f"PASSKEY_LENGTHS = [256, 320]\nPASSKEY_TRIALS = 2\nOUT = {str(out)!r}"))
    assert _pngs(outputs) == 1 + 2 + 1
    rows = [json.loads(line) for line in open(out / "ppl.jsonl")]
    assert len(rows) == 2 * 5
    r = subprocess.run(command_argv("ppl", "--model", model, "--data", data, "--length", "64", "--samples", "2",
                                    "--rope", "yarn:2", "--rope", str(f)), capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    cli = {(x["rope"], x["length"]): x["ppl"] for x in map(json.loads, r.stdout.splitlines())}
    mine = {(x["rope"], x["length"]): x["ppl"] for x in rows}
    assert len(cli) == 2
    for key, value in cli.items():
        np.testing.assert_allclose(mine[key], value, rtol=1e-5)
    trials = [json.loads(line) for line in open(out / "passkey_1" / "trials.jsonl")][1:]
    assert sorted((t["length"], t["index"]) for t in trials) == [(256, 0), (256, 1), (320, 0), (320, 1)]


def test_extend_notebook_goes_stage_by_stage_to_the_commands_results(tmp_path, extend_whole):
    """The demo's pipeline (shrunk) one stage a cell, each stage's outputs and plots shown, then the
    report: every perplexity it evaluates equals one ``longrope-jax extend`` run's."""
    out = tmp_path / "nb"
    nb, outputs, text = _execute("extend", tmp_path, f"OVERRIDES = {SHRINK!r}\nOUT = {str(out)!r}")
    assert _pngs(outputs) >= 2 + 2 + 2  # the two searches' plots (each), the report's two
    assert any("text/markdown" in o.get("data", {}) for o in outputs)  # the report
    assert text.count("done, skipped") >= 11  # each cell skipped what earlier cells ran
    manifest = json.load(open(out / "pipeline.json"))

    cli = extend_whole[0]
    one_go = json.load(open(cli / "pipeline.json"))
    assert list(manifest["stages"]) == list(one_go["stages"])
    for name, rec in one_go["stages"].items():
        if "results" in rec["outputs"]:
            got = {k.replace(str(out), ""): v for k, v in manifest["stages"][name]["outputs"]["results"].items()}
            want = {k.replace(str(cli), ""): v for k, v in rec["outputs"]["results"].items()}
            assert got.keys() == want.keys()
            np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-5)


def test_the_install_cell_installs_from_a_source_tree_into_a_fresh_environment(tmp_path):
    """A fresh venv that sees this environment's dependencies but not its longrope-jax (no .pth of
    it runs): the cell installs the package from this checkout (offline: pip finds every dependency
    installed, and builds with this environment's setuptools instead of an isolated one it would
    download), and the installed copy (not the checkout) imports with its configs and runs its
    command."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)  # pip: this one's
    py = str(venv / "bin" / "python")
    fresh = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(fresh, "deps.pth"), "w") as fh:  # a path line: the dependencies, not their .pth files
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    assert subprocess.run([py, "-c", "import longrope_jax"], capture_output=True, cwd=tmp_path).returncode == 1

    nb = nbformat.read(os.path.join(NOTEBOOKS, "search.ipynb"), as_version=4)
    (cell,) = [c for c in nb.cells if "install" in c.get("metadata", {}).get("tags", [])]
    code = f"INSTALL = True\nSOURCE = {ROOT!r}\nMODEL = 'tiny'\n" + cell.source
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([py, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
                            "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"installing longrope-jax from {ROOT}" in r.stdout
    check = ("import longrope_jax, longrope_jax.configs.train.tiny as t; "
             "print(longrope_jax.__file__); print(t.__file__)")
    where = subprocess.run([py, "-c", check], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(line.startswith(fresh) for line in where.stdout.split()), where.stdout
    version = subprocess.run([str(venv / "bin" / "longrope-jax"), "--version"], capture_output=True, text=True,
                             env=env)
    assert version.stdout.strip() == "longrope-jax 0.1.0"
