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


# -- network slimming ----------------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.b2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


def _zero_some_channels(model, fraction, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
                bn.running_var.uniform_(0.5, 1.5, generator=gen)
                bn.weight.uniform_(0.5, 1.5, generator=gen)
                zero = torch.randperm(bn.num_features, generator=gen)[: int(fraction * bn.num_features)]
                bn.weight[zero] = 0
                bn.bias[zero] = 0


def test_slimming_zero_gamma_channels_keeps_outputs():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    _zero_some_channels(model, 0.5)
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    report = prune.slim(model, 0.5, x)
    assert report.kept == {"b1": (8, 16), "b2": (16, 32)}
    assert model.c2.in_channels == 8 and model.fc.in_features == 16 * 16
    assert report.params_after < 0.5 * report.params_before
    assert torch.allclose(model(x), before, atol=1e-6)
    assert "parameters" in str(report)


def test_slimming_leaves_residual_channels_alone_and_runs():
    torch.manual_seed(0)

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.bn0(self.stem(x)))
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            x = torch.relu(x + y)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    model = Res().eval()
    _zero_some_channels(model, 0.5)
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    report = prune.slim(model, 0.5, x)
    assert "residual" in report.left_alone["bn0"] and "residual" in report.left_alone["b2"]
    assert report.kept["b1"][0] < 8  # the inner channels of the block are slimmed
    assert torch.allclose(model(x), before, atol=1e-6)


def test_bn_l1_penalty_and_grad():
    model = SmallCNN()
    total = sum(bn.weight.abs().sum() for bn in (model.b1, model.b2))
    assert torch.allclose(prune.bn_l1_penalty(model, 1e-3), 1e-3 * total)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    before = model.b1.weight.grad.clone()
    prune.add_bn_l1_grad(model, 0.1)
    assert torch.allclose(model.b1.weight.grad, before + 0.1 * torch.sign(model.b1.weight.detach()))
    with pytest.raises(ValueError, match="lam"):
        prune.bn_l1_penalty(model, -1.0)


def test_select_channels_keeps_a_minimum_per_layer():
    model = SmallCNN()
    with torch.no_grad():
        model.b1.weight.fill_(1e-3)  # all of b1 below any threshold
        model.b2.weight.uniform_(0.5, 1.0)
    keep = prune.select_channels(model, 0.3, min_channels=4)
    assert int(keep["b1"].sum()) == 4
    with pytest.raises(ValueError, match="ratio"):
        prune.select_channels(model, 1.0)


def test_masks_keep_the_parameter_and_its_gradient_accumulator():
    # DistributedDataParallel hooks each parameter's gradient accumulator when it is built;
    # attach_mask / remove_mask must not replace it (register_parametrization's set_ did:
    # DDP then failed with "parameters that were not used").
    layer = nn.Linear(16, 8)
    weight = layer.weight
    accumulator = weight.view_as(weight).grad_fn.next_functions[0][0]
    mask = torch.rand(8, 16) > 0.5
    prune.attach_mask(layer, mask=mask)
    original = layer.parametrizations.weight.original
    assert original is weight
    assert original.view_as(original).grad_fn.next_functions[0][0] is accumulator
    layer(torch.randn(3, 16)).sum().backward()
    assert (weight.grad[~mask] == 0).all() and (weight.grad[mask] != 0).all()
    prune.remove_mask(layer)
    assert layer.weight is weight and (weight[~mask] == 0).all()
    assert weight.view_as(weight).grad_fn.next_functions[0][0] is accumulator


class TutorialCNN(nn.Module):
    """The PyTorch tutorial CNN with BatchNorm: its forward flattens with a traced constant."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 5), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1, self.fc2 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = x.view(-1, 16 * 5 * 5)
        return self.fc2(torch.relu(self.fc1(x)))


def test_slimming_leaves_a_constant_view_alone_and_equals_masked():
    model = TutorialCNN().eval()
    _zero_some_channels(model, 0.5)
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    report = prune.slim(model, 0.4, x)
    assert "constant" in report.left_alone["bn2"] and model.fc1.in_features == 400
    assert report.kept["bn1"] == (3, 6) and model.conv2.in_channels == 3
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


class _SharedConv(nn.Module):  # one conv on two branches
    def __init__(self):
        super().__init__()
        self.conv, self.bn_a, self.bn_b = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.c_a, self.c_b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c_a(torch.relu(self.bn_a(self.conv(x)))) * self.c_b(torch.relu(self.bn_b(self.conv(x))))


class _SharedBN(nn.Module):  # one BatchNorm after two convs
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3, self.c4 = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c3(torch.relu(self.bn(self.c1(x)))) - self.c4(torch.relu(self.bn(self.c2(x))))


class _SharedConsumer(nn.Module):  # a consumer reached twice, once from a slimmable chain
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.c2, self.b2 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        shared = self.head(torch.relu(self.b1(self.c1(x)))) + self.head(self.c0(x))
        return shared + self.tail(torch.relu(self.b2(self.c2(x))))


@pytest.mark.parametrize("kind,bn,why", [(_SharedConv, "bn_a", "conv is called 2 times"),
                                         (_SharedBN, "bn", "called 2 times"),
                                         (_SharedConsumer, "b1", "head, which is called 2 times")])
def test_slimming_shared_modules_are_left_alone_and_the_rest_slims(kind, bn, why):
    model = kind().eval()
    _zero_some_channels(model, 0.5)
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    report = prune.slim(model, 0.5, x)  # raised IndexError half way, the model rebuilt
    assert why in report.left_alone[bn]
    if kind is _SharedConsumer:
        assert report.kept["b2"] == (4, 8) and model.tail.in_channels == 4
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_slimming_that_fails_to_run_puts_every_layer_back():
    model = SmallCNN().eval()
    _zero_some_channels(model, 0.5)

    def needs_32_channels(module, args):  # code slimming cannot see (hooks are not traced)
        if args[0].shape[1] != 32:
            raise RuntimeError("expected 32 channels")

    model.pool.register_forward_pre_hook(needs_32_channels)
    x = torch.randn(2, 1, 8, 8)
    before, layers = model(x), dict(model.named_children())
    with pytest.raises(RuntimeError, match="expected 32 channels"):
        prune.slim(model, 0.5, x)
    assert dict(model.named_children()) == layers
    torch.testing.assert_close(model(x), before)
