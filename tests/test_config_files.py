"""Settings: the built-in configs as defaults, configs by name and path, overrides by field type,
in-memory sections of a multi-stage config, one-line errors naming the dotted key, and configs
found from an installed (not editable) package."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest
from ml_collections import FieldReference

from longrope_jax import config_files
from longrope_jax.jobs import ppl, train
from longrope_jax.search import settings as search_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ("ppl", "search", "train", "passkey", "generate", "convert")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_its_defaults_and_every_kind_names_a_setting(command):
    import importlib

    job = importlib.import_module(f"longrope_jax.jobs.{command}")
    kinds = search_settings.JOB_KINDS if command == "search" else job.KINDS
    defaults = config_files.defaults(command)
    assert set(kinds) <= set(defaults.keys()), set(kinds) - set(defaults.keys())
    if command == "search":  # the rest are the algorithm's, validated by SearchSettings
        assert set(defaults.keys()) - set(kinds) == set(search_settings.ALGORITHM)
    else:
        assert set(defaults.keys()) == set(kinds)


def test_built_in_configs_by_name_and_path_build_on_the_defaults():
    tiny = config_files.load("tiny", "train")
    path = os.path.join(ROOT, "configs", "train", "tiny.py")
    assert tiny == config_files.load("train/tiny") == config_files.load(path)
    defaults = config_files.defaults("train")
    differ = {k for k in defaults.keys() if defaults[k] != tiny[k]}
    assert differ == {"model_config", "seq_len", "batch", "steps", "lr", "warmup_steps", "schedule", "end_lr_ratio",
                      "b2", "weight_decay", "loss_chunk", "checkpoint_every", "eval_data", "eval_lengths"}
    assert config_files.builtin_names("search") == ["default", "longrope2", "official"]
    names = ", ".join(config_files.builtin_names("train"))
    assert names.startswith("default, ") and "tiny" in names
    with pytest.raises(config_files.ConfigError, match=rf"^--config tin: no such file, and no built-in config of that "
                                                       rf"name \(built-in: {names}\)$"):
        config_files.load("tin", "train")


def test_a_config_file_outside_is_merged_onto_the_defaults(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("import ml_collections\n\ndef get_config():\n    c = ml_collections.ConfigDict()\n"
                 "    c.model = 'm'\n    c.data = 'pydoc:'\n    c.length = [64]\n    c.samples = 3\n    return c\n")
    s = ppl.resolve(str(f), ["--config.q_chunk=256"], {"seed": 4})
    assert (s.model, s.data, s.length, s.samples, s.seed, s.q_chunk, s.loss_chunk) == ("m", ["pydoc:"], [64], 3, 4,
                                                                                       256, 1024)
    assert s.tokenizer is None and s.memory_budget_gib is None  # placeholders: unset
    with pytest.raises(AttributeError):  # locked: a typo cannot add a setting
        s.sampels = 2
    f.write_text(f.read_text().replace("c.samples = 3", "c.sampels = 3"))
    with pytest.raises(config_files.ConfigError, match=rf"^{f}: unknown setting 'sampels' \(known: attention, "):
        ppl.resolve(str(f))


def test_overrides_take_each_field_s_type_and_errors_name_the_source():
    with pytest.raises(config_files.ConfigError, match=r"^--config.q_chunk: expected a int, got 'x'$"):
        ppl.resolve(None, ["--config.q_chunk=x"], {"model": "m", "data": ["d"], "length": [8]})
    with pytest.raises(config_files.ConfigError, match=r"^--config.samples: expected an integer >= 1, got 0$"):
        ppl.resolve(None, ["--config.samples=0"], {"model": "m", "data": ["d"], "length": [8]})
    s = train.resolve("tiny", ["--config.model_config.hidden_size=64", "--config.eval_lengths=512"], {"out": "r"})
    assert s.model_config.hidden_size == 64 and s.eval_lengths == [512]
    with pytest.raises(config_files.ConfigError, match=r"^--config.model_config.hidden_sise: tiny has no field"):
        train.resolve("tiny", ["--config.model_config.hidden_sise=64"], {"out": "r"})
    with pytest.raises(config_files.ConfigError, match=r"^missing --seq-len \(or a --config file that sets it\)$"):
        train.resolve(None, [], {"out": "r", "model": "m"})


def _two_stages():
    """What a multi-stage config holds: one section per stage, shared values by reference."""
    c = ml_collections.ConfigDict()
    c.data = FieldReference(["stdlib:"])
    c.model = FieldReference("smollm2")
    c.stages = [ml_collections.ConfigDict({"search": {"model": c.get_ref("model"), "data": c.get_ref("data"),
                                                      "target_length": 16384, "out": "s1", "population": 8,
                                                      "parents": 4}}),
                ml_collections.ConfigDict({"train": {"model": c.get_ref("model"), "data": c.get_ref("data"),
                                                     "seq_len": 16384, "steps": 10, "out": "t1"}})]
    return c


def test_sections_of_a_multi_stage_config_are_each_checked_by_their_command():
    c = _two_stages()
    search = search_settings.section(c.stages[0].search, "stages[0].search")
    stage = train.section(c.stages[1].train, "stages[1].train")
    assert search["settings"].population == 8 and search["settings"].iterations == 40  # the rest: defaults
    assert stage.steps == 10 and stage.lr == config_files.defaults("train").lr
    c.data = ["pydoc:"]  # shared: both sections follow
    assert search_settings.section(c.stages[0].search, "s")["data"] == train.section(c.stages[1].train, "t").data \
        == ["pydoc:"]
    bad = _two_stages()
    bad.stages[1].train.lrr = 1e-5
    with pytest.raises(config_files.ConfigError, match=r"^stages\[1\]\.train: unknown setting 'lrr' \(known: "):
        train.section(bad.stages[1].train, "stages[1].train")
    bad = _two_stages()
    bad.stages[1].train.lr = -1.0
    with pytest.raises(config_files.ConfigError, match=r"^stages\[1\]\.train: setting 'lr': expected a positive "
                                                       r"number, got -1.0$"):
        train.section(bad.stages[1].train, "stages[1].train")
    with pytest.raises(config_files.ConfigError, match=r"^stages\[1\]\.train: missing setting 'seq_len'$"):
        train.section({"model": "m", "out": "o"}, "stages[1].train")
    deep = {"model_config": {**config_files.load("tiny", "train").model_config.to_dict(), "hidden_sise": 3},
            "out": "o", "seq_len": 8}
    tiny = config_files.load("tiny", "train")
    with pytest.raises(config_files.ConfigError, match=r"^here: unknown setting 'model_config\.hidden_sise' "
                                                       r"\(known in model_config: "):
        config_files.merge(tiny, deep, "here")


def test_an_installed_package_finds_its_configs(tmp_path):
    """A wheel of the project (not an editable install) holds the configs; installed into a fresh
    folder, ``--config NAME`` and a config's relative import work from there."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), ROOT], check=True, capture_output=True)
    (wheel,) = wheels.iterdir()
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import longrope_jax, sys; from longrope_jax import config_files as c; "
            "print(longrope_jax.__file__); print(c.builtin_dir()); print(c.load('tiny', 'train').lr, "
            "c.load('official', 'search').factor_range)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(target)) and out[1] == str(target / "longrope_jax" / "configs")
    assert out[2:] == ["0.003", "official"]


@pytest.mark.parametrize("name", config_files.builtin_names("train")[1:])  # default: seq_len is the user's
def test_every_built_in_train_config_resolves(name):
    s = train.resolve(name, [], {"out": "run"})
    assert s.seq_len >= 2 and (s.model or s.model_config)


def test_the_training_data_configs_say_what_their_stages_do():
    pose = train.resolve("smollm2_32k_pose", [], {"out": "run"})
    assert (pose.seq_len, pose.skip_to, pose.skip_chunks) == (2048, 32768, 2) and pose.rope.endswith(
        os.path.join("smollm2_32k", "search_gen1", "factors.json")) and os.path.exists(pose.rope)
    mixed = train.resolve("smollm2_16k_longrope2", [], {"out": "run"})
    assert mixed.packing and 0 < mixed.short_microbatches < mixed.accum and mixed.seq_len == 16384
