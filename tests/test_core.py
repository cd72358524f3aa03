"""Core pieces: IR round trips, the cache, data splits, zoo specs and checkpoints, targets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from dery.cache import Cache, atomic_write, atomic_write_json, read_json
from dery.data import digits, image_folder
from dery.errors import DeryError
from dery.ir import Block, CutPoint, Partition, Stitch, from_json, to_json
from dery.targets import get_target, registry
from dery.zoo import load_member, parse_zoo
from PIL import Image


def test_ir_round_trips_exactly() -> None:
    cut = CutPoint("m", "n", 2, (1, 8, 4, 4), "nchw", 0)
    block = Block("m", None, "n", "abc", 10, 20)
    part = Partition(2, ("m",), (("n",),), ((block, Block("m", "n", None, "def", 1, 2)),), 1.5, "flops", "optimal")
    st = Stitch("a", "b", 0, "nchw>nchw:same", "/w.npz", 0.75, "fp", 5, 6)
    for v in (cut, block, part, st):
        assert from_json(type(v), json.loads(json.dumps(to_json(v)))) == v
    assert cut.grid == (4, 4) and CutPoint("m", "t", 0, (1, 17, 8), "nlc", 1).grid == (4, 4)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path) -> None:
    target = tmp_path / "f.json"
    atomic_write_json(target, {"a": 1})

    def boom(p):
        p.write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_damaged_cache_artifact_is_named_not_recomputed(tmp_path) -> None:
    cache = Cache(tmp_path)
    assert cache.json("k", "key", lambda: {"v": 1}, what="thing") == {"v": 1}
    path = cache.path("k", "key", ".json")
    path.write_text("[1, 2")
    with pytest.raises(DeryError, match="damaged thing file") as info:
        cache.json("k", "key", lambda: {"v": 2}, what="thing")
    assert str(path) in str(info.value) and path.read_text() == "[1, 2"
    with pytest.raises(DeryError, match=str(path)):
        read_json(path, "thing")


def test_digits_splits_are_disjoint_deterministic_and_sized() -> None:
    """Every pair of train/val/test shares no image, probe is the head of train and shares none with val or
    test, and train + val + test is the whole distorted dataset, each image with its own label."""
    import itertools

    import torch.nn.functional as F
    from dery.data import DIGITS_DISTORTION, _to_uint8
    from sklearn.datasets import load_digits

    a, b = digits(16), digits(16)
    assert a.fingerprint == b.fingerprint and torch.equal(a.split("test").images, b.split("test").images)
    sizes = {s: len(a.split(s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 1078, "val": 270, "test": 449} and a.split("train").images.shape[1:] == (3, 16, 16)
    pairs = {s: [(bytes(x.numpy()), int(y)) for x, y in zip(a.split(s).images, a.split(s).labels)]
             for s in ("train", "probe", "val", "test")}
    images = {s: {img for img, _ in v} for s, v in pairs.items()}
    assert all(len(images[s]) == len(pairs[s]) for s in pairs)  # no image twice within a split
    for s, t in itertools.combinations(pairs, 2):
        if {s, t} == {"train", "probe"}:
            assert images["probe"] <= images["train"]
        else:
            assert not images[s] & images[t], (s, t)
    assert torch.equal(a.split("probe").images, a.split("train").images[:256])
    raw = load_digits()
    x = F.interpolate(torch.tensor(raw.images, dtype=torch.float32)[:, None] / 16.0, size=(32, 32),
                      mode="bilinear", align_corners=False)
    x = F.interpolate(DIGITS_DISTORTION(x, torch.Generator().manual_seed(0)), size=(16, 16), mode="bilinear",
                      align_corners=False)
    whole = {(bytes(img.numpy()), int(y)) for img, y in zip(_to_uint8(x.repeat(1, 3, 1, 1)), raw.target)}
    assert len(whole) == 1797
    assert set(pairs["train"]) | set(pairs["val"]) | set(pairs["test"]) == whole
    assert digits(16, seed=1).fingerprint != a.fingerprint


def test_glyphs_are_rendered_the_same_for_a_seed_cached_whole_and_split_without_overlap(tmp_path) -> None:
    """The same seed renders the same letters byte for byte, another seed others; the cached images equal a fresh
    render; the splits have their sizes, share no image, and every letter class occurs."""
    from dery.data import GLYPH_CLASSES, GLYPH_SPLITS, glyphs, render_glyphs

    a, b, c = render_glyphs(40, 16, 0), render_glyphs(40, 16, 0), render_glyphs(40, 16, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[0], c[0])
    assert a[0].shape == (40, 1, 16, 16) and a[0].dtype == torch.uint8 and int(a[1].max()) < len(GLYPH_CLASSES)
    cache = Cache(tmp_path)
    made, read = glyphs(16, probe=32, cache=cache), glyphs(16, probe=32, cache=cache)
    assert len(list(tmp_path.rglob("glyphs-*.pt"))) == 1 and made.fingerprint == read.fingerprint
    assert all(torch.equal(made.split(s).images, read.split(s).images) for s in made.splits)
    assert {s: len(made.split(s)) for s, _ in GLYPH_SPLITS} == dict(GLYPH_SPLITS) and made.num_classes == 26
    assert torch.equal(made.split("probe").images, made.split("train").images[:32])
    seen = {s: {bytes(x.numpy()) for x in made.split(s).images} for s in ("train", "val", "test")}
    assert not (seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"])
    assert all(set(made.split(s).labels.tolist()) == set(range(26)) for s in ("val", "test"))
    head = list(made.batches("val", 7, limit=10))
    assert [len(x) for x, _ in head] == [7, 3] and torch.equal(torch.cat([y for _, y in head]),
                                                               made.split("val").labels[:10])


def test_data_defaults_to_what_the_zoo_trains_on() -> None:
    from dery.zoo import default_data

    assert default_data(parse_zoo("default")) == "glyphs" and default_data(parse_zoo("tiny")) == "digits"
    assert default_data(parse_zoo("resnet18:random")) == "digits"
    with pytest.raises(DeryError, match=r"different embedded data \(digits, glyphs\); choose one with --data"):
        default_data(parse_zoo("default,tiny"))


def test_image_folder_reads_classes_and_resizes(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for c, colour in (("cat", 30), ("dog", 220)):
        (tmp_path / c).mkdir()
        for i in range(10):
            arr = np.full((40, 60, 3), colour, dtype=np.uint8) + rng.integers(0, 5, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / c / f"{i}.png")
    data = image_folder(tmp_path, 24, probe=4)
    assert data.classes == ("cat", "dog") and data.resolution == 24
    test = data.split("test")
    assert test.images.shape[1:] == (3, 24, 24)
    means = test.images.float().mean((1, 2, 3))
    assert torch.equal(test.labels, (means > 128).long())
    with pytest.raises(DeryError, match="not a directory"):
        image_folder(tmp_path / "nope", 24)


def test_zoo_specs_random_weights_and_checkpoints(tmp_path) -> None:
    specs = parse_zoo("tiny,resnet18:random")
    assert [s.name for s in specs] == ["resnet", "mobilenetv3", "vit", "resnet18"]
    assert specs[-1].weights == "random"
    assert [s.name for s in parse_zoo("resnet18:random,resnet18:random")] == ["resnet18", "resnet18#2"]
    data = digits(32, probe=8)
    a = load_member(parse_zoo("resnet10t:random")[0], data, Cache(tmp_path))
    b = load_member(parse_zoo("resnet10t:random")[0], data, Cache(tmp_path))
    assert a.weights_key == b.weights_key  # seeded: the same every time
    ckpt = tmp_path / "w.pth"
    torch.save(a.module.net.state_dict(), ckpt)
    c = load_member(parse_zoo(f"resnet10t={ckpt}")[0], data, Cache(tmp_path))
    assert c.weights_key == a.weights_key
    bad = tmp_path / "bad.pth"
    torch.save({"nope": torch.zeros(1)}, bad)
    with pytest.raises(DeryError, match="does not fit resnet10t"):
        load_member(parse_zoo(f"resnet10t={bad}")[0], data, Cache(tmp_path))


def test_missing_pretrained_weights_say_what_to_do(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DeryError) as info:
        load_member(parse_zoo("resnet10t")[0], digits(32, probe=8), Cache(tmp_path))
    msg = str(info.value)
    assert "pretrained weights for resnet10t" in msg and "resnet10t=PATH" in msg and "resnet10t:random" in msg


def test_target_registry() -> None:
    names = set(registry())
    assert {"cpu", "a100", "h100", "h200"} <= names
    a100 = get_target("a100")
    assert a100.backend == "tensorrt" and a100.peak_figure("tflops_fp16") == 312.0
    assert a100.matches("NVIDIA A100-SXM4-80GB")
    assert not a100.matches("NVIDIA H100 80GB HBM3")
    assert get_target("h200").backend == "torch-cuda"
    with pytest.raises(DeryError, match="known targets: a100, cpu, h100, h200"):
        get_target("gpu")
