"""notebooks/search.ipynb, executed headless on a tiny model (its install cell finds this install)."""

import json
import os
import re

import jax
import numpy as np
import pytest

from longrope_jax import factors, hf
from longrope_jax.model import init_params

from tiny import byte_tokenizer_file, tiny_config

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "notebooks", "search.ipynb")
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 8


def test_search_notebook_runs_headless(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    cfg = tiny_config(max_position_embeddings=32)
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, 3))
    model = str(tmp_path / "tiny")
    hf.save(model, cfg, params, tokenizer_file=byte_tokenizer_file(str(tmp_path)))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in (0, 7, 19)))

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (i,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert "INSTALL = True" in nb.cells[i].source  # the defaults a Colab user gets
    # INSTALL stays True: the install cell must keep this (editable) install, not replace it.
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(
        f"MODEL = {model!r}\nDATA = {str(data)!r}\nTARGET_LENGTH = 64\nSAMPLES = 2\n"
        f"OUT = {str(tmp_path / 'search')!r}\nEXPORT = {str(tmp_path / 'hf')!r}"))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # live plot, progress, factors
    summary = json.load(open(tmp_path / "search" / "summary.json"))
    assert summary["stopped"] == "completed" and summary["evaluations"] == 6 + 2 * 4
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "is installed (" in text and "not reinstalling" in text
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl", "hf", "search", "tiny", "tokenizer.json"]  # no leftovers
    (ppl,) = re.findall(r"factors\.json  ppl ([0-9.]+)", text)
    np.testing.assert_allclose(float(ppl), summary["ppl"], rtol=1e-4)  # `ppl` reproduces the search
    d = factors.load(str(tmp_path / "search" / "factors.json"))
    block = json.load(open(tmp_path / "hf" / "config.json"))["rope_scaling"]
    assert block["rope_type"] == "longrope"
    np.testing.assert_allclose(block["long_factor"], d["long_factor"], rtol=1e-9)
