"""Validation of the quality model (dery.passes.proxy) against real held-out test accuracy.

    DERY_CACHE_DIR=/tmp/quality-cache /work/venv/bin/python benchmarks/bench_quality.py [--quick]

One run writes benchmarks/results/quality.md and benchmarks/results/quality.json. On the
default zoo (six members trained on the embedded glyphs, K = 4, target cpu) it builds assemblies with no
training and measures their top-1 accuracy on the TEST split, which no predictor sees:
(a) a validation set: the 6 pure members, every single-switch assembly (one stitch), and
    random multi-switch assemblies (two or more stitches, drawn with a fixed seed); on it
    every predictor is scored by Kendall's tau against test accuracy and by its top-1
    regret. The unary+pairwise predictors (the program's objective) come from
    `Quality.score`, the whole-network proxies from `whole_network_score` on val.
(b) full mode also measures every assembly of the search space (test accuracy and the
    cheap predictors), which gives the true best assembly under each latency budget (from
    the fastest assembly the program can build to the slowest member); there dery-compile's
    own choice is replayed with `dery.driver.Search` (program with each predictor -> its 5
    best solutions -> re-ranked by the val-acc proxy) next to the program's top solution.
Val feeds the predictors and the proxies; test is only the ground truth.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as common
import numpy as np
import scipy.stats
import torch
from dery import defaults
from dery.driver import CompileConfig, Search, Session, front
from dery.evaluate import accuracy, reference_labels
from dery.passes.assemble import assemble
from dery.passes.proxy import PREDICTORS, PROXIES, quality, whole_network_score
from dery.passes.repair import repair
from dery.passes.solve import assembly_ids, chosen_models
from dery.solver import best_solutions, min_achievable

RESULTS = common.RESULTS
SEED = 0
BUDGETS = 8  # from the fastest assembly the program can build to the slowest member
UNTRAINED = CompileConfig(target="cpu", latency_ms=1.0, finetune="none")
DEFAULT_PREDICTOR = UNTRAINED.quality_model
DEFAULT_RERANK = UNTRAINED.rerank
REPAIRED = CompileConfig(target="cpu", latency_ms=1.0)  # the default repair and the quality model it uses
REPAIRED_MULTI = 30  # multi-switch assemblies repaired for the after-repair validation


def machine() -> dict:
    return common.machine("torch", "numpy", "scipy", "onnxruntime", torch_threads=torch.get_num_threads())


def session(out: Path) -> Session:
    """The front half of dery-compile on the default zoo (cached under DERY_CACHE_DIR)."""
    return front(dataclasses.replace(UNTRAINED, zoo="default", k=4, out=out, measure="all"))


def switches_of(models: tuple[str, ...]) -> int:
    return sum(a != b for a, b in zip(models, models[1:]))


def validation_set(models: tuple[str, ...], k: int, multi: int, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Pure members, every single-switch assembly, and `multi` random distinct multi-switch ones."""
    space = list(itertools.product(models, repeat=k))
    fixed = [m for m in space if switches_of(m) <= 1]
    many = [m for m in space if switches_of(m) >= 2]
    return fixed + [many[i] for i in sorted(rng.choice(len(many), size=min(multi, len(many)), replace=False))]


def tau(pred: list[float], truth: list[float]) -> float:
    return float(scipy.stats.kendalltau(pred, truth).statistic)


def regret(pred: list[float], truth: list[float]) -> tuple[float, float]:
    """(test accuracy of the predictor's top assembly, best test accuracy - that)."""
    pick = truth[int(np.argmax(pred))]
    return pick, max(truth) - pick


def score_rows(rows: list[dict], names: list[str]) -> list[dict]:
    truth = [r["test_acc"] for r in rows]
    out = []
    for name in names:
        pred = [r["scores"][name] for r in rows]
        pick, lost = regret(pred, truth)
        out.append({"predictor": name, "tau": tau(pred, truth), "top1_test_acc": pick, "regret": lost})
    return out


def budget_study(s: Session, qualities: dict, space: dict[tuple[str, ...], dict], budgets: list[float],
                 workdir: Path) -> list[dict]:
    """dery-compile's choice at each budget (per predictor, with and without re-ranking) vs the true best."""
    members = {m: r.median_ms for m, r in s.costs.networks.items()}
    test_acc = {m: space[(m,) * s.partition.k]["test_acc"] for m in members}
    out = []
    for budget in budgets:
        reference = Search(dataclasses.replace(s, quality=qualities[DEFAULT_PREDICTOR]), workdir).problem(budget)
        feasible = [m for m in space if reference.meets_limits(reference.evaluate(assembly_ids(m))[1])]
        best = max(feasible, key=lambda m: (space[m]["test_acc"], m)) if feasible else None
        fits = [m for m in members if members[m] <= budget]
        member = max(fits, key=lambda m: (test_acc[m], m)) if fits else None
        row = {"budget_ms": budget, "feasible": len(feasible),
               "best": list(best) if best else None, "best_test_acc": space[best]["test_acc"] if best else None,
               "best_member": member, "best_member_test_acc": test_acc[member] if member else None,
               "choices": {}}
        for name, q in qualities.items():
            search = Search(dataclasses.replace(s, quality=q), workdir)
            sp = search.space(budget)
            sols = best_solutions(sp.problem, 1)
            picked = search.choose(budget, [])
            for how, models in (("program", chosen_models(sp, sols[0]) if sols else None),
                                (f"program+top5+{DEFAULT_RERANK}", picked[3] if picked else None)):
                acc = space[models]["test_acc"] if models else None
                row["choices"][f"{name}|{how}"] = {
                    "models": list(models) if models else None, "test_acc": acc,
                    "regret": row["best_test_acc"] - acc if acc is not None else None}
        out.append(row)
    return out


def repaired_study(s: Session, qualities: dict, multi: list[tuple[str, ...]], workdir: Path, terms_s: float
                   ) -> dict:
    """Kendall tau against test accuracy after the default repair, on multi-switch assemblies: every predictor
    (`pairwise-repaired` measures its terms after a brief repair) and, for reference, val accuracy after the
    full repair (what the re-ranking reads)."""
    train_labels, _ = reference_labels(s.zoo, s.data, "train")
    val_labels, _ = reference_labels(s.zoo, s.data, "val")
    test_labels, _ = reference_labels(s.zoo, s.data, "test")
    rows, t0 = [], time.perf_counter()
    for models in multi:
        _, module = assemble(s.lowered, s.partition, s.stitches, models)
        fixed = repair(module, REPAIRED.finetune, REPAIRED.epochs, s.data, train_labels, seed=SEED,
                       run_dir=workdir / "repair" / "-".join(models))
        rows.append({"models": list(models), "switches": switches_of(models),
                     "test_acc": accuracy(fixed.module, s.data.images("test"), test_labels),
                     "scores": {**{p: q.score(models) for p, q in qualities.items()},
                                "val-acc after repair": accuracy(fixed.module, s.data.images("val"), val_labels)}})
    return {"finetune": REPAIRED.finetune, "epochs": REPAIRED.epochs, "term_epochs": defaults.REPAIR_TERM_EPOCHS,
            "default": REPAIRED.quality_model, "terms_s": terms_s,
            "repairs_s": time.perf_counter() - t0, "single_switches": len(s.stitches.items),
            "scores": score_rows(rows, [*PREDICTORS, "val-acc after repair"]), "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{REPAIRED_MULTI} multi-switch assemblies, all "
                        "repaired; no exhaustive pass, no budget study")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(SEED)
    workdir = Path(tempfile.mkdtemp(prefix="bench-quality-"))
    s = session(workdir / "out")
    qualities, terms_s = {}, {}
    for p in PREDICTORS:
        t0 = time.perf_counter()
        qualities[p] = quality(s.lowered, s.partition, s.stitches, s.data, s.cache, p, REPAIRED.finetune, SEED)
        terms_s[p] = time.perf_counter() - t0
    val_labels, kind = reference_labels(s.zoo, s.data, "val")
    test_labels, test_kind = reference_labels(s.zoo, s.data, "test")
    test_images = s.data.images("test")
    unlimited = Search(s, workdir).problem(1e9)
    k, models = s.partition.k, s.partition.models
    chosen = validation_set(models, k, REPAIRED_MULTI if args.quick else 200, np.random.default_rng(SEED))
    space_keys = list(itertools.product(models, repeat=k)) if not args.quick else chosen
    in_validation = set(chosen)
    space: dict[tuple[str, ...], dict] = {}
    for i, m in enumerate(space_keys):
        _, module = assemble(s.lowered, s.partition, s.stitches, m)
        row = {"models": list(m), "switches": switches_of(m), "validation": m in in_validation,
               "predicted_ms": unlimited.evaluate(assembly_ids(m))[1]["latency_ms"],
               "test_acc": accuracy(module, test_images, test_labels),
               "scores": {p: q.score(m) for p, q in qualities.items()}}
        proxies = PROXIES if m in in_validation else ("val-acc",)
        row["scores"].update({p: whole_network_score(p, module, s.data, val_labels) for p in proxies})
        space[m] = row
        if i % 50 == 0:
            print(f"{i}/{len(space_keys)} assemblies, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    names = [*PREDICTORS, *PROXIES]
    rows = [space[m] for m in chosen]
    multi = [r for r in rows if r["switches"] >= 2]
    validation = {"all": score_rows(rows, names), "multi_switch": score_rows(multi, names)}
    exhaustive = None
    lo, hi = min_achievable(unlimited, "latency_ms"), max(r.median_ms for r in s.costs.networks.values())
    budgets = [lo + (hi - lo) * i / (BUDGETS - 1) for i in range(BUDGETS)]
    if not args.quick:
        every = list(space.values())
        cheap = [*PREDICTORS, "val-acc"]
        exhaustive = {"all": score_rows(every, cheap),
                      "multi_switch": score_rows([r for r in every if r["switches"] >= 2], cheap)}
    study = budget_study(s, qualities, space, budgets, workdir) if not args.quick else None
    multi_keys = [m for m in chosen if switches_of(m) >= 2][:REPAIRED_MULTI]
    after_repair = repaired_study(s, qualities, multi_keys, workdir, terms_s["pairwise-repaired"])
    total = time.perf_counter() - started
    info = machine()
    doc = {"machine": info, "mode": "quick" if args.quick else "full", "seed": SEED, "labels": kind,
           "test_labels": test_kind, "command": " ".join([sys.executable, *sys.argv]),
           "default_predictor": DEFAULT_PREDICTOR, "default_rerank": DEFAULT_RERANK,
           "zoo": {m: {"val_acc": qualities[DEFAULT_PREDICTOR].member_val[m],
                       "test_acc": space[(m,) * k]["test_acc"], "latency_ms": s.costs.networks[m].median_ms}
                   for m in models},
           "splits": {n: len(s.data.split(n)) for n in ("train", "probe", "val", "test")},
           "counts": {"validation": len(rows), "pure": sum(r["switches"] == 0 for r in rows),
                      "single": sum(r["switches"] == 1 for r in rows), "multi": len(multi),
                      "space": len(space_keys)},
           "validation": validation, "exhaustive": exhaustive, "budgets": study, "after_repair": after_repair,
           "total_s": total,
           "assemblies": list(space.values())}
    common.write_results("quality", doc, markdown(doc))
    return 0


def _table(scores: list[dict]) -> list[str]:
    lines = ["| predictor | kind | Kendall tau | test acc of its top-1 | top-1 regret (points) |",
             "|---|---|---|---|---|"]
    for r in sorted(scores, key=lambda r: -r["tau"]):
        kind = ("whole-network" if r["predictor"] in PROXIES or r["predictor"].startswith("val-acc")
                else "unary+pairwise")
        lines.append(f"| `{r['predictor']}` | {kind} | {r['tau']:.3f} | {common.pct(r['top1_test_acc'])} | "
                     f"{common.pct(r['regret'])} |")
    return lines


def verdict(doc: dict) -> list[str]:
    """Which predictor and which proxy rank best (tau on multi-switch assemblies), against the defaults."""
    multi = {r["predictor"]: r for r in doc["validation"]["multi_switch"]}
    lines = []
    for names, default, what in ((PREDICTORS, doc["default_predictor"], "program objective (unary+pairwise)"),
                                 (PROXIES, doc["default_rerank"], "re-ranking proxy (whole network)")):
        best = max(names, key=lambda n: multi[n]["tau"])
        d, b = multi[default], multi[best]
        if best == default:
            runner = max((n for n in names if n != default), key=lambda n: multi[n]["tau"])
            lines.append(f"- {what}: the default `{default}` is the best, tau {d['tau']:.3f} on multi-switch "
                         f"assemblies, {d['tau'] - multi[runner]['tau']:+.3f} over the next (`{runner}`).")
        else:
            lines.append(f"- {what}: `{best}` ranks best, tau {b['tau']:.3f} on multi-switch assemblies, "
                         f"{b['tau'] - d['tau']:+.3f} over the default `{default}` ({d['tau']:.3f}); top-1 "
                         f"regret {common.pct(b['regret'])} vs {common.pct(d['regret'])} points.")
    return lines


def markdown(doc: dict) -> list[str]:
    info, c = doc["machine"], doc["counts"]
    md = ["# Quality-model validation (`benchmarks/bench_quality.py`)", "",
          f"Machine: {info['cpu']}, {info['cores_usable']} usable cores (shared), torch {info['torch']} "
          f"({info['torch_threads']} threads), Python {info['python']}. Mode: {doc['mode']}; seed {doc['seed']}; "
          f"total run {doc['total_s']:.0f} s.", "",
          f"Command: `{doc['command']}` (DERY_CACHE_DIR={os.environ.get('DERY_CACHE_DIR', '<default>')}).", "",
          "Zoo: the default preset (six members trained on the embedded glyphs), K = 4, target cpu (ONNX "
          "Runtime). Splits: "
          + ", ".join(f"{n} {v}" for n, v in doc["splits"].items())
          + f". Ground truth: top-1 accuracy on the test split ({doc['test_labels']}), no training of any "
          f"assembly. Predictors read val only ({doc['labels']}).", "",
          "| member | val acc | test acc | measured latency (ms) |", "|---|---|---|---|"]
    md += [f"| {m} | {common.pct(z['val_acc'])} | {common.pct(z['test_acc'])} | {z['latency_ms']:.4f} |"
           for m, z in doc["zoo"].items()]
    md += ["", f"## Validation set: {c['validation']} assemblies ({c['pure']} pure members, {c['single']} "
           f"single-switch, {c['multi']} random multi-switch)", "",
           "The unary+pairwise predictors are fitted on val accuracies of exactly the pure and single-switch",
           "assemblies (`pairwise` reproduces their val log-odds by construction), so the multi-switch rows",
           "are the honest test of how the terms combine.", "", *verdict(doc), "", "All assemblies:", "",
           *_table(doc["validation"]["all"]), "", "Multi-switch assemblies only:", "",
           *_table(doc["validation"]["multi_switch"])]
    ar = doc["after_repair"]
    best = max(ar["scores"], key=lambda r: r["tau"] if r["predictor"] != "val-acc after repair" else -9)
    default = next(r for r in ar["scores"] if r["predictor"] == ar["default"])
    untrained = next(r for r in ar["scores"] if r["predictor"] == doc["default_predictor"])
    md += ["", f"## After repair: {len(ar['rows'])} multi-switch assemblies of the validation set, each repaired "
           f"by `--finetune {ar['finetune']} --epochs {ar['epochs']}`", "",
           f"Ground truth: test accuracy after that repair. `pairwise-repaired` takes its terms from the "
           f"{len(doc['zoo'])} members and {ar['single_switches']} single-switch assemblies after "
           f"{ar['term_epochs']} epoch of the same repair ({ar['terms_s']:.0f} s for all of them; the "
           f"{len(ar['rows'])} full repairs took {ar['repairs_s']:.0f} s). `val-acc after repair` is the "
           "re-ranking's reading of each repaired candidate, not a program term.", "",
           f"- quality model used with a repair: `{ar['default']}`, tau {default['tau']:.3f}, against "
           f"{untrained['tau']:.3f} for the untrained default `{doc['default_predictor']}` on the same "
           f"assemblies; the best program term is `{best['predictor']}` ({best['tau']:.3f}).", "",
           *_table(ar["scores"])]
    if doc["exhaustive"]:
        md += ["", f"## Whole search space: all {c['space']} assemblies (cheap predictors only)", "",
               *_table(doc["exhaustive"]["all"]), "", "Multi-switch only:", "",
               *_table(doc["exhaustive"]["multi_switch"])]
    if doc["budgets"]:
        names = list(doc["budgets"][0]["choices"])
        md += ["", "## Choice under a latency budget (test accuracy %, regret vs the best feasible assembly)", "",
               "Feasible = the calibrated program's predicted latency within the budget; 'best' is the",
               f"assembly with the highest test accuracy among them (exhaustive). `X|program+top5+{DEFAULT_RERANK}` "
               "is what dery-compile does with predictor X.", "",
               "| budget ms | feasible | best (test) | best member (test) | "
               + " | ".join(f"`{n}`" for n in names) + " |",
               "|---|---|---|---|" + "---|" * len(names)]
        for b in doc["budgets"]:
            cells = [f"{common.pct(ch['test_acc'])} (-{common.pct(ch['regret'])})" for ch in b["choices"].values()]
            md.append(f"| {b['budget_ms']:.4f} | {b['feasible']} | {common.pct(b['best_test_acc'])} | "
                      f"{b['best_member'] or '-'} ({common.pct(b['best_member_test_acc'])}) | "
                      + " | ".join(cells) + " |")
        md += ["", "Mean regret over the budgets (points):", ""]
        for n in names:
            vals = [b["choices"][n]["regret"] for b in doc["budgets"] if b["choices"][n]["regret"] is not None]
            md.append(f"- `{n}`: {common.pct(float(np.mean(vals)))}")
    return md


if __name__ == "__main__":
    common.run(main)
