"""The default zoo's weights ship with the package, made by dery's own training code."""
from __future__ import annotations

import pytest
import torch
from dery.cache import Cache
from dery.evaluate import accuracy
from dery.zoo import PRESETS, load_member, read_checkpoint, shipped_path, trained, zoo_data

SPECS = PRESETS["default"]


@pytest.fixture(scope="module")
def data():
    return zoo_data(SPECS, cache=Cache())


def test_the_default_zoo_loads_the_shipped_weights_and_trains_nothing(data, tmp_path) -> None:
    """Each member's weights are exactly its shipped checkpoint's, nothing is written to the cache, and each
    member is trained: far above chance (1 in 26, 3.8%) on the test split."""
    cache = Cache(tmp_path)
    test_x, test_y = data.images("test"), data.split("test").labels
    for spec in SPECS:
        net = load_member(spec, data, cache)
        shipped = read_checkpoint(shipped_path(spec, data))["state_dict"]
        mine = net.module.net.state_dict()
        assert mine.keys() == shipped.keys() and all(torch.equal(mine[k], shipped[k]) for k in mine), spec.name
        assert accuracy(net.module, test_x, test_y) > 0.25, spec.name
    assert not any(tmp_path.rglob("*.pt"))


def test_other_data_does_not_match_the_shipped_weights(data) -> None:
    """The shipped file is keyed by the data as well as the recipe: another probe split names another file."""
    other = zoo_data(SPECS, probe=128)
    assert all(shipped_path(s, data).is_file() and not shipped_path(s, other).exists() for s in SPECS)


@pytest.mark.slow  # trains one member
def test_the_training_code_remakes_a_shipped_member(data) -> None:
    """`dery train-zoo`'s training, run again, makes a member as accurate as the shipped one (bit-identical on
    the machine that made them; other CPUs round differently)."""
    spec = next(s for s in SPECS if s.name == "resnet")
    test_x, test_y = data.images("test"), data.split("test").labels
    again = accuracy(trained(spec, data), test_x, test_y)
    shipped = accuracy(load_member(spec, data, Cache()).module, test_x, test_y)
    assert abs(again - shipped) < 0.03
