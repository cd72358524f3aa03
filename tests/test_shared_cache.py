"""Two runs on one cache: real processes write one profile table and make one artifact at the same time."""
from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import time
from pathlib import Path

import records
import torch
from dery.cache import Cache
from dery.ir import LatencyRecord
from dery.profile_store import SCHEMA, ProfileStore

WRITES = 60  # records each process adds, one file write each
SPAWN = mp.get_context("spawn")


def record(fp: str, ms: float, when: str = "2026-01-01T00:00:00+00:00") -> LatencyRecord:
    return records.record(fp, when, ms, "test-cpu", reference=4.0, anchor=4.0)


def _writer(root: str, name: str, done, start) -> None:
    """Open the store, wait for the other process, then add WRITES records of our own one at a time."""
    store = ProfileStore(Cache(Path(root)), "cpu")
    start.wait()
    for i in range(WRITES):
        store.add_all([record(f"{name}-{i:03d}", 1.0 + i)])
    done.put(name)


def _maker(root: str, results, start) -> None:
    """Ask for one artifact together with the other process; its make takes long enough to overlap."""
    def make() -> bytes:
        with open(Path(root) / "makes.log", "a") as f:
            f.write("make\n")
        time.sleep(0.5)
        return b"expensive bytes"

    start.wait()
    value = Cache(Path(root)).get_or_make("test", "one-key", ".bin", make=make, save=lambda v, p: p.write_bytes(v),
                                          load=lambda p: p.read_bytes(), what="test artifact")
    results.put(value)


def _together(target, args: list[tuple]) -> None:
    """Run `target(*a, start)` in one spawned process per `a`, released together by a barrier."""
    start = SPAWN.Barrier(len(args))
    procs = [SPAWN.Process(target=target, args=(*a, start)) for a in args]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"worker exited with {p.exitcode}"


def test_two_processes_writing_one_profile_table_lose_no_record(tmp_path: Path) -> None:
    old = record("old", 9.0)
    ProfileStore(Cache(tmp_path), "cpu").add_all([old])
    done = SPAWN.Queue()
    _together(_writer, [(str(tmp_path), n, done) for n in "ab"])
    assert sorted(done.get(timeout=5) for _ in range(2)) == ["a", "b"]
    path = tmp_path / "profiles" / "cpu.json"
    raw = json.loads(path.read_text())  # valid JSON, the current schema
    assert raw["schema"] == SCHEMA
    keys = [r["fingerprint"] for r in raw["records"]]
    assert keys == sorted(["old", *(f"{n}-{i:03d}" for n in "ab" for i in range(WRITES))])
    again = ProfileStore(Cache(tmp_path), "cpu")
    assert again.get(record("b-017", 0.0)).median_ms == 18.0 and again.get(old) == old


def test_a_write_keeps_the_newer_of_two_versions_of_a_record(tmp_path: Path) -> None:
    first, second = ProfileStore(Cache(tmp_path), "cpu"), ProfileStore(Cache(tmp_path), "cpu")
    second.add_all([record("x", 2.0, "2026-01-02T00:00:00+00:00")])
    first.add_all([record("x", 1.0, "2026-01-01T00:00:00+00:00"), record("y", 3.0)])
    table = ProfileStore(Cache(tmp_path), "cpu")
    assert table.get(record("x", 0.0)).median_ms == 2.0 and table.get(record("y", 0.0)).median_ms == 3.0


def test_two_processes_asking_for_one_artifact_make_it_once(tmp_path: Path) -> None:
    results = SPAWN.Queue()
    _together(_maker, [(str(tmp_path), results)] * 2)
    assert [results.get(timeout=5) for _ in range(2)] == [b"expensive bytes"] * 2
    assert (tmp_path / "makes.log").read_text() == "make\n"
    assert (tmp_path / "test" / "one-key.bin").read_bytes() == b"expensive bytes"


def test_a_value_keep_rejects_is_returned_and_not_saved(tmp_path: Path) -> None:
    cache, made = Cache(tmp_path), []

    def make() -> dict:
        made.append(1)
        return {"noisy": len(made) == 1}

    def ask() -> dict:
        return cache.json("test", "k", make, what="test value", keep=lambda v: not v["noisy"])

    assert ask() == {"noisy": True} and not (tmp_path / "test" / "k.json").exists()
    assert ask() == {"noisy": False} and ask() == {"noisy": False} and len(made) == 2


def test_a_trained_member_does_not_depend_on_what_ran_before() -> None:
    """A run that loads a cached member and trains the next must train the same weights as a run that trained
    both: the initial weights come from the recipe's seed, not from the global RNG's state."""
    import tempfile

    from dery import zoo
    from dery.data import load_data

    specs = zoo.parse_zoo("tiny")
    spec = dataclasses.replace(specs[0], recipe=dataclasses.replace(specs[0].recipe, epochs=1))
    data = load_data(None, zoo.native_resolution(specs), probe=64, seed=0)
    keys = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        with tempfile.TemporaryDirectory() as root:
            keys.append(zoo.load_member(spec, data, Cache(Path(root))).weights_key)
    assert keys[0] == keys[1]
