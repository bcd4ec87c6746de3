"""``longrope-jax ppl`` end to end: JSON lines on stdout, table on stderr, clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from longrope_jax import cli, evaluate, hf
from longrope_jax.factors import resolve_rope
from longrope_jax.tokenizer import Tokenizer

from tiny import make_hf_dir

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    d = make_hf_dir(str(root), max_position_embeddings=64)
    data = root / "doc.txt"
    data.write_text(TEXT)
    return d, str(data)


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_ppl_json_lines_match_library(tiny, capsys):
    d, data = tiny
    rc, recs, err = _run(["ppl", "--model", d, "--data", data, "--length", "48", "--length", "96",
                          "--rope", "none", "--rope", "yarn:2", "--rope", "pi:2"], capsys)
    assert rc == 0 and len(recs) == 6
    assert [(r["length"], r["rope"]) for r in recs] == [(L, r) for L in (48, 96) for r in ("none", "yarn:2", "pi:2")]
    cfg, params = hf.load(d)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = np.asarray(tok.encode(TEXT)[:96], np.int32)[None]
    ref = evaluate.perplexity(params, cfg, ids, resolve_rope("yarn:2", cfg, 96))
    got = recs[4]
    assert got["predictions"] == 95 and got["documents"] == [data]
    np.testing.assert_allclose(got["ppl"], ref["ppl"], rtol=1e-6)
    assert recs[3]["beyond_window"] is True and recs[4]["beyond_window"] is False
    assert got["tokenizer"]["adds_special_tokens"] is False
    assert "ppl" in err and "yarn:2" in err and "beyond window" in err


def test_ppl_two_data_sources(tiny, tmp_path, capsys):
    d, data = tiny
    other = tmp_path / "other.txt"
    other.write_text("Pack my box with five dozen liquor jugs. " * 40)
    rc, recs, _ = _run(["ppl", "--model", d, "--data", data, "--data", str(other), "--length", "48", "--samples", "2",
                        "--rope", "none"], capsys)
    assert rc == 0 and recs[0]["documents"] == [data, str(other)] and recs[0]["data"] == [data, str(other)]
    cfg, params = hf.load(d)
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    ids = np.stack([np.asarray(tok.encode(t)[:48], np.int32) for t in (TEXT, other.read_text())])
    ref = evaluate.perplexity(params, cfg, ids, resolve_rope("none", cfg, 48))
    np.testing.assert_allclose(recs[0]["nll_per_window"], ref["nll_per_window"], rtol=1e-6)


def test_ppl_short_document_is_a_clear_error(tiny, capsys):
    d, data = tiny
    rc, recs, err = _run(["ppl", "--model", d, "--data", data, "--length", "100000"], capsys)
    assert rc == 2 and not recs
    assert f"{data}: expected 1 document(s) of at least 100000 tokens, found 0" in err


def test_ppl_bad_rope_value(tiny, capsys):
    d, data = tiny
    rc, _, err = _run(["ppl", "--model", d, "--data", data, "--length", "32", "--rope", "warp:9"], capsys)
    assert rc == 2 and "--rope warp:9: expected model, none, pi:S" in err


def test_entry_point_subprocess(tiny):
    d, data = tiny
    p = subprocess.run([sys.executable, "-m", "longrope_jax", "ppl", "--model", d, "--data", data,
                        "--length", "32"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout.splitlines()[0])
    assert rec["rope"] == "model" and rec["ppl"] > 1  # the default: the model as configured


def test_ppl_config_file_with_dotted_overrides(tiny, capsys):
    d, data = tiny
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "ppl", "smollm2_beyond_window.py")
    rc, recs, err = _run(["ppl", "--config", cfg, f"--config.model={d}", f"--config.data={data}",
                          "--config.length=[40]", "--config.rope=['none', 'ntk:2']", "--seed", "3"], capsys)
    assert rc == 0, err
    assert [(r["length"], r["rope"], r["seed"]) for r in recs] == [(40, "none", 3), (40, "ntk:2", 3)]
    rc, _, err = _run(["ppl", "--config", cfg, "--config.bogus=1"], capsys)
    assert rc == 2 and "--config.bogus: " in err and "has no field 'bogus'" in err
    rc, _, err = _run(["ppl", "--data", data, "--length", "32"], capsys)
    assert rc == 2 and "missing --model" in err


def test_generate_command(tiny, capsys):
    d, _ = tiny
    rc, recs, err = _run(["generate", "--model", d, "--prompt", "The quick brown", "--max-new-tokens", "5"], capsys)
    assert rc == 0, err
    (rec,) = recs
    assert rec["new_tokens"] == 5 and len(rec["tokens"]) == 5 and rec["prompt_tokens"] == 15
    assert rec["completion"] in err


def test_ppl_plot(tiny, capsys, tmp_path):
    d, data = tiny
    rc, recs, err = _run(["ppl", "--model", d, "--data", data, "--length", "32", "--length", "80", "--rope", "none",
                          "--rope", "ntk:2", "--plot", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    png = tmp_path / "ppl_vs_length.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_config_override_of_wrong_type_is_a_clear_error(tiny, capsys):
    d, data = tiny
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "ppl", "smollm2_beyond_window.py")
    rc, _, err = _run(["ppl", "--config", cfg, "--config.seed=1.5"], capsys)
    assert rc == 2 and "--config.seed: expected a int, got '1.5'" in err


def test_default_rope_is_the_models_own_scaling(tmp_path, capsys):
    """A model whose config scales its RoPE (here HF ``linear``, factor 2) is scored as configured
    unless --rope says otherwise."""
    d = make_hf_dir(str(tmp_path), max_position_embeddings=64, rope_parameters={"rope_type": "linear", "factor": 2.0})
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    base = ["ppl", "--model", d, "--data", str(data), "--length", "96"]
    rc, (default,), err = _run(base, capsys)
    assert rc == 0, err
    rc, (pi, none), err = _run([*base, "--rope", "pi:2", "--rope", "none"], capsys)
    assert default["rope"] == "model" and default["method"] == pi["method"]
    assert default["ppl"] == pi["ppl"] and abs(none["ppl"] - default["ppl"]) > 1e-3
    assert not default["beyond_window"] and none["beyond_window"]
    rc, (alias,), err = _run([*base, "--rope", "longrope"], capsys)
    assert alias["ppl"] == default["ppl"]


def test_a_list_eos_token_id_works_everywhere(tmp_path, capsys):
    """Llama-3 configs carry ``eos_token_id: [a, b]``: a static jit argument must not hash it."""
    d = make_hf_dir(str(tmp_path), max_position_embeddings=64, eos_token_id=[2, 3], bos_token_id=1)
    assert json.load(open(os.path.join(d, "config.json")))["eos_token_id"] == [2, 3]
    data = tmp_path / "doc.txt"
    data.write_text(TEXT)
    rc, (rec,), err = _run(["ppl", "--model", d, "--data", str(data), "--length", "40"], capsys)
    assert rc == 0, err
    rc, out, err = _run(["generate", "--model", d, "--prompt", "The quick", "--max-new-tokens", "3"], capsys)
    assert rc == 0, err
    rc, out, err = _run(["passkey", "--model", d, "--lengths", "300", "--trials", "1"], capsys)
    assert rc == 0, err


def test_ppl_fused_attention_beyond_512_tokens(tiny, capsys):
    """``--attention fused`` on CPU (its XLA path) through ``ppl``, default and explicit block, equals
    blockwise."""
    d, data = tiny
    base = ["ppl", "--model", d, "--data", data, "--length", "600", "--rope", "none"]
    rc, (ref,), err = _run([*base, "--attention", "blockwise"], capsys)
    assert rc == 0, err
    for extra in ([], ["--q-chunk", "128"]):
        rc, (got,), err = _run([*base, "--attention", "fused", *extra], capsys)
        assert rc == 0, err
        assert got["attention"] == "fused"
        np.testing.assert_allclose(got["ppl"], ref["ppl"], rtol=1e-5)


def _bad_inputs(root, model, data):
    """(name, argv, what the one stderr line must say) for each bad input a user may give."""
    def hf_dir(name, edit=None, text=None):
        d = os.path.join(root, name)
        if not os.path.exists(d):
            import shutil

            shutil.copytree(model, d)
            f = os.path.join(d, "config.json")
            with open(f) as fh:
                c = json.load(fh)
            if edit:
                edit(c)
            with open(f, "w") as fh:
                fh.write(text(json.dumps(c)) if text else json.dumps(c))
        return d

    def factors(name, **kw):
        d = dict({"format": "longrope-factors/1", "rope_theta": 10000.0, "rotary_dim": 8,
                  "original_max_position_embeddings": 64, "max_position_embeddings": 128,
                  "long_factor": [1.0, 1.5, 2.0, 2.0]}, **kw)
        f = os.path.join(root, name + ".json")
        with open(f, "w") as fh:
            fh.write(json.dumps(d))  # NaN as the bare token NaN, as Python writes it
        return f

    def file(name, text):
        f = os.path.join(root, name)
        with open(f, "w") as fh:
            fh.write(text)
        return f

    def run_dir(d):
        for sub in ("checkpoints", "final"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        with open(os.path.join(d, "settings.json"), "w") as fh:
            fh.write('{"format": "longrope-train/1", "settings": {}}')
        return d

    ppl = ["ppl", "--data", data, "--length", "32"]
    cfg = os.path.join(root, "config")
    return [
        ("missing model", ppl + ["--model", os.path.join(root, "nope")], "nope: no such file or directory"),
        ("truncated config.json", ppl + ["--model", hf_dir("trunc", text=lambda s: s[:len(s) // 2])],
         "trunc/config.json: not valid JSON"),
        ("missing field", ppl + ["--model", hf_dir("nohidden", lambda c: c.pop("hidden_size"))],
         "nohidden/config.json: field 'hidden_size' is missing"),
        ("wrong type", ppl + ["--model", hf_dir("strhidden", lambda c: c.update(hidden_size="32"))],
         "strhidden/config.json: field 'hidden_size': expected a positive integer, got '32'"),
        ("rope_theta a list", ppl + ["--model", hf_dir("thetalist", lambda c: c.update(rope_theta=[1, 2]))],
         "thetalist/config.json: field 'rope_theta': expected a positive finite number"),
        ("rope block of the wrong type", ppl + ["--model", hf_dir("yarnx", lambda c: c.update(
            rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": "x"}))],
         "yarnx/config.json: field 'rope_parameters.factor': expected a positive finite number, got 'x'"),
        ("short rope-block factors", ppl + ["--model", hf_dir("lr", lambda c: c.update(rope_parameters={
            "rope_type": "longrope", "rope_theta": 1e4, "long_factor": [1.0], "short_factor": [1.0] * 4}))],
         "lr/config.json: long_factor: expected 4 factors"),
        ("missing data", ["ppl", "--model", model, "--data", os.path.join(root, "none.txt"), "--length", "32"],
         "none.txt: not found"),
        ("NaN factors", ppl + ["--model", model, "--rope", factors("nan", long_factor=[1.0, float("nan"), 2, 2])],
         "nan.json: long_factor[1]: expected a finite factor > 0, got nan"),
        ("short factors", ppl + ["--model", model, "--rope", factors("short", long_factor=[1.0, 2.0])],
         "short.json: long_factor: expected 4 factors (rotary_dim / 2), got 2"),
        ("factors of another rope_theta", ppl + ["--model", model, "--rope", factors("theta", rope_theta=5e5)],
         "theta.json: field 'rope_theta': expected 10000.0 (the model's), got 500000.0"),
        ("truncated factors", ppl + ["--model", model, "--rope", file("tf.json", '{"format": "longr')],
         "tf.json: not valid JSON"),
        ("bad scale", ppl + ["--model", model, "--rope", "yarn:abc"], "--rope yarn:abc: expected yarn:S with S a number"),
        ("negative scale", ppl + ["--model", model, "--rope", "pi:-2"], "--rope pi:-2: expected a positive scale"),
        ("unknown --rope", ppl + ["--model", model, "--rope", "warp:9"], "--rope warp:9: expected model, none, pi:S"),
        ("missing config file", ["ppl", "--config", os.path.join(root, "none.py")], "none.py: config file not found"),
        ("config syntax error", ["ppl", "--config", file("syntax.py", "def get_config(:\n")],
         "syntax.py: line 1: invalid Python"),
        ("config field of the wrong type", ["ppl", "--config", file("wrongtype.py", (
            "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict("
            f"dict(model={model!r}, data={data!r}, length=[32], samples='3'))\n"))],
         "wrongtype.py: setting 'samples': expected an integer >= 1, got '3'"),
        ("config missing a field", ["ppl", "--config", file("nolength.py", (
            "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict("
            f"dict(model={model!r}, data={data!r}))\n"))], "missing --length (or a --config file that sets it)"),
        ("unknown config field", ["ppl", "--config", file("unknown.py", (
            "import ml_collections\ndef get_config():\n    return ml_collections.ConfigDict(dict(lenght=[32]))\n"))],
         "unknown.py: unknown setting 'lenght'"),
        ("search override of the wrong type", ["search", "--model", model, "--data", data, "--target-length", "128",
                                               "--out", cfg, "--config.population=abc"],
         "--config.population: expected a int, got 'abc'"),
        ("garbage tokenizer", ppl + ["--model", model, "--tokenizer", file("tok.json", "{bad")],
         "tok.json: cannot read tokenizer"),
        ("mesh of the wrong size", ppl + ["--model", model, "--mesh", "data=3"],
         "--mesh: axis sizes data=3 multiply to 3, expected the device count 8"),
        ("mesh length", ["ppl", "--model", model, "--data", data, "--length", "36", "--mesh", "data=2,sequence=4"],
         "--mesh: sequence=4 needs a length divisible by 8 (2 x sequence), got 36"),
        ("mesh heads", ppl + ["--model", model, "--mesh", "tensor=8"],
         "--mesh: tensor=8 must divide num_attention_heads, which is 4"),
        ("mesh axis", ppl + ["--model", model, "--mesh", "pipeline=2"], "--mesh: unknown axis 'pipeline'"),
        ("half a multi-process start", ppl + ["--model", model, "--coordinator", "localhost:1"],
         "--coordinator, --num-processes and --process-id: give all three or none"),
        ("a train run directory as the model", ppl + ["--model", run_dir(os.path.join(root, "run"))],
         f"{root}/run: a train run directory, not a model; did you mean {root}/run/final?"),
        ("an unknown built-in config", ["train", "--config", "tinny"],
         "--config tinny: no such file, and no built-in config of that name (built-in: default, smollm2_16k, "),
    ]


def test_ppl_on_a_mesh_equals_one_device(tiny, capsys):
    """The command on ``--mesh fsdp=2,sequence=4`` (and the ring on ``sequence=8``) gives the
    single-device perplexities, and says which mesh it ran on."""
    d, data = tiny
    argv = ["ppl", "--model", d, "--data", data, "--length", "48", "--length", "96", "--rope", "none", "--rope",
            "yarn:2", "--q-chunk", "8"]
    rc, one, err = _run(argv + ["--attention", "blockwise"], capsys)  # no mesh: candidates over the local devices
    assert rc == 0 and one[0]["mesh"] is None, err
    for mesh, attention in (("fsdp=2,sequence=4", "blockwise"), ("sequence=8", "ring")):
        rc, got, err = _run(argv + ["--mesh", mesh, "--attention", attention], capsys)
        assert rc == 0, err
        assert [r["mesh"] for r in got] == [mesh] * 4
        np.testing.assert_allclose([r["ppl"] for r in got], [r["ppl"] for r in one], rtol=1e-5)


def test_bad_inputs_are_one_line_errors(tiny, tmp_path, capsys):
    """Each bad input exits 2 with one stderr line naming the file and field, and no traceback
    (an uncaught exception would fail this test), before any model loading is reported."""
    d, data = tiny
    cases = _bad_inputs(str(tmp_path), d, data)
    assert len(cases) >= 12
    for name, argv, expected in cases:
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 2 and not out.strip(), name
        assert len(lines) == 1 and lines[0].startswith(f"longrope-jax {argv[0]}: error: "), (name, lines)
        assert expected in lines[0], (name, lines[0])


def test_help_says_what_each_flag_takes_and_the_version():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    helps = {name: {a.dest: a.help or "" for a in p._actions} for name, p in sub.items()}
    for command in ("ppl", "search", "generate", "passkey", "train"):
        assert "checkpoint" in helps[command]["model"] and "RUN/final" in helps[command]["model"], command
    for command in ("ppl", "search", "train"):
        assert "stdlib:" in helps[command]["data"], command
    for command, flag in (("generate", "prompt"), ("generate", "max_new_tokens"), ("passkey", "lengths"),
                          ("passkey", "seed"), ("ppl", "seed"), ("ppl", "param_dtype"), ("search", "time_budget")):
        assert len(helps[command][flag]) > 10, (command, flag)
    assert "before each evaluator call" in helps["search"]["time_budget"]
    assert not parser.description.startswith("``")  # for users, not a developer docstring
    from longrope_jax import __version__

    p = subprocess.run([sys.executable, "-m", "longrope_jax", "--version"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == f"longrope-jax {__version__}"


def test_ctrl_c_stops_a_command_with_one_line(tiny):
    """SIGINT (Ctrl-C, restored in the child: a non-interactive shell ignores it in background
    jobs) during a long generation: exit 130, one line, no traceback."""
    import signal
    import time

    from processes import command_argv

    d, _ = tiny
    p = subprocess.Popen(command_argv("generate", "--model", d, "--prompt", "The quick", "--max-new-tokens", "100000"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    first = p.stderr.read(20)  # generated text (nothing else goes to stderr first): decoding
    assert len(first) == 20, first + p.communicate()[1]
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and not out, err[-2000:]
    assert err.rstrip().splitlines()[-1] == "longrope-jax generate: interrupted" and "Traceback" not in err


def test_commands_on_a_machine_without_a_tpu_leave_libtpu_alone(tiny):
    """With libtpu installed (the test extra) and no TPU chip, a command runs on the CPU without
    starting the TPU backend: no discovery warnings, no lock file taken."""
    from longrope_jax import platforms

    import importlib.util

    if importlib.util.find_spec("libtpu") is None or platforms.has_tpu_chip():
        pytest.skip("needs libtpu installed on a machine without a TPU chip")
    d, data = tiny
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    p = subprocess.run([sys.executable, "-m", "longrope_jax", "ppl", "--model", d, "--data", data, "--length", "32"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "TPU" not in p.stderr and "libtpu" not in p.stderr, p.stderr[-2000:]
