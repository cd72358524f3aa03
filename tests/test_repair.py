"""--finetune: the repair trains what it says, never changes the engine's architecture, and the engine is the
trained network; a repaired compile is deterministic and weighs every member that fits after the same repair."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from dery.cache import Cache
from dery.driver import CompileConfig, Search, run_compile
from dery.passes.assemble import assemble
from dery.passes.compile import compile_engine
from dery.passes.repair import repair
from dery.passes.stitch import StitchModule
from dery.targets import get_target
from dery.zoo import load_member, parse_zoo


def switched(tiny) -> tuple[str, ...]:
    """A single-switch assembly of the tiny zoo (one stitch, blocks of two members)."""
    st = tiny.stitches.items[0]
    k = tiny.partition.k
    return (st.source,) * (st.boundary + 1) + (st.target,) * (k - st.boundary - 1)


def graph(path) -> tuple[list[str], list[tuple[int, ...]]]:
    """An ONNX graph's operators in order and the shapes of its weights."""
    g = onnx.load(str(path)).graph
    return [n.op_type for n in g.node], sorted(tuple(t.dims) for t in g.initializer)


def run_engine(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))])


@pytest.mark.parametrize("kind", ["stitches", "e2e", pytest.param("incubate", marks=pytest.mark.slow)])
def test_repair_trains_what_it_says_and_keeps_the_architecture(tiny, tmp_path, kind) -> None:
    models = switched(tiny)
    zoo_before = {lw.name: {n: t.clone() for n, t in lw.network.module.state_dict().items()} for lw in tiny.lowered}
    stitch_before = {n: t.clone() for n, t in tiny.stitches.modules[models[0], models[-1],
                                                                    tiny.stitches.items[0].boundary].state_dict().items()}
    _, module = assemble(tiny.lowered, tiny.partition, tiny.stitches, models)
    untrained = {n: p.detach().clone() for n, p in module.named_parameters()}
    fixed = repair(module, kind, 1, tiny.data, tiny.data.split("train").labels, seed=0, run_dir=tmp_path / "run")
    # The zoo and the session's stitches are untouched: the repair trained a copy.
    for lw in tiny.lowered:
        assert all(torch.equal(t, zoo_before[lw.name][n]) for n, t in lw.network.module.state_dict().items())
    st = tiny.stitches.modules[models[0], models[-1], tiny.stitches.items[0].boundary]
    assert all(torch.equal(t, stitch_before[n]) for n, t in st.state_dict().items())
    # Same parameters by shape; what changed is what the kind trains.
    trained = [p.detach() for p in fixed.module.parameters()]
    assert [p.shape for p in trained] == [p.shape for p in untrained.values()]
    if kind == "stitches":
        stitch_ids = {id(p) for part in fixed.module.parts if isinstance(part, StitchModule) for p in part.parameters()}
        for p, before in zip(fixed.module.parameters(), untrained.values()):
            assert torch.equal(p.detach(), before) != (id(p) in stitch_ids and fixed.log["kept"])
    else:
        assert sum(not torch.equal(p, b) for p, b in zip(trained, untrained.values())) > len(trained) // 2
    # The engine of the repaired network has the untrained engine's graph and computes the trained network.
    target = get_target("cpu")
    shape = tiny.zoo[0].input_shape
    plain = compile_engine(module, shape, target, tmp_path, "plain")
    engine = compile_engine(fixed.module, shape, target, tmp_path, "repaired")
    assert graph(engine.path) == graph(plain.path)
    x = tiny.data.images("test", 16)
    with torch.no_grad():
        want, before = fixed.module(x).numpy(), module(x).numpy()
    got = run_engine(engine.path, x)
    assert np.abs(got - want).max() <= 1e-4 < np.abs(got - before).max()


def test_a_repaired_compile_is_deterministic_and_weighs_every_member_after_the_same_repair(tiny, tmp_path) -> None:
    lat = sorted(r.median_ms for r in tiny.costs.networks.values())
    budget = (lat[0] + lat[-1]) / 2
    cfg = CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, finetune="e2e", epochs=2)
    one = run_compile(dataclasses.replace(cfg, out=tmp_path / "one"))
    two = run_compile(dataclasses.replace(cfg, out=tmp_path / "two"))
    # Everything but the engine's timing (a disturbed reading is measured afresh, never cached) is the same.
    timing = {"run", "measured_latency_ms", "measured_p90_ms", "measured_cv", "budget_used", "rounds", "status"}
    assert {k: v for k, v in one.items() if k not in timing} == {k: v for k, v in two.items() if k not in timing}
    assert [r["chosen"] for r in one["rounds"]] == [r["chosen"] for r in two["rounds"]]
    assert (tmp_path / "one" / one["engine"]).read_bytes() == (tmp_path / "two" / two["engine"]).read_bytes()
    assert one["repair"]["kind"] == "e2e" and one["repair"]["epochs"] == 2
    assert one["quality"]["predictor"] == cfg.quality_model
    # Every member that fits had the same repair: its reported accuracy is that of the member so repaired.
    search = Search(dataclasses.replace(tiny, config=cfg), tmp_path / "work")
    k = tiny.partition.k
    x, y = tiny.data.images("test"), tiny.data.split("test").labels
    fitting = [z for z in one["zoo"] if z["fits"]]
    assert fitting and all(z["latency_ms"] <= budget for z in fitting)
    assert all(z["accuracy_repaired"] is None for z in one["zoo"] if not z["fits"])
    for z in fitting:
        member = search.repaired((z["model"],) * k).module
        assert z["accuracy_repaired"] == float((member(x).argmax(1) == y).float().mean())
        # ...and the answer is never behind it on val, where the choice is made.
        assert one["rounds"][-1]["proxy"] >= search.proxy((z["model"],) * k)
    models = tuple(b["model"] for b in one["assembly"])
    assert one["member"] == (models[0] if len(set(models)) == 1 else None)
    repaired = search.repaired(models).module
    assert one["accuracy"] == pytest.approx(float((repaired(x).argmax(1) == y).float().mean()), abs=1e-9)
    # The answer is also written as a checkpoint that --zoo loads: the repaired network, bit for bit.
    (spec,) = parse_zoo(str(tmp_path / "one" / one["checkpoint"]))
    with torch.no_grad():
        assert torch.equal(load_member(spec, tiny.data, Cache()).module(x), repaired(x))
    report = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report["budget_used"] == pytest.approx(report["measured_latency_ms"] / budget)
    assert "Repair (`--finetune e2e`, 2 epochs" in (tmp_path / "one" / "report.md").read_text()


def test_a_cached_engine_is_copied_into_a_directory_not_made_yet(tmp_path, monkeypatch) -> None:
    """The second request for an engine copies the stored one, byte for byte, into a directory that nothing
    has created yet (a search's work directory), and builds nothing."""
    import dery.passes.compile
    from dery.passes.compile import cached_engine

    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    target, cache = get_target("cpu"), Cache(tmp_path / "cache")
    first = cached_engine(module, (3, 8, 8), target, tmp_path / "a", "m", cache, "id-1")

    def build(*args, **kwargs):
        raise AssertionError("built again")

    monkeypatch.setattr(dery.passes.compile, "compile_engine", build)
    again = cached_engine(module, (3, 8, 8), target, tmp_path / "b" / "c", "m", cache, "id-1")
    assert again.path == tmp_path / "b" / "c" / first.path.name
    assert again.path.read_bytes() == first.path.read_bytes()

