"""Measurement on demand against the full table: the same answers from a fraction of the pieces.

    python benchmarks/bench_on_demand.py [--zoo default] [--steps 10]

Profiles the zoo fully (`--measure all`, from the cache where it can), then
builds the on-demand profile over the same store: the blocks, the members and
their own joints and triples, the calibration's assemblies, and then, budget by
budget, only the joints and triples that the program's best solutions rest on
(unmeasured terms at their floors). At every budget of the reassembly
benchmark's grid (the member range in `--steps` steps, 0.8x the fastest member,
and just below each member) both choose with dery-compile's solve and re-rank;
the benchmark records whether they agree, the pieces each rests on, and
whether every floor lies below every real term. Both read one store, so the
comparison isolates what on demand decides to ask for. Writes
benchmarks/results/on_demand.md and on_demand.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import _common as common
from dery.driver import CompileConfig, Search, front
from dery.passes.calibrate import calibrate
from dery.passes.profile import profile

JUST_BELOW = 0.98


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    full = front(CompileConfig(target="cpu", latency_ms=1.0, zoo=args.zoo, measure="all"))
    lazy = profile(full.lowered, full.partition, full.stitches, full.target, full.store, full.cache, on_demand=True)
    first = len(lazy.found)
    cal = calibrate(full.lowered, full.partition, full.stitches, lazy.costs(), full.target, full.store,
                    seed=full.config.seed, profiler=lazy)
    lazy.settle_floors()
    calibrated = len(lazy.found)
    on_demand = dataclasses.replace(full, profiler=lazy, costs=lazy.costs(), calibration=cal)
    c = full.costs
    real = {"boundary": min(c.boundary_ms(*k) for k in c.joints), "context": min(c.context_ms(*k) for k in c.triples)}
    member_ms = {m: r.median_ms for m, r in c.networks.items()}
    lo, hi = min(member_ms.values()), max(member_ms.values())
    grid = [lo + (hi - lo) * i / args.steps for i in range(args.steps + 1)]
    budgets = sorted({0.8 * lo, *grid, *(JUST_BELOW * ms for ms in member_ms.values() if ms > lo)})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        searches = {"full": Search(full, Path(tmp)), "on demand": Search(on_demand, Path(tmp))}
        for budget in budgets:
            picked = {name: s.choose(budget, []) for name, s in searches.items()}
            models = {name: None if p is None else list(p[3]) for name, p in picked.items()}
            rows.append({"budget_ms": budget, "full": models["full"], "on_demand": models["on demand"],
                         "same": models["full"] == models["on demand"], "asked": len(lazy.found)})
    doc = {"machine": common.machine(), "zoo": args.zoo, "search_space": len(lazy.items), "first": first,
           "with_calibration": calibrated, "asked": len(lazy.found), "floors": dict(zip(("boundary", "context"),
                                                                                          lazy.floors)),
           "lowest_real": real, "calibration_equal": cal == full.calibration, "budgets": rows}
    floors_ok = all(doc["floors"][k] < real[k] for k in real)
    lines = [f"# Measurement on demand vs the full table (`benchmarks/bench_on_demand.py --zoo {args.zoo}`)", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores. One profile store "
             "serves both: the full table reads every piece of it, on demand asks only for what its solutions "
             "rest on, in this order: blocks, members and the members' own joints and triples; the calibration's "
             "random assemblies; then budget by budget (cumulative below).", "",
             "| budget (ms) | full table's choice | on demand's choice | same | pieces asked so far |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['budget_ms']:.4f} | {' > '.join(r['full'] or ['-'])} | {' > '.join(r['on_demand'] or ['-'])} "
              f"| {r['same']} | {r['asked']} |" for r in rows]
    same = sum(r["same"] for r in rows)
    lines += ["", f"**Same choice at {same} of {len(rows)} budgets.** Pieces: {first} first, {calibrated} with the "
              f"calibration's, {doc['asked']} after every budget, of {doc['search_space']} in the full table "
              f"({doc['asked'] / doc['search_space']:.0%}). Calibration identical: {doc['calibration_equal']}.",
              f"Floors: boundary {doc['floors']['boundary']:.4f} ms (lowest real {real['boundary']:.4f}), context "
              f"{doc['floors']['context']:.4f} ms (lowest real {real['context']:.4f}): below every real term: "
              f"{floors_ok}.", ""]
    common.write_results("on_demand", doc, lines)


if __name__ == "__main__":
    common.run(main)
