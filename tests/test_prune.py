"""sparsekit.prune: schedules, mask-while-training, the Pruner, iterative N:M."""

import copy
import math

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import prune


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8))


def test_cubic_matches_zhu_gupta_formula():
    s = prune.cubic(0.1, 0.9, start=5, steps=4, every=3)
    for t in range(0, 40):
        if t < 5:
            want = 0.1
        else:
            k = min((t - 5) // 3, 4)
            want = 0.9 + (0.1 - 0.9) * (1 - k / 4) ** 3
        assert s(t) == pytest.approx(want)
    assert s.end == 5 + 4 * 3 and s(s.end) == pytest.approx(0.9)


def test_other_schedules():
    lin = prune.linear(0.0, 0.6, steps=3)
    assert [lin(t) for t in range(5)] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.6])
    exp = prune.exponential(0.0, 0.75, steps=2)  # density 1 -> 0.5 -> 0.25
    assert [exp(t) for t in range(4)] == pytest.approx([0.0, 0.5, 0.75, 0.75])
    step = prune.stepwise(0.1, 0.05, 0.5)
    assert [step(t) for t in range(10)] == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5])
    assert prune.constant(0.3)(0) == prune.constant(0.3)(100) == 0.3
    for bad in (lambda: prune.cubic(-0.1, 0.5), lambda: prune.linear(0.0, 1.5),
                lambda: prune.cubic(0.0, 0.5, every=0), lambda: prune.stepwise(0.5, 0.1, 0.2)):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_schedule_sparsity_is_exact_at_every_step(scope):
    model = mlp()
    schedule = prune.cubic(0.0, 0.8, steps=6, every=2)
    pruner = prune.Pruner(model, schedule, scope=scope)
    for _ in range(16):
        s = pruner.step()
        assert s == schedule(pruner.step_count)
        counts = [(m.numel() - int(m.sum()), m.numel()) for m in pruner.masks().values()]
        if scope == "layer":
            for pruned, numel in counts:
                assert pruned == round(s * numel)
        else:
            assert sum(p for p, _ in counts) == round(s * sum(n for _, n in counts))


@pytest.mark.parametrize("method", ["magnitude", "random", "ln_structured", "block"])
def test_pruned_weights_never_come_back(method):
    model = mlp()
    pruner = prune.Pruner(model, prune.linear(0.0, 0.75, steps=6), method=method, block=(4, 4),
                          generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    previous = {k: v.clone() for k, v in pruner.masks().items()}
    for _ in range(10):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        pruner.step()
        for name, mod in pruner.modules:
            mask = pruner.masks()[name]
            assert not torch.any(mask & ~previous[name])  # kept set only shrinks
            assert torch.all(mod.weight[~mask] == 0)  # and pruned weights stay zero
            previous[name] = mask.clone()
    assert pruner.sparsity == pytest.approx(0.75)


def test_masks_are_bool_buffers_and_finalize_leaves_plain_state_dict():
    model = mlp()
    pruner = prune.Pruner(model, prune.constant(0.5))
    for mask in pruner.masks().values():
        assert mask.dtype == torch.bool
    x = torch.randn(4, 32)
    out = model(x)
    pruner.finalize()
    assert set(model.state_dict()) == set(mlp().state_dict())
    assert torch.allclose(model(x), out)
    assert float((model[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-3)


def test_iterative_nm_then_sparse_layers():
    model = mlp()
    pruner = prune.Pruner(model, prune.cubic(0.0, 0.5, steps=4), method="nm", pattern="2:4")
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        pruner.step()
    for name, mod in pruner.modules:
        sk.compress(mod.weight.detach(), 2, 4)  # raises unless every group is 2:4
    expected = model(x)
    report = pruner.finalize(pattern="2:4")
    assert len(report.converted) == 3
    assert all(isinstance(model[i], sk.SparseLinear) for i in (0, 2, 4))
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


def test_iterative_nm_on_conv_groups_over_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    pruner = prune.Pruner(model, prune.linear(0.0, 0.5, steps=2), method="nm")
    for _ in range(3):
        pruner.step()
    x = torch.randn(2, 8, 6, 6)
    expected = model(x)
    pruner.finalize(pattern="2:4")
    assert isinstance(model[0], sk.SparseConv2d)
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="schedule"):
        prune.Pruner(mlp(), 0.5)
    with pytest.raises(ValueError, match="method"):
        prune.Pruner(mlp(), prune.constant(0.5), method="lottery")
    with pytest.raises(ValueError, match="global"):
        prune.Pruner(mlp(), prune.constant(0.5), method="random", scope="global")
    with pytest.raises(ValueError, match="no layer"):
        prune.Pruner(nn.ReLU(), prune.constant(0.5))
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        prune.attach_mask(lin, mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="no mask attached"):
        prune.remove_mask(lin)
