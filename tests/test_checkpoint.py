"""longrope-jax checkpoints and ``convert``: bit-identical round trips, restoring without the source,
and clear errors that leave the output path as it was.

Tests run as root, where a directory with mode 0o500 is still writable, so the unwritable output
case puts the output under a regular file (its parent cannot be a directory).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from longrope_jax import atomic, checkpoint, cli, export, hf
from longrope_jax.jobs import convert
from longrope_jax import factors as factors_lib
from longrope_jax.loading import load_model
from longrope_jax.model import Transformer, init_params

from tiny import byte_tokenizer_file, tiny_config

P = 4  # tiny_config: head_dim 8


def tiny_src(root, name="src", dtype=None, shard_bytes=1 << 30, **kw) -> str:
    """A tiny HF directory (our writer) with tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    cfg = tiny_config(bos_token_id=0, eos_token_id=1, **kw)
    params = init_params(cfg)
    out = os.path.join(str(root), name)
    hf.save(out, cfg, params, dtype=dtype, shard_bytes=shard_bytes)
    byte_tokenizer_file(out)
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, "x-marker": name},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    json.dump({"bos_token": "!"}, open(os.path.join(out, "special_tokens_map.json"), "w"))
    return out


def tensors(path) -> dict[str, np.ndarray]:
    return {n: a for n, a, _ in hf.iter_safetensors(hf.safetensors_files(path))}


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes(), k


def factors_file(path, **kw) -> str:
    d = {"format": factors_lib.FORMAT, "rope_type": "longrope", "rope_theta": 10000.0, "rotary_dim": 2 * P,
         "original_max_position_embeddings": 64, "max_position_embeddings": 256,
         "long_factor": [1.5, 2.0, 3.0, 4.0], "short_factor": [1.0, 1.1, 1.2, 1.3], "start_tokens": 0}
    d.update(kw)
    json.dump(d, open(path, "w"))
    return str(path)


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, [json.loads(x) for x in out.splitlines() if x.strip()], err


def listing(root) -> list[str]:
    """Every path under ``root``, hidden ones (temporary directories) included."""
    out = []
    for d, dirs, files in os.walk(str(root)):
        out += [os.path.relpath(os.path.join(d, n), str(root)) for n in dirs + files]
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Round trips.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_checkpoint_hf_bit_identical(tmp_path, dtype, sharded):
    shard = 20_000 if sharded else 1 << 30
    src = tiny_src(tmp_path, dtype=None if dtype == "float32" else ml_dtypes.bfloat16, shard_bytes=shard,
                   tie_word_embeddings=not sharded)
    assert os.path.exists(os.path.join(src, hf.INDEX)) == sharded
    r1 = convert.run(src, str(tmp_path / "ckpt"))
    assert r1["to"] == "checkpoint" and r1["dtype"] == dtype
    cfg, params, meta = checkpoint.restore(str(tmp_path / "ckpt"))
    assert {a.dtype.name for a in jax.tree.leaves(params)} == {dtype} and cfg.param_dtype == dtype
    assert meta["source"]["kind"] == "hf" and meta["source"]["path"] == src
    r2 = convert.run(str(tmp_path / "ckpt"), str(tmp_path / "out"), shard_bytes=shard)
    assert r2["to"] == "hf" and r2["rope_type"] == "default"
    out = str(tmp_path / "out")
    assert os.path.exists(os.path.join(out, hf.INDEX)) == sharded
    assert_bit_identical(tensors(src), tensors(out))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):  # carried byte for byte
        assert open(os.path.join(src, f), "rb").read() == open(os.path.join(out, f), "rb").read()
    assert hf.read_config(out) == hf.read_config(src)


def test_checkpoint_restores_without_source_and_loads(tmp_path):
    src = tiny_src(tmp_path, tie_word_embeddings=False)
    ckpt = str(tmp_path / "ckpt")
    convert.run(src, ckpt)
    shutil.rmtree(src)  # everything the checkpoint needs is inside it
    m = load_model(ckpt)
    assert m.tokenizer is not None and m.tokenizer.source.startswith(ckpt)
    assert m.tokenizer.decode(m.tokenizer.encode("hello world")) == "hello world"
    cfg, params, _ = checkpoint.restore(ckpt)
    t = np.arange(12, dtype=np.int32)[None] % cfg.vocab_size
    a = Transformer(m.cfg).apply({"params": m.params}, t)
    b = Transformer(cfg).apply({"params": params}, t)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mb = load_model(ckpt, param_dtype="bfloat16", to_device=False)  # cast on request, as for HF dirs
    assert {a.dtype for a in jax.tree.leaves(mb.params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_checkpoint_save_restore_api_keeps_dtypes_and_factors(tmp_path):
    cfg = tiny_config(tie_word_embeddings=False)
    params = init_params(cfg)  # jax arrays
    params["norm"]["weight"] = np.asarray(params["norm"]["weight"]).astype(ml_dtypes.bfloat16)  # mixed dtypes
    fac = factors_lib.load(factors_file(tmp_path / "f.json", per_length={"128": {"long_factor": [2, 2, 2, 2]}}))
    tf = byte_tokenizer_file(str(tmp_path))
    meta = checkpoint.save(str(tmp_path / "c"), cfg, params, tokenizer_file=tf, factors=fac,
                           source={"path": "x.gguf", "sha256": "ab" * 32})
    assert meta["format"] == checkpoint.FORMAT and meta["tokenizer"]["files"] == ["tokenizer.json"]
    cfg2, p2, meta2 = checkpoint.restore(str(tmp_path / "c"))
    assert cfg2 == cfg and cfg2.rope_parameters == cfg.rope_parameters
    assert p2["norm"]["weight"].dtype == ml_dtypes.bfloat16 and p2["embed_tokens"]["embedding"].dtype == np.float32
    assert_bit_identical(dict(checkpoint._flatten(jax.device_get(params))), dict(checkpoint._flatten(p2)))
    assert meta2["rope"]["factors"]["per_length"] == {128: {"long_factor": [2.0] * 4}}
    assert meta2["source"]["sha256"] == "ab" * 32
    assert load_model(str(tmp_path / "c"), to_device=False).sha256 == "ab" * 32


def test_cli_convert_json_line(tmp_path, capsys):
    src = tiny_src(tmp_path)
    rc, recs, err = run_cli(["convert", "--model", src, "--out", str(tmp_path / "c")], capsys)
    assert rc == 0, err
    assert recs[0]["command"] == "convert" and recs[0]["to"] == "checkpoint" and recs[0]["out"] == str(tmp_path / "c")
    assert "reading" in err and "writing checkpoint" in err
    assert checkpoint.is_checkpoint(str(tmp_path / "c"))


# --------------------------------------------------------------------------------------------
# Bad input: clear errors, and the output path as it was.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    src = tiny_src(root)
    convert.run(src, str(root / "good"))
    return str(root / "good")


def _damaged(ckpt, tmp_path, fn) -> str:
    d = str(tmp_path / "damaged")
    shutil.copytree(ckpt, d)
    fn(d)
    return d


def _edit_meta(d, **kw):
    f = os.path.join(d, checkpoint.METADATA)
    m = json.load(open(f))
    m.update(kw)
    json.dump(m, open(f, "w"))


def _truncate_data(d):
    files = [f for f in glob.glob(os.path.join(d, checkpoint.PARAMS, "**", "*"), recursive=True) if os.path.isfile(f)
             and os.sep + "d" + os.sep in f]
    assert files
    for f in files:
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 3])


DAMAGE = {
    "missing metadata": (lambda d: os.remove(os.path.join(d, checkpoint.METADATA)),
                         r"longrope_checkpoint.json: missing \(expected the metadata file of a longrope-jax "
                         r"checkpoint, format 'longrope-jax-checkpoint/1'"),
    "corrupt metadata": (lambda d: open(os.path.join(d, checkpoint.METADATA), "w").write("{not json"),
                         r"longrope_checkpoint.json: not valid JSON"),
    "unknown format version": (lambda d: _edit_meta(d, format="longrope-jax-checkpoint/7"),
                               r"longrope_checkpoint.json: field 'format': expected 'longrope-jax-checkpoint/1' .*"
                               r"got 'longrope-jax-checkpoint/7'"),
    "missing params": (lambda d: shutil.rmtree(os.path.join(d, checkpoint.PARAMS)),
                       r"damaged/params: missing \(expected the Orbax params data"),
    "truncated params data": (_truncate_data, r"damaged/params: cannot restore the Orbax params .*expected a "
                                              r"complete Orbax PyTree checkpoint"),
    "params digest mismatch": (lambda d: _edit_meta(d, params={**json.load(open(os.path.join(
        d, checkpoint.METADATA)))["params"], "sha256": "0" * 64}),
        r"damaged/params: params sha256 does not match longrope_checkpoint.json .*the Orbax data is corrupt"),
    "missing tokenizer": (lambda d: os.remove(os.path.join(d, checkpoint.TOKENIZER, "tokenizer.json")),
                          r"tokenizer/tokenizer.json: missing \(listed in longrope_checkpoint.json"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error(ckpt, tmp_path, case, capsys):
    fn, msg = DAMAGE[case]
    d = _damaged(ckpt, tmp_path, fn)
    with pytest.raises(checkpoint.CheckpointError, match=msg):
        checkpoint.restore(d)
    with pytest.raises(checkpoint.CheckpointError, match=msg):  # load_model recognises it as a checkpoint
        load_model(d, to_device=False)
    out = tmp_path / "out"
    rc, recs, err = run_cli(["convert", "--model", d, "--out", str(out)], capsys)
    assert rc == 2 and not recs and "longrope-jax convert: error: " in err and d in err
    assert not out.exists() and "Event loop is closed" not in err


@pytest.mark.parametrize("case", ["wrong length", "wrong format", "wrong theta"])
def test_bad_factors_file(ckpt, tmp_path, case, capsys):
    kw, msg = {
        "wrong length": (dict(long_factor=[2.0] * 3), r"field 'long_factor'|long_factor: expected 4 factors"),
        "wrong format": (dict(format="longrope-factors/2"),
                         r"field 'format': expected 'longrope-factors/1', got 'longrope-factors/2'"),
        "wrong theta": (dict(rope_theta=5e5), r"field 'rope_theta': expected 10000.0 \(the model's\)"),
    }[case]
    f = factors_file(tmp_path / "f.json", **kw)
    for to in ("hf", "checkpoint"):
        out = tmp_path / f"out-{to}"
        with pytest.raises(factors_lib.FactorsError, match=msg) as e:
            convert.run(ckpt, str(out), factors=f, to=to)
        assert f in str(e.value) and not out.exists()
    assert listing(tmp_path) == ["f.json"]


def test_existing_output_refused_unless_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, recs, err = run_cli(["convert", "--model", ckpt, "--out", str(out)], capsys)
    assert rc == 2 and not recs
    assert f"{out}: exists (expected a new output directory); pass --overwrite" in err
    assert listing(tmp_path) == ["out", "out/keep.txt"]
    rc, recs, err = run_cli(["convert", "--model", ckpt, "--out", str(out), "--overwrite"], capsys)
    assert rc == 0, err
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or backup directory left
    (tmp_path / "file").write_text("x")  # a file is never replaced, even with --overwrite
    rc, _, err = run_cli(["convert", "--model", ckpt, "--out", str(tmp_path / "file"), "--overwrite"], capsys)
    assert rc == 2 and "exists and is not a directory" in err and (tmp_path / "file").read_text() == "x"
    rc, _, err = run_cli(["convert", "--model", ckpt, "--out", ckpt, "--overwrite", "--to", "checkpoint"], capsys)
    assert rc == 2 and "is the source model" in err and checkpoint.restore(ckpt)


def test_unwritable_output_directory(ckpt, tmp_path, capsys):
    # Root ignores chmod 0o500, so the parent is made impossible instead: a path under a regular file.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    for to in ("hf", "checkpoint"):
        out = blocker / "sub" / "out"
        rc, recs, err = run_cli(["convert", "--model", ckpt, "--out", str(out), "--to", to], capsys)
        assert rc == 2 and not recs
        assert (f"{out}: cannot write the output: {blocker} is not a directory, so the parent directory "
                f"{blocker / 'sub'} cannot exist") in err
        assert "reading" not in err  # refused before the model is read
    assert listing(tmp_path) == ["blocker"] and blocker.read_text() == "a file, not a directory"


def test_failure_mid_write_leaves_output_as_it_was(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "deep" / "out"  # the missing parent is created, and removed again on failure

    def boom(*a, **k):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(hf, "write_weights", boom)
    with pytest.raises(OSError, match="simulated"):
        convert.run(ckpt, str(out))
    assert listing(tmp_path) == []
    out.parent.mkdir()
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OSError, match="simulated"):
        convert.run(ckpt, str(out), overwrite=True)
    assert listing(tmp_path) == ["deep", "deep/out", "deep/out/old.txt"]
    monkeypatch.setattr(checkpoint, "_orbax_save", boom)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save(str(out), *checkpoint.restore(ckpt)[:2], overwrite=True)
    assert listing(tmp_path) == ["deep", "deep/out", "deep/out/old.txt"]


def test_atomic_check_dir_messages(tmp_path):
    with pytest.raises(atomic.OutputError, match="exists and is not a directory"):
        (tmp_path / "f").write_text("")
        atomic.check_dir(str(tmp_path / "f"), overwrite=True)
    assert atomic.check_dir(str(tmp_path / "new")) == str(tmp_path / "new")
    with pytest.raises(export.ExportError, match=r"not a tokenizer file"):
        cfg = tiny_config()
        export.save_hf(str(tmp_path / "x"), cfg, init_params(cfg), tokenizer_files=[str(tmp_path / "f")])
    assert not (tmp_path / "x").exists()


def test_checkpoint_factors_drive_rope_longrope(tmp_path, capsys):
    """Factors attached at conversion are what ``--rope longrope`` uses on the checkpoint."""
    src = tiny_src(tmp_path)
    f = factors_file(tmp_path / "factors.json", start_tokens=2)
    ck = str(tmp_path / "ck")
    rc, _, err = run_cli(["convert", "--model", src, "--out", ck, "--factors", f], capsys)
    assert rc == 0, err
    text = tmp_path / "doc.txt"
    text.write_text("Some text to score, long enough for a window of ninety tokens. " * 4)
    rc, a, err = run_cli(["ppl", "--model", ck, "--data", str(text), "--length", "90", "--rope", "longrope"], capsys)
    assert rc == 0, err
    rc, b, err = run_cli(["ppl", "--model", src, "--data", str(text), "--length", "90", "--rope", f], capsys)
    assert rc == 0, err
    rc, c, err = run_cli(["ppl", "--model", src, "--data", str(text), "--length", "90", "--rope", "longrope"], capsys)
    assert a[0]["ppl"] == pytest.approx(b[0]["ppl"], rel=1e-6)
    assert abs(a[0]["ppl"] - c[0]["ppl"]) > 1e-4  # the source's own (default) RoPE differs
