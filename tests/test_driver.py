"""The driver's stages as data: prefixes served from the cache, one source of defaults, the documented stage table."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from dery import defaults
from dery.cli import _compile_parser, main
from dery.driver import FRONT, PASSES, CompileConfig


def test_partition_command_is_served_from_the_cache(tiny, capsys, monkeypatch) -> None:
    import dery.passes.partition as partition
    import dery.passes.similarity as similarity

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cached partition was computed again")

    assert main(["partition", "--zoo", "tiny", "--k", "3", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    monkeypatch.setattr(similarity, "similarity", must_not_run)
    monkeypatch.setattr(partition, "partition", must_not_run)
    assert main(["partition", "--zoo", "tiny", "--k", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert [m["boundaries"] for m in first["models"]] == [list(b) for b in tiny.partition.boundaries]


def test_every_default_has_one_source() -> None:
    import argparse

    args = _compile_parser(argparse.ArgumentParser()).parse_args(["--target", "cpu", "--latency-ms", "1"])
    config = CompileConfig(target="cpu", latency_ms=1.0)
    for f in dataclasses.fields(CompileConfig):
        if f.name in ("target", "latency_ms", "profiling"):  # required, or a settings object no flag exposes
            continue
        assert getattr(args, f.name) == getattr(config, f.name), f.name
    assert (config.k, config.balance, config.top, config.finetune, config.epochs) == (
        defaults.K, defaults.BALANCE, defaults.TOP, defaults.FINETUNE, defaults.FINETUNE_EPOCHS)
    assert config.quality_model == (defaults.REPAIR_PREDICTOR if config.repairs else defaults.PREDICTOR)
    assert replace(config, finetune="none").quality_model == defaults.PREDICTOR
    assert replace(config, finetune="none", predictor="stitch-r2").quality_model == "stitch-r2"
    assert config.profiling == defaults.Profiling() and not hasattr(args, "profiling")


def test_one_setting_changes_without_patching_a_module(tiny) -> None:
    """A Session built with k=2 partitions into two sets while the shared fixture (k=3) is untouched."""
    from dery.driver import front

    s = front(dataclasses.replace(tiny.config, k=2), until="partition")
    assert s.partition.k == 2 and tiny.partition.k == 3 and s.stitches is None


@pytest.mark.slow  # scores every predictor and proxy
def test_proxy_implements_every_name_the_cli_offers(tiny) -> None:
    from dery.evaluate import reference_labels
    from dery.passes.proxy import quality, whole_network_score

    for name in defaults.PREDICTORS:
        assert quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, name).predictor == name
    labels, _ = reference_labels(tiny.zoo, tiny.data, "val")
    scores = {name: whole_network_score(name, tiny.zoo[0].module, tiny.data, labels) for name in defaults.PROXIES}
    assert len(set(scores.values())) == len(defaults.PROXIES)


def test_architecture_stage_table_matches_the_driver() -> None:
    text = (Path(__file__).parents[1] / "ARCHITECTURE.md").read_text()
    table = text.split("## Where each stage lives", 1)[1].split("\n\n", 2)[1]
    rows = [re.match(r"\| (\w+) \|", line).group(1) for line in table.splitlines()[2:] if line.startswith("| ")]
    assert rows == list(PASSES)
    assert [name for name, _ in FRONT] == [p for p in PASSES if p in dict(FRONT)]
