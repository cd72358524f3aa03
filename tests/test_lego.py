"""Model LEGO: disassembly, scaling and assembly on a residual timm net and a plain CNN (REFERENCES.md section 3)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from dery.cache import Cache
from dery.cli import build_parser
from dery.data import digits
from dery.errors import DeryError
from dery.passes.disassemble import (
    Thresholds,
    _prune_groups,
    input_means,
    cmd_disassemble,
    disassemble,
    parse_classes,
    random_component,
    rounded,
    task_accuracy,
    unit_counts,
)
from dery.passes.lego import (
    _image_consumers,
    _merge_nets,
    apply_scale,
    assemble,
    calibrate_scale,
    component_checkpoint,
    module_from_checkpoint,
    read_part,
    save_checkpoint,
)
from dery.training import fit
from dery.zoo import PRESETS, Normalized, load_member

torch.set_num_threads(1)
TASK, WRONG = (1, 5, 7), (0, 2, 4)


@pytest.fixture(scope="module")
def data():
    return digits(32)


@pytest.fixture(scope="module")
def resnet(data):
    return load_member(PRESETS["default"][0], data, Cache())


@pytest.fixture(scope="module")
def plain(data):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    m = Normalized(net, (0.5,) * 3, (0.5,) * 3)
    fit(m, list(m.parameters()), data.images("train"), data.split("train").labels, epochs=30, lr=5e-3,
        weight_decay=0.05, batch=64, seed=0, schedule="one-cycle", train_mode=True, label="plain")
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def _split(data, name):
    return data.images(name), data.split(name).labels


def _acc(comp, data):
    x, y = _split(data, "test")
    return task_accuracy(comp.module, x, y, comp.classes, range(len(comp.classes)))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "plain"])
def test_located_component_beats_random_and_wrong_classes(kind, request, data):
    module = request.getfixturevalue(kind)
    module = module.module if hasattr(module, "module") else module
    x, y = _split(data, "train")
    # as located (--round-to 1): rounding adds channels by weight norm, which is not what this test is about
    comp = disassemble(module, x, y, TASK, data.classes, round_to=1)
    assert comp.module(x[:2]).shape == (2, 3)
    assert comp.kept_fraction < 0.6
    rand = [_acc(random_component(module, comp, x, y, s), data) for s in range(3)]
    wrong = disassemble(module, x, y, WRONG, data.classes, round_to=1)
    xt, yt = _split(data, "test")
    acc, acc_wrong = _acc(comp, data), task_accuracy(wrong.module, xt, yt, TASK, range(len(TASK)))
    assert acc >= np.mean(rand) + 0.08, (acc, rand)
    assert acc >= 0.85
    assert acc_wrong <= 1 / len(TASK) + 0.2, acc_wrong
    # removed channels' mean contributions kept in biases: without them the plain chain loses most of the task
    dropped = _acc(disassemble(module, x, y, TASK, data.classes, round_to=1, compensate="off"), data)
    assert acc >= dropped + (0.2 if kind == "plain" else 0.0), (acc, dropped)


@pytest.mark.slow
def test_assembly_identity_one_network_and_onnx(resnet, data, tmp_path):
    import onnxruntime as ort
    from dery.onnx_graph import export

    x, y = _split(data, "train")
    paths = []
    for name, classes in (("a", (0, 3)), ("b", (1, 5))):
        comp = disassemble(resnet.module, x, y, classes, data.classes)
        paths.append(tmp_path / f"{name}.pt")
        save_checkpoint(paths[-1], component_checkpoint(comp, resnet.spec, 10, 32, None))
    parts = [read_part(p) for p in paths]
    ckpt = assemble(parts)
    assert ckpt["lego"]["kind"] == "component" and ckpt["classes"] == ["0", "1", "3", "5"]
    a, b, c = (module_from_checkpoint(k) for k in (*parts, ckpt))
    img = data.images("test", 16)
    with torch.no_grad():
        want = torch.cat([a(img), b(img)], 1)[:, [0, 2, 1, 3]]
        got = c(img)
    assert float((got - want).abs().max()) <= 1e-5
    model = export(c, [img], ["x"], ["y"])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"x": img.numpy()})[0]
    assert float(np.abs(out - want.numpy()).max()) <= 1e-5


@pytest.mark.slow
def test_assembly_identity_plain_and_branches(plain, resnet, data):
    x, y = _split(data, "train")
    a = disassemble(plain, x, y, (0, 3), data.classes)
    b = disassemble(plain, x, y, (1, 5), data.classes)
    merged = _merge_nets(a.module.net, b.module.net, _image_consumers(a.module.net, (3, 32, 32)))
    assert merged is not None
    img = data.images("test", 16)
    with torch.no_grad():
        got = merged((img - 0.5) / 0.5)
        want = torch.cat([a.module(img), b.module(img)], 1)
    assert float((got - want).abs().max()) <= 1e-5
    # different architectures: parallel branches, one global class order
    r = disassemble(resnet.module, x, y, (2, 4), data.classes)
    ckpt_r = component_checkpoint(r, resnet.spec, 10, 32, None)
    spec = PRESETS["tiny"][1]
    mnv3 = load_member(spec, data, Cache())
    m = disassemble(mnv3.module, x, y, (1, 9), data.classes)
    ckpt_m = component_checkpoint(m, spec, 10, 32, None)
    both = assemble([ckpt_r, ckpt_m])
    assert both["lego"]["kind"] == "branches" and both["classes"] == ["1", "2", "4", "9"]
    with torch.no_grad():
        got = module_from_checkpoint(both)(img)
        want = torch.cat([r.module(img), m.module(img)], 1)[:, [2, 0, 1, 3]]
    assert float((got - want).abs().max()) <= 1e-5


@pytest.mark.slow
def test_scaling_recovers_a_misscaled_component(resnet, data):
    x, y = _split(data, "train")
    a = disassemble(resnet.module, x, y, (0, 3, 6), data.classes)
    b = disassemble(resnet.module, x, y, (1, 5, 7), data.classes)
    apply_scale(b.module.net, b.classifier, [25.0] * 3)  # deliberately mis-scaled

    def union_acc(sa, sb):
        ca, cb = (component_checkpoint(c, resnet.spec, 10, 32, None) for c in (a, b))
        for ck, s, c in ((ca, sa, a), (cb, sb, b)):
            if s is not None:
                m = module_from_checkpoint(ck)
                apply_scale(m.net, c.classifier, s)
                ck["state_dict"] = m.net.state_dict()
        net = module_from_checkpoint(assemble([ca, cb]))
        xt, yt = _split(data, "test")
        return task_accuracy(net, xt, yt, (0, 1, 3, 5, 6, 7), range(6))

    before = union_acc(None, None)
    after = union_acc(calibrate_scale(a, x, y), calibrate_scale(b, x, y))
    assert after >= before + 0.15, (before, after)
    assert after >= 0.8


def test_compensation_keeps_a_removed_constant_channel_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1, bias=False), nn.ReLU(),
                        nn.Flatten(), nn.Linear(128, 3)).eval()
    with torch.no_grad():
        net[0].weight[2].zero_()
        net[0].bias[2] = 5.0  # channel 2 is 5 everywhere, on every image
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        want = net(x)
    means = input_means(net, x)
    assert torch.allclose(means["2"][2], torch.full((8, 8), 5.0)) and means["5"].shape == (128,)

    def without_channel_2(prunable):
        def keep(dg, group, root, size):
            return torch.arange(size) != 2 if root is prunable[0] else torch.ones(size, dtype=torch.bool)
        return keep

    kept, dropped = copy.deepcopy(net), copy.deepcopy(net)
    _prune_groups(kept, x[:1], without_channel_2(kept), means)
    _prune_groups(dropped, x[:1], without_channel_2(dropped))
    assert kept[0].out_channels == dropped[0].out_channels == 3
    assert kept[2].bias is not None and dropped[2].bias is None
    with torch.no_grad():
        assert float((kept(x) - want).abs().max()) <= 1e-4 < float((dropped(x) - want).abs().max())


@pytest.mark.parametrize("arch", ["efficientnet_b0", "mobilenetv3_small_050", "mobilenext_035", "resnet18"])
def test_channels_nothing_reads_are_removed_from_a_timm_net_exactly(arch):
    """In every dependency group that a conv or linear layer roots (a depthwise conv, a squeeze-excite gate,
    an add tie channels into one), half the channels are made unread: every layer that reads the group's
    channels gets zero weights on them, and their own outputs stay. Removing those channels physically must
    leave the network's logits unchanged; a group torn apart fails to run or changes them. (ConvNeXt is not
    here: its LayerNorm reads every channel, so removing channels changes the others' normalisation.)"""
    import timm

    import dery.models  # noqa: F401 - registers mobilenext

    torch.manual_seed(0)
    net = timm.create_model(arch, num_classes=10, drop_rate=0.0).eval()
    x = torch.randn(2, 3, 64, 64)
    roots: set[nn.Module] = set()

    def half(size):
        return torch.arange(size) % 2 == 0

    def zero_readers(dg, group, root, size):  # first pass: nothing removed, the readers zeroed
        if root is not net.get_classifier() and size >= 8:
            roots.add(root)
            for item in dg.get_pruning_group(root, group[0].dep.handler, (~half(size)).nonzero().flatten().tolist()):
                layer = item.dep.target.module
                if dg.is_in_channel_pruning_fn(item.dep.handler) and isinstance(layer, (nn.Conv2d, nn.Linear)) \
                        and getattr(layer, "groups", 1) == 1:
                    with torch.no_grad():
                        layer.weight[:, list(item.idxs)] = 0
        return torch.ones(size, dtype=torch.bool)

    _prune_groups(net, x[:1], zero_readers)
    with torch.no_grad():
        want = net(x)
    before = sum(p.numel() for p in net.parameters())
    _prune_groups(net, x[:1], lambda dg, group, root, size: half(size) if root in roots
                  else torch.ones(size, dtype=torch.bool))
    with torch.no_grad():
        got = net(x)
    assert len(roots) >= 8 and sum(p.numel() for p in net.parameters()) < 0.6 * before
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_rounding_adds_the_largest_norm_dropped_channels():
    conv = nn.Conv2d(1, 6, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0]).view(6, 1, 1, 1))
    keep = torch.tensor([True, False, False, False, False, True])
    assert rounded(keep, conv, 4).tolist() == [True, False, True, False, True, True]  # norms 4 and 3 join
    assert rounded(keep, conv, 2).tolist() == keep.tolist() and rounded(keep, conv, 1).tolist() == keep.tolist()
    assert rounded(keep, conv, 8).all()  # no more channels than the group has


def test_kept_channels_are_multiples_of_the_kernel_block(resnet, data):
    x, y = _split(data, "train")
    exact = disassemble(resnet.module, x, y, (0, 3), data.classes, round_to=1)
    comp = disassemble(resnet.module, x, y, (0, 3), data.classes)
    whole = unit_counts(resnet.module.net)
    assert comp.kept_units[comp.classifier] == exact.kept_units[comp.classifier] == 2
    grown = 0
    for name, n in comp.kept_units.items():
        if name != comp.classifier:
            assert n % 8 == 0 or n == whole[name], (name, n)
            assert exact.kept_units[name] <= n < exact.kept_units[name] + 8, name
            grown += n > exact.kept_units[name]
    assert grown > 0 and exact.kept_params < comp.kept_params


def test_bad_input_is_one_clear_error(data, tmp_path):
    names = data.classes
    for bad, what in (("11", "out of range"), ("x", "unknown class"), ("3,3", "twice"), (" , ", "empty"),
                      (",".join(names), "every class")):
        with pytest.raises(DeryError, match=what) as e:
            parse_classes(bad, names)
        assert "\n" not in str(e.value) and e.value.exit_code == 2
    with pytest.raises(DeryError, match="no class names"):
        parse_classes("1", None)
    with pytest.raises(DeryError, match=r"outside \[0, 1\]"):
        Thresholds(conv_alpha=1.5)
    out = tmp_path / "c.pt"
    for argv, what in ((["resnet", "--classes", "30", "-o", str(out)], "out of range"),
                       (["resnet", "--classes", "1", "--linear-beta", "-0.1", "-o", str(out)], r"outside \[0, 1\]")):
        with pytest.raises(DeryError, match=what):
            cmd_disassemble(build_parser().parse_args(["disassemble", *argv]))
    assert not out.exists()
    torch.save({"format": "dery.checkpoint/1", "name": "x", "arch": "resnet18", "kwargs": [], "lego": {}},
               tmp_path / "nonames.pt")
    with pytest.raises(DeryError, match="no class names"):
        read_part(tmp_path / "nonames.pt")
