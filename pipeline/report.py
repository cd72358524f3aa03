"""The outputs of a dery-compile run: engine, report.json, report.md and a plot.

report.json ("dery.report/1") is the machine-readable contract; report.md
says the same for people. Everything is written atomically, the report last,
so an output directory never holds a report that points at a missing engine.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dery

from .cache import atomic_write, atomic_write_bytes, atomic_write_json, read_json

if TYPE_CHECKING:
    from .driver import Result
    from .ir import Partition
    from .targets import Target

SCHEMA = "dery.report/1"
PLOT = "latency_accuracy.png"


@dataclass(frozen=True)
class Facts:
    """What the run computed that the report shows beside the final assembly: plain values, no driver state."""

    target: Target
    budget_ms: float
    input_shape: tuple[int, ...]
    data: dict[str, Any]  # name, resolution, split sizes, labelled
    partition: Partition
    quality: dict[str, Any]  # predictor, labels, rerank
    members: list[dict[str, Any]]  # one row per zoo member: latency record, cost, test accuracy
    accuracy: float | None  # the final assembly's on the test split, after its repair (None without labels)
    accuracy_as_is: float | None  # the same assembly before its repair
    repair: dict[str, Any]  # what `--finetune` did: kind, epochs, seconds, train losses
    predicted_accuracy: float
    estimated: bool  # whether any latency the final assembly's cost rests on is estimated
    pieces: dict[str, int]  # latency pieces of the search space and how many of them the run's answer rests on
    run: dict[str, Any]  # what differs between two runs of one command: pass timings, pieces measured now


def build_report(facts: Facts, final: Result, rounds: list[dict], status: str, pareto: list[dict] | None,
                 engine_name: str, checkpoint: str | None = None) -> dict[str, Any]:
    """The report.json document."""
    a, t = final.assembly, final.timing
    stitches = [st for st in a.stitches if st is not None]
    p = facts.partition
    return {
        "schema": SCHEMA,
        "dery_version": dery.__version__,
        "status": status,
        "target": facts.target.name,
        "backend": final.engine.backend,
        "backend_version": final.engine.backend_version,
        "device": final.engine.device,
        "precision": facts.target.precision,
        "batch": facts.target.batch,
        "input_shape": list(facts.input_shape),
        "budget_ms": facts.budget_ms,
        "predicted_latency_ms": final.predicted_ms,
        "measured_latency_ms": final.measured_ms,
        "measured_p90_ms": t.p90_ms if t else None,
        "measured_cv": t.cv if t else None,
        "latency_estimated": facts.estimated,
        "engine": engine_name,
        "checkpoint": checkpoint,
        "assembly": [{"set": k, "model": b.model, "first": b.first, "last": b.last, "params": b.params,
                      "flops": b.flops, "activation_bytes": b.activation_bytes} for k, b in enumerate(a.blocks)],
        "stitches": [{"boundary": st.boundary, "from": st.source, "to": st.target, "kind": st.kind,
                      "r2": st.r2, "params": st.params, "flops": st.flops} for st in stitches],
        "params": sum(b.params for b in a.blocks) + sum(st.params for st in stitches),
        "flops": sum(b.flops for b in a.blocks) + sum(st.flops for st in stitches),
        "activation_mb": max(b.activation_bytes for b in a.blocks) * facts.target.batch / 1e6,
        "accuracy": facts.accuracy,
        "predicted_accuracy": facts.predicted_accuracy,
        "quality": {**facts.quality, "proxy": final.proxy, "objective": final.solution.objective},
        "accuracy_as_is": facts.accuracy_as_is,
        "repair": facts.repair,
        "budget_used": final.measured_ms / facts.budget_ms if final.measured_ms is not None else None,
        "member": a.models[0] if len(set(a.models)) == 1 else None,
        "data": facts.data,
        "partition": {"k": p.k, "balance": p.balance, "objective": p.objective,
                      "boundaries": {m: list(b) for m, b in zip(p.models, p.boundaries)}},
        "zoo": facts.members,
        "rounds": rounds,
        "pareto": pareto,
        "latency_pieces": facts.pieces,
        "run": facts.run,
    }


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    if isinstance(v, int) and abs(v) >= 10_000:
        return f"{v:,}"
    return str(v)


def _yes(v: bool | None) -> str:
    return "-" if v is None else ("yes" if v else "no")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _repair_lines(r: dict[str, Any]) -> list[str]:
    """What the repair did and how much of the budget the engine uses; whether the best choice is a member."""
    rep = r["repair"]
    lines = [""]
    if rep["kind"] != "none":
        lines.append(f"Repair (`--finetune {rep['kind']}`, {rep['epochs']} epochs on the train split, "
                     f"{r['run']['repair_s']:.1f} s): test accuracy {_pct(r['accuracy_as_is'])} as assembled, "
                     f"{_pct(r['accuracy'])} repaired. Every member that fits the budget had the same repair.")
    else:
        lines.append("No repair (`--finetune none`): the blocks and least-squares stitches as they are.")
    if r["budget_used"] is not None:
        lines.append(f"The engine uses {100 * r['budget_used']:.0f}% of the budget.")
    if r["member"] is not None:
        lines.append(f"The best choice is a member: {r['member']} whole (no assembly of several members "
                     f"scored higher on val); its latency is its end-to-end record, the figure in the zoo table.")
    return lines


def markdown(report: dict[str, Any]) -> str:
    """report.md: the same facts as report.json, for people."""
    r = report
    est = " (estimated)" if r["latency_estimated"] else ""
    lines = [
        f"# dery report: {r['target']} under {r['budget_ms']:g} ms",
        "",
        f"**Status:** {r['status']}",
        "",
        f"Engine `{r['engine']}` ({r['backend']} {r['backend_version']}, {r['precision']}, batch {r['batch']}, "
        f"input {'x'.join(map(str, r['input_shape']))}) on {r['device']}."
        + (f" The trained network: `{r['checkpoint']}` (a dery checkpoint; `--zoo` and `dery incubate` take it)."
           if r.get("checkpoint") else ""),
        "",
        "| | latency (ms) | params | FLOPs | accuracy |",
        "|---|---|---|---|---|",
        f"| budget | {_fmt(r['budget_ms'])} | | | |",
        f"| predicted{est} | {_fmt(r['predicted_latency_ms'])} | | | {_pct(r['predicted_accuracy'])} (val) |",
        f"| **measured engine** | **{_fmt(r['measured_latency_ms'])}** (p90 {_fmt(r['measured_p90_ms'])}, "
        f"cv {_fmt(r['measured_cv'], 2)}) | {_fmt(r['params'])} | {_fmt(r['flops'])} | {_pct(r['accuracy'])} |"
        if r["measured_latency_ms"] is not None else
        f"| **engine not measured** (no device here) | - | {_fmt(r['params'])} | {_fmt(r['flops'])} | "
        f"{_pct(r['accuracy'])} (torch) |",
        *_repair_lines(r),
        "",
        "## Chosen blocks",
        "",
        "| set | model | from cut | to cut | params | FLOPs |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {b['set']} | {b['model']} | {b['first'] or '(input)'} | {b['last'] or '(logits)'} | "
              f"{_fmt(b['params'])} | {_fmt(b['flops'])} |" for b in r["assembly"]]
    if r["stitches"]:
        lines += ["", "| stitch after set | from | to | kind | held-out R^2 | params |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['boundary']} | {s['from']} | {s['to']} | {s['kind']} | {s['r2']:.3f} | {_fmt(s['params'])} |"
                  for s in r["stitches"]]
    lines += ["", "## Zoo (each member measured end to end the same way)", ""]
    if r["data"].get("classes"):
        lines += [f"For the classes {', '.join(r['data']['classes'])} only: every member takes part whole (its "
                  f"classifier cut to those classes) and as its Model LEGO component (`NAME@part`); accuracy is on "
                  f"those classes' test images.", ""]
    lines += ["| model | architecture | latency (ms) | fits | params | FLOPs | test accuracy | after the same repair |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {z['model']} | {z['arch']} | {_fmt(z['latency_ms'])}{' (est.)' if z['estimated'] else ''} | "
              f"{_yes(z['fits'])} | {_fmt(z['params'])} | {_fmt(z['flops'])} | {_pct(z['accuracy'])} | "
              f"{_pct(z['accuracy_repaired'])} |" for z in r["zoo"]]
    lines += ["", "## Closed loop", "", "| round | limit (ms) | chosen | predicted (ms) | measured (ms) | within |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {x['round']} | {_fmt(x['limit_ms'])} | {' > '.join(x['chosen'])} | {_fmt(x['predicted_ms'])} | "
              f"{_fmt(x['measured_ms'])}{' (its record)' if x['reading'] == 'member record' else ''} | "
              f"{_yes(x['within_budget'])} |" for x in r["rounds"]]
    if r.get("pareto"):
        lines += ["", "## Pareto sweep", "", "| budget (ms) | chosen | predicted (ms) | measured (ms) | accuracy |",
                  "|---|---|---|---|---|"]
        lines += [f"| {_fmt(p['budget_ms'])} | {' > '.join(p['chosen'])} | {_fmt(p['predicted_ms'])} | "
                  f"{_fmt(p['measured_ms'])} | {_pct(p['accuracy'])} |" for p in r["pareto"]]
    q = r["quality"]
    lines += ["", f"Quality model: `{q['predictor']}` on {q['labels']}, re-ranked by `{q['rerank']}`. Partition: "
              f"K={r['partition']['k']}, balanced by {r['partition']['balance']}. Data: {r['data']['name']} at "
              f"{r['data']['resolution']} px.", "", f"![latency vs accuracy]({PLOT})", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency against accuracy: zoo members, the assembly, the budget, and the Pareto sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ykey = "accuracy" if report["accuracy"] is not None else None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    zy = [(z["accuracy_repaired"] or z["accuracy"]) if ykey else 0.0 for z in report["zoo"]]
    ax.scatter([z["latency_ms"] for z in report["zoo"]], zy, c="tab:blue", label="zoo members")
    for z, y in zip(report["zoo"], zy):
        ax.annotate(z["model"], (z["latency_ms"], y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if report.get("pareto"):
        pts = [p for p in report["pareto"] if p["accuracy"] is not None or not ykey]
        ax.plot([p["measured_ms"] for p in pts], [p["accuracy"] if ykey else 0.0 for p in pts], "o--",
                c="tab:green", label="reassembled (sweep)")
    measured = report["measured_latency_ms"]
    ax.scatter([measured if measured is not None else report["predicted_latency_ms"]],
               [report["accuracy"] if ykey else 0.0], marker="*", s=180, c="tab:red",
               label="chosen assembly" + ("" if measured is not None else " (estimated latency)"), zorder=5)
    ax.axvline(report["budget_ms"], color="gray", ls=":", label="budget")
    ax.set_xlabel(f"measured latency on {report['target']} (ms)")
    ax.set_ylabel("test accuracy" if ykey else "(no labels)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def write_outputs(out: Path, facts: Facts, final: Result, rounds: list[dict], status: str,
                  pareto: list[dict] | None, checkpoint: str | None = None) -> dict[str, Any]:
    """Move the engine into place and write report.json, report.md and the plot (`checkpoint`: the name of the
    assembly checkpoint already written in `out`)."""
    engine_name = f"model{final.engine.path.suffix}"
    engine_path = out / engine_name
    os.replace(final.engine.path, engine_path)
    side = read_json(final.engine.sidecar, "engine sidecar")
    side["measured_latency_ms"] = final.measured_ms
    side["status"] = status
    atomic_write_json(engine_path.with_name(engine_name + ".json"), side)
    report = build_report(facts, final, rounds, status, pareto, engine_name, checkpoint)
    plot(report, out / PLOT)
    atomic_write_bytes(out / "report.md", markdown(report).encode())
    atomic_write_json(out / "report.json", report)
    return report

