"""Reassembly benchmark: dery-compile's choice under latency budgets against the zoo members that fit.

    DERY_CACHE_DIR=/tmp/quality-cache /work/venv/bin/python benchmarks/bench_reassembly.py [--quick]

One run writes benchmarks/results/reassembly.md and benchmarks/results/reassembly.json. On
the default zoo (six members trained on digits, K = 4, target cpu / ONNX Runtime), for
budgets spread evenly from the fastest to the slowest member's measured latency, plus 2%
below each slower member's (where that member stops fitting) and one below the fastest
member (where none fits), it replays dery-compile's closed loop with
`dery.driver.Search` (program with the default predictor -> 5 best -> re-ranked by the
val-acc proxy -> compiled engine measured -> re-solved under a tighter limit while it
overshoots), then measures the chosen assembly's top-1 TEST accuracy
(a) as assembled, with the closed-form stitches and no training;
(b) after `refine_stitches` (only the stitches train, end to end, blocks frozen);
(c) after `fine_tune` (a private copy of the whole assembly trains briefly);
against the most accurate member whose measured latency fits the budget, as it is and,
as a control for the extra training, after the same fine-tune. Training uses the train
split only; hyper-parameters are the functions' defaults.
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
import scipy.stats
import torch
from bench_quality import DEFAULT_PREDICTOR, DEFAULT_RERANK, machine, session
from dery.driver import CompileConfig, Search, Session, front
from dery.errors import DeryError
from dery.evaluate import predictions, reference_labels
from dery.passes.assemble import assemble
from dery.passes.compile import compile_engine
from dery.passes.stitch import StitchModule, fine_tune, refine_stitches
from dery.passes.verify import identity, measure_engine, next_limit
from dery.zoo import load_member, parse_zoo

RESULTS = common.RESULTS
SEED = 0
REFINE_EPOCHS = 10
FINE_TUNE_EPOCHS = 5
MAX_ROUNDS = 4
JUST_BELOW = 0.98  # dery-compile's default closed-loop rounds


def correct(module: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-image correctness (bool) of a module on a split."""
    return predictions(module, images).argmax(-1) == labels


def mcnemar(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact two-sided McNemar p-value that a and b (paired correctness) are equally accurate."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


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


def member_engines(s: Session, workdir: Path) -> dict[str, float]:
    """Each member compiled as a one-model assembly and measured like every chosen engine."""
    out = {}
    for m in s.partition.models:
        models = (m,) * s.partition.k
        _, module = assemble(s.lowered, s.partition, s.stitches, models)
        engine = compile_engine(module, s.zoo[0].input_shape, s.target, workdir, f"member-{m}")
        out[m] = measure_engine(engine.path, identity(models, s.partition, s.stitches, s.lowered), s.target,
                                s.cache).median_ms
    return out


def dominant(s: Session) -> str | None:
    """The member that is both the fastest (measured) and the most accurate on val, if one is."""
    ms = {m: r.median_ms for m, r in s.costs.networks.items()}
    val = s.quality.member_val
    fastest, best = min(ms, key=ms.get), max(val, key=val.get)
    return fastest if fastest == best else None


def checkpoint_zoo(s: Session, drop: str) -> str:
    """A --zoo spec naming the cached checkpoints of every member of `s` but `drop` (same weights)."""
    wanted = {n.name: n.weights_key for n in s.zoo if n.name != drop}
    found: dict[str, str] = {}
    for path in sorted((s.cache.root / "zoo").glob("*.pt")):
        spec = parse_zoo(str(path))[0]
        if spec.name in wanted and spec.name not in found and \
                load_member(spec, s.data, s.cache).weights_key == wanted[spec.name]:
            found[spec.name] = str(path)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise DeryError(f"no cached checkpoint for {', '.join(missing)} under {s.cache.root / 'zoo'}")
    return ",".join(found[m] for m in wanted)


def study(s: Session, workdir: Path, steps: int, refine_epochs: int, tune_epochs: int) -> dict:
    """Members, then at each budget: dery-compile's choice, as is / refined / fine-tuned, vs the members that fit."""
    started = time.perf_counter()
    search = Search(s, workdir)
    train_labels, _ = reference_labels(s.zoo, s.data, "train")
    test_images = s.data.images("test")
    test_labels, _ = reference_labels(s.zoo, s.data, "test")
    by_name = {n.name: n for n in s.zoo}
    member_ms = {m: r.median_ms for m, r in s.costs.networks.items()}
    member_ok = {m: correct(by_name[m].module, test_images, test_labels) for m in member_ms}
    engines_ms = member_engines(s, workdir)
    lo, hi = min(member_ms.values()), max(member_ms.values())
    # an even grid over the member range, plus just below each member's latency (where it stops fitting)
    grid = [lo + (hi - lo) * i / steps for i in range(steps + 1)]
    budgets = sorted({0.8 * lo, *grid, *(JUST_BELOW * ms for ms in member_ms.values() if ms > lo)})
    tuned_members: dict[str, torch.Tensor] = {}
    rows = []
    for budget in budgets:
        print(f"budget {budget:.4f} ms, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        rounds, result = compiled(search, budget)
        row: dict = {"budget_ms": budget, "in_member_range": budget >= lo, "rounds": rounds}
        fits = [m for m in member_ms if member_ms[m] <= budget]
        member = max(fits, key=lambda m: (float(member_ok[m].float().mean()), -member_ms[m])) if fits else None
        if member is not None:
            if member not in tuned_members:
                _, whole = assemble(s.lowered, s.partition, s.stitches, (member,) * s.partition.k)
                tuned, _ = fine_tune(whole, s.data, train_labels, tune_epochs, seed=SEED)
                tuned_members[member] = correct(tuned, test_images, test_labels)
            row["member"] = {"name": member, "latency_ms": member_ms[member], "engine_ms": engines_ms[member],
                             "test_acc": float(member_ok[member].float().mean()),
                             "fine_tuned_test_acc": float(tuned_members[member].float().mean())}
        row["chosen"] = None if result is None else chosen(s, result, budget, member, member_ok, tuned_members,
                                                           train_labels,
                                                           refine_epochs, tune_epochs)
        rows.append(row)
    return {"models": list(s.partition.models),
            "members": {m: {"latency_ms": member_ms[m], "engine_ms": engines_ms[m],
                            "val_acc": s.quality.member_val[m], "test_acc": float(member_ok[m].float().mean()),
                            "fine_tuned_test_acc": float(tuned_members[m].float().mean())
                            if m in tuned_members else None} for m in member_ms},
            "calibration": dataclasses.asdict(s.calibration) if dataclasses.is_dataclass(s.calibration) else None,
            "budgets": rows}


def chosen(s: Session, result, budget: float, member: str | None, member_ok: dict[str, torch.Tensor],
           tuned_ok: dict[str, torch.Tensor],
           train_labels: torch.Tensor, refine_epochs: int, tune_epochs: int) -> dict:
    """Test accuracy of one chosen assembly as is, refined and fine-tuned, against the best member that fits
    (as it is; for the fine-tuned assembly, that member after the same fine-tune). Only an assembly of two or
    more members counts as reassembled: a lone member that fine-tuning improves is not a reassembly."""
    test_images = s.data.images("test")
    test_labels, _ = reference_labels(s.zoo, s.data, "test")
    models = result.models
    _, module = assemble(s.lowered, s.partition, s.stitches, models)
    as_is = correct(module, test_images, test_labels)
    refine_log = refine_stitches(module, s.data, train_labels, refine_epochs, seed=SEED)
    refined = correct(module, test_images, test_labels)
    _, fresh = assemble(s.lowered, s.partition, s.stitches, models)
    tuned, tune_log = fine_tune(fresh, s.data, train_labels, tune_epochs, seed=SEED)
    out = {"models": list(models), "stitches": sum(isinstance(p, StitchModule) for p in module.parts),
           "predicted_ms": result.predicted_ms, "engine_ms": result.measured_ms,
           "engine_within_budget": result.measured_ms <= budget, "proxy": result.proxy,
           "objective": result.solution.objective, "refine": refine_log, "fine_tune": tune_log,
           "reassembled": len(set(models)) > 1}
    tuned_ok_now = correct(tuned, test_images, test_labels)
    for name, ok in (("as_is", as_is), ("refined", refined), ("fine_tuned", tuned_ok_now)):
        entry = {"test_acc": float(ok.float().mean()), "errors": int((~ok).sum())}
        if member is not None:
            control = (tuned_ok if name == "fine_tuned" else member_ok)[member]
            entry["beats_every_member_that_fits"] = out["reassembled"] and bool(
                entry["test_acc"] > float(control.float().mean()))
            entry["mcnemar_p_vs_member"] = mcnemar(ok, control)
        out[name] = entry
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="3 budgets in the member range, 1 training epoch each, no leave-one-out zoo")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    refine_epochs, tune_epochs = (1, 1) if args.quick else (REFINE_EPOCHS, FINE_TUNE_EPOCHS)
    steps = 2 if args.quick else 5
    workdir = Path(tempfile.mkdtemp(prefix="bench-reassembly-"))
    try:
        s = session(workdir / "out")
        _, kind = reference_labels(s.zoo, s.data, "train")
        _, test_kind = reference_labels(s.zoo, s.data, "test")
        zoos = {"default": study(s, workdir, steps, refine_epochs, tune_epochs)}
        drop = dominant(s)
        if drop is not None and not args.quick:
            spec = checkpoint_zoo(s, drop)
            sub = front(CompileConfig(target="cpu", latency_ms=1.0, zoo=spec, k=4, out=workdir / "out"))
            zoos[f"default without {drop}"] = study(sub, workdir, steps, refine_epochs, tune_epochs)
        doc = {"machine": machine(), "mode": "quick" if args.quick else "full", "seed": SEED,
               "command": " ".join([sys.executable, *sys.argv]), "labels": kind, "test_labels": test_kind,
               "predictor": DEFAULT_PREDICTOR, "rerank": DEFAULT_RERANK, "refine_epochs": refine_epochs,
               "fine_tune_epochs": tune_epochs, "test_images": len(s.data.split("test")), "dominant": drop,
               "zoos": zoos, "total_s": time.perf_counter() - started}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    common.write_results("reassembly", doc, markdown(doc))
    return 0


def _mark(entry: dict) -> str:
    if "beats_every_member_that_fits" not in entry:
        return f"{common.pct(entry['test_acc'])} (no member fits)"
    verdict = "**beats**" if entry["beats_every_member_that_fits"] else "no"
    return f"{common.pct(entry['test_acc'])} ({verdict}, p={entry['mcnemar_p_vs_member']:.2g})"


def markdown(doc: dict) -> list[str]:
    info = doc["machine"]
    md = ["# Reassembly benchmark (`benchmarks/bench_reassembly.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores (shared with other jobs), torch "
          f"{info['torch']}, ONNX Runtime {info['onnxruntime']}. Mode: {doc['mode']}; seed {doc['seed']}; total run "
          f"{doc['total_s']:.0f} s.", "",
          f"Command: `{doc['command']}` (DERY_CACHE_DIR={os.environ.get('DERY_CACHE_DIR', '<default>')}).", "",
          f"K = 4, target cpu (ONNX Runtime). Choice: dery-compile's closed loop (predictor `{doc['predictor']}`, "
          f"top-5 re-ranked by `{doc['rerank']}`, engine measured, re-solved while over budget). Accuracy: top-1 "
          f"on the test split ({doc['test_images']} images, {doc['test_labels']}); one image is "
          f"{100 / doc['test_images']:.2f} points. Refinement: {doc['refine_epochs']} epochs of the stitches "
          f"only; fine-tune: {doc['fine_tune_epochs']} epochs of a copy of the whole network; both on the train "
          f"split ({doc['labels']}). 'beats': an assembly of two or more members with strictly higher test accuracy "
          f"than the most accurate member whose measured latency fits (the fine-tuned assembly against that "
          f"member after the same fine-tune); p: exact McNemar test against that member."]
    for name, z in doc["zoos"].items():
        md += ["", f"## Zoo: {name}", "",
               "| member | measured latency (ms) | engine (ms) | val acc | test acc | after the same fine-tune |",
               "|---|---|---|---|---|---|"]
        for m, r in sorted(z["members"].items(), key=lambda kv: kv[1]["latency_ms"]):
            md.append(f"| {m} | {r['latency_ms']:.4f} | {r['engine_ms']:.4f} | {common.pct(r['val_acc'])} | "
                      f"{common.pct(r['test_acc'])} | {common.pct(r['fine_tuned_test_acc'])} |")
        md += ["", "| budget (ms) | best member that fits (test; fine-tuned) | chosen assembly | stitches | "
               "predicted / engine ms | as is | stitches refined | fine-tuned |", "|---|---|---|---|---|---|---|---|"]
        for b in z["budgets"]:
            mem = b.get("member")
            mcell = (f"{mem['name']} ({common.pct(mem['test_acc'])}; {common.pct(mem['fine_tuned_test_acc'])})"
                     if mem else "none")
            c = b["chosen"]
            label = f"{b['budget_ms']:.4f}{'' if b['in_member_range'] else ' (below every member)'}"
            if c is None:
                md.append(f"| {label} | {mcell} | nothing fits | | | | | |")
                continue
            over = "" if c["engine_within_budget"] else " (over)"
            md.append(f"| {label} | {mcell} | {'-'.join(c['models'])} | {c['stitches']} | "
                      f"{c['predicted_ms']:.4f} / {c['engine_ms']:.4f}{over} | {_mark(c['as_is'])} | "
                      f"{_mark(c['refined'])} | {_mark(c['fine_tuned'])} |")
        md += ["", "Where a reassembled network beats every member that fits (budgets in the member range):", ""]
        in_range = [b for b in z["budgets"] if b["in_member_range"]]
        for stage in ("as_is", "refined", "fine_tuned"):
            won = [f"{b['budget_ms']:.4f}" for b in in_range
                   if b["chosen"] and b["chosen"][stage].get("beats_every_member_that_fits")]
            md.append(f"- {stage.replace('_', ' ')}: {len(won)} of {len(in_range)} budgets"
                      + (f" ({', '.join(won)} ms)" if won else ""))
    return md


if __name__ == "__main__":
    common.run(main)
