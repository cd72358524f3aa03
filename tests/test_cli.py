"""Bad input: one clear line on stderr, the right exit code, no traceback, nothing half-written."""
from __future__ import annotations

import itertools
import json
import shutil

import pytest
from dery.backends import availability
from dery.cli import compile_main, main
from dery.targets import get_target, registry


def run(capsys: pytest.CaptureFixture, fn, argv: list[str]) -> tuple[int, str, str]:
    try:
        code = fn(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_target_lists_the_known_ones(capsys) -> None:
    code, _, err = run(capsys, compile_main, ["--target", "tpu9", "--latency-ms", "1"])
    line = one_line(err)
    assert code == 2 and "unknown target 'tpu9'" in line and "a100, cpu, h100, h200" in line


def test_unknown_model_lists_presets_and_suggests(capsys, tmp_path) -> None:
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "1", "--zoo", "resnet5O",
                                              "--out", str(tmp_path)])
    line = one_line(err)
    assert code == 2 and "unknown model 'resnet5O'" in line and "default, tiny" in line and "resnet50" in line


@pytest.mark.parametrize("budget, why", [("0", "positive"), ("-3", "positive"), ("fast", "number"),
                                         ("nan", "positive"), ("inf", "finite")])
def test_bad_budgets_are_usage_errors(capsys, budget, why) -> None:
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", budget])
    assert code == 2 and "--latency-ms" in err and why in err and "Traceback" not in err


def test_gpu_target_not_here_fails_in_one_line(capsys, tmp_path) -> None:
    """A GPU target this machine cannot measure (by the product's own availability test) fails in one line
    that gives availability's reason; at most one of them matches the local GPU, so one is always missing."""
    name, reason = next((n, availability(get_target(n))[1]) for n in ("a100", "h100", "h200")
                        if availability(get_target(n))[1] is not None)
    code, _, err = run(capsys, compile_main, ["--target", name, "--latency-ms", "5", "--out", str(tmp_path)])
    line = one_line(err)
    assert code == 1
    assert line == (f"dery: error: target {name} ({get_target(name).description}) cannot compile here: {reason}; "
                    f"--allow-estimates plans with estimated latencies instead")


def test_unwritable_out_is_named(capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "1", "--out", str(blocker / "sub")])
    line = one_line(err)
    assert code == 2 and str(blocker / "sub") in line and "not writable" in line


def calibrated_in_context_ms(tiny, models: tuple[str, ...]) -> float:
    """An assembly's predicted latency from the records alone: with K = 3 its in-context sum (blocks, joints
    less their blocks, the triple less its joints plus its middle block) telescopes to its triple's record."""
    cal, costs = tiny.calibration, tiny.costs
    blocks = sum(costs.blocks[m, k].median_ms for k, m in enumerate(models))
    triple = costs.triples[(*models, 0)].median_ms
    stitches = sum(a != b for a, b in zip(models, models[1:]))
    return cal.intercept_ms + cal.block_scale * blocks + cal.boundary_scale * (triple - blocks) \
        + cal.per_stitch_ms * stitches


def assemblies(tiny) -> list[tuple[str, ...]]:
    """Every assembly whose switches all have a fitted stitch."""
    return [models for models in itertools.product(tiny.partition.models, repeat=tiny.partition.k)
            if all(a == b or tiny.stitches.get(a, b, j) is not None
                   for j, (a, b) in enumerate(zip(models, models[1:])))]


def test_budget_below_fastest_says_the_fastest_and_writes_nothing(capsys, tiny, tmp_path) -> None:
    assert tiny.partition.k == 3
    out = tmp_path / "out"
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "0.000001", "--zoo", "tiny",
                                              "--k", "3", "--out", str(out)])
    line = one_line(err)
    assert code == 1 and "below the fastest achievable assembly" in line and "ms predicted" in line
    fastest = min(calibrated_in_context_ms(tiny, models) for models in assemblies(tiny))
    member = min(r.median_ms for r in tiny.costs.networks.values())
    assert line.split("assembly on target cpu: ")[1].split(" ms")[0] == f"{fastest:.4g}", (line, fastest)
    assert line.split("fastest zoo member measures ")[1].split(" ms")[0] == f"{member:.4g}", (line, member)
    assert list(out.iterdir()) == []


def test_damaged_cache_file_is_named_and_kept(capsys, tiny, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny.cache.root, cache)
    victim = next((cache / "partition").glob("*.json"))
    victim.write_text("{ not json")
    monkeypatch.setenv("DERY_CACHE_DIR", str(cache))
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "1", "--zoo", "tiny", "--k", "3",
                                              "--out", str(tmp_path / "out")])
    line = one_line(err)
    assert code == 1 and str(victim) in line and "damaged" in line
    assert victim.read_text() == "{ not json"


def test_damaged_profile_table_is_named(capsys, tiny, tmp_path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny.cache.root, cache)
    table = cache / "profiles" / "cpu.json"
    table.write_text(json.dumps({"schema": "something else"}))
    monkeypatch.setenv("DERY_CACHE_DIR", str(cache))
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "1", "--zoo", "tiny", "--k", "3",
                                              "--out", str(tmp_path / "out")])
    assert code == 1 and str(table) in one_line(err)


def test_debug_shows_the_traceback(capsys, tmp_path) -> None:
    with pytest.raises(Exception) as info:
        compile_main(["--target", "tpu9", "--latency-ms", "1", "--debug"])
    assert "unknown target" in str(info.value)


def test_targets_lists_availability(capsys) -> None:
    """Each row says what the product's availability test says for this machine; cpu is available anywhere."""
    code, out, _ = run(capsys, main, ["targets"])
    assert code == 0
    rows = {line.split()[0]: line for line in out.strip().splitlines()}
    assert set(rows) == set(registry()) == {"cpu", "a100", "h100", "h200"}
    for name, row in rows.items():
        device, reason = availability(get_target(name))
        if reason is None:
            assert f" available ({device}) " in row and "unavailable" not in row, row
        else:
            assert f" unavailable: {reason} " in row, row
    assert availability(get_target("cpu"))[1] is None
    assert sum(availability(get_target(n))[1] is None for n in ("a100", "h100", "h200")) <= 1
