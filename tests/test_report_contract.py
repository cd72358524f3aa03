"""report.json (dery.report/1) as a schema: every field, its type, whether it may be null, and sums that must hold.

Checked on the three kinds of report a run writes: ok, over budget (the engine measured above the budget in
every round), and estimated (no device here).
"""
from __future__ import annotations

import json

import pytest
from dery.driver import CompileConfig, run_compile
from records import readings_over

NUM = (int, float)
NULL = type(None)

BLOCK = {"set": int, "model": str, "first": (str, NULL), "last": (str, NULL), "params": int, "flops": int,
         "activation_bytes": int}
STITCH = {"boundary": int, "from": str, "to": str, "kind": str, "r2": NUM, "params": int, "flops": int}
MEMBER = {"model": str, "arch": str, "component_of": (str, NULL), "latency_ms": NUM, "latency_p90_ms": NUM,
          "params": int, "flops": int,
          "estimated": bool, "fits": bool, "accuracy": (float, NULL), "accuracy_repaired": (float, NULL)}
ROUND = {"round": int, "limit_ms": NUM, "chosen": list, "predicted_ms": NUM, "measured_ms": (*NUM, NULL),
         "p90_ms": (*NUM, NULL), "cv": (*NUM, NULL), "within_budget": (bool, NULL), "score": NUM, "proxy": NUM,
         "reading": str}
REPORT = {
    "schema": str, "dery_version": str, "status": str, "target": str, "backend": str, "backend_version": str,
    "device": (str, NULL), "precision": str, "batch": int, "input_shape": list, "budget_ms": NUM,
    "predicted_latency_ms": NUM, "measured_latency_ms": (*NUM, NULL), "measured_p90_ms": (*NUM, NULL),
    "measured_cv": (*NUM, NULL), "latency_estimated": bool, "engine": str, "checkpoint": (str, NULL), "assembly": [BLOCK], "stitches": [STITCH],
    "params": int, "flops": int, "activation_mb": NUM, "accuracy": (float, NULL), "predicted_accuracy": (float, NULL),
    "quality": {"predictor": str, "labels": str, "rerank": str, "proxy": NUM, "objective": NUM},
    "accuracy_as_is": (float, NULL), "repair": dict, "budget_used": (*NUM, NULL), "member": (str, NULL),
    "data": {"name": str, "resolution": int, "classes": (list, NULL), "splits": dict, "labelled": bool},
    "partition": {"k": int, "balance": str, "objective": NUM, "boundaries": dict},
    "zoo": [MEMBER], "rounds": [ROUND], "pareto": (list, NULL),
    "latency_pieces": {"search_space": int, "asked": int},
    "run": {"timings_s": dict, "pieces_measured": int, "repair_s": NUM},
}


def conforms(value, spec, path: str = "report") -> None:
    """Assert that `value` has exactly the fields of `spec`, each of its type (bool is never a number)."""
    if isinstance(spec, dict):
        assert isinstance(value, dict), path
        assert set(value) == set(spec), f"{path}: extra {set(value) - set(spec)}, missing {set(spec) - set(value)}"
        for key, sub in spec.items():
            conforms(value[key], sub, f"{path}.{key}")
    elif isinstance(spec, list):
        assert isinstance(value, list), path
        for i, item in enumerate(value):
            conforms(item, spec[0], f"{path}[{i}]")
    else:
        types = spec if isinstance(spec, tuple) else (spec,)
        assert isinstance(value, types) and not (isinstance(value, bool) and bool not in types), \
            f"{path}: {value!r} is not {types}"


def check(report: dict, tiny) -> None:
    """The schema, plus what the figures must add up to for the chosen assembly."""
    conforms(report, REPORT)
    assert report["schema"] == "dery.report/1"
    models = [b["model"] for b in report["assembly"]]
    assert [b["set"] for b in report["assembly"]] == list(range(tiny.partition.k))
    for k, b in enumerate(report["assembly"]):
        block = tiny.partition.block(b["model"], k)
        assert (b["first"], b["last"], b["params"], b["flops"]) == (block.first, block.last, block.params, block.flops)
    switches = [(j, a, c) for j, (a, c) in enumerate(zip(models, models[1:])) if a != c]
    assert [(s["boundary"], s["from"], s["to"]) for s in report["stitches"]] == switches
    for s in report["stitches"]:
        st = tiny.stitches.get(s["from"], s["to"], s["boundary"])
        assert (s["params"], s["flops"]) == (st.params, st.flops)
    assert report["params"] == sum(b["params"] for b in report["assembly"]) + sum(s["params"] for s in
                                                                                  report["stitches"])
    assert report["flops"] == sum(b["flops"] for b in report["assembly"]) + sum(s["flops"] for s in report["stitches"])
    assert report["activation_mb"] == max(b["activation_bytes"] for b in report["assembly"]) * report["batch"] / 1e6
    assert [r["round"] for r in report["rounds"]] == list(range(len(report["rounds"])))
    assert {z["model"] for z in report["zoo"]} == set(tiny.partition.models)


@pytest.fixture(scope="module")
def budget(tiny) -> float:
    lat = sorted(r.median_ms for r in tiny.costs.networks.values())
    return (lat[0] + lat[-1]) / 2


def test_ok_report(tiny, budget, tmp_path) -> None:
    report = run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path))
    check(report, tiny)
    assert report["status"] == "ok" and report["rounds"][-1]["within_budget"] is True
    assert report["checkpoint"] == "assembly.pt" and (tmp_path / report["checkpoint"]).is_file()
    assert report["measured_latency_ms"] == report["rounds"][-1]["measured_ms"] <= budget
    assert json.loads((tmp_path / "report.json").read_text()) == report


@pytest.mark.slow  # the default run stays under 5 minutes on 2 cores
def test_over_budget_report(tiny, budget, tmp_path, monkeypatch) -> None:
    slow = iter([1.05, 1.02, 1.04])  # every round measures above the budget; the second is the fastest
    readings_over(monkeypatch, lambda: next(slow) * budget)
    report = run_compile(CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=tmp_path, max_rounds=3))
    check(report, tiny)
    assert report["status"].startswith("over budget:")
    rounds = report["rounds"]
    assert len(rounds) >= 2 and [r["within_budget"] for r in rounds] == [False] * len(rounds)
    limits = [budget, budget / 1.05, budget / 1.05 / 1.02][:len(rounds)]
    assert [r["limit_ms"] for r in rounds] == pytest.approx(limits, rel=1e-12)
    assert report["measured_latency_ms"] == min(r["measured_ms"] for r in rounds) == rounds[1]["measured_ms"]
    assert [b["model"] for b in report["assembly"]] == rounds[1]["chosen"]


@pytest.mark.slow  # a second compile, estimated (measured: 80 s on 2 cores); the ok report stays by default
def test_estimated_report(tiny, tmp_path) -> None:
    from dery.backends import availability
    from dery.targets import get_target

    absent = next(n for n in ("a100", "h100", "h200") if availability(get_target(n))[1] is not None)
    report = run_compile(CompileConfig(target=absent, latency_ms=5.0, zoo="tiny", k=3, out=tmp_path,
                                       allow_estimates=True))
    check(report, tiny)
    assert report["status"].startswith("estimated:") and report["latency_estimated"] is True
    assert report["measured_latency_ms"] is None and report["measured_cv"] is None
    assert all(z["estimated"] for z in report["zoo"])
