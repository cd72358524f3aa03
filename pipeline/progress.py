"""Progress bars for long work (training, features, profiling), on stderr via rich."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator


def enabled() -> bool:
    """Bars are shown on a terminal unless DERY_QUIET is set."""
    return sys.stderr.isatty() and not os.environ.get("DERY_QUIET")


@contextlib.contextmanager
def task(description: str, total: int) -> Iterator[Callable[..., None]]:
    """A progress bar; yields `advance(n=1, note=None)`. With DERY_PROGRESS=lines (worker processes, whose
    bars would overwrite each other) every step is one line instead."""
    if os.environ.get("DERY_PROGRESS") == "lines":
        done = [0]

        def line(n: int = 1, note: str | None = None) -> None:
            done[0] += n
            say(f"{description}: {done[0]}/{total}" + (f" {note}" if note else ""))

        yield line
        return
    if not enabled():
        yield lambda n=1, note=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[note]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tid = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            bar.update(tid, advance=n, **({"note": note} if note is not None else {}))

        yield advance


def say(message: str) -> None:
    """One status line on stderr (silent under DERY_QUIET)."""
    if not os.environ.get("DERY_QUIET"):
        print(message, file=sys.stderr, flush=True)
