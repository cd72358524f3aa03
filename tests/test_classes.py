"""`dery-compile --classes`: every member takes part whole and as its Model LEGO component, scored on the classes."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dery.driver import CompileConfig, run_compile
from dery.errors import DeryError
from dery.passes.disassemble import task_accuracy

CLASSES = (0, 3)


@pytest.fixture(scope="module")
def compiled(tiny, tmp_path_factory):
    """A --classes compile on the tiny zoo with a budget every member meets, and what it said on stderr."""
    budget = 2 * max(r.median_ms for r in tiny.costs.networks.values())
    out = tmp_path_factory.mktemp("classes")
    cfg = CompileConfig(target="cpu", latency_ms=budget, zoo="tiny", k=3, out=out, finetune="none",
                        classes=",".join(map(str, CLASSES)))
    said = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(said):
        mp.delenv("DERY_QUIET")
        report = run_compile(cfg)
    return report, out, said.getvalue()


@pytest.mark.slow  # a whole compile of five members (measured: 2 to 3 minutes on 2 cores)
def test_each_member_takes_part_whole_and_as_its_component(compiled, tiny):
    report, out, _ = compiled
    rows = {z["model"]: z for z in report["zoo"]}
    # vit has no convolutional units to locate: it takes part whole only
    assert set(rows) == {"resnet", "mobilenetv3", "vit", "resnet@part", "mobilenetv3@part"}
    for name, row in rows.items():
        assert row["component_of"] == (name[:-len("@part")] if name.endswith("@part") else None)
    for whole in ("resnet", "mobilenetv3"):
        assert rows[f"{whole}@part"]["params"] < rows[whole]["params"]
    # a whole member's classifier keeps the classes' rows only, so its accuracy is the full network's among them
    x, y = tiny.data.images("test"), tiny.data.split("test").labels
    for n in tiny.zoo:
        assert rows[n.name]["accuracy"] == pytest.approx(task_accuracy(n.module, x, y, CLASSES), abs=1e-12)
    assert report["data"]["classes"] == [tiny.data.classes[c] for c in CLASSES]
    assert report["data"]["splits"]["test"] == int(torch.isin(y, torch.tensor(CLASSES)).sum())
    assert "For the classes" in (out / "report.md").read_text()


@pytest.mark.slow
def test_the_engine_outputs_the_classes_logits_and_its_accuracy_is_on_them(compiled, tiny):
    report, out, _ = compiled
    assert report["status"] == "ok" and report["measured_latency_ms"] <= report["budget_ms"]
    x, y = tiny.data.images("test"), tiny.data.split("test").labels
    keep = torch.isin(y, torch.tensor(CLASSES))
    sess = ort.InferenceSession(str(out / report["engine"]), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(None, {"x": img[None].numpy()})[0] for img in x[keep]])
    assert logits.shape == (int(keep.sum()), len(CLASSES))
    truth = torch.searchsorted(torch.tensor(CLASSES), y[keep]).numpy()
    acc = float((logits.argmax(1) == truth).mean())
    assert abs(acc - report["accuracy"]) <= 1 / len(truth) + 1e-12  # ONNX and torch may part on one near-tie


@pytest.mark.slow
def test_a_member_that_cannot_be_disassembled_is_said_in_one_line(compiled):
    lines = [ln for ln in compiled[2].splitlines() if "takes part whole only" in ln]
    assert len(lines) == 1 and lines[0].startswith("vit cannot be disassembled: it has attention"), lines


@pytest.mark.parametrize("bad, what", [("0,0", "twice"), ("10", "out of range"), ("zero", "unknown class"),
                                       (" , ", "empty"), (",".join(map(str, range(10))), "every class")])
def test_a_bad_class_list_is_one_line_and_writes_nothing(bad, what, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DeryError, match=what) as e:
        run_compile(CompileConfig(target="cpu", latency_ms=1.0, zoo="tiny", k=3, out=out, finetune="none",
                                  classes=bad))
    assert "\n" not in str(e.value) and e.value.exit_code == 2
    assert not out.exists()
