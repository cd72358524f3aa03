"""stitch refinement and fine-tuning train what they say and leave the zoo bit-identical; the log-accuracy
quality model that came with them is exact where `pairwise` is."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pytest
import torch
from dery.data import Dataset, Split
from dery.evaluate import reference_labels
from dery.passes.assemble import Assembled, assemble
from dery.passes.proxy import quality, switch_accuracies
from dery.passes.stitch import StitchModule, fine_tune, refine_stitches


def digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest() for k, t in tensors.items()}


def frozen_state(module: Assembled) -> dict[str, str]:
    """Every parameter and buffer outside the stitches (BatchNorm running statistics included)."""
    return digest({f"{i}.{k}": t for i, part in enumerate(module.parts) if not isinstance(part, StitchModule)
                   for k, t in part.state_dict().items()})


def zoo_state(tiny) -> dict[str, str]:
    return digest({f"{n.name}.{k}": t for n in tiny.zoo for k, t in n.module.state_dict().items()})


def stitched(tiny) -> tuple[Assembled, Dataset, torch.Tensor]:
    """A two-stitch assembly of the tiny zoo, the data cut to 192 train images (to stay quick), their labels."""
    a, b, c = tiny.partition.models
    models = next(m for m in ((a, b, a), (a, c, a), (b, a, b), (c, a, b))
                  if all(tiny.stitches.get(x, y, j) for j, (x, y) in enumerate(zip(m, m[1:]))))
    _, module = assemble(tiny.lowered, tiny.partition, tiny.stitches, models)
    train = tiny.data.split("train")
    data = dataclasses.replace(tiny.data, splits={**tiny.data.splits,
                                                  "train": Split(train.images[:192], train.labels[:192])})
    labels, _ = reference_labels(tiny.zoo, data, "train")
    return module, data, labels


def test_refinement_lowers_the_loss_and_trains_only_private_stitch_copies(tiny) -> None:
    module, data, labels = stitched(tiny)
    blocks, zoo = frozen_state(module), zoo_state(tiny)
    shared = digest({f"{k}.{n}": t for k, m in tiny.stitches.modules.items() for n, t in m.state_dict().items()})
    before = digest({f"{i}.{k}": t for i, p in enumerate(module.parts) if isinstance(p, StitchModule)
                     for k, t in p.state_dict().items()})
    out = refine_stitches(module, data, labels, epochs=3)
    assert out["loss_after"] < out["loss_before"]
    assert out["trained_params"] == sum(p.numel() for p in module.parts if isinstance(p, StitchModule)
                                        for p in p.parameters())
    after = digest({f"{i}.{k}": t for i, p in enumerate(module.parts) if isinstance(p, StitchModule)
                    for k, t in p.state_dict().items()})
    assert after != before
    assert frozen_state(module) == blocks and zoo_state(tiny) == zoo
    assert digest({f"{k}.{n}": t for k, m in tiny.stitches.modules.items()
                   for n, t in m.state_dict().items()}) == shared
    assert all(not p.requires_grad for n in tiny.zoo for p in n.module.parameters())


def test_refinement_is_deterministic_for_a_seed(tiny) -> None:
    runs = []
    for _ in range(2):
        module, data, labels = stitched(tiny)
        refine_stitches(module, data, labels, epochs=1, seed=3)
        runs.append([t.clone() for p in module.parts if isinstance(p, StitchModule) for t in p.state_dict().values()])
    assert all(torch.equal(x, y) for x, y in zip(*runs))


def test_fine_tune_trains_a_copy_and_leaves_the_zoo_untouched(tiny) -> None:
    module, data, labels = stitched(tiny)
    zoo, own = zoo_state(tiny), digest(module.state_dict())
    tuned, out = fine_tune(module, data, labels, epochs=2)
    assert out["loss_after"] < out["loss_before"]
    assert out["trained_params"] == sum(p.numel() for p in tuned.parameters())
    assert digest(tuned.state_dict()) != own
    assert zoo_state(tiny) == zoo and digest(module.state_dict()) == own


def test_pairwise_log_is_exact_on_members_and_single_switches_and_multiplies_beyond(tiny) -> None:
    q = quality(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache, "pairwise-log")
    switches, members, _ = switch_accuracies(tiny.lowered, tiny.partition, tiny.stitches, tiny.data, tiny.cache)
    n, k = len(tiny.data.split("val")), tiny.partition.k
    clip = lambda p: min(max(p, 0.5 / n), 1 - 0.5 / n)  # noqa: E731
    for m, acc in members.items():
        assert q.accuracy((m,) * k) == pytest.approx(clip(acc))
    for (a, b, j), acc in switches.items():
        assert q.accuracy((a,) * (j + 1) + (b,) * (k - j - 1)) == pytest.approx(clip(acc))
    a, b = tiny.partition.models[:2]
    expect = clip(switches[a, b, 0]) * clip(switches[b, a, 1]) / clip(members[b])
    assert q.accuracy((a, b, a)) == pytest.approx(min(expect, 1.0))
    assert q.score((a, b, a)) == pytest.approx(math.log(expect))
