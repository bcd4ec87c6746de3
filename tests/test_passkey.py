"""Passkey retrieval: prompt construction, the job end to end on a tiny model, the heat map."""

import json

import pytest

from longrope_jax import cli, passkey
from longrope_jax.jobs import passkey as passkey_job
from longrope_jax.tokenizer import Tokenizer

from tiny import byte_tokenizer_file, make_hf_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.from_file(byte_tokenizer_file(str(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_and_needle_position(tok, depth):
    ids = passkey.build_prompt(tok, 600, depth, "12345")
    assert len(ids) <= 600 and len(ids) > 600 - len(tok.encode(passkey.FILLER))
    text = tok.decode(ids)
    assert text.startswith(passkey.INTRO) and text.endswith(passkey.QUESTION)
    pos = text.index("The pass key is 12345") - len(passkey.INTRO)
    filler = len(text) - len(passkey.INTRO) - len(passkey.QUESTION) - len(passkey.NEEDLE.format(key="12345"))
    # The needle sits on a filler sentence boundary at or before the requested depth.
    assert 0 <= depth - pos / filler <= len(passkey.FILLER) / filler + 1e-9


def test_too_short_length_is_a_clear_error(tok):
    with pytest.raises(ValueError, match="--lengths: 50 tokens cannot hold the passkey prompt"):
        passkey.build_prompt(tok, 50, 0.5, "12345")


def test_passkey_command_end_to_end(tmp_path, capsys):
    d = make_hf_dir(str(tmp_path), max_position_embeddings=512)
    rc = cli.main(["passkey", "--model", d, "--lengths", "300", "400", "--trials", "3", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = [json.loads(x) for x in out.splitlines()]
    summary = lines[-1]
    assert set(summary["accuracy"]) == {"300", "400"} and len(summary["trials"]) == 6
    assert all(0 <= a <= 1 for a in summary["accuracy"].values())
    assert {r["length"] for r in lines[:-1]} == {300, 400}
    assert (tmp_path / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    # A random tiny model cannot know the key: the test is honest.
    assert summary["accuracy"]["300"] < 1.0


def test_summarise_bins():
    ts = [passkey.Trial(100, d, "1", 90, "", c) for d, c in [(0.05, True), (0.3, False), (0.5, True), (0.95, True)]]
    rows = passkey.summarise(ts, bins=2)
    assert [(r["depth_lo"], r["trials"], r["accuracy"]) for r in rows] == [(0.0, 2, 0.5), (0.5, 2, 1.0)]


def test_passkey_resumes_from_its_log(tmp_path, capsys):
    """A run cut short after some trials continues from trials.jsonl and ends as an uninterrupted run."""
    d = make_hf_dir(str(tmp_path), max_position_embeddings=512)
    args = ["passkey", "--model", d, "--lengths", "300", "--trials", "4", "--seed", "3"]
    assert cli.main(args + ["--out", str(tmp_path / "full")]) == 0
    full = json.loads(capsys.readouterr()[0].splitlines()[-1])
    log = (tmp_path / "full" / "trials.jsonl").read_text().splitlines()
    assert len(log) == 1 + 4 and json.loads(log[0])["format"] == passkey_job.LOG_FORMAT
    # An interrupted run: the header, two trials, and a third line torn by the crash.
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "trials.jsonl").write_text("\n".join(log[:3]) + "\n" + log[3][:20])
    calls = []
    import longrope_jax.generate as gen

    real = gen.greedy

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    gen.greedy = counting
    try:
        assert cli.main(args + ["--out", str(tmp_path / "cut")]) == 0
    finally:
        gen.greedy = real
    out, err = capsys.readouterr()
    resumed = json.loads(out.splitlines()[-1])
    assert len(calls) == 2 and "2 trial(s) done, resumed" in err
    assert resumed["trials"] == full["trials"]
    assert (tmp_path / "cut" / "trials.jsonl").read_text().splitlines() == log


def test_passkey_log_of_other_settings_is_refused(tmp_path, capsys):
    d = make_hf_dir(str(tmp_path), max_position_embeddings=512)
    args = ["passkey", "--model", d, "--lengths", "300", "--trials", "1", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 0
    capsys.readouterr()
    rc = cli.main(args[:-2] + ["--seed", "5", "--out", str(tmp_path / "o")])
    err = capsys.readouterr()[1]
    assert rc == 2 and "trials.jsonl: the log belongs to a different passkey run (seed: log has 0, this passkey run 5)" in err
