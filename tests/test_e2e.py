"""dery-compile end to end on the tiny zoo: budget met, engine equals the torch assembly, reruns reuse."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dery.backends import availability
from dery.driver import CompileConfig, run_compile
from dery.passes.assemble import assemble
from dery.targets import get_target

REQUIRED = {"schema", "target", "backend", "budget_ms", "predicted_latency_ms", "measured_latency_ms", "engine",
            "assembly", "params", "flops", "accuracy", "zoo", "rounds", "status"}


@pytest.fixture(scope="module")
def budget(tiny) -> float:
    """A budget strictly between the fastest and the slowest zoo member."""
    lat = sorted(r.median_ms for r in tiny.costs.networks.values())
    return (lat[0] + lat[-1]) / 2


@pytest.fixture(scope="module")
def first(tiny, budget, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("out1")
    return run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=out, finetune="none")), out


def test_engine_within_budget_and_report_contract(first, budget) -> None:
    report, out = first
    assert REQUIRED <= set(report)
    assert report["schema"] == "dery.report/1" and report["status"] == "ok"
    assert report["measured_latency_ms"] <= budget
    last = report["rounds"][-1]
    assert last["within_budget"] and last["measured_ms"] == report["measured_latency_ms"]
    assert [a["set"] for a in report["assembly"]] == [0, 1, 2]
    assert report["assembly"][0]["first"] is None and report["assembly"][-1]["last"] is None
    for a, b in zip(report["assembly"], report["assembly"][1:]):
        assert (a["last"] is not None) and (b["first"] is not None)
    assert {z["model"] for z in report["zoo"]} == {"resnet", "mobilenetv3", "vit"}
    assert all(set(z) >= {"model", "latency_ms", "params", "accuracy"} for z in report["zoo"])
    assert 0.0 <= report["accuracy"] <= 1.0
    assert json.loads((out / "report.json").read_text()) == report
    assert all((out / f).is_file() for f in (report["engine"], "report.md", "latency_accuracy.png"))
    side = json.loads((out / (report["engine"] + ".json")).read_text())
    assert side["backend"] == "onnxruntime" and side["measured_latency_ms"] == report["measured_latency_ms"]
    assert "| set | model |" in (out / "report.md").read_text()


def test_engine_outputs_equal_the_torch_assembly(first, tiny) -> None:
    report, out = first
    _, module = assemble(tiny.lowered, tiny.partition, tiny.stitches, [a["model"] for a in report["assembly"]])
    x = tiny.data.images("test", 16)
    sess = ort.InferenceSession(str(out / report["engine"]), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        ref = module(x).numpy()
    assert np.abs(got - ref).max() <= 1e-4
    acc = float((module(tiny.data.images("test")).argmax(1) == tiny.data.split("test").labels).float().mean())
    assert acc == pytest.approx(report["accuracy"])


def test_second_run_reuses_everything_and_gives_the_same_report(first, tiny, budget, tmp_path, monkeypatch) -> None:
    report, out = first
    import dery.passes.compile
    from dery.driver import front

    again = front(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path, finetune="none"))
    assert again.costs.measured == 0  # every latency came from the profile store
    assert again.partition == tiny.partition

    def build(*args, **kwargs):
        raise AssertionError("the second run built an engine")

    monkeypatch.setattr(dery.passes.compile, "compile_engine", build)  # the engine comes from the cache
    second = run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path, finetune="none"))
    verified = {"verify"} if report["member"] is None else set()  # a member whole stands on its record
    assert second["run"]["pieces_measured"] == 0 and set(second["run"]["timings_s"]) >= {"zoo", "solve", *verified}
    assert without_run(second) == without_run(report)
    assert without_run(json.loads((tmp_path / "report.json").read_bytes())) == without_run(report)
    for name in (report["engine"], report["engine"] + ".json", "report.md"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name


def test_the_same_command_is_answered_from_the_run_cache(first, budget, tmp_path, monkeypatch, capsys) -> None:
    import argparse

    import dery.driver
    from dery import cli, runs

    base = ["--target", "cpu", "--latency-ms", repr(budget), "--zoo", "tiny", "--k", "3", "--finetune", "none"]
    assert cli.compile_main([*base, "--out", str(tmp_path / "a")]) == 0  # every stage served from `first`'s cache
    report = json.loads((tmp_path / "a" / "report.json").read_bytes())
    assert without_run(report) == without_run(first[0])

    def run_compile(cfg):
        raise AssertionError("a stage ran although the same command had finished")

    monkeypatch.setattr(dery.driver, "run_compile", run_compile)
    capsys.readouterr()
    assert cli.compile_main([*base, "--out", str(tmp_path / "b")]) == 0
    for name in runs.outputs(report):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes(), name

    parse = lambda argv: cli._compile_parser(argparse.ArgumentParser()).parse_args(argv)  # noqa: E731
    target = tmp_path / "t.toml"
    target.write_bytes(Path(get_target("cpu").path).read_bytes())
    key = runs.run_key(parse([*base, "--out", "x"]))
    assert runs.run_key(parse([*base, "--out", "elsewhere"])) == key  # where outputs go changes nothing in them
    assert runs.run_key(parse([*base, "--out", "x", "--seed", "1"])) != key
    with_file = runs.run_key(parse([*base[:1], str(target), *base[2:]]))
    target.write_bytes(target.read_bytes() + b"\n# edited\n")
    assert runs.run_key(parse([*base[:1], str(target), *base[2:]])) != with_file  # a target file by its contents

    calls = []
    monkeypatch.setattr(dery.driver, "run_compile", lambda cfg: calls.append(cfg) or report)
    assert cli.compile_main([*base, "--out", str(tmp_path / "a"), "--rerun"]) == 0 and len(calls) == 1

    damaged = runs.entry(key) / report["engine"]
    damaged.write_bytes(b"garbage")
    assert cli.compile_main([*base, "--out", str(tmp_path / "c")]) != 0
    assert str(damaged) in capsys.readouterr().err and not (tmp_path / "c" / "report.json").exists()


def without_run(report: dict) -> dict:
    """A report less its `run` section (wall-clock timings and what this run measured), which differs by run."""
    return {k: v for k, v in report.items() if k != "run"}


def in_context_ms(tiny, models: tuple[str, ...]) -> float:
    """An assembly's calibrated latency from the records alone: with K = 3 its in-context sum telescopes to its
    triple's record (blocks + joints less their blocks + the triple less its joints plus its middle block)."""
    cal, costs = tiny.calibration, tiny.costs
    blocks = sum(costs.blocks[m, k].median_ms for k, m in enumerate(models))
    stitches = sum(a != b for a, b in zip(models, models[1:]))
    return cal.intercept_ms + cal.block_scale * blocks \
        + cal.boundary_scale * (costs.triples[(*models, 0)].median_ms - blocks) + cal.per_stitch_ms * stitches


def ranked_assemblies(tiny, budget: float) -> list[tuple[float, tuple[str, ...]]]:
    """Every assembly with a stitch at each switch and a latency within the budget, best quality first
    (enumerated over all model choices, priced from the records and the quality terms directly)."""
    found = []
    for models in itertools.product(tiny.partition.models, repeat=tiny.partition.k):
        if all(a == b or tiny.stitches.get(a, b, j) is not None for j, (a, b) in enumerate(zip(models, models[1:]))):
            if in_context_ms(tiny, models) <= budget * (1 + 1e-9):
                found.append((tiny.quality.score(models), models))
    return sorted(found, reverse=True)


def test_save_problem_reproduces_the_solution(first, tiny, budget, tmp_path) -> None:
    """The saved program's optimum is the best assembly within the budget found by enumerating them all, and
    round 0 picked one of the `top` best (the proxy re-ranks those)."""
    from dery.driver import Search
    from dery.passes.solve import chosen_models
    from dery.problem import Problem
    from dery.solver import solve

    report, _ = first
    path = tmp_path / "problem.json"
    run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path / "o", finetune="none",
                              save_problem=path))
    problem = Problem.from_json(json.loads(path.read_text()))
    assert problem.sets == 3 and problem.limits["latency_ms"] == budget
    sol = solve(problem)
    space = Search(tiny, tmp_path).space(budget)
    ranked = ranked_assemblies(tiny, budget)
    assert sol.status == "optimal" and len(ranked) >= 2
    best_score, best = ranked[0]
    assert sol.objective == pytest.approx(best_score, rel=1e-9, abs=1e-12)
    if ranked[1][0] < best_score - 1e-9:  # a unique optimum: the same assembly
        assert chosen_models(space, sol) == best
    assert sol.totals["latency_ms"] == pytest.approx(in_context_ms(tiny, chosen_models(space, sol)), rel=1e-9)
    top = CompileConfig(target="cpu", latency_ms=budget).top
    round0 = tuple(report["rounds"][0]["chosen"])
    assert report["rounds"][0]["score"] == pytest.approx(tiny.quality.score(round0), rel=1e-9, abs=1e-12)
    at_round0 = ranked_assemblies(tiny, report["rounds"][0]["limit_ms"])
    cutoff = at_round0[min(top, len(at_round0)) - 1][0]
    assert round0 in {m for _, m in at_round0} and tiny.quality.score(round0) >= cutoff - 1e-9


def test_dery_bench_checks_outputs_and_refuses_a_foreign_sidecar(first, tmp_path, capsys) -> None:
    import shutil

    from dery.cli import main

    report, out = first
    engine = tmp_path / "model.onnx"
    shutil.copy(out / report["engine"], engine)
    shutil.copy(out / (report["engine"] + ".json"), tmp_path / "model.onnx.json")
    assert main(["bench", str(engine), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output_check"]["ok"] and doc["output_check"]["error"] <= 1e-4 and doc["median_ms"] > 0
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    bad = dict(side, check={**side["check"], "outputs": [[[v + 1.0 for v in row] for row in out_]
                                                         for out_ in side["check"]["outputs"]]})
    (tmp_path / "model.onnx.json").write_text(json.dumps(bad))
    assert main(["bench", str(engine)]) == 1
    assert "MISMATCH" in capsys.readouterr().out
    (tmp_path / "model.onnx.json").write_text(json.dumps(dict(side, backend="torch-cuda", target="h200")))
    assert main(["bench", str(engine)]) == 1
    assert "cannot run" in capsys.readouterr().err
    (tmp_path / "model.onnx.json").write_text(json.dumps(dict(side, backend_version="0.0.1")))
    with pytest.warns(UserWarning, match="'0.0.1'"):
        assert main(["bench", str(engine)]) == 0
    (tmp_path / "model.onnx.json").unlink()
    assert main(["bench", str(engine)]) == 2
    assert "no sidecar" in capsys.readouterr().err


def test_dery_profile_reuses_records_and_merges(tiny, tmp_path, capsys) -> None:
    """The tiny store's table split into two different tables (disjoint halves sharing one record and one
    calibration point) merges back into exactly the whole table."""
    from dery.cli import main

    assert main(["profile", "--target", "cpu", "--zoo", "tiny", "--k", "3"]) == 0
    assert "measured 0 pieces" in capsys.readouterr().out
    whole = json.loads(tiny.store.path.read_text())
    recs, cal = whole["records"], whole["calibration"]
    assert len(recs) >= 4 and len(cal) >= 2
    halves = [{**whole, "records": recs[0::2] + recs[1:2], "calibration": cal[0::2] + cal[1:2]},
              {**whole, "records": recs[1::2], "calibration": cal[1::2]}]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, half in zip(paths, halves):
        path.write_text(json.dumps(half))
        assert len(half["records"]) < len(recs)
    merged = tmp_path / "merged.json"
    assert main(["profile", "--merge", *map(str, paths), "-o", str(merged)]) == 0
    assert f"{len(recs)} records" in capsys.readouterr().out
    table = json.loads(merged.read_text())
    key = json.dumps
    assert sorted(map(key, table["records"])) == sorted(map(key, recs))
    assert sorted(map(key, table["calibration"])) == sorted(map(key, cal))


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_unreachable_target_with_estimates_plans_and_flags_every_figure(tiny, tmp_path) -> None:
    # A GPU target this machine cannot measure, by the product's availability test (at most one matches here).
    name, reason = next((n, availability(get_target(n))[1]) for n in ("a100", "h100", "h200")
                        if availability(get_target(n))[1] is not None)
    report = run_compile(CompileConfig(target=name, latency_ms=5.0, zoo="tiny", k=3, out=tmp_path,
                                       allow_estimates=True))
    assert report["status"].startswith("estimated:") and report["measured_latency_ms"] is None
    assert report["latency_estimated"] and all(z["estimated"] for z in report["zoo"])
    assert report["predicted_latency_ms"] <= 5.0
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    assert side["built"] is False and side["why_not_built"] == reason
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = tiny.data.images("test", 1).numpy()
    assert sess.run(None, {"x": x})[0].shape == (1, 10)
    assert "(est.)" in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_latency_balance_keeps_every_block_under_the_cap(tiny) -> None:
    from dery.passes.partition import partition
    from dery.passes.profile import segment_latencies
    from dery.passes.similarity import similarity

    seg = segment_latencies(tiny.lowered, tiny.target, tiny.store, tiny.cache)
    part = partition(tiny.lowered, similarity(tiny.lowered, tiny.data, tiny.cache), 3, balance="latency",
                     slack=1.0, segment_cost=lambda lw, a, b: seg[lw.name, a, b])
    for lw, bounds in zip(tiny.lowered, part.boundaries):
        cuts = [None, *[c.name for c in lw.boundary_cuts()], None]
        total = sum(seg[lw.name, a, b] for a, b in zip(cuts, cuts[1:]))
        ends = [None, *bounds, None]
        for first, last in zip(ends, ends[1:]):
            lo, hi = cuts.index(first), cuts.index(last, 1)
            share = sum(seg[lw.name, a, b] for a, b in zip(cuts[lo:hi], cuts[lo + 1:hi + 1])) / total
            assert share <= 2 / 3 + 1e-9


def test_memory_limit_prunes_blocks_above_it(tiny) -> None:
    from dery.errors import DeryError
    from dery.passes.solve import activation_mb, search_problem

    blocks = [b for row in tiny.partition.blocks for b in row]
    assert all(b.activation_bytes > 0 for b in blocks)
    sizes = sorted(activation_mb(b.activation_bytes, 1) for b in blocks)
    cut = sizes[len(sizes) // 2]
    limits = {"latency_ms": None, "params": None, "flops": None}
    problem = search_problem(tiny.partition, tiny.costs, tiny.quality, tiny.stitches, limits=limits,
                             calibration=tiny.calibration, memory_mb=cut).problem
    assert problem.candidates and all(c.extra["activation_mb"] <= cut for c in problem.candidates)
    assert all(t.extra.get("activation_mb", 0) <= cut for t in problem.transitions)
    assert len({(c.extra['model'], c.set) for c in problem.candidates}) < len(blocks)
    with pytest.raises(DeryError, match="smallest needs"):
        search_problem(tiny.partition, tiny.costs, tiny.quality, tiny.stitches, limits=limits,
                       calibration=tiny.calibration, memory_mb=sizes[0] / 10)


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_pareto_sweep_and_stitch_refinement(tiny, budget, tmp_path) -> None:
    """--pareto: distinct assemblies from the fastest assembly up, each measured and in the report and plot;
    --finetune stitches: the engine carries the refined stitches (its accuracy is the refined module's)."""
    from dery.passes.stitch import StitchModule
    from dery.solver import min_achievable

    report = run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path, pareto=True,
                                       finetune="stitches", epochs=1))
    sweep = report["pareto"]
    assert len(sweep) >= 1  # one point when a single assembly is the proxy's pick at every budget
    assert len({tuple(p["chosen"]) for p in sweep}) == len(sweep)
    assert [p["budget_ms"] for p in sweep] == sorted(p["budget_ms"] for p in sweep)
    assert all(p["predicted_ms"] <= p["budget_ms"] * (1 + 1e-9) and p["measured_ms"] > 0 for p in sweep)
    slowest = max(r.median_ms for r in tiny.costs.networks.values())
    from dery.driver import Search

    search = Search(tiny, tmp_path)
    assert sweep[0]["budget_ms"] == pytest.approx(min_achievable(search.problem(slowest), "latency_ms"))
    assert all(search.choose(p["budget_ms"], [])[3] == tuple(p["chosen"]) for p in sweep)
    assert "## Pareto sweep" in (tmp_path / "report.md").read_text()
    refined = report["repair"]
    models = [a["model"] for a in report["assembly"]]
    _, module = assemble(tiny.lowered, tiny.partition, tiny.stitches, models)
    if any(isinstance(p, StitchModule) for p in module.parts):
        assert refined["trained_params"] > 0 and refined["loss_after"] <= refined["loss_before"]
        assert refined["kept"] == (refined["loss_after"] < refined["loss_before"])
    else:
        assert refined["trained_params"] == 0 and report["accuracy"] == report["accuracy_as_is"]
    sess = ort.InferenceSession(str(tmp_path / report["engine"]), providers=["CPUExecutionProvider"])
    x, y = tiny.data.images("test"), tiny.data.split("test").labels
    got = np.concatenate([sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    assert float((torch.from_numpy(got).argmax(1) == y).float().mean()) == pytest.approx(report["accuracy"], abs=1e-9)


def test_a_member_that_fits_by_its_own_reading_is_weighed_whatever_its_blocks_sum_to(tiny, tmp_path) -> None:
    """At a limit equal to a member's end-to-end reading, the member is a candidate at exactly that latency,
    also where its blocks and joints sum to more: the report says it fits, so the answer must weigh it."""
    from dery.driver import Search
    from dery.passes.solve import assembly_ids

    search = Search(tiny, tmp_path)
    for m, rec in tiny.costs.networks.items():
        space = search.space(rec.median_ms)
        summed = space.problem.evaluate(tuple(assembly_ids((m,) * tiny.partition.k)))[1]["latency_ms"]
        got = {models: sol for models, sol in search.members(space, [])}
        assert got[(m,) * tiny.partition.k].totals["latency_ms"] == rec.median_ms, (m, summed)
        slower = [n for n, r in tiny.costs.networks.items() if r.median_ms > rec.median_ms * 1.01]
        assert not any((n,) * tiny.partition.k in got for n in slower)


def test_the_closed_loop_judges_a_member_whole_by_its_record_and_a_mix_by_its_engine(tiny, tmp_path,
                                                                                      monkeypatch) -> None:
    """A member whole is the graph its end-to-end record timed: at a budget equal to that record it fits, however
    slow a second reading of its engine would be. A mix is measured as an engine."""
    from dataclasses import replace

    import dery.passes.verify as verify
    from dery.driver import Search
    from dery.passes.solve import assembly_ids
    from dery.problem import Solution

    real, readings = verify.measure_engine, []

    def disturbed(*args, **kwargs):
        t = real(*args, **kwargs)
        readings.append(t.median_ms)
        return replace(t, median_ms=2 * t.median_ms)

    monkeypatch.setattr(verify, "measure_engine", disturbed)
    search, k = Search(tiny, tmp_path), tiny.partition.k
    m, rec = min(tiny.costs.networks.items(), key=lambda kv: kv[1].median_ms)
    lone = dict(search.members(search.space(rec.median_ms), []))[(m,) * k]
    got = search.realise((m,) * k, lone, 0.0, "lone")
    row = got.round_json(0, rec.median_ms, rec.median_ms)
    assert (got.measured_ms, row["within_budget"], row["reading"], readings) == (rec.median_ms, True,
                                                                                 "member record", [])
    other = next(n for n in tiny.partition.models if n != m)
    mix = (m,) * (k - 1) + (other,)
    ids = tuple(assembly_ids(mix))
    objective, totals = search.space(1e9).problem.evaluate(ids)
    got = search.realise(mix, Solution("optimal", ids, objective, totals), 0.0, "mix")
    assert len(readings) == 1 and got.measured_ms == 2 * readings[0]
    assert got.round_json(0, 1.0, 1.0)["reading"] == "engine"
