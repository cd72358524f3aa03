"""Deep Incubation engine: compatibility (CNN and ViT, against a measured control), isolation, pure loading,
resume, determinism, the output anchor's gradient, token meta layers, damaged checkpoints."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from dery.data import digits
from dery.errors import DeryError
from dery.incubate import (
    AnchorGrad,
    Hybrid,
    accuracy,
    incubate_module,
    incubate_modules,
    meta_layer,
    meta_model,
    module_shapes,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread (the shared 2-core machines run several suites at once; conftest sets 2)."""
    was = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(was)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        last = nn.Conv2d(c, c, 3, padding=1)
        nn.init.zeros_(last.weight)  # zero-initialised residual branch (each block starts as the identity)
        nn.init.zeros_(last.bias)
        self.f = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c),
                               nn.ReLU(), last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def cnn(seed: int, c: int = 32, n: int = 2) -> list[nn.Module]:
    """A residual BN CNN cut into 3 modules: stem + n-1 blocks, n blocks, n-1 blocks + head (C x 8 x 8 between)."""
    torch.manual_seed(seed)
    head = [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
    return [nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.BatchNorm2d(c), *[_Res(c) for _ in range(n - 1)]),
            nn.Sequential(*[_Res(c) for _ in range(n)]),
            nn.Sequential(*[_Res(c) for _ in range(n - 1)], *head)]


class _Embed(nn.Module):
    def __init__(self, v: nn.Module):
        super().__init__()
        self.patch_embed, self.cls_token, self.pos_embed = v.patch_embed, v.cls_token, v.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed


class _Head(nn.Module):
    def __init__(self, v: nn.Module):
        super().__init__()
        self.norm, self.head = v.norm, v.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x)[:, 0])


def vit(seed: int, d: int = 64, depth: int = 6) -> list[nn.Module]:
    """timm's VisionTransformer (4 px patches of 16 px images: 17 tokens) cut into 3 modules of depth/3 blocks;
    the patch embedding goes with module 0 and the norm and head with module 2, as in the paper."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    v = VisionTransformer(img_size=16, patch_size=4, num_classes=10, embed_dim=d, depth=depth, num_heads=4,
                          mlp_ratio=2.0)
    per, blocks = depth // 3, list(v.blocks)
    return [nn.Sequential(_Embed(v), *blocks[:per]), nn.Sequential(*blocks[per:2 * per]),
            nn.Sequential(*blocks[2 * per:], _Head(v))]


@pytest.fixture(scope="module")
def data():
    return digits(16)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A cheap incubation (few epochs: mechanics, not accuracy)."""
    mods = cnn(0, c=8, n=1)
    d = tmp_path_factory.mktemp("inc")
    asm, rep = incubate_modules(mods, data, d, epochs_meta=1, epochs_module=1, epochs_finetune=0, lr=1e-2)
    return mods, asm, rep, d


def test_pure_loading(run, data):
    mods, asm, _, _ = run
    x = data.images("test", 64)
    y = x
    with torch.no_grad():
        for m in mods:
            m.eval()
            y = m(y)
        assert torch.equal(asm(x), y)


def _compatibility(build, data, tmp_path, *, epochs_meta: int, epochs_module: int, lr: float
                   ) -> tuple[dict, float, float]:
    """(report, mean hybrid accuracy, control accuracy): the assembly before fine-tuning, its hybrids, and a
    control in which module i had a meta model of its own (module 0 the main one, module i > 0 one seeded
    100 + i), all else equal."""
    mods = build(0)
    _, rep = incubate_modules(mods, data, tmp_path, epochs_meta=epochs_meta, epochs_module=epochs_module,
                              epochs_finetune=0, lr=lr)
    shapes = module_shapes(mods, (3, 16, 16))
    control = [mods[0]]
    for i in range(1, len(mods)):
        own, _ = meta_model(shapes, data, epochs=epochs_meta, lr=lr, seed=100 + i)
        c = build(0)[i]
        incubate_module(c, i, own, data, epochs=epochs_module, lr=lr, seed=1 + i)
        control.append(c)
    ctrl = accuracy(Hybrid(control, None), data.images("test"), data.split("test").labels)
    return rep, sum(rep["hybrid_accuracy"]) / len(rep["hybrid_accuracy"]), ctrl


@pytest.mark.slow  # about a minute: meta model, three hybrids, two control meta models and modules
def test_compatibility_cnn(data, tmp_path):
    rep, mean_hybrid, ctrl = _compatibility(cnn, data, tmp_path, epochs_meta=30, epochs_module=15, lr=1e-2)
    assert rep["assembled_accuracy"] >= 0.9 * mean_hybrid, rep
    assert rep["assembled_accuracy"] >= ctrl + 0.5, (rep, ctrl)


@pytest.mark.slow  # a few minutes
def test_compatibility_vit(data, tmp_path):
    rep, mean_hybrid, ctrl = _compatibility(vit, data, tmp_path, epochs_meta=30, epochs_module=20, lr=3e-3)
    assert rep["assembled_accuracy"] >= 0.9 * mean_hybrid, rep
    assert rep["assembled_accuracy"] >= ctrl + 0.5, (rep, ctrl)


def test_isolation_frozen_tensors_bit_identical(data, tmp_path):
    mods = cnn(1, c=8, n=1)
    incubate_modules(mods[:], data, tmp_path, epochs_meta=1, epochs_module=0, epochs_finetune=0)
    meta, _ = meta_model(module_shapes(mods, (3, 16, 16)), data, epochs=1, lr=3e-3, seed=0, path=tmp_path / "meta.pt")
    before = copy.deepcopy(meta.state_dict())
    (tmp_path / "module_1.pt").unlink()
    incubate_modules(mods, data, tmp_path, epochs_meta=1, epochs_module=1, epochs_finetune=0, meta=meta)
    after = meta.state_dict()
    for key, v in before.items():  # meta layer 1 too: module 1's anchor reads it in eval mode, without gradients
        assert torch.equal(v, after[key]), key


def test_resume_does_not_retrain_finished_modules(run, data):
    _mods, _, rep, d = run
    assert rep["trained"] == ["meta", "module 0", "module 1", "module 2"]
    stamp = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in d.glob("*.pt")}
    first = torch.load(d / "module_2.pt", weights_only=True)["state"]
    (d / "module_2.pt").unlink()  # interrupted before module 2 finished
    _, rep2 = incubate_modules(cnn(0, c=8, n=1), data, d, epochs_meta=1, epochs_module=1, epochs_finetune=0,
                               lr=1e-2)
    assert rep2["trained"] == ["module 2"]
    for name in ("meta.pt", "module_0.pt", "module_1.pt"):
        assert (d / name).stat().st_mtime_ns == stamp[name][0] and (d / name).read_bytes() == stamp[name][1]
    again = torch.load(d / "module_2.pt", weights_only=True)["state"]
    assert all(torch.equal(first[k], again[k]) for k in first)  # the retrain is deterministic


def test_same_seed_same_vit_modules(data):
    def once():
        mods = vit(0, d=32, depth=3)
        meta, _ = meta_model(module_shapes(mods, (3, 16, 16)), data, epochs=1, lr=3e-3, seed=0)
        incubate_module(mods[0], 0, meta, data, epochs=1, lr=3e-3, seed=1)
        return mods[0].state_dict()

    a, b = once(), once()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_anchor_gradient_is_that_of_the_anchor_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 3, 5, 5, generator=g, requires_grad=True)
    ref, up = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    scale = torch.rand(1, 3, 1, 1, generator=g) + 0.5
    (AnchorGrad.apply(y, ref, scale, 7.0) * up).sum().backward()
    y2 = y.detach().clone().requires_grad_(True)
    ((y2 * up).sum() + 7.0 * ((y2 - ref) / scale).pow(2).mean()).backward()
    assert torch.allclose(y.grad, y2.grad, atol=1e-6)


def test_meta_layers_for_tokens_and_residual_maps():
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert meta_layer((3, 16, 16), (17, 64), 0)(x).shape == (2, 17, 64)  # 4 px patches and a class token
        assert meta_layer((3, 16, 16), (16, 64), 0)(x).shape == (2, 16, 64)
        t = torch.randn(2, 17, 64)
        assert meta_layer((17, 64), (17, 64), 1)(t).shape == (2, 17, 64)
        assert meta_layer((17, 64), (10,), 2)(t).shape == (2, 10)
        f = torch.randn(2, 16, 8, 8)
        assert torch.equal(meta_layer((16, 8, 8), (16, 8, 8), 1).eval()(f), f)  # residual, starts as the identity
    with pytest.raises(DeryError, match="module 0: no meta layer"):
        meta_layer((3, 16, 16), (15, 64), 0)


def test_damaged_checkpoint_is_named(run, data, tmp_path):
    (tmp_path / "meta.pt").write_bytes((run[3] / "meta.pt").read_bytes())
    (tmp_path / "module_0.pt").write_bytes(b"garbage")
    with pytest.raises(DeryError, match=r"module 0 checkpoint .*module_0\.pt is damaged"):
        incubate_modules(cnn(0, c=8, n=1), data, tmp_path, epochs_meta=1, epochs_module=1, epochs_finetune=0)


def test_no_meta_layer_for_shape():
    with pytest.raises(DeryError, match="module 2: no meta layer"):
        meta_layer((8, 16), (4, 16), 2)


@pytest.mark.slow  # about 25 s of training
def test_repair_in_the_assembly_itself_improves_it_and_keeps_its_architecture(tiny, tmp_path):
    """A reassembled network of three tiny-zoo members, repaired in itself (the default meta model): more
    accurate than as stitched, the same parts with the same tensors' shapes, and what it computes is its
    modules' composition. The stitched parts it started from are not touched."""
    from dery.incubate import assembly_modules, repair
    from dery.passes.assemble import assemble

    models = tuple(tiny.partition.models)
    _, net = assemble(tiny.lowered, tiny.partition, tiny.stitches, models)
    net = copy.deepcopy(net)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    zoo_before = {k: v.clone() for k, v in tiny.lowered[0].network.module.state_dict().items()}
    mods = assembly_modules(net)
    assert len(mods) == tiny.partition.k and sum(len(list(m.children())) > 0 for m in mods) >= 1
    repaired, rep = repair(mods, tiny.data, tmp_path, epochs_module=2, epochs_finetune=1, lr=3e-3)
    assert rep["meta"] == "self"
    assert rep["finetuned_accuracy"] > rep["before_accuracy"] + 0.15, rep  # measured: 0.082 -> 0.381
    tuned = repaired.state_dict()
    assert sorted(tuple(v.shape) for v in tuned.values()) == sorted(tuple(v) for v in shapes.values())
    x = tiny.data.images("test", 32)
    with torch.no_grad():
        y = x
        for p in repaired.parts:
            y = p(y)
        assert torch.equal(repaired.eval()(x), y)
    assert all(torch.equal(v, tiny.lowered[0].network.module.state_dict()[k]) for k, v in zoo_before.items())
