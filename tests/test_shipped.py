"""The default zoo's weights ship with the package, made by dery's own training code."""
from __future__ import annotations

import pytest
import torch
from dery.cache import Cache
from dery.data import load_data
from dery.evaluate import accuracy
from dery.zoo import PRESETS, load_member, native_resolution, read_checkpoint, shipped_path, trained

SPECS = PRESETS["default"]


@pytest.fixture(scope="module")
def data():
    return load_data(None, native_resolution(SPECS))


def test_the_default_zoo_loads_the_shipped_weights_and_trains_nothing(data, tmp_path) -> None:
    """Each member's weights are exactly its shipped checkpoint's, nothing is written to the cache, and each
    member is trained: far above chance (10%) on the test split."""
    cache = Cache(tmp_path)
    test_x, test_y = data.images("test"), data.split("test").labels
    for spec in SPECS:
        net = load_member(spec, data, cache)
        shipped = read_checkpoint(shipped_path(spec, data))["state_dict"]
        mine = net.module.net.state_dict()
        assert mine.keys() == shipped.keys() and all(torch.equal(mine[k], shipped[k]) for k in mine), spec.name
        assert accuracy(net.module, test_x, test_y) > 0.6, spec.name
    assert not any(tmp_path.rglob("*.pt"))


def test_other_data_does_not_match_the_shipped_weights(data) -> None:
    """The shipped file is keyed by the data as well as the recipe: another split seed names another file."""
    other = load_data(None, native_resolution(SPECS), seed=1)
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
