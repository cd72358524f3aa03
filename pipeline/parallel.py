"""Module-parallel incubation on torch.distributed: stage 2's K trainings as processes under torchrun.

`dery incubate --nproc N` writes the job (`job.json`) and the meta model into its run directory, then
starts `torchrun --standalone --nproc-per-node N -m dery.parallel RUN_DIR` (also a documented entry point
of its own). Each process joins the group (gloo on CPU, NCCL on GPUs), rebuilds the target's modules
from the job exactly as the launcher did, and incubates its share of the modules that have no checkpoint
yet. With N <= K, rank r takes modules r, r + N, ...; with more processes than modules, the ranks
r = g, g + K, ... train module g together with DistributedDataParallel, each on its share of every batch.
Every module is seeded on its own (dery.incubate.incubate_module), so N processes give the modules one
process gives when they run with the same threads each. A process that fails writes one line naming
its module to `failed_<i>.txt`, which the launcher reports.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import defaults
from .cache import atomic_write_json, content_key
from .errors import FAILED, USAGE, DeryError

JOB = "job.json"
JOB_FORMAT = "dery.incubate-job/1"


@dataclass(frozen=True)
class Job:
    """Everything a process needs to rebuild an incubation: target, cuts, data, epochs, seeds."""

    target: str
    k: int
    data: str | None = None
    seed: int = defaults.SEED
    epochs_meta: int = defaults.INCUBATE_EPOCHS_META
    epochs_module: int = defaults.INCUBATE_EPOCHS_MODULE
    epochs_finetune: int = defaults.INCUBATE_EPOCHS_FINETUNE
    lr: float = defaults.INCUBATE_LR
    anchor: float = defaults.INCUBATE_ANCHOR
    meta: str = defaults.INCUBATE_META
    threads: int = 1

    def key(self) -> str:
        """What the run directory is named by: everything but the threads (they do not change the result
        of one process, only how fast it runs), and the target file's contents when it names a file."""
        target = Path(self.target).expanduser()
        held = hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else None
        return content_key("incubate", {k: v for k, v in dataclasses.asdict(self).items() if k != "threads"}, held)


def write_job(run_dir: Path, job: Job, todo: list[int]) -> None:
    """The job file the processes read."""
    atomic_write_json(Path(run_dir) / JOB, {"format": JOB_FORMAT, "job": dataclasses.asdict(job), "todo": todo})


def read_job(run_dir: Path) -> tuple[Job, list[int]]:
    """The job and the modules to train, from `run_dir`; a missing or damaged file is named."""
    path = Path(run_dir) / JOB
    try:
        doc = json.loads(path.read_text())
        return Job(**doc["job"]), [int(i) for i in doc["todo"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeryError(f"incubation job {path} is missing or damaged ({type(e).__name__}); run "
                        f"`dery incubate` to write it", exit_code=USAGE) from e


def check_nproc(nproc: int) -> None:
    """More processes than the machine has devices for (GPUs, else CPU cores) is a one-line error."""
    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "CUDA GPUs"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if nproc > have:
        raise DeryError(f"--nproc {nproc} is more than this machine's {have} {what}; use --nproc {have} or fewer",
                        exit_code=USAGE)


def assignment(rank: int, world: int, k: int) -> tuple[list[int], list[list[int]]]:
    """The modules (of 0..k-1) `rank` trains, and the rank groups that share one module (data-parallel) when
    there are more processes than modules (else none). It depends on K and the processes only, not on which
    modules are still to train, so a resumed module is trained as it would have been."""
    if world <= k:
        return list(range(rank, k, world)), []
    groups = [list(range(g, world, k)) for g in range(k)]
    return [rank % k], groups


def launch(run_dir: Path, job: Job, todo: list[int], nproc: int) -> None:
    """Run stage 2 for `todo` as `nproc` processes under torchrun and wait; a failure names its module."""
    run_dir = Path(run_dir)
    for stale in run_dir.glob("failed_*.txt"):
        stale.unlink()
    write_job(run_dir, job, todo)
    env = {**os.environ, "DERY_PROGRESS": "lines", "OMP_NUM_THREADS": str(job.threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "dery.parallel", str(run_dir)]
    try:  # the processes' output goes where ours does: stdout stays for the command's result
        out = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        out = None
    done = subprocess.run(cmd, env=env, stdout=out)
    failed = sorted(run_dir.glob("failed_*.txt"))
    if failed:
        raise DeryError("; ".join(p.read_text().strip() for p in failed), exit_code=FAILED)
    missing = [i for i in todo if not (run_dir / f"module_{i}.pt").exists()]
    if done.returncode != 0 or missing:
        raise DeryError(f"torchrun exited {done.returncode} and module(s) {', '.join(map(str, missing))} have no "
                        f"checkpoint in {run_dir}; rerun to train them (finished modules are kept)")


def _ddp(group: Any, device: torch.device) -> Any:
    def wrap(model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, process_group=group)

    return wrap


def worker(run_dir: Path) -> None:
    """One torchrun process: incubate this rank's share of the job's modules."""
    import torch.distributed as dist

    from .incubate import incubate_module, save_module
    from .incubate_cmd import meta_for, target_modules

    job, todo = read_job(run_dir)
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(job.threads)
    mine, groups = assignment(rank, world, job.k)
    mine = [i for i in mine if i in todo]
    handles = [dist.new_group(g) for g in groups]  # every rank creates every group, in one order
    i = mine[0] if mine else None
    try:
        target = target_modules(job)
        meta = meta_for(job, target, Path(run_dir)).to(device)
        for i in mine:
            module = target.modules[i].to(device)
            if groups:
                g = next(n for n, ranks in enumerate(groups) if rank in ranks)
                members = groups[g]
                wrap, shard = _ddp(handles[g], device), (members.index(rank), len(members))
            else:
                members, wrap, shard = [rank], None, (0, 1)
            incubate_module(module, i, meta, target.data, epochs=job.epochs_module, lr=job.lr, seed=job.seed + 1 + i,
                            anchor=job.anchor, device=device, wrap=wrap, shard=shard)
            if rank == members[0]:
                save_module(Path(run_dir), i, module)
    except Exception as e:
        line = str(e) if isinstance(e, DeryError) else f"{type(e).__name__}: {e}"
        (Path(run_dir) / f"failed_{i}.txt").write_text(f"module {i} failed in process {rank}: {line}\n")
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: torchrun --nproc-per-node N -m dery.parallel RUN_DIR (a directory `dery incubate` wrote)")
    worker(Path(sys.argv[1]))
