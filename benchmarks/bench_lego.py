"""Model LEGO on the default zoo's CNNs: kept parameters, ONNX Runtime latency, task accuracy against controls.

Rows: every default-zoo CNN (the ViT is not a CNN and is refused by disassembly) x 5 class subsets; the
component is deterministic, so the 3 seeds are the random control's seeds. Latency: ONNX Runtime, 1 thread,
batch 1, median of many runs on a shared, noisy 2-core machine. Writes benchmarks/results/lego.{md,json}.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from dery.cache import Cache
from dery.data import digits
from dery.onnx_graph import export
from dery.passes.disassemble import disassemble, random_component, task_accuracy
from dery.zoo import PRESETS, load_member

SUBSETS = ((0, 3), (1, 5, 7), (2, 4, 6, 8), (0, 9), (3, 5, 8))
SEEDS = (0, 1, 2)
RESULTS = Path(__file__).parent / "results"


def latency_ms(module: torch.nn.Module, shape: tuple[int, ...], runs: int = 200) -> float:
    """Median ONNX Runtime latency (1 thread, batch 1)."""
    import onnxruntime as ort

    x = torch.rand(1, *shape)
    model = export(module, [x], ["x"], ["y"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    for _ in range(20):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    data = digits(32)
    x, y = data.images("train"), data.split("train").labels
    xt, yt = data.images("test"), data.split("test").labels
    rows = []
    for spec in PRESETS["default"]:
        if spec.name == "vit":
            continue
        net = load_member(spec, data, Cache())
        whole_ms = latency_ms(net.module, net.input_shape)
        for classes in SUBSETS:
            comp = disassemble(net.module, x, y, classes, data.classes, label=net.name)
            wrong_cls = tuple(c for c in range(10) if c not in classes)[:len(classes)]
            wrong = disassemble(net.module, x, y, wrong_cls, data.classes, label=net.name)
            cols = range(len(classes))
            rand = [task_accuracy(random_component(net.module, comp, x, s).module, xt, yt, classes, cols)
                    for s in SEEDS]
            rows.append({"model": net.name, "classes": list(classes), "whole_params": comp.whole_params,
                         "kept_params": comp.kept_params, "kept_fraction": comp.kept_fraction,
                         "whole_ms": whole_ms, "component_ms": latency_ms(comp.module, net.input_shape),
                         "acc_whole": task_accuracy(net.module, xt, yt, classes),
                         "acc_component": task_accuracy(comp.module, xt, yt, classes, cols),
                         "acc_random": float(np.mean(rand)), "acc_random_seeds": rand,
                         "acc_wrong": task_accuracy(wrong.module, xt, yt, classes, cols)})
            r = rows[-1]
            print(f"{r['model']:12s} {classes} kept {100 * r['kept_fraction']:.1f}% {r['whole_ms']:.3f}->"
                  f"{r['component_ms']:.3f} ms acc {r['acc_whole']:.3f} {r['acc_component']:.3f} "
                  f"rand {r['acc_random']:.3f} wrong {r['acc_wrong']:.3f}", flush=True)
    write(rows)


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lego.json").write_text(json.dumps({"machine": platform.machine(), "rows": rows}, indent=2) + "\n")
    lines = ["# Model LEGO: components of the default zoo's CNNs", "",
             "Digits (distorted), 32 px, default thresholds (conv 0.3/0.2, linear 0.4/0.3), at least 32 "
             "confidently correct training samples per class. Accuracy: test split, samples of the subset's "
             "classes, argmax over those classes. Random control: the same units per dependency group chosen at "
             "random (3 seeds, mean). Wrong-class control: the component located for as many other classes, "
             "its logits read as the task's. Latency: ONNX Runtime CPU, 1 thread, batch 1, median of 200 runs "
             "on a shared, noisy 2-core machine (other engineers' jobs ran meanwhile). Components are not "
             "parameter-scaled here.", "",
             "| model | classes | kept params | latency whole -> component (ms) | acc whole | acc component | "
             "acc random | acc wrong-class |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {','.join(map(str, r['classes']))} | {r['kept_params']:,} "
                     f"({100 * r['kept_fraction']:.1f}%) | {r['whole_ms']:.3f} -> {r['component_ms']:.3f} | "
                     f"{100 * r['acc_whole']:.1f} | {100 * r['acc_component']:.1f} | {100 * r['acc_random']:.1f} | "
                     f"{100 * r['acc_wrong']:.1f} |")
    lines += ["", "## Per family (mean over subsets)", "",
              "| model | kept params | whole - component (points) | component - random (points) | "
              "within 5 points at <= 40% params | beats random by >= 8 points |", "|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        kept = float(np.mean([r["kept_fraction"] for r in rs]))
        gap = 100 * float(np.mean([r["acc_whole"] - r["acc_component"] for r in rs]))
        lift = 100 * float(np.mean([r["acc_component"] - r["acc_random"] for r in rs]))
        lines.append(f"| {model} | {100 * kept:.1f}% | {gap:.1f} | {lift:.1f} | "
                     f"{'yes' if gap <= 5 and kept <= 0.4 else 'no'} | {'yes' if lift >= 8 else 'no'} |")
    (RESULTS / "lego.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
