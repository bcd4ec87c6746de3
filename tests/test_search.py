"""The LongRoPE evolutionary search: operators, the loop, log and resume, the job end to end."""

import dataclasses
import json
import math
import os
import re
import shutil
import sys

import jax
import numpy as np
import pytest

from longrope_jax import cli, config_files, factors, hf
from longrope_jax.model import init_params
from longrope_jax.search import operators, settings as settings_lib
from longrope_jax.search.evolve import SearchLog, evolve
from longrope_jax.search.genome import Candidate, SearchError, Space, from_factors, space_for
from longrope_jax.jobs.search import run as run_search
from longrope_jax.search.settings import SearchSettings

from tiny import byte_tokenizer_file, tiny_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "search")


# --------------------------------------------------------------------------------------------
# Settings and the space.


def test_the_defaults_are_the_paper_settings():
    """``configs/search/default.py`` against the paper's table (the library's ``SearchSettings``
    takes its defaults from there); ``official`` differs in the range alone."""
    default = config_files.load(os.path.join(CONFIGS, "default.py")).to_dict()
    s = SearchSettings()
    assert (s.population, s.iterations, s.mutations, s.crossovers, s.parents) == (64, 40, 16, 16, 32)
    assert (s.mutation_prob, s.step, s.factor_range) == (0.3, 0.01, "paper")
    assert s.start_tokens == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
    official = config_files.load(os.path.join(CONFIGS, "official.py")).to_dict()
    assert {k for k in default if default[k] != official[k]} == {"factor_range"}
    assert official["factor_range"] == "official"


def test_factor_ranges():
    paper = space_for(4, 2.0, factor_range="paper")
    official = space_for(4, 2.0, factor_range="official")
    assert paper.bounds()[0].tolist() == [1.0] * 4 and paper.bounds()[1].tolist() == [2.5] * 4
    assert official.bounds()[1].tolist() == [3.0] * 4
    assert space_for(2, 3.3).bounds()[1].tolist() == [4.12] * 2  # 1.25 * 3.3 = 4.125, snapped inwards
    with pytest.raises(SearchError, match="factor_range: expected one of"):
        space_for(4, 2.0, factor_range="wide")
    with pytest.raises(SearchError, match="scale: expected a number > 1"):
        space_for(4, 1.0)


def test_settings_validation():
    with pytest.raises(SearchError, match=r"parents: expected at most population \(8\), got 32"):
        SearchSettings(population=8).validate()
    with pytest.raises(SearchError, match="mutation_prob: expected a probability"):
        SearchSettings(mutation_prob=1.5).validate()
    with pytest.raises(SearchError, match="start_tokens: expected distinct integers >= 0"):
        SearchSettings(start_tokens=(0, -4)).validate()
    base = dict(model="m", data="d", target_length=64, out="o")
    overrides = ["--config.population=8", "--config.parents=4", "--config.seed=3"]
    job = settings_lib.resolve(os.path.join(CONFIGS, "official.py"), overrides, dict(base, seed=None))
    assert job["settings"].population == 8 and job["settings"].factor_range == "official" and job["seed"] == 3
    assert settings_lib.resolve(None, ["--config.seed=3"], dict(base, seed=5))["seed"] == 5  # flags win
    with pytest.raises(config_files.ConfigError, match="has no field 'populaton'"):
        settings_lib.resolve(None, ["--config.populaton=8"], base)
    with pytest.raises(config_files.ConfigError, match="missing --target-length"):
        settings_lib.resolve(None, [], dict(base, target_length=None))


def test_from_factors_rounds_clips_and_validates():
    sp = space_for(4, 2.0)
    c = from_factors([0.9, 1.234, 1.5, 2.6], sp)
    assert c.grid == (100, 123, 150, 250) and c.start_tokens == 0
    assert sp.factors(c).tolist() == [1.0, 1.23, 1.5, 2.5]
    assert from_factors(sp.factors(c), sp) == c  # file values read back to the same grid point
    with pytest.raises(SearchError, match=r"src: pair 2: factors must be non-decreasing, got 1.5 then 1.2"):
        from_factors([1.0, 1.5, 1.2, 2.0], sp, source="src")
    with pytest.raises(SearchError, match=r"src: pair 3: factor 2.6 is outside the search range \[1, 2.5\]"):
        from_factors([1.0, 1.5, 2.0, 2.6], sp, clip=False, source="src")
    with pytest.raises(SearchError, match=r"expected 4 factors \(rotary_dim / 2\), got 3"):
        from_factors([1.0, 1.5, 2.0], sp)
    with pytest.raises(SearchError, match="pair 1: expected a finite factor"):
        from_factors([1.0, float("nan"), 2.0, 2.0], sp)
    with pytest.raises(SearchError, match=r"start_tokens: 3 is not in the search set"):
        from_factors([1.0, 1.5, 2.0, 2.0], sp, start_tokens=3)


# --------------------------------------------------------------------------------------------
# Operators: never a non-monotone or out-of-range vector, never a known one.


def _random_space(rng, p):
    lo = np.sort(rng.integers(90, 130, p))
    hi = lo + rng.integers(0, 60, p)
    hi = np.maximum.accumulate(hi)
    return Space(tuple(int(x) for x in lo), tuple(int(x) for x in hi), 0.01, (0, 1, 2, 4, 8, 64))


def _random_candidate(rng, sp):
    g, prev = [], -1
    for lo, hi in zip(sp.lo, sp.hi):
        lo = max(lo, prev)
        prev = int(rng.integers(lo, hi + 1))
        g.append(prev)
    return Candidate(tuple(g), int(rng.choice(sp.start_tokens)))


def test_mutation_stays_valid_and_new():
    rng = np.random.default_rng(0)
    for trial in range(300):
        sp = _random_space(rng, int(rng.integers(1, 12))) if trial % 3 else space_for(int(rng.integers(2, 33)), 4.0)
        parent = _random_candidate(rng, sp)
        assert operators.is_valid(parent, sp)
        seen = {parent.key}
        for _ in range(10):
            c = operators.mutate(parent, sp, rng, seen, prob=float(rng.uniform(0.05, 1.0)),
                                 start_prob=float(rng.uniform(0, 1)))
            if c is None:  # tiny spaces can run out of new vectors
                break
            assert operators.violation(c, sp) is None, (c, sp)
            assert c.key not in seen
            seen.add(c.key)


def test_crossover_stays_valid_and_new():
    rng = np.random.default_rng(1)
    made = fell_back = 0
    for trial in range(300):
        sp = _random_space(rng, int(rng.integers(2, 12))) if trial % 3 else space_for(int(rng.integers(2, 33)), 8.0)
        a, b = _random_candidate(rng, sp), _random_candidate(rng, sp)
        seen = {a.key, b.key}
        for _ in range(5):
            c = operators.crossover(a, b, sp, rng, seen, prob=float(rng.uniform(0.1, 1.0)))
            if c is None:
                fell_back += 1
                break
            made += 1
            assert operators.violation(c, sp) is None
            assert c.key not in seen
            assert all(x in (ya, yb) for x, ya, yb in zip(c.grid, a.grid, b.grid))
            assert c.start_tokens in (a.start_tokens, b.start_tokens)
            seen.add(c.key)
    assert made > 500 and fell_back > 0
    sp = space_for(4, 2.0)
    a = from_factors([1, 1.5, 2, 2], sp)
    assert operators.crossover(a, a, sp, rng, set()) is None  # equal parents: the caller mutates


def test_mutation_gives_up_on_an_exhausted_space():
    sp = Space((100, 100), (101, 101), 0.01, (0,))
    every = {Candidate(g).key for g in ((100, 100), (100, 101), (101, 101))}
    assert operators.mutate(Candidate((100, 101)), sp, np.random.default_rng(0), every, tries=50) is None
    with pytest.raises(SearchError, match="pair 1: not non-decreasing"):
        operators.check(Candidate((101, 100)), sp)


# --------------------------------------------------------------------------------------------
# The loop on a synthetic fitness: distance to a hidden monotone vector.


P = 6
SPACE = space_for(P, 2.0, step=0.1, factor_range="official", start_tokens=(0, 2, 4, 8))
TARGET = (11, 13, 19, 20, 25, 29)
SMALL = SearchSettings(population=16, iterations=40, mutations=8, crossovers=8, parents=8)


def _seeds(sp=SPACE):
    return [("pi", from_factors(np.full(P, 2.0), sp)), ("ntk", from_factors(2.0 ** (np.arange(P) / (P - 1)), sp))]


class Synthetic:
    """Planted optimum: ``1 + |grid - TARGET|_1 + 3 [n_hat != 4]``; records every call."""

    def __init__(self, fail_on_call=None, exc=RuntimeError, seconds_per_call=0.0):
        self.calls, self.fail_on_call, self.exc = [], fail_on_call, exc
        self.seconds_per_call, self.now = seconds_per_call, 0.0  # a fake clock each call advances

    def __call__(self, cands):
        self.now += self.seconds_per_call
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise self.exc("injected failure")
        self.calls.append([c.key for c in cands])
        for c in cands:
            assert operators.is_valid(c, SPACE)
        return [1.0 + float(np.abs(np.subtract(c.grid, TARGET)).sum()) + 3.0 * (c.start_tokens != 4) for c in cands]


def test_finds_a_planted_optimum():
    for seed in range(3):
        f = Synthetic()
        res = evolve(SPACE, _seeds(), f, SMALL, seed=seed, progress=False)
        assert res.best.ppl == 1.0, (seed, res.best)
        assert res.best.candidate == Candidate(TARGET, 4)
        assert res.stopped == "completed" and res.evaluations == 16 + 40 * 16


def test_generations_are_scored_together_and_never_twice():
    f = Synthetic()
    res = evolve(SPACE, _seeds(), f, SMALL, seed=0, progress=False)
    assert [len(c) for c in f.calls] == [16] + [16] * 40
    keys = [k for call in f.calls for k in call]
    assert len(keys) == len(set(keys)) == res.evaluations
    bests = [g["best_ppl"] for g in res.generations]
    assert bests == sorted(bests, reverse=True) and len(bests) == 41


def _log_bytes(path):
    with open(path, "rb") as fh:
        return fh.read()


def test_seeded_runs_are_reproducible(tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    st = SearchSettings(population=16, iterations=12, mutations=8, crossovers=8, parents=8)
    ra = evolve(SPACE, _seeds(), Synthetic(), st, seed=7, log_path=a, progress=False)
    rb = evolve(SPACE, _seeds(), Synthetic(), st, seed=7, log_path=b, progress=False)
    evolve(SPACE, _seeds(), Synthetic(), st, seed=8, log_path=c, progress=False)
    assert _log_bytes(a) == _log_bytes(b) and _log_bytes(a) != _log_bytes(c)
    assert ra.best.candidate == rb.best.candidate
    lines = _log_bytes(a).decode().splitlines()
    assert len(lines) == ra.evaluations + 1
    rec = json.loads(lines[1])
    assert rec["eval"] == 0 and rec["origin"] == "seed:pi" and rec["factors"] == [2.0] * P


@pytest.mark.parametrize("how", ["exception", "max_evals", "torn_line", "interrupt"])
def test_interrupted_then_resumed_ends_where_uninterrupted_ends(tmp_path, how):
    settings = SearchSettings(population=16, iterations=12, mutations=8, crossovers=8, parents=8)
    ref_path, path = str(tmp_path / "ref.jsonl"), str(tmp_path / "log.jsonl")
    ref = evolve(SPACE, _seeds(), Synthetic(), settings, seed=3, log_path=ref_path, progress=False)
    if how in ("exception", "interrupt"):
        exc = RuntimeError if how == "exception" else KeyboardInterrupt
        f = Synthetic(fail_on_call=5, exc=exc)
        if how == "exception":
            with pytest.raises(RuntimeError, match="injected"):
                evolve(SPACE, _seeds(), f, settings, seed=3, log_path=path, progress=False)
        else:
            part = evolve(SPACE, _seeds(), f, settings, seed=3, log_path=path, progress=False)
            assert part.stopped == "interrupted" and part.evaluations == 16 + 3 * 16 and part.best is not None
        done = 16 + 3 * 16  # the generation in flight is lost
    else:
        part = evolve(SPACE, _seeds(), Synthetic(), settings, seed=3, log_path=path, max_evals=53, progress=False)
        assert part.stopped == "max_evals" and part.evaluations == 53  # inside generation 3
        assert part.best.ppl == min(json.loads(x)["ppl"] for x in _log_bytes(path).decode().splitlines()[1:])
        done = 53
        if how == "torn_line":
            with open(path, "ab") as fh:
                fh.write(b'{"eval": 53, "generation": 3, "ori')
    assert len(_log_bytes(path).decode().splitlines()) - 1 == done + (how == "torn_line")
    f = Synthetic()
    res = evolve(SPACE, _seeds(), f, settings, seed=3, log_path=path, progress=False)
    assert res.replayed == done and res.new_evaluations == ref.evaluations - done
    assert sum(len(c) for c in f.calls) == ref.evaluations - done  # nothing scored twice
    assert _log_bytes(path) == _log_bytes(ref_path)
    assert res.best.candidate == ref.best.candidate and res.best.ppl == ref.best.ppl
    assert res.generations == ref.generations
    # Resuming a finished search evaluates nothing and ends in the same place.
    again = evolve(SPACE, _seeds(), Synthetic(), settings, seed=3, log_path=path, progress=False)
    assert again.new_evaluations == 0 and again.best.candidate == ref.best.candidate


class OneAtATime(Synthetic):
    """Like Synthetic, for a fitness that takes one candidate per call (``batch_size = 1``, as the
    perplexity fitness on one CPU device)."""

    batch_size = 1


def test_one_candidate_per_call_logs_each_and_resumes_inside_a_generation(tmp_path):
    settings = SearchSettings(population=8, iterations=3, mutations=4, crossovers=4, parents=4)
    ref_path, path = str(tmp_path / "ref.jsonl"), str(tmp_path / "log.jsonl")
    ref = evolve(SPACE, _seeds(), Synthetic(), settings, seed=5, log_path=ref_path, progress=False)
    lines = []
    f = OneAtATime(fail_on_call=8 + 3, exc=KeyboardInterrupt)  # killed on generation 1's third candidate
    part = evolve(SPACE, _seeds(), f, settings, seed=5, log_path=path, progress=False, log=lines.append)
    assert [len(c) for c in f.calls] == [1] * 10
    assert part.stopped == "interrupted" and part.evaluations == 8 + 2  # only the candidate in flight lost
    assert "generation 1: 2/8 scored" in lines[-2] and "per candidate" in lines[-2]
    f = OneAtATime()
    res = evolve(SPACE, _seeds(), f, settings, seed=5, log_path=path, progress=False)
    assert res.replayed == 10 and len(f.calls) == ref.evaluations - 10
    assert _log_bytes(path) == _log_bytes(ref_path)  # the same log as scoring whole generations
    assert res.best.candidate == ref.best.candidate and res.generations == ref.generations


def test_time_budget_stops_inside_a_generation_when_candidates_go_one_at_a_time():
    f = OneAtATime(seconds_per_call=10.0)
    res = evolve(SPACE, _seeds(), f, SMALL, seed=0, time_budget=35.0, clock=lambda: f.now, progress=False)
    assert res.stopped == "time_budget" and res.evaluations == 4 and res.generations[-1]["partial"]


def test_time_budget_stops_between_generations():
    f = Synthetic(seconds_per_call=10.0)
    res = evolve(SPACE, _seeds(), f, SMALL, seed=0, time_budget=35.0, clock=lambda: f.now, progress=False)
    assert res.stopped == "time_budget" and len(f.calls) == 4 and res.evaluations == 16 + 3 * 16
    assert res.best.ppl == min(x.ppl for x in res.history)


def test_a_log_from_another_search_is_refused(tmp_path):
    path = str(tmp_path / "log.jsonl")
    evolve(SPACE, _seeds(), Synthetic(), SMALL, seed=1, log_path=path, max_evals=20, progress=False)
    with pytest.raises(SearchError, match=r"belongs to a different search \(seed: log has 1, this search 2\)"):
        evolve(SPACE, _seeds(), Synthetic(), SMALL, seed=2, log_path=path, progress=False)
    with pytest.raises(SearchError, match="settings.mutations: log has 8, this search 4"):
        evolve(SPACE, _seeds(), Synthetic(), SearchSettings(population=16, mutations=4, parents=8), seed=1,
               log_path=path, progress=False)
    lines = _log_bytes(path).split(b"\n")
    lines[3] = b"{not json"
    with open(path, "wb") as fh:
        fh.write(b"\n".join(lines))
    with pytest.raises(SearchError, match="line 4: not valid JSON"):
        SearchLog(path, json.loads(lines[0]))


def test_fitness_non_finite_ranks_last():
    def fitness(cands):
        return [{"ppl": float("nan") if i % 2 else 5.0 + i, "nll": 1.0} for i, _ in enumerate(cands)]

    res = evolve(SPACE, _seeds(), fitness, SearchSettings(population=6, iterations=2, mutations=2, crossovers=2,
                                                          parents=3), progress=False)
    assert res.best.ppl == 5.0 and res.best.record["nll"] == 1.0
    assert any(x.record["ppl"] is None and x.ppl == math.inf for x in res.history)


# --------------------------------------------------------------------------------------------
# The job on a tiny model, through the command line.


TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. " * 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    cfg = tiny_config(max_position_embeddings=32)
    params = jax.tree.map(lambda a: a * 4.0 if a.ndim > 1 else a, init_params(cfg, 3))  # sharper attention
    tf = byte_tokenizer_file(str(root))
    model = str(root / "tiny")
    hf.save(model, cfg, params, tokenizer_file=tf)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": TEXT[i:]}) + "\n" for i in (0, 7, 19)))
    return model, str(data), root


SMOKE = ["--config.population=6", "--config.iterations=2", "--config.mutations=2", "--config.crossovers=2",
         "--config.parents=4"]


def _cli(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, [json.loads(line) for line in out.splitlines() if line.strip()], err


def test_search_smoke_and_factors_round_trip(tiny, capsys, monkeypatch):
    model, data, root = tiny
    monkeypatch.chdir(root)
    out = "run"  # relative: the provenance's command keeps it as given
    argv = ["search", "--model", model, "--data", data, "--target-length", "64", "--out", out, "--samples", "2",
            "--seed", "1", *SMOKE]
    rc, lines, err = _cli(argv, capsys)
    assert rc == 0, err
    (res,) = lines
    assert res["stopped"] == "completed" and res["evaluations"] == 6 + 2 * 4 and res["new_evaluations"] == 14
    assert set(res["baselines"]) == {"none", "pi:2", "ntk:2", "yarn:2", "dynamic:2"}
    for f in ("factors.json", "summary.json", "log.jsonl", "search_progress.png", "search_factors.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left
    d = factors.load(os.path.join(out, "factors.json"))
    assert d["original_max_position_embeddings"] == 32 and d["max_position_embeddings"] == 64
    assert d["long_factor"] == sorted(d["long_factor"]) and 1.0 <= min(d["long_factor"]) <= max(d["long_factor"]) <= 2.5
    prov = d["provenance"]
    assert prov["seed"] == 1 and prov["version"] and len(prov["documents"]) == 2
    assert prov["command"].startswith("longrope-jax search --model") and "--config.population=6" in prov["command"]
    assert " --out run " in prov["command"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    records = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]]
    assert len(records) == 14 and len({(r["start_tokens"], tuple(r["factors"])) for r in records}) == 14
    assert summary["result"]["ppl"] == res["ppl"] == min(r["ppl"] for r in records)
    assert np.ptp([r["ppl"] for r in records]) > 1e-4  # the candidates really differ
    assert summary["result"]["start_tokens"] == d["start_tokens"] == res["start_tokens"]
    # The factors file scores the same through `ppl`, on the same seeded windows.
    rc, (ppl,), err = _cli(["ppl", "--model", model, "--data", data, "--length", "64", "--samples", "2", "--seed", "1",
                           "--rope", os.path.join(out, "factors.json")], capsys)
    assert rc == 0, err
    assert ppl["documents"] == summary["documents"]
    np.testing.assert_allclose(ppl["ppl"], res["ppl"], rtol=1e-5)
    # The same command again resumes from the log: nothing re-evaluated, the same result.
    rc, (again,), err = _cli(argv, capsys)
    assert rc == 0, err
    assert again["new_evaluations"] == 0 and again["replayed_evaluations"] == 14 and again["ppl"] == res["ppl"]
    assert "resuming from" in err and "(from baselines.json)" in err  # baselines not rescored either
    # Another search's log in --out is refused before anything is scored.
    rc, _, err = _cli([*argv[:-len(SMOKE)], "--config.mutation_prob=0.5", *SMOKE], capsys)
    assert rc == 2 and "belongs to a different search (settings.mutation_prob: log has 0.3, this search 0.5)" in err
    assert "baselines:" not in err


def test_baselines_survive_a_crash_in_generation_0(tiny, capsys, monkeypatch):
    """The baselines are written as soon as they are scored: a search killed before its first
    generation ends does not score them again when resumed."""
    from longrope_jax.search import run as search_run

    model, data, root = tiny
    out = str(root / "crash")
    argv = ["search", "--model", model, "--data", data, "--target-length", "64", "--out", out, "--samples", "1",
            *SMOKE]

    def crash(*a, **k):
        raise RuntimeError("killed in generation 0")

    with monkeypatch.context() as m:
        m.setattr(search_run.evolve_lib, "evolve", crash)
        with pytest.raises(RuntimeError, match="killed in generation 0"):
            cli.main(argv)
    capsys.readouterr()
    saved = json.load(open(os.path.join(out, "baselines.json")))
    assert not os.path.exists(os.path.join(out, "summary.json"))
    from longrope_jax.search import fitness as fitness_lib

    scored = []
    real = fitness_lib.score_named
    monkeypatch.setattr(fitness_lib, "score_named",
                        lambda fit, specs, **k: scored.append(set(specs) - set(k["done"])) or real(fit, specs, **k))
    rc, (res,), err = _cli(argv, capsys)
    assert rc == 0, err
    assert scored == [set()] and "(from baselines.json)" in err  # none scored again (all passed as done)
    assert res["baselines"] == {k: v["ppl"] for k, v in saved["baselines_detail"].items()}


def test_one_candidate_per_call_keeps_each_baseline_and_reports_progress(tiny, capsys, monkeypatch):
    """As on one CPU device (``evaluate.one_cpu``): baselines and candidates scored one per call,
    each kept as it finishes; a search killed inside the baselines scores only the rest when resumed,
    and ends where an uninterrupted search ends."""
    from longrope_jax import evaluate
    from longrope_jax.search import fitness as fitness_lib

    model, data, root = tiny
    monkeypatch.setattr(evaluate, "one_cpu", lambda devices=None: True)
    common = ["--model", model, "--data", data, "--target-length", "64", "--samples", "1", *SMOKE]
    rc, (ref,), err = _cli(["search", *common, "--out", str(root / "one_ref")], capsys)
    assert rc == 0, err
    assert "baseline yarn:2: ppl" in err and "(4/5, " in err and "generation 1: 3/4 scored" in err
    out = str(root / "one_cut")
    real, calls = fitness_lib.PerplexityFitness.score_specs, []

    def killed_on_third(self, specs):
        calls.append(len(specs))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, specs)

    with monkeypatch.context() as m:
        m.setattr(fitness_lib.PerplexityFitness, "score_specs", killed_on_third)
        assert cli.main(["search", *common, "--out", out]) == 130  # Ctrl-C: one line, exit 130
    assert capsys.readouterr().err.rstrip().endswith("longrope-jax search: interrupted")
    assert calls == [1, 1, 1]
    saved = json.load(open(os.path.join(out, "baselines.json")))["baselines_detail"]
    assert list(saved) == ["none", "pi:2"]
    rc, (res,), err = _cli(["search", *common, "--out", out], capsys)
    assert rc == 0, err
    assert "2 of 5 from baselines.json" in err and "baseline none:" not in err and "baseline ntk:2:" in err
    assert res["baselines"] == ref["baselines"] and res["ppl"] == ref["ppl"]
    assert open(os.path.join(out, "log.jsonl")).read() == open(str(root / "one_ref" / "log.jsonl")).read()


def test_search_budget_stops_cleanly_and_writes_result(tiny, capsys):
    model, data, root = tiny
    out = str(root / "budget")
    rc, (res,), err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--out", out,
                            "--samples", "1", "--max-evals", "8", *SMOKE], capsys)
    assert rc == 0, err
    assert res["stopped"] == "max_evals" and res["evaluations"] == 8
    d = factors.load(os.path.join(out, "factors.json"))
    assert d["provenance"]["search"]["evaluations"] == 8


def test_search_on_a_mesh_equals_one_device(tiny, capsys):
    """The same search on ``--mesh data=2,sequence=4`` (candidates over data, tokens over sequence)
    and on one device: the same candidates with the same scores."""
    model, data, root = tiny
    logs = []
    for name, mesh in (("one", None), ("mesh", "data=2,sequence=4")):
        out = str(root / f"mesh_{name}")
        argv = ["search", "--model", model, "--data", data, "--target-length", "64", "--out", out, "--samples", "2",
                "--max-evals", "8", *SMOKE] + ([] if mesh is None else ["--mesh", mesh])
        with pytest.MonkeyPatch.context() as m:
            if mesh is None:  # one device: as on a one-CPU machine
                m.setattr(jax, "local_devices", lambda *a, **k: jax.devices()[:1])
            rc, (res,), err = _cli(argv, capsys)
        assert rc == 0, err
        logs.append([json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]])
    one, mesh = logs
    assert len(one) == len(mesh) == 8
    assert [r["factors"] for r in one] == [r["factors"] for r in mesh]
    np.testing.assert_allclose([r["ppl"] for r in mesh], [r["ppl"] for r in one], rtol=1e-5)
    # A mesh the length does not fit is refused before anything is scored.
    rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "60", "--out",
                       str(root / "mesh_bad"), "--samples", "2", "--mesh", "sequence=8", *SMOKE], capsys)
    assert rc == 2 and "--mesh: sequence=8 needs a length divisible by 16 (2 x sequence), got 60" in err


def test_two_processes_search_as_one_and_resume_to_the_same_log(tiny, tmp_path, capsys):
    """2 processes x 4 devices on ``data=2,sequence=4``: the candidates of 1 process x 8 devices on
    that mesh, in the same order, perplexities within 1e-6; process 0 alone writes and prints.
    Stopped by a budget and resumed, the 2-process log is byte for byte the uninterrupted one's."""
    from processes import free_port, two_processes

    model, data, root = tiny
    args = ["search", "--model", model, "--data", data, "--target-length", "64", "--samples", "2", "--seed", "1",
            *SMOKE, "--mesh", "data=2,sequence=4"]
    rc, _, err = _cli([*args, "--out", str(tmp_path / "one")], capsys)  # this process: 8 devices
    assert rc == 0, err
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def two(out, *extra):
        port = free_port()
        res = two_processes(lambda i: [sys.executable, "-m", "longrope_jax", *args, "--out", str(out), *extra,
                                       "--coordinator", f"localhost:{port}", "--num-processes", "2",
                                       "--process-id", str(i)], repo, env={"PYTHONPATH": repo})
        for rc, _, err in res:
            assert rc == 0, err[-3000:]
        assert res[1][1] == "" and not os.path.exists(f"{out}.1")  # process 1 prints and writes nothing
        return json.loads(res[0][1].splitlines()[-1])

    whole = two(tmp_path / "two")
    assert whole["new_evaluations"] == 14
    cut = two(tmp_path / "cut", "--max-evals", "8")
    assert cut["stopped"] == "max_evals" and cut["new_evaluations"] == 8
    rest = two(tmp_path / "cut")
    assert rest["replayed_evaluations"] == 8 and rest["new_evaluations"] == 6

    def records(out):
        return [json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]]

    one, got = records(tmp_path / "one"), records(tmp_path / "two")
    assert [(r["start_tokens"], r["factors"]) for r in got] == [(r["start_tokens"], r["factors"]) for r in one]
    np.testing.assert_allclose([r["ppl"] for r in got], [r["ppl"] for r in one], rtol=1e-6)
    assert open(tmp_path / "cut" / "log.jsonl").read() == open(tmp_path / "two" / "log.jsonl").read()


def test_search_windows_from_two_sources_are_logged_and_resume(tiny, tmp_path, capsys):
    model, data, root = tiny
    other = tmp_path / "other.txt"
    other.write_text("Sphinx of black quartz, judge my vow. How vexingly quick daft zebras jump! " * 8)
    out = str(tmp_path / "two")
    argv = ["search", "--model", model, "--data", data, "--data", str(other), "--target-length", "64", "--out", out,
            "--samples", "3", "--seed", "1", "--max-evals", "8", *SMOKE]
    rc, (res,), err = _cli(argv, capsys)
    assert rc == 0, err
    assert res["data"] == [data, str(other)] and len(res["documents"]) == 3 and res["documents"][2] == str(other)
    header = json.loads(open(os.path.join(out, "log.jsonl")).readline())
    assert header["context"]["documents"] == res["documents"]
    prov = factors.load(os.path.join(out, "factors.json"))["provenance"]
    assert f"--data {data} --data {other}" in prov["command"] and prov["documents"] == res["documents"]
    rc, (ppl,), err = _cli(["ppl", "--model", model, "--data", data, "--data", str(other), "--length", "64",
                            "--samples", "3", "--seed", "1", "--rope", os.path.join(out, "factors.json")], capsys)
    assert rc == 0 and ppl["documents"] == res["documents"]  # ppl picks the same windows
    np.testing.assert_allclose(ppl["ppl"], res["ppl"], rtol=1e-5)
    rc, (again,), err = _cli(argv, capsys)
    assert rc == 0 and again["new_evaluations"] == 0 and again["ppl"] == res["ppl"]


def test_bad_seeds_are_clear_errors(tiny, capsys):
    model, data, root = tiny
    base = ["search", "--model", model, "--data", data, "--target-length", "64", "--out", str(root / "bad")]
    rc, _, err = _cli(base + ["--seed", "-1"], capsys)
    assert rc == 2 and "--seed: expected an integer >= 0, got -1" in err
    rc, _, err = _cli(base + ["--config.seed=-3"], capsys)
    assert rc == 2 and "--config.seed: expected an integer >= 0, got -3" in err
    rc, _, err = _cli(base + ["--config.seed=1.5"], capsys)
    assert rc == 2 and "--config.seed: expected a int, got '1.5'" in err
    with pytest.raises(SystemExit):
        cli.main(base + ["--seed", "abc"])
    assert "invalid int value: 'abc'" in capsys.readouterr().err
    for bad in (1.5, "3", True):
        with pytest.raises(SearchError, match="--seed: expected an integer >= 0"):
            run_search(model, data, 64, str(root / "bad"), seed=bad)
    rc, _, err = _cli(base[:-4] + ["--target-length", "32", "--out", str(root / "bad")], capsys)
    assert rc == 2 and "--target-length: expected more than the original window (32 tokens), got 32" in err


def test_bad_factor_files_are_clear_errors(tiny, tmp_path, capsys):
    model, data, root = tiny
    good = {"format": "longrope-factors/1", "rope_theta": 10000.0, "rotary_dim": 8,
            "original_max_position_embeddings": 32, "max_position_embeddings": 64, "long_factor": [1, 1.2, 1.5, 2]}
    cases = [
        ({"long_factor": [1, 1.5, 1.2, 2]}, "pair 2: factors must be non-decreasing, got 1.5 then 1.2"),
        ({"long_factor": [1, 1.2, 1.5, 2.7]}, r"pair 3: factor 2.7 is outside the search range \[1, 2.5\]"),
        ({"long_factor": [1, 1.2, 2]}, "expected 4 factors"),
        ({"long_factor": [1, 1.2, -1, 2]}, r"long_factor\[2\]: expected a finite factor > 0"),
        ({"format": "longrope-factors/0"}, "field 'format': expected 'longrope-factors/1'"),
        ({"start_tokens": 3}, r"start_tokens: 3 is not in the search set"),
        ({"rope_theta": 500000.0}, "field 'rope_theta': expected 10000.0"),
    ]
    for i, (patch, msg) in enumerate(cases):
        path = tmp_path / f"f{i}.json"
        path.write_text(json.dumps(dict(good, **patch)))
        rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--samples", "1",
                           "--out", str(tmp_path / f"out{i}"), *SMOKE, f"--config.seed_factors=['{path}']"], capsys)
        assert rc == 2, (patch, err)
        assert str(path) in err and re.search(msg, err), (msg, err)
    rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--samples", "1",
                       "--out", str(tmp_path / "missing"), "--config.seed_factors=['/nonexistent.json']"], capsys)
    assert rc == 2 and "/nonexistent.json: not found" in err


def test_a_finished_search_can_be_extended(tmp_path):
    short = SearchSettings(population=16, iterations=5, mutations=8, crossovers=8, parents=8)
    long = SearchSettings(population=16, iterations=9, mutations=8, crossovers=8, parents=8)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    evolve(SPACE, _seeds(), Synthetic(), short, seed=4, log_path=a, progress=False)
    res = evolve(SPACE, _seeds(), Synthetic(), long, seed=4, log_path=a, progress=False)
    evolve(SPACE, _seeds(), Synthetic(), long, seed=4, log_path=b, progress=False)
    assert res.replayed == 16 + 5 * 16 and _log_bytes(a) == _log_bytes(b)


# --------------------------------------------------------------------------------------------
# LongRoPE2 mode: the critical-dimension genome.


def test_theoretical_critical_dim():
    from longrope_jax.search.genome import theoretical_critical_dim

    assert theoretical_critical_dim(128, 500000.0, 8192) == 35  # LLaMA3-8B (docs/method.md)
    assert theoretical_critical_dim(64, 100000.0, 8192) == 20  # SmolLM2


def _lr2_space(rng):
    from longrope_jax.search.genome import longrope2_space_for

    p = int(rng.integers(3, 20))
    lo = int(rng.integers(1, p - 1))
    return longrope2_space_for(p, float(rng.choice([1.5, 2.0, 4.0])), (lo, int(rng.integers(lo, p))),
                               step=0.05, start_tokens=(0, 4))


def _check_lr2(c, sp):
    assert operators.violation(c, sp) is None, (c, sp)
    f = sp.factors(c)
    k = c.critical_dim
    s = sp.value(sp.lo[0])
    assert np.all(f[k:] >= s - 1e-9) and np.all(f[k:] <= 2 * s + 1e-9) and np.all(np.diff(f) >= -1e-9)
    np.testing.assert_allclose(f[:k], f[k] ** (np.arange(k) / k), rtol=1e-9)
    assert f[0] == 1.0


def test_longrope2_operators_stay_valid_canonical_and_new():
    from longrope_jax.search.genome import critical_from_factors, from_record

    rng = np.random.default_rng(7)
    crits = set()
    for trial in range(200):
        sp = _lr2_space(rng)
        a = critical_from_factors(np.sort(rng.uniform(0, 3 * sp.value(sp.hi[0]), sp.num_pairs)), sp,
                                  int(rng.integers(sp.critical[0], sp.critical[1] + 1)))
        b = critical_from_factors(np.sort(rng.uniform(0, 3 * sp.value(sp.hi[0]), sp.num_pairs)), sp,
                                  int(rng.integers(sp.critical[0], sp.critical[1] + 1)))
        _check_lr2(a, sp)
        _check_lr2(b, sp)
        seen = {a.key, b.key}
        for _ in range(4):
            for op in (lambda: operators.mutate(a, sp, rng, seen, prob=0.5),
                       lambda: operators.crossover(a, b, sp, rng, seen, prob=0.8)):
                c = op()
                if c is None:
                    continue
                _check_lr2(c, sp)
                assert c.key not in seen
                seen.add(c.key)
                crits.add(c.critical_dim != a.critical_dim)
                rec = {"factors": sp.factors(c).tolist(), "start_tokens": c.start_tokens, "critical_dim": c.critical_dim}
                assert from_record(json.loads(json.dumps(rec)), sp) == c  # the log replays it exactly
    assert crits == {True, False}  # the critical dimension is searched
    sp = _lr2_space(np.random.default_rng(0))
    with pytest.raises(SearchError, match="no critical dimension in LongRoPE2 mode"):
        operators.check(Candidate(sp.lo), sp)
    c = critical_from_factors(np.full(sp.num_pairs, 100.0), sp, sp.critical[0])  # every pair at 2 s
    broken = Candidate((sp.lo[0],) + c.grid[1:], 0, c.critical_dim)  # monotone, in range, a dead gene moved
    with pytest.raises(SearchError, match="not in canonical form"):
        operators.check(broken, sp)


def test_log_headers_of_plain_searches_do_not_change():
    """Settings added with LongRoPE2 mode stay out of a plain search's log header (old logs resume)."""
    from longrope_jax.search.evolve import make_header

    h = make_header(SPACE, SMALL, 0, _seeds())
    assert not {"mode", "critical_range", "fitness", "needles"} & set(h["settings"])
    h2 = make_header(SPACE, SearchSettings(mode="longrope2", fitness="needle"), 0, _seeds())
    assert h2["settings"]["mode"] == "longrope2" and h2["settings"]["fitness"] == "needle"
    assert not {"attention_factor_range", "attention_factor_step"} & set(h["settings"])


# --------------------------------------------------------------------------------------------
# The attention-factor gene.

def test_attention_gene_operators_stay_valid_and_replay():
    from longrope_jax.search.genome import from_record

    sp = SPACE.with_attention_gene((1.0, 1.2), 0.01)
    assert sp.attention == (100, 120) and sp.describe()["attention_factor"] == [1.0, 1.2]
    rng = np.random.default_rng(3)
    a = dataclasses.replace(_random_candidate(rng, SPACE), attention=104)
    b = dataclasses.replace(_random_candidate(rng, SPACE), attention=107)
    seen, moved = {a.key, b.key}, set()
    for _ in range(100):
        for c in (operators.mutate(a, sp, rng, seen, prob=0.5), operators.crossover(a, b, sp, rng, seen, prob=0.8)):
            if c is None:
                continue
            assert operators.violation(c, sp) is None and c.key not in seen
            seen.add(c.key)
            moved.add(c.attention not in (a.attention, b.attention))
            rec = {"factors": sp.factors(c).tolist(), "start_tokens": c.start_tokens,
                   "attention_factor": sp.attention_factor(c)}
            assert from_record(json.loads(json.dumps(rec)), sp) == c
    assert moved == {True, False}
    assert dataclasses.replace(a, attention=None).key != a.key
    with pytest.raises(SearchError, match="no attention factor while the gene is searched"):
        operators.check(dataclasses.replace(a, attention=None), sp)
    with pytest.raises(SearchError, match=r"attention factor 1.3 outside \[1, 1.2\]"):
        operators.check(dataclasses.replace(a, attention=130), sp)
    with pytest.raises(SearchError, match="an attention factor gene outside its search"):
        operators.check(a, SPACE)
    with pytest.raises(SearchError, match="attention_factor_range: expected"):
        SearchSettings(attention_factor_range=(1.2, 1.0)).validate()


def test_attention_gene_search_logs_exports_and_resumes(tiny, tmp_path, capsys):
    from longrope_jax import export

    model, data, root = tiny
    out = str(tmp_path / "gene")
    argv = ["search", "--model", model, "--data", data, "--target-length", "64", "--out", out, "--samples", "2",
            "--seed", "2", "--config.attention_factor_range=[0.9, 1.3]", "--config.attention_factor_step=0.02", *SMOKE]
    rc, (res,), err = _cli(argv, capsys)
    assert rc == 0, err
    records = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]]
    afs = [r["attention_factor"] for r in records]
    assert records[0]["attention_factor"] == 1.1  # seeds start at the paper's sqrt(1 + ln 2 / ln 32) = 1.0954
    assert any(r["origin"] == "seed:yarn+yarn-attention" and r["attention_factor"] == 1.06 for r in records)
    assert len(set(afs)) > 2 and all(0.9 <= a <= 1.3 for a in afs)
    d = factors.load(os.path.join(out, "factors.json"))
    best = min(records, key=lambda r: r["ppl"])
    assert d["attention_factor"] == best["attention_factor"] == res["attention_factor"]
    assert d["provenance"]["search"]["attention_factor_range"] == [0.9, 1.3]
    rc, (ppl,), err = _cli(["ppl", "--model", model, "--data", data, "--length", "64", "--samples", "2", "--seed", "2",
                            "--rope", os.path.join(out, "factors.json")], capsys)
    np.testing.assert_allclose(ppl["ppl"], res["ppl"], rtol=1e-5)  # the file carries the searched factor
    cfg, _ = hf.load(model)
    ext, notes = export.longrope_config(cfg, d, allow_drop_start_tokens=True)
    assert notes["attention_factor_written"] and ext.rope_parameters["attention_factor"] == d["attention_factor"]
    rc, (again,), err = _cli(argv, capsys)
    assert rc == 0 and again["new_evaluations"] == 0 and again["ppl"] == res["ppl"]
    rc, _, err = _cli([*argv, "--readjust", os.path.join(out, "factors.json")], capsys)
    assert rc == 2 and "attention_factor_range: a readjust keeps" in err


# --------------------------------------------------------------------------------------------
# Progressive search, short-context readjust and LongRoPE2 mode on the tiny model.

LAMBDA_1 = [1.0, 1.2, 1.5, 2.0]


def _factors_file(path, **kw):
    d = {"format": "longrope-factors/1", "rope_type": "longrope", "rope_theta": 10000.0, "rotary_dim": 8,
         "original_max_position_embeddings": 32, "max_position_embeddings": 64, "long_factor": LAMBDA_1,
         "short_factor": [1.0] * 4, "attention_factor": None, "start_tokens": 0,
         "provenance": {"command": "the first search"}}
    d.update(kw)
    with open(path, "w") as fh:
        json.dump(d, fh)
    return str(path)


def _ppl(capsys, model, data, length, rope, samples=2, seed=1, *extra):
    rc, (line,), err = _cli(["ppl", "--model", model, "--data", data, "--length", str(length), "--samples",
                             str(samples), "--seed", str(seed), "--rope", rope, *extra], capsys)
    assert rc == 0, err
    return line


def test_progressive_search_multiplies_onto_the_base_factors(tiny, capsys, monkeypatch):
    from longrope_jax import evaluate

    model, data, root = tiny
    base = _factors_file(root / "lambda1.json")
    out = str(root / "progressive")
    argv = ["search", "--model", model, "--data", data, "--target-length", "128", "--out", out, "--samples", "2",
            "--seed", "1", "--base-factors", base, *SMOKE]
    rc, (res,), err = _cli(argv, capsys)
    assert rc == 0, err
    assert res["kind"] == "progressive" and res["scale"] == 2.0  # 128 over the base file's 64, not the model's 32
    assert list(res["baselines"]) == ["none", "base", "base*pi:2", "base*ntk:2", "base*yarn:2"]
    summary = json.load(open(os.path.join(out, "summary.json")))
    lam2 = np.asarray(summary["result"]["searched_factors"])
    assert np.all(np.diff(lam2) >= 0) and lam2.min() >= 1.0 and lam2.max() <= 2.5  # the rules apply to lambda_2
    d = factors.load(os.path.join(out, "factors.json"))
    np.testing.assert_allclose(d["long_factor"], np.asarray(LAMBDA_1) * lam2, rtol=1e-9)
    assert d["original_max_position_embeddings"] == 32 and d["max_position_embeddings"] == 128
    assert d["provenance"]["parent"] == {"command": "the first search"}
    assert d["provenance"]["search"]["base_factors_file"] == os.path.abspath(base)
    assert "--base-factors" in d["provenance"]["command"]
    records = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]]
    assert records[0]["origin"] == "seed:base" and records[0]["factors"] == [1.0] * 4
    assert records[0]["same_as"] == "base" and records[0]["ppl"] == res["baselines"]["base"]  # not scored twice
    # ... also when the baselines come from an earlier run's baselines.json (a resumed search).
    again = str(root / "progressive_again")
    os.makedirs(again)
    shutil.copy(os.path.join(out, "baselines.json"), again)
    with monkeypatch.context() as m:  # one candidate per call, as on one CPU device: a progress line each
        m.setattr(evaluate, "one_cpu", lambda devices=None: True)
        rc, (res2,), err = _cli([a if a != out else again for a in argv], capsys)
    assert rc == 0 and "(from baselines.json)" in err, err
    assert "generation 0: 1/6 scored (best of them " in err and "); the score of baseline base\n" in err
    assert json.loads(open(os.path.join(again, "log.jsonl")).read().splitlines()[1])["same_as"] == "base"
    np.testing.assert_allclose(res2["ppl"], res["ppl"], rtol=1e-6)  # batched there, one per call here
    # The written factors score the search's result through `ppl`; lambda_1 alone is the "base" baseline.
    np.testing.assert_allclose(_ppl(capsys, model, data, 128, os.path.join(out, "factors.json"))["ppl"], res["ppl"],
                               rtol=1e-5)
    assert res["ppl"] <= res["baselines"]["base"] + 1e-9
    # ... and through the HF export: transformers' config block carries lambda_2 * lambda_1.
    hf_out = str(root / "progressive_hf")
    rc, _, err = _cli(["convert", "--model", model, "--factors", os.path.join(out, "factors.json"), "--to", "hf",
                       "--out", hf_out], capsys)
    assert rc == 0, err
    cfg = json.load(open(os.path.join(hf_out, "config.json")))
    np.testing.assert_allclose(cfg["rope_scaling"]["long_factor"], d["long_factor"], rtol=1e-9)
    np.testing.assert_allclose(_ppl(capsys, hf_out, data, 128, "longrope")["ppl"], res["ppl"], rtol=1e-5)


def test_a_candidate_with_a_baselines_spec_takes_its_score(tiny):
    """A progressive search's seeds lambda_2 = 1 and PI are its baselines ``base`` and ``base*pi:2``
    exactly: they take those scores (what a forward gives them) instead of a forward pass each."""
    from longrope_jax import loading, rope
    from longrope_jax.search import fitness as fitness_lib
    from longrope_jax.jobs.search import load_setup as setup_search

    model, _, root = tiny
    m = loading.load_model(model)
    setup = setup_search(m.cfg, SearchSettings(), 128, base_factors=_factors_file(root / "lambda1_same.json"))
    tokens = np.random.default_rng(0).integers(3, 200, (2, 128))
    def make():
        return fitness_lib.PerplexityFitness(m.params, m.cfg, tokens, setup["space"], original_max=setup["switch"],
                                             base_factors=setup["base"], template=setup["template"], slot=setup["slot"])

    fit = make()
    calls = []
    real = fit.score_specs
    fit.score_specs = lambda specs: calls.append(len(specs)) or real(specs)
    base = fitness_lib.score_named(fit, setup["baselines"])
    seeds = dict(setup["seeds"])
    assert list(seeds) == ["base", "pi", "ntk", "yarn"]
    calls.clear()
    got = fit([seeds["base"], seeds["ntk"], seeds["pi"]])
    assert calls == [1]  # only NTK (rounded onto the grid: not its baseline's factors) goes through the model
    assert [g.get("same_as") for g in got] == ["base", None, "base*pi:2"]
    assert got[0]["ppl"] == base["base"]["ppl"] and got[2]["nll"] == base["base*pi:2"]["nll"]
    for name in ("base", "pi"):  # the key is sound: a forward of the seed's own spec gives the same score
        np.testing.assert_allclose(real([fit.spec(seeds[name])])[0], got[["base", "", "pi"].index(name)]
                                   ["nll_per_window"], rtol=1e-6)
    # A score carried over from an earlier run (``done``) is remembered too; a different spec is not.
    fit2 = make()
    fitness_lib.score_named(fit2, {"base": setup["baselines"]["base"]}, done={"base": base["base"]})
    assert fit2([seeds["base"]])[0]["same_as"] == "base"
    assert rope.value_key(setup["baselines"]["base"]) != rope.value_key(fit.spec(seeds["ntk"]))


def test_readjust_writes_short_factors_or_a_per_length_entry(tiny, capsys):
    model, data, root = tiny
    ext = _factors_file(root / "extended.json", max_position_embeddings=128, long_factor=[1.0, 1.3, 1.8, 3.0])
    before = {n: _ppl(capsys, model, data, n, ext)["ppl"] for n in (32, 64, 128)}
    # At the original window: the short factors.
    out = str(root / "readjust32")
    rc, (res,), err = _cli(["search", "--model", model, "--data", data, "--target-length", "32", "--out", out,
                            "--samples", "2", "--seed", "1", "--readjust", ext, *SMOKE], capsys)
    assert rc == 0, err
    assert res["kind"] == "readjust-short" and res["slot"] == "short"
    assert list(res["baselines"]) == ["none", "file"]
    np.testing.assert_allclose(res["baselines"]["file"], before[32], rtol=1e-5)
    d = factors.load(os.path.join(out, "factors.json"))
    assert d["long_factor"] == [1.0, 1.3, 1.8, 3.0] and d["max_position_embeddings"] == 128
    assert d["short_factor"] != [1.0] * 4 or res["ppl"] <= res["baselines"]["file"]
    np.testing.assert_allclose(_ppl(capsys, model, data, 32, os.path.join(out, "factors.json"))["ppl"], res["ppl"],
                               rtol=1e-5)
    assert res["ppl"] <= min(res["baselines"].values()) + 1e-9  # both baselines are seeds
    # Between the windows: a per_length entry; longer calls keep the top-level long factors.
    out2 = str(root / "readjust64")
    rc, (res2,), err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--out", out2,
                             "--samples", "2", "--seed", "1", "--readjust", ext, *SMOKE], capsys)
    assert rc == 0, err
    assert res2["kind"] == "readjust-per_length"
    d2 = factors.load(os.path.join(out2, "factors.json"))
    assert list(d2["per_length"]) == [64] and d2["short_factor"] == [1.0] * 4
    new = os.path.join(out2, "factors.json")
    np.testing.assert_allclose(_ppl(capsys, model, data, 64, new)["ppl"], res2["ppl"], rtol=1e-5)
    np.testing.assert_allclose(_ppl(capsys, model, data, 128, new)["ppl"], before[128], rtol=1e-6)
    # Errors name the flag and the expected value.
    rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "256", "--out",
                       str(root / "r_bad"), "--readjust", ext], capsys)
    assert rc == 2 and "at or below its max_position_embeddings (128), got 256" in err
    rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--out",
                       str(root / "r_bad"), "--readjust", ext, "--base-factors", ext], capsys)
    assert rc == 2 and "--base-factors and --readjust: give one" in err


def test_longrope2_needle_search(tiny, capsys):
    from longrope_jax import evaluate
    from longrope_jax.loading import load_model
    from longrope_jax.needle import needle_windows
    from longrope_jax.data import read_documents, windows

    model, data, root = tiny
    out = str(root / "lr2")
    argv = ["search", "--config", os.path.join(CONFIGS, "longrope2.py"), "--model", model, "--data", data,
            "--target-length", "256", "--out", out, "--samples", "2", "--seed", "1", "--config.needles=1",
            "--config.critical_range=[1, 3]", *SMOKE]
    rc, (res,), err = _cli(argv, capsys)
    assert rc == 0, err
    assert res["kind"] == "longrope2" and res["fitness"] == "needle" and 1 <= res["critical_dim"] <= 3
    assert "LongRoPE2 mode: critical dim in [1, 3]" in err
    d = factors.load(os.path.join(out, "factors.json"))
    f, k = np.asarray(d["long_factor"]), d["critical_dim"]
    assert k == res["critical_dim"] and np.all((f[k:] >= 8.0) & (f[k:] <= 16.0))  # [s, 2s], s = 256 / 32
    np.testing.assert_allclose(f[:k], f[k] ** (np.arange(k) / k), rtol=1e-9)
    records = [json.loads(x) for x in open(os.path.join(out, "log.jsonl")).read().splitlines()[1:]]
    assert len({r["critical_dim"] for r in records}) > 1
    # The needle perplexity of the written file, recomputed from scratch, is the search's result.
    m = load_model(model)
    w = windows(read_documents(data), m.tokenizer, 256, 2, 1)
    nw = needle_windows(m.tokenizer, w.tokens, 1, 1)
    spec = factors.to_spec(d, 256)
    nll = evaluate.score(m.params, m.cfg, nw.tokens, jax.tree.map(lambda a: a[None], spec), attention="dense",
                         weights=nw.weights)
    np.testing.assert_allclose(math.exp(nll.mean()), res["ppl"], rtol=1e-5)
    # The plain perplexity of that file differs: the fitness really is the needles'.
    plain = _ppl(capsys, model, data, 256, os.path.join(out, "factors.json"))
    assert abs(plain["ppl"] - res["ppl"]) > 1e-3
    # ``ppl --needles`` scores the same fitness on any windows: here the search's, beside the plain one.
    both = _ppl(capsys, model, data, 256, os.path.join(out, "factors.json"), 2, 1, "--needles", "1")
    assert both["ppl"] == plain["ppl"] and both["needles"] == 1
    np.testing.assert_allclose(both["needle_ppl"], math.exp(nll.mean()), rtol=1e-6)
    assert both["needle_scored_tokens"] == nw.weights.sum(1).tolist()
    # Resuming replays everything.
    rc, (again,), err = _cli(argv, capsys)
    assert rc == 0 and again["new_evaluations"] == 0 and again["ppl"] == res["ppl"], err
    # LongRoPE2 mode does not combine with a progressive search; a bad range is named.
    rc, _, err = _cli([*argv[:-len(SMOKE)], "--base-factors", _factors_file(root / "l1b.json")], capsys)
    assert rc == 2 and "mode 'longrope2' searches a plain extension" in err
    rc, _, err = _cli([*argv, "--config.critical_range=[3, 9]", "--out", str(root / "lr2bad")], capsys)
    assert rc == 2 and "critical_range: expected within [1, 3]" in err


def test_written_files_are_readable_by_others(tiny, capsys):
    """Atomic writes go through private temporary files; the results must not stay private."""
    model, data, root = tiny
    out = str(root / "modes")
    rc, _, err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--out", out,
                       "--samples", "1", "--max-evals", "6", *SMOKE], capsys)
    assert rc == 0, err
    for f in ("factors.json", "summary.json", "search_progress.png", "search_factors.png"):
        assert os.stat(os.path.join(out, f)).st_mode & 0o044 == 0o044, f


def test_progress_plot_keeps_the_search_in_view(tmp_path, monkeypatch):
    """Baselines far above the search (no scaling, PI) are named in the legend, not drawn: the
    y axis spans the search's curves and the competitive baselines."""
    from longrope_jax.search import plots

    figs = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or real_save(fig, path))
    gens = [{"generation": g, "best_ppl": 10.03 - 0.02 * g, "median_ppl": 10.1 - 0.03 * g} for g in range(4)]
    path = plots.progress(gens, str(tmp_path / "p.png"), {"none": 27.9, "pi:2": 30.9, "ntk:2": 10.46, "yarn:2": 10.12})
    assert os.path.getsize(path) > 0
    ax = figs[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "none (27.9, off scale)" in labels and "pi:2 (30.9, off scale)" in labels and "yarn:2 (10.12)" in labels
    assert 10.46 < ax.get_ylim()[1] < 12 and ax.get_yscale() == "linear"
    def ticks(ax):  # the x ticks in view
        return [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]

    assert ticks(ax) == [0, 1, 2, 3]
    # A search of one generation (population only): its median is a marker, its only tick 0.
    plots.progress(gens[:1], str(tmp_path / "one.png"), {"none": 27.9, "yarn:2": 10.12})
    ax = figs[1].axes[0]
    assert ticks(ax) == [0]
    assert [line.get_marker() for line in ax.get_lines()[:2]] == ["o", "x"]


def test_weights_in_memory_are_searched_step_by_step(tiny, capsys):
    """The search's parts over params in memory, called one at a time (setup, windows, fitness,
    baselines + evolution, no files), find what the ``search`` job finds on the same weights
    written to disk and loaded back."""
    from longrope_jax import loading
    from longrope_jax.jobs import search as search_job
    from longrope_jax.search import run as search_run

    model, data, root = tiny
    m = loading.load_model(model)
    params = jax.tree.map(lambda a: a * 1.1, m.params)  # "fine-tuned": other weights than the file's
    settings = SearchSettings(population=6, iterations=2, mutations=2, crossovers=2, parents=4)
    setup = search_job.load_setup(m.cfg, settings, 64)
    assert setup["kind"] == "plain" and set(setup["baselines"]) == {"none", "pi:2", "ntk:2", "yarn:2", "dynamic:2"}
    w, tokens, weights, _ = search_job.search_windows(m.tokenizer, data, "text", 64, 2, 1, settings)
    fit = search_run.make_fitness(params, m.cfg, tokens, setup, weights=weights)
    seen = []
    s = search_run.search_factors(fit, setup, settings, seed=1, progress=False,
                                  on_generation=lambda b, r: seen.append(r.evaluations))
    assert s.result.best is not None and seen == sorted(seen) and len(seen) == 3
    tuned = str(root / "tuned")
    hf.save(tuned, m.cfg, params, tokenizer_file=os.path.join(model, "tokenizer.json"))
    rc, (line,), _ = _cli(["search", "--model", tuned, "--data", data, "--target-length", "64", "--out",
                           str(root / "tuned_run"), "--samples", "2", "--seed", "1", *SMOKE], capsys)
    assert rc == 0
    np.testing.assert_allclose(s.result.best.ppl, line["ppl"], rtol=1e-6)
    np.testing.assert_allclose(s.baselines["none"]["ppl"], line["baselines"]["none"], rtol=1e-6)
    d = factors.load(os.path.join(str(root / "tuned_run"), "factors.json"))
    assert d["long_factor"] == fit.document(s.result.best.candidate)["long_factor"]
    rc, (orig,), _ = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--out",
                           str(root / "orig_run"), "--samples", "2", "--seed", "1", *SMOKE], capsys)
    assert abs(orig["baselines"]["none"] - line["baselines"]["none"]) > 1e-3  # the weights really differ


def test_a_search_not_below_a_baseline_says_so_and_names_its_seeds():
    """The PI seed is not the ``pi`` baseline (grid-rounded factors, LongRoPE's attention factor):
    the summary and messages say what a seed is, and a best that does not beat every baseline ends
    with a warning naming the baseline and both numbers."""
    import types

    from longrope_jax.jobs.search import not_below_baselines
    from longrope_jax.search.setup import describe_origin

    best = types.SimpleNamespace(ppl=25.2675)
    got = not_below_baselines(best, {"none": 99.0, "pi:2": 25.2519, "ntk:2": 30.0, "yarn:2": 25.26})
    assert got.startswith("the best candidate (25.2675) is not below the pi:2 baseline (25.2519) nor 1 other(s)")
    assert not_below_baselines(types.SimpleNamespace(ppl=20.0), {"pi:2": 25.2519, "none": None}) is None
    assert describe_origin("seed:pi", 0.01) == ("the PI seed: PI's factors rounded onto the 0.01 grid, with "
                                                "LongRoPE's attention factor (not the pi baseline)")
    assert describe_origin("mutation", 0.01) == "mutation"


def test_the_search_command_warns_when_a_baseline_wins(tiny, capsys):
    """One evaluation (the first seed) against five baselines: the line, the summary and stderr
    agree with the numbers: a warning exactly when some baseline is at least as good."""
    model, data, root = tiny
    out = str(root / "one_eval")
    rc, (res,), err = _cli(["search", "--model", model, "--data", data, "--target-length", "64", "--samples", "1",
                            "--out", out, "--max-evals", "1", *SMOKE], capsys)
    assert rc == 0, err
    beaten = [k for k, v in res["baselines"].items() if not res["ppl"] < v]
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert bool(beaten) == ("warning" in res) == (summary["warning"] is not None) == ("WARNING: " in err)
    assert summary["result"]["origin"] == "seed:pi" and "the PI seed" in summary["result"]["origin_described"]
    assert "the PI seed: PI's factors rounded onto the 0.01 grid" in err
