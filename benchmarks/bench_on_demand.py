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
from dery.defaults import Profiling
from dery.driver import CompileConfig, Search, front
from dery.passes.calibrate import calibrate
from dery.passes.profile import profile

JUST_BELOW = 0.98
FLOORS = ("own", "zoo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="default")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    full = front(CompileConfig(target="cpu", latency_ms=1.0, zoo=args.zoo, measure="all"))
    c = full.costs
    real = {"boundary": min(c.boundary_ms(*k) for k in c.joints), "context": min(c.context_ms(*k) for k in c.triples)}
    member_ms = {m: r.median_ms for m, r in c.networks.items()}
    lo, hi = min(member_ms.values()), max(member_ms.values())
    grid = [lo + (hi - lo) * i / args.steps for i in range(args.steps + 1)]
    budgets = sorted({0.8 * lo, *grid, *(JUST_BELOW * ms for ms in member_ms.values() if ms > lo)})
    doc = {"machine": common.machine(), "zoo": args.zoo, "lowest_real": real, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        reference = Search(full, Path(tmp))
        chosen = {b: reference.choose(b, []) for b in budgets}
        for mode in FLOORS:
            settings = Profiling(floors=mode)
            lazy = profile(full.lowered, full.partition, full.stitches, full.target, full.store, full.cache,
                           settings=settings, on_demand=True)
            first = len(lazy.found)
            cal = calibrate(full.lowered, full.partition, full.stitches, lazy, full.target, full.store,
                            seed=full.config.seed, settings=settings)
            lazy.settle_floors()
            calibrated = len(lazy.found)
            search = Search(dataclasses.replace(full, profiler=lazy, costs=lazy.costs(), calibration=cal), Path(tmp))
            rows = []
            for budget in budgets:
                before = search.solves
                picked = search.choose(budget, [])
                models = {name: None if p is None else list(p[3]) for name, p in (("full", chosen[budget]),
                                                                                   ("on_demand", picked))}
                rows.append({"budget_ms": budget, **models, "same": models["full"] == models["on_demand"],
                             "asked": len(lazy.found), "solves": search.solves - before})
            costs = lazy.costs()
            below = all(costs.boundary_ms(*k) <= c.boundary_ms(*k) for k in c.joints if k not in costs.joints) \
                and all(costs.context_ms(*k) <= c.context_ms(*k) for k in c.triples if not costs.context_measured(*k))
            doc["modes"][mode] = {"search_space": len(lazy.items), "first": first, "with_calibration": calibrated,
                                  "asked": len(lazy.found), "solves": sum(r["solves"] for r in rows),
                                  "calibration_equal": cal == full.calibration, "floors_below_real": below,
                                  "budgets": rows}
    lines = [f"# Measurement on demand vs the full table (`benchmarks/bench_on_demand.py --zoo {args.zoo}`)", "",
             f"Machine: {doc['machine']['cpu']}, {doc['machine']['cores_usable']} usable cores. One profile store "
             "serves all: the full table reads every piece of it, on demand asks only for what its solutions "
             "rest on, in this order: blocks, members and the members' own joints and triples; the calibration's "
             "random assemblies; then budget by budget (cumulative below). Until a term is measured it takes its "
             "floor: `own` (the default): the least of its members' own terms at that place less half its "
             "largest block; `zoo` (the control): the zoo's lowest measured term of its kind less half the "
             "zoo's slowest block. *solves*: programs solved at that budget (one per on-demand round).", "",
             "| budget (ms) | full table's choice | " + " | ".join(
                 f"`{m}`: choice, same, pieces asked so far, solves" for m in FLOORS) + " |",
             "|---|---|" + "---|" * len(FLOORS)]
    for i, budget in enumerate(budgets):
        cells = []
        for m in FLOORS:
            r = doc["modes"][m]["budgets"][i]
            cells.append(f"{' > '.join(r['on_demand'] or ['-'])}, {r['same']}, {r['asked']}, {r['solves']}")
        first_row = doc["modes"][FLOORS[0]]["budgets"][i]
        lines.append(f"| {budget:.4f} | {' > '.join(first_row['full'] or ['-'])} | " + " | ".join(cells) + " |")
    lines.append("")
    for m in FLOORS:
        d = doc["modes"][m]
        same = sum(r["same"] for r in d["budgets"])
        lines.append(f"- `{m}`: **same choice at {same} of {len(budgets)} budgets**; pieces {d['first']} first, "
                     f"{d['with_calibration']} with the calibration's, {d['asked']} after every budget, of "
                     f"{d['search_space']} in the full table ({d['asked'] / d['search_space']:.0%}); {d['solves']} "
                     f"solves; calibration identical: {d['calibration_equal']}; every floor at or below its real "
                     f"term: {d['floors_below_real']}.")
    lines.append("")
    common.write_results("on_demand", doc, lines)


if __name__ == "__main__":
    common.run(main)
