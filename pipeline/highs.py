"""One way to make a HiGHS solver whose answers are reproducible, whose "optimal" is a proof, and which is silent."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

import highspy

# One thread and a fixed seed make the answer the same on every run; zero gaps make "optimal" mean proven.
EXACT = {"output_flag": False, "threads": 1, "random_seed": 0, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0}


@contextlib.contextmanager
def _stdout_discarded() -> Iterator[None]:
    """Send whatever C code writes to file descriptor 1 meanwhile to the null device.

    HiGHS prints its banner from C when an instance is constructed, before any option can be set; C's stdio
    buffer is flushed before descriptor 1 is restored so that nothing buffered leaks out later.
    """
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        try:
            yield
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
    finally:
        os.close(saved)
        os.close(null)


def exact_highs(**options: Any) -> highspy.Highs:
    """A silent, deterministic HiGHS instance with zero MIP gaps (plus any further options)."""
    with _stdout_discarded():
        h = highspy.Highs()
    for name, value in {**EXACT, **options}.items():
        h.setOptionValue(name, value)
    return h
