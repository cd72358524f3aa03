"""Bad input: one clear line on stderr, the right exit code, no traceback, nothing half-written."""
from __future__ import annotations

import json
import shutil

import pytest
from dery.cli import compile_main, main


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


def test_gpu_target_without_gpu_fails_in_one_line(capsys, tmp_path) -> None:
    code, _, err = run(capsys, compile_main, ["--target", "a100", "--latency-ms", "5", "--out", str(tmp_path)])
    line = one_line(err)
    assert code == 1 and "target a100" in line
    assert "GPU" in line or "TensorRT" in line or "tensorrt" in line


def test_unwritable_out_is_named(capsys, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "1", "--out", str(blocker / "sub")])
    line = one_line(err)
    assert code == 2 and str(blocker / "sub") in line and "not writable" in line


def test_budget_below_fastest_says_the_fastest_and_writes_nothing(capsys, tiny, tmp_path) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, compile_main, ["--target", "cpu", "--latency-ms", "0.000001", "--zoo", "tiny",
                                              "--k", "3", "--out", str(out)])
    line = one_line(err)
    assert code == 1 and "below the fastest achievable assembly" in line and "ms predicted" in line
    fastest = float(line.split("assembly on target cpu: ")[1].split(" ms")[0])
    assert fastest > 0.000001
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
    code, out, _ = run(capsys, main, ["targets"])
    assert code == 0
    rows = {line.split()[0]: line for line in out.strip().splitlines()}
    assert set(rows) == {"cpu", "a100", "h100", "h200"}
    assert "available" in rows["cpu"] and "unavailable" not in rows["cpu"]
    assert "unavailable" in rows["a100"]


def test_cli_choices_are_what_the_proxy_pass_implements() -> None:
    from dery import cli
    from dery.passes import proxy

    assert cli.PREDICTORS == proxy.PREDICTORS and cli.PROXIES == proxy.PROXIES
