"""`dery incubate`: one network cut into K modules at its balanced boundary cuts, incubated (dery.incubate),
and written as a dery checkpoint that `--zoo` accepts, with a report.

The run directory (by default keyed by the job under the cache) holds the job, the meta model and each
module's checkpoint, so running the same command again after an interruption trains only what is missing.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import defaults, progress
from .cache import Cache, atomic_write, atomic_write_json, ensure_dir
from .data import Dataset
from .errors import USAGE, DeryError
from .incubate import Hybrid, assembly_modules, frozen_meta, incubate_modules, tiny_meta
from .parallel import JOB, Job, check_nproc, launch, read_job, write_job
from .zoo import MemberSpec, Network

REPORT_FORMAT = "dery.incubate-report/1"


@dataclass(frozen=True, eq=False)
class Target:
    """The network of a job, its K modules (segments sharing the network's parameters) and the data."""

    spec: MemberSpec
    network: Network
    cuts: tuple[str, ...]
    modules: tuple[nn.Module, ...]
    data: Dataset


def target_modules(job: Job) -> Target:
    """Rebuild the job's network and cut it into K modules; the same job gives the same modules."""
    from .passes.assemble import Assembled
    from .passes.disassemble import resolve_member
    from .passes.lower import lower
    from .passes.partition import balanced_cuts
    from .zoo import load_member, zoo_data

    spec = resolve_member(job.target)
    data = zoo_data((spec,), job.data, seed=job.seed, cache=Cache())
    if not data.labelled:
        raise DeryError(f"incubation trains on labels and the data at {job.data} has none", exit_code=USAGE)
    network = load_member(spec, data, Cache())
    if isinstance(network.module.net, Assembled):  # a dery assembly: its blocks, each with the stitch before it
        modules = tuple(assembly_modules(network.module.net))
        if len(modules) != job.k:
            raise DeryError(f"{job.target} is an assembly of {len(modules)} blocks, which incubate as "
                            f"{len(modules)} modules; give --k {len(modules)}", exit_code=USAGE)
        blocks = [label for label in network.module.net.labels if not label.startswith("stitch ")]
        return Target(spec, network, tuple(blocks[:-1]), modules, data)
    lowered = lower(network)
    cuts = balanced_cuts(lowered, job.k)
    ends = [None, *cuts, None]
    modules = tuple(lowered.segment(a, b) for a, b in zip(ends, ends[1:]))
    return Target(spec, network, cuts, modules, data)


def meta_for(job: Job, target: Target, run_dir: Path) -> Hybrid:
    """The meta model of the job: the tiny one (stage 1, trained once and kept in `run_dir`) or, with
    meta "self", the network's own modules as they start, frozen."""
    if job.meta == "self":
        return frozen_meta(target.modules)
    return tiny_meta(target.modules, target.data, epochs=job.epochs_meta, lr=job.lr, seed=job.seed,
                     path=Path(run_dir) / "meta.pt")[0]


def _run_dir(job: Job, given: Path | None) -> Path:
    run_dir = ensure_dir(given if given is not None else Cache().root / "incubate" / job.key(), "run directory")
    if (run_dir / JOB).exists():
        held, _ = read_job(run_dir)
        if dataclasses.replace(held, threads=job.threads) != job:
            raise DeryError(f"run directory {run_dir} holds another incubation job ({held.target}, K={held.k}); "
                            f"give an empty --run-dir", exit_code=USAGE)
    write_job(run_dir, job, [])
    return run_dir


def incubate_target(job: Job, *, nproc: int = 1, run_dir: Path | None = None) -> tuple[Target, dict[str, Any]]:
    """Incubate the job's network (stage 2 on `nproc` torchrun processes when more than one); the network's
    weights become the fine-tuned assembly's. Returns the target and the report."""
    check_nproc(nproc)
    t0 = time.perf_counter()
    target = target_modules(job)
    run_dir = _run_dir(job, run_dir)
    progress.say(f"incubate: {target.spec.name} cut into {job.k} modules after {', '.join(target.cuts) or '-'}; "
                 f"run directory {run_dir}")

    def stage2(todo: list[int], meta: Hybrid) -> None:
        if nproc > 1:
            launch(run_dir, job, todo, nproc)
            return
        from .incubate import train_modules

        was = torch.get_num_threads()
        torch.set_num_threads(job.threads)
        try:
            train_modules(target.modules, meta, target.data, run_dir, todo, epochs=job.epochs_module, lr=job.lr,
                          seed=job.seed, anchor=job.anchor)
        finally:
            torch.set_num_threads(was)

    assembled, report = incubate_modules(list(target.modules), target.data, run_dir, epochs_meta=job.epochs_meta,
                                         epochs_module=job.epochs_module, epochs_finetune=job.epochs_finetune,
                                         lr=job.lr, seed=job.seed,
                                         meta=frozen_meta(target.modules) if job.meta == "self" else None,
                                         anchor=job.anchor, stage2=stage2)
    for module, tuned in zip(target.modules, assembled.parts):
        module.load_state_dict(tuned.state_dict())
    report = {"format": REPORT_FORMAT, "job": dataclasses.asdict(job), "nproc": nproc, "cuts": list(target.cuts),
              "run_dir": str(run_dir), **report, "wall_s": {**report["wall_s"], "total": time.perf_counter() - t0}}
    return target, report


def write_outputs(target: Target, report: dict[str, Any], out: Path) -> Path:
    """The incubated network as a dery checkpoint at `out` and its report next to it (OUT.json)."""
    from .passes.assemble import Assembled
    from .zoo import read_checkpoint, save_trained

    ensure_dir(out.parent if str(out.parent) else Path("."), "output directory")
    spec = dataclasses.replace(target.spec, name=f"{target.spec.name}-incubated")
    net = target.network.module.net
    if isinstance(net, Assembled):  # the assembly's own checkpoint, holding the incubated tensors
        ckpt = {**read_checkpoint(Path(target.spec.weights)), "name": spec.name, "state_dict": net.state_dict()}
        atomic_write(out, lambda p: torch.save(ckpt, p))
    else:
        atomic_write(out, lambda p: save_trained(target.network.module, spec, target.data, p))
    path = out.with_suffix(".json")
    atomic_write_json(path, {**report, "checkpoint": str(out)})
    return path


def cmd_incubate(args: Any) -> int:
    """`dery incubate MODEL --k K -o OUT.pt [--nproc N]`."""
    from .passes.assemble import ASSEMBLY_ARCH
    from .passes.disassemble import resolve_member

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.nproc)
    meta = args.meta or (defaults.REPAIR_META if resolve_member(args.model).arch == ASSEMBLY_ARCH
                         else defaults.INCUBATE_META)
    job = Job(args.model, args.k, str(args.data) if args.data else None, args.seed, args.epochs_meta,
              args.epochs_module, args.epochs_finetune, args.lr, args.anchor, meta, threads)
    target, report = incubate_target(job, nproc=args.nproc, run_dir=args.run_dir)
    path = write_outputs(target, report, args.output)
    hybrids = ", ".join(f"{a:.3f}" for a in report["hybrid_accuracy"])
    wall = ", ".join(f"{k} {v:.1f} s" for k, v in report["wall_s"].items())
    print(f"{args.output}: {target.spec.name} incubated as {job.k} modules ({job.meta} meta model, "
          f"{args.nproc} process{'es' if args.nproc > 1 else ''}); test accuracy: meta model "
          f"{report['meta_accuracy']:.3f}, hybrids {hybrids}, assembled {report['assembled_accuracy']:.3f}, "
          f"fine-tuned {report['finetuned_accuracy']:.3f}")
    print(f"wall: {wall}; trained now: {', '.join(report['trained']) or 'nothing (all resumed)'}; report {path}")
    if args.json:
        print(json.dumps(report, indent=1))
    return 0
