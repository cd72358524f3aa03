"""Reassembly benchmark: dery-compile's choice under latency budgets against the zoo members that fit.

    DERY_CACHE_DIR=/tmp/bench-cache python benchmarks/bench_reassembly.py [--quick]

One run writes benchmarks/results/reassembly.md and benchmarks/results/reassembly.json. On the
default zoo and on a second zoo of other architectures trained on the same data (`--zoo alt`),
K = 4, target cpu / ONNX Runtime, at 11 budgets spread evenly over the members' measured
latencies (fastest to slowest), it replays dery-compile's closed loop with `dery.driver.Search`
twice:
(a) `--finetune none`: the untrained quality model, the best 5 solutions and every member that
    fits re-ranked by val accuracy as they are; the engine measured, re-solved while it overshoots;
(b) the default repair (`--finetune e2e --epochs 5`): the after-repair quality model, the same
    candidates each repaired and re-ranked by val accuracy after repair;
and measures the answer's top-1 TEST accuracy against every member that fits the budget (measured
latency), with the same training: as they are for (a), after the same repair for (b). A win is an
assembly of two or more members whose engine measures within the budget and is more accurate on
test than every member that fits; p is the exact McNemar test against the best of them. For (b)
the same assembly is also repaired by the other kinds (`stitches`, `incubate`, same epochs), with
their wall time, for the first two distinct reassembled answers: the evidence for the default kind.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import torch
from bench_quality import machine
from dery.driver import CompileConfig, Search, Session, front
from dery.errors import DeryError
from dery.evaluate import predictions, reference_labels
from dery.passes.assemble import assemble
from dery.passes.proxy import quality
from dery.passes.repair import repair
from dery.passes.verify import next_limit

RESULTS = common.RESULTS
SEED = 0
BUDGETS = 11
MAX_ROUNDS = 4  # dery-compile's default closed-loop rounds
REPAIRED = CompileConfig(target="cpu", latency_ms=1.0)  # the default repair
UNTRAINED = dataclasses.replace(REPAIRED, finetune="none")
OTHER_KINDS = ("stitches", "incubate")
OTHER_KINDS_AT = 2  # distinct reassembled answers that the other kinds repair too (each once)
ZOOS = {"default": "default", "alt": "alt"}


def correct(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image correctness (bool) of a module on a split."""
    return predictions(module, images).argmax(-1) == labels


def compiled(search: Search, budget: float) -> tuple[list[dict], object | None]:
    """dery-compile's closed loop at one budget: the rounds and the final result (None if nothing fits)."""
    limit, over, rounds, final = budget, [], [], None
    for r in range(MAX_ROUNDS):
        result = search.best(limit, exclude=over)
        if result is None:
            break
        rounds.append(result.round_json(r, limit, budget))
        if result.measured_ms <= budget:
            return rounds, result
        over.append(result.solution.chosen)
        final = final if final is not None and final.measured_ms <= result.measured_ms else result
        limit = next_limit(limit, budget, result.measured_ms)
    return rounds, final


def fitting(s: Session, budget: float) -> list[str]:
    """The members whose measured latency fits the budget."""
    return [m for m, r in s.costs.networks.items() if r.median_ms <= budget]


def verdict(ok: torch.Tensor, models: tuple[str, ...], within: bool, controls: dict[str, torch.Tensor]) -> dict:
    """Test accuracy of an answer against the best of the members that fit (same training), McNemar p."""
    acc = float(ok.float().mean())
    out = {"test_acc": acc, "errors": int((~ok).sum()), "reassembled": len(set(models)) > 1,
           "within_budget": within}
    if controls:
        best = max(controls, key=lambda m: (float(controls[m].float().mean()), m))
        control = float(controls[best].float().mean())
        out.update(member=best, member_test_acc=control, p=common.mcnemar(ok, controls[best]),
                   win=out["reassembled"] and within and acc > control,
                   loss=control > acc and common.mcnemar(ok, controls[best]) < 0.05)
    return out


def study(s: Session, workdir: Path, budgets_n: int, other_kinds: bool) -> dict:
    """At each budget: dery-compile's answer untrained and with the default repair, against the members that fit."""
    started = time.perf_counter()
    k = s.partition.k
    repaired_s = dataclasses.replace(s, config=dataclasses.replace(s.config, finetune=REPAIRED.finetune,
                                                                   epochs=REPAIRED.epochs),
                                     quality=quality(s.lowered, s.partition, s.stitches, s.data, s.cache,
                                                     REPAIRED.quality_model))
    plain, fixed = Search(s, workdir / "none"), Search(repaired_s, workdir / "repair")
    x = s.data.images("test")
    y, _ = reference_labels(s.zoo, s.data, "test")
    train_y, _ = reference_labels(s.zoo, s.data, "train")
    member_ms = {m: r.median_ms for m, r in s.costs.networks.items()}
    as_is = {m: correct(n.module, x, y) for m, n in zip(member_ms, s.zoo)}
    after = {m: correct(fixed.repaired((m,) * k).module, x, y) for m in member_ms}
    lo, hi = min(member_ms.values()), max(member_ms.values())
    rows, kinds = [], {}
    for i in range(budgets_n):
        budget = lo + (hi - lo) * i / max(budgets_n - 1, 1)
        print(f"budget {budget:.4f} ms, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        fits = fitting(s, budget)
        row: dict = {"budget_ms": budget, "fits": fits}
        for name, search, controls in (("none", plain, as_is), ("repair", fixed, after)):
            rounds, result = compiled(search, budget)
            if result is None:
                row[name] = None
                continue
            ok = correct(result.module, x, y)
            row[name] = {"models": list(result.models), "predicted_ms": result.predicted_ms,
                         "engine_ms": result.measured_ms, "rounds": len(rounds), "proxy": result.proxy,
                         **verdict(ok, result.models, result.measured_ms <= budget, {m: controls[m] for m in fits})}
        answer = tuple(row["repair"]["models"]) if row["repair"] and row["repair"]["reassembled"] else None
        if other_kinds and answer is not None and (answer in kinds or len(kinds) < OTHER_KINDS_AT):
            if answer not in kinds:
                kinds[answer] = {REPAIRED.finetune: {"test_acc": row["repair"]["test_acc"],
                                                     "seconds": fixed.repaired(answer).seconds}}
                for kind in OTHER_KINDS:
                    _, module = assemble(s.lowered, s.partition, s.stitches, answer)
                    done = repair(module, kind, REPAIRED.epochs, s.data, train_y, seed=SEED,
                                  run_dir=workdir / kind / f"{i}")
                    kinds[answer][kind] = {"test_acc": float(correct(done.module, x, y).float().mean()),
                                           "seconds": done.seconds}
            row["kinds"] = kinds[answer]
        rows.append(row)
    return {"models": list(s.partition.models),
            "members": {m: {"latency_ms": member_ms[m], "val_acc": s.quality.member_val[m],
                            "test_acc": float(as_is[m].float().mean()),
                            "repaired_test_acc": float(after[m].float().mean()),
                            "repair_s": fixed.repaired((m,) * k).seconds} for m in member_ms},
            "quality": {"none": s.quality.predictor, "repair": repaired_s.quality.predictor},
            "budgets": rows, "wall_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 budgets, the default zoo only, no other kinds")
    parser.add_argument("--zoos", default=",".join(ZOOS), help=f"zoos to study (default {','.join(ZOOS)})")
    args = parser.parse_args(argv)
    names = ["default"] if args.quick else args.zoos.split(",")
    if unknown := [n for n in names if n not in ZOOS]:
        raise DeryError(f"--zoos: unknown zoo {', '.join(unknown)}; the zoos are {', '.join(ZOOS)}")
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench-reassembly-"))
    doc = {"machine": machine(), "mode": "quick" if args.quick else "full", "seed": SEED,
           "command": " ".join([sys.executable, *sys.argv]), "finetune": REPAIRED.finetune,
           "epochs": REPAIRED.epochs, "zoos": {}}
    try:
        for name in names:
            try:
                s = front(dataclasses.replace(UNTRAINED, zoo=ZOOS[name], k=4, out=workdir / "out"))
            except DeryError as e:  # reported as measured: the zoo that cannot be compiled says why
                doc["zoos"][name] = {"error": str(e)}
            else:
                doc["zoos"][name] = study(s, workdir / name, 3 if args.quick else BUDGETS,
                                          other_kinds=not args.quick)
                doc["labels"] = reference_labels(s.zoo, s.data, "train")[1]
                doc["test_images"] = len(s.data.split("test"))
            doc["total_s"] = time.perf_counter() - started
            if "test_images" in doc:  # after each zoo: a later failure keeps what was measured
                common.write_results("reassembly", doc, markdown(doc))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if "test_images" not in doc:
        raise DeryError("no zoo could be compiled: " + "; ".join(f"{k}: {z['error']}" for k, z in doc["zoos"].items()))
    return 0


def _cell(entry: dict | None) -> str:
    if entry is None:
        return "nothing fits"
    over = "" if entry["within_budget"] else ", engine over budget"
    head = f"{'-'.join(entry['models'])}: {common.pct(entry['test_acc'])}"
    if "member" not in entry:
        return f"{head} (no member fits{over})"
    mark = "**win**" if entry["win"] else ("**loss**" if entry["loss"] else "no")
    return f"{head} vs {entry['member']} {common.pct(entry['member_test_acc'])} ({mark}, p={entry['p']:.2g}{over})"


def markdown(doc: dict) -> list[str]:
    info = doc["machine"]
    md = ["# Reassembly benchmark (`benchmarks/bench_reassembly.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores, torch {info['torch']}, ONNX Runtime "
          f"{info['onnxruntime']}. Mode: {doc['mode']}; seed {doc['seed']}; total run {doc['total_s']:.0f} s.", "",
          f"Command: `{doc['command']}` (DERY_CACHE_DIR={os.environ.get('DERY_CACHE_DIR', '<default>')}).", "",
          f"K = 4, target cpu (ONNX Runtime), {BUDGETS} budgets evenly from the fastest to the slowest member's "
          f"measured latency. Each cell: dery-compile's answer and its test accuracy ({doc['test_images']} images; "
          f"one image is {100 / doc['test_images']:.2f} points) against the most accurate member that fits, with "
          f"the same training: as they are for `--finetune none`, after the same repair (`--finetune "
          f"{doc['finetune']} --epochs {doc['epochs']}`, train split, {doc['labels']}) for the default. "
          "**win**: two or more members, engine within budget, more accurate than every member that fits; "
          "**loss**: a member that fits is more accurate with McNemar p < 0.05; p: exact McNemar test against "
          "that member."]
    for name, z in doc["zoos"].items():
        if "error" in z:
            md += ["", f"## Zoo: {name}", "", f"Not compiled: {z['error']}"]
            continue
        md += ["", f"## Zoo: {name} (quality model `{z['quality']['none']}` untrained, `{z['quality']['repair']}` "
               f"with the repair; {z['wall_s']:.0f} s)", "",
               "| member | measured latency (ms) | val acc | test acc | after the repair | repair (s) |",
               "|---|---|---|---|---|---|"]
        for m, r in sorted(z["members"].items(), key=lambda kv: kv[1]["latency_ms"]):
            md.append(f"| {m} | {r['latency_ms']:.4f} | {common.pct(r['val_acc'])} | {common.pct(r['test_acc'])} | "
                      f"{common.pct(r['repaired_test_acc'])} | {r['repair_s']:.1f} |")
        md += ["", "| budget (ms) | members that fit | `--finetune none` | default repair | engine ms (repair) |",
               "|---|---|---|---|---|"]
        for b in z["budgets"]:
            rep = b["repair"]
            md.append(f"| {b['budget_ms']:.4f} | {len(b['fits'])} | {_cell(b['none'])} | {_cell(rep)} | "
                      f"{rep['engine_ms']:.4f} |" if rep else f"| {b['budget_ms']:.4f} | {len(b['fits'])} | "
                      f"{_cell(b['none'])} | {_cell(rep)} | - |")
        md += [""]
        for how in ("none", "repair"):
            entries = [b[how] for b in z["budgets"] if b[how] is not None]
            wins = [e for e in entries if e.get("win")]
            strong = sum(e["p"] < 0.05 for e in wins)
            md.append(f"- `{how}`: wins at {len(wins)} of {len(z['budgets'])} budgets, {strong} "
                      f"with p < 0.05; losses (a member that fits better, p < 0.05): "
                      f"{sum(bool(e.get('loss')) for e in entries)}; the answer is a lone member at "
                      f"{sum(not e['reassembled'] for e in entries)}.")
        kinds = {tuple(b["repair"]["models"]): b for b in reversed(z["budgets"]) if b.get("kinds")}
        if kinds:
            names = list(next(iter(kinds.values()))["kinds"])
            md += ["", "Each distinct chosen assembly repaired by each kind (test accuracy, wall time; the lowest "
                   "budget that chose it):", "",
                   "| budget (ms) | assembly | " + " | ".join(f"`{n}`" for n in names) + " |",
                   "|---|---|" + "---|" * len(names)]
            for models, b in sorted(kinds.items(), key=lambda kv: kv[1]["budget_ms"]):
                md.append(f"| {b['budget_ms']:.4f} | {'-'.join(models)} | "
                          + " | ".join(f"{common.pct(b['kinds'][n]['test_acc'])} ({b['kinds'][n]['seconds']:.1f} s)"
                                       for n in names) + " |")
            for n in names:
                runs = [b["kinds"][n] for b in kinds.values()]
                md.append(f"- `{n}`: mean {common.pct(sum(r['test_acc'] for r in runs) / len(runs))}, "
                          f"{sum(r['seconds'] for r in runs) / len(runs):.1f} s per repair")
    return md


if __name__ == "__main__":
    common.run(main)
