"""The installed console scripts, run as a user's script runs them: a fresh process, stdout parsed whole.

In-process tests cannot see what a C library writes to file descriptor 1 (HiGHS prints its banner there), so
every command here is a real subprocess of the `dery` / `dery-compile` executables next to this interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# Two sets, two models: a0 > b1 (score 1 + 3 - 0.5, latency 3) is the best of the three that fit 4 ms.
PROBLEM = {
    "schema": "dery.problem/1", "sets": 2, "limits": {"latency_ms": 4.0},
    "candidates": [{"id": "a0", "set": 0, "score": 1.0, "latency_ms": 1.0},
                   {"id": "b0", "set": 0, "score": 2.0, "latency_ms": 3.0},
                   {"id": "a1", "set": 1, "score": 1.0, "latency_ms": 1.0},
                   {"id": "b1", "set": 1, "score": 3.0, "latency_ms": 2.0}],
    "transitions": [{"from": "a0", "to": "a1", "score": 0.0}, {"from": "a0", "to": "b1", "score": -0.5},
                    {"from": "b0", "to": "a1", "score": 0.0}, {"from": "b0", "to": "b1", "score": 0.0}],
}


def command(*argv: str, quiet: bool = True) -> subprocess.CompletedProcess:
    """Run an installed console script with the test session's cache and environment (its output a pipe)."""
    exe, *rest = argv
    env = {k: v for k, v in os.environ.items() if quiet or k != "DERY_QUIET"}
    return subprocess.run([str(BIN / exe), *rest], capture_output=True, text=True, env=env, timeout=600)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_solve_prints_exactly_one_json_document(tmp_path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(PROBLEM))
    r = command("dery", "solve", str(path))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)  # the whole of stdout, as `| python -m json.tool` reads it
    assert doc["status"] == "optimal" and doc["chosen"] == ["a0", "b1"] and doc["objective"] == 3.5
    assert doc["totals"]["latency_ms"] == 3.0 and doc["gap"] == 0
    assert r.stderr == ""


def test_solve_infeasible_and_damaged_problems(tmp_path) -> None:
    tight = tmp_path / "tight.json"
    tight.write_text(json.dumps({**PROBLEM, "limits": {"latency_ms": 1.5}}))
    r = command("dery", "solve", str(tight))
    assert r.returncode == 1
    assert json.loads(r.stdout)["status"] == "infeasible"
    line = one_line(r.stderr)
    assert str(tight) in line and "infeasible" in line and "2" in line  # the smallest latency is 2 ms
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "dery.problem/1", "sets": ')
    r = command("dery", "solve", str(broken))
    assert r.returncode == 2 and r.stdout == ""
    assert one_line(r.stderr).startswith(f"dery solve: {broken}:1:")


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_partition_json_is_the_cached_partition(tiny) -> None:
    from dery.passes.partition import partition_json

    r = command("dery", "partition", "--zoo", "tiny", "--k", "3", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = partition_json(tiny.partition)
    assert [m["boundaries"] for m in got["models"]] == [m["boundaries"] for m in want["models"]]
    assert got["objective"] == pytest.approx(want["objective"], abs=1e-9) and got["k"] == 3


@pytest.mark.slow  # lowers resnet18 at 224 px in a fresh process
def test_inspect_json_and_its_errors() -> None:
    r = command("dery", "inspect", "resnet18", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["model"] == "resnet18" and doc["input_shape"] == [3, 224, 224]
    blocks = [f"net_layer{i}_{j}_act2" for i in range(1, 5) for j in range(2)]
    assert [c["name"] for c in doc["cut_points"] if c["boundary"]] == ["net_conv1", "net_act1", "net_maxpool", *blocks]
    assert doc["max_abs_diff"] <= 1e-5
    r = command("dery", "inspect", "resnet5O", "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown model 'resnet5O'" in one_line(r.stderr)


@pytest.mark.slow  # a whole compile through the CLI, then dery bench (measured: 40 s on 2 cores)
def test_compile_then_bench_the_engine(tiny, tmp_path) -> None:
    lat = sorted(r.median_ms for r in tiny.costs.networks.values())
    budget = (lat[0] + lat[-1]) / 2
    out = tmp_path / "out"
    r = command("dery-compile", "--target", "cpu", "--latency-ms", f"{budget:.6f}", "--zoo", "tiny", "--k", "3",
                "--out", str(out), quiet=False)
    assert r.returncode == 0, r.stderr
    passes = [line.split()[1] for line in r.stderr.splitlines() if line.startswith("dery: ") and line.endswith(" s")]
    report = json.loads((out / "report.json").read_text())
    verified = {"verify"} if report["member"] is None else set()  # a member whole stands on its record
    assert {"zoo", "lower", "stitch", "profile", "calibrate", "proxy", "solve", "compile", *verified} <= set(passes)
    assert report["status"] == "ok" and report["measured_latency_ms"] <= budget
    line = one_line(r.stdout)
    assert line.startswith(f"ok: {out / report['engine']} measures {report['measured_latency_ms']:.4g} ms")
    assert "HiGHS" not in r.stdout + r.stderr
    r = command("dery", "bench", str(out / report["engine"]), "--json")
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert bench["output_check"]["ok"] and bench["engine"].endswith(report["engine"])
    assert bench["recorded_ms"] == report["measured_latency_ms"]
    r = command("dery", "bench", str(out / "missing.onnx"))
    assert r.returncode == 2 and r.stdout == "" and "missing.onnx" in one_line(r.stderr)


def test_compile_usage_errors_are_one_line() -> None:
    r = command("dery-compile", "--target", "tpu9", "--latency-ms", "1")
    assert r.returncode == 2 and r.stdout == ""
    assert "unknown target 'tpu9'" in one_line(r.stderr)
