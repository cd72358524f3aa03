"""Shared fixtures: an isolated cache and one small real pipeline run shared by the tests.

The `tiny` zoo (three timm architectures briefly trained on digits) goes through
the real passes once per test session; tests that need networks, a partition,
stitches or profiles read them from `tiny`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

# Before anything imports huggingface_hub: the test machines have no network, so fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point DERY_CACHE_DIR at a fresh directory for the whole session."""
    root = tmp_path_factory.mktemp("dery-cache")
    old = {k: os.environ.get(k) for k in ("DERY_CACHE_DIR", "DERY_QUIET")}
    os.environ.update(DERY_CACHE_DIR=str(root), DERY_QUIET="1")
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield root
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def tiny(isolated_cache: Path):
    """The front half of the pipeline (zoo .. proxy) on the tiny zoo, K = 3, target cpu, every piece measured, no
    repair (the untrained quality model; tests/test_repair.py covers --finetune)."""
    from dery.driver import CompileConfig, front

    return front(CompileConfig(target="cpu", latency_ms=1.0, zoo="tiny", k=3, out=isolated_cache / "unused",
                               measure="all", finetune="none"))
