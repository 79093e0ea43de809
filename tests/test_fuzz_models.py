"""Fuzzing whole-model surgery: random module trees (nested, shared, tied, subclassed,
MultiheadAttention, TransformerEncoderLayer, modules that read a child's weight) through
sparsify / densify, and random CNNs (shared convs and BatchNorms, residuals, constant-shape
views) through slim. Each must either convert with outputs equal to the masked dense model,
or leave the layer untouched with a reason; an error leaves the whole model untouched.
Bounded (few examples, derandomized); hypothesis prints the failing example."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekit as sk
from sparsekit import prune

D = 16  # feature width of every sparsify tree: [B, S, D] in, [B, S, D] out
FUZZ = settings(max_examples=30, deadline=None, derandomize=True, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Doubled(nn.Linear):  # a subclass with its own forward: must be skipped
    def forward(self, x):
        return 2 * super().forward(x)


class Marked(nn.Linear):  # a subclass without one: converts
    pass


class ReadsWeight(nn.Module):  # an owner that reads its child's weight directly
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, x):
        return torch.tanh(x @ self.proj.weight.t())


class SelfAttention(nn.Module):
    def __init__(self, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


class ConvBlock(nn.Module):  # [B, S, D] as a [B, D, S, 1] image through a Conv2d
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


class AbsConv(nn.Conv2d):  # a Conv2d subclass computing something else: must be skipped
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight.abs(), bias)


class Chain(nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@st.composite
def module_trees(draw, depth=0):
    """A Chain of random layers; `pool` collects every Linear built, for sharing and tying."""
    pool = draw(st.shared(st.builds(list), key="pool"))
    kinds = ["linear", "marked", "doubled", "reads", "mha", "tel", "relu", "shared", "tied",
             "conv", "absconv"]
    if depth < 2:
        kinds.append("nested")
    layers = []
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=4)):
        if kind in ("shared", "tied") and not pool:
            kind = "linear"
        if kind == "linear":
            layer = nn.Linear(D, D, bias=draw(st.booleans()))
        elif kind == "marked":
            layer = Marked(D, D)
        elif kind == "doubled":
            layer = Doubled(D, D)
        elif kind == "reads":
            layer = ReadsWeight()
        elif kind == "mha":
            layer = SelfAttention(draw(st.sampled_from([1, 2, 4])))
        elif kind == "tel":
            layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0, batch_first=True,
                                               norm_first=draw(st.booleans()))
        elif kind == "relu":
            layer = nn.ReLU()
        elif kind in ("conv", "absconv"):
            kind_cls = nn.Conv2d if kind == "conv" else AbsConv
            layer = ConvBlock(kind_cls(D, D, (draw(st.sampled_from([1, 3])), 1), padding="same",
                                       bias=draw(st.booleans())))
        elif kind == "shared":
            layer = pool[draw(st.integers(0, len(pool) - 1))]
        elif kind == "tied":
            other = pool[draw(st.integers(0, len(pool) - 1))]
            layer = nn.Linear(D, D, bias=other.bias is not None)
            layer.weight = other.weight
            if other.bias is not None and draw(st.booleans()):
                layer.bias = other.bias  # fully tied: one shared sparse module can serve both
        else:
            layer = draw(module_trees(depth + 1))
        if isinstance(layer, nn.Linear) and layer not in pool:
            pool.append(layer)
        layers.append(layer)
    return Chain(layers)


def masked_dense(model, converted):
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name in converted:  # a shared or tied weight is masked again: nm is idempotent
            weight = ref.get_submodule(name).weight
            if weight.dim() == 4:  # conv: N:M over input channels at each kernel position
                flat = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
                keep = sk.masks.nm(flat, 2, 4).view(weight.shape[0], weight.shape[2],
                                                    weight.shape[3], weight.shape[1])
                weight.mul_(keep.permute(0, 3, 1, 2))
            else:
                weight.mul_(sk.masks.nm(weight, 2, 4))
    return ref


def linear_names(model):
    return {n for n, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, (nn.Linear, nn.Conv2d))}


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@FUZZ
@given(tree=module_trees(), poison=st.one_of(st.none(), st.integers(0, 50)),
       train=st.booleans())
def test_fuzz_sparsify_converts_exactly_or_leaves_alone(tree, poison, train):
    torch.manual_seed(0)
    model = tree.train(train)
    x = torch.randn(2, 5, D)
    names = sorted(linear_names(model))
    if poison is not None and names:  # NaN in one weight: an error, and nothing changed
        target = names[poison % len(names)]
        with torch.no_grad():
            model.get_submodule(target).weight[0, 0] = float("nan")
        before = state(model)
        structure = [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)]
        try:
            report = sk.sparsify(model)
        except ValueError as e:
            assert "NaN" in str(e) and "layer '" in str(e)
            assert [(n, type(m)) for n, m in model.named_modules(remove_duplicate=False)] == structure
            after = state(model)
            assert after.keys() == before.keys()
            assert all(torch.equal(after[k].nan_to_num(), before[k].nan_to_num()) for k in after)
        else:  # only if the poisoned layer was not to be converted anyway
            assert target in report.skipped
        return
    original = copy.deepcopy(model)
    report = sk.sparsify(model)
    # every Linear is accounted for: converted, or skipped with a reason
    assert set(report.converted) | set(report.skipped) == set(names)
    assert not set(report.converted) & set(report.skipped)
    for name, why in report.skipped.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, (nn.Linear, nn.Conv2d)) and why
        assert torch.equal(layer.weight, original.get_submodule(name).weight)  # untouched
    for name in report.converted:
        assert isinstance(model.get_submodule(name), (sk.SparseLinear, sk.SparseConv2d))
    # tied weights stay tied: the layers that shared one weight now share one module
    by_weight = {}
    for name in report.converted:
        by_weight.setdefault(id(original.get_submodule(name).weight), set()).add(
            id(model.get_submodule(name)))
    assert all(len(mods) == 1 for mods in by_weight.values())
    ref = masked_dense(original, report.converted)
    with torch.no_grad():
        want = ref(x)
        got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    sk.densify(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-5)


# -- slim ----------------------------------------------------------------------------------

C = 8


class FuzzCNN(nn.Module):
    """Runs `ops` (a static list, so torch.fx unrolls it) over convs / BNs held by index."""

    def __init__(self, ops, n_conv, n_bn, head):
        super().__init__()
        self.ops, self.head_kind = ops, head
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(C, C, 3, padding=1) for _ in range(n_conv)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(C) for _ in range(n_bn)])
        self.spatial = 8 // (2 if any(op[0] == "pool" for op in ops) else 1)
        self.fc = nn.Linear(C * self.spatial ** 2 if head != "gap" else C, 5)

    def forward(self, x):
        x = self.stem(x)
        for op in self.ops:
            kind = op[0]
            if kind == "cbr":
                x = torch.relu(self.bns[op[2]](self.convs[op[1]](x)))
            elif kind == "res":
                x = x + torch.relu(self.bns[op[2]](self.convs[op[1]](x)))
            elif kind == "two":  # one conv on two branches, multiplied
                x = self.convs[op[1]](x) * torch.relu(self.bns[op[2]](self.convs[op[1]](x)))
            elif kind == "pool":
                x = nn.functional.max_pool2d(x, 2)
        if self.head_kind == "flatten":
            x = torch.flatten(x, 1)
        elif self.head_kind == "view_const":
            x = x.view(-1, C * self.spatial ** 2)
        elif self.head_kind == "view_size":
            x = x.view(x.size(0), -1)
        else:
            x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


@st.composite
def cnns(draw):
    n_conv, n_bn = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    ops, pooled = [], False
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["cbr", "cbr", "res", "two", "pool"]))
        if kind == "pool":
            if pooled:
                continue
            pooled = True
            ops.append(("pool",))
        else:  # indices may repeat: shared convs and BatchNorms
            ops.append((kind, draw(st.integers(0, n_conv - 1)), draw(st.integers(0, n_bn - 1))))
    head = draw(st.sampled_from(["flatten", "view_const", "view_size", "gap"]))
    return FuzzCNN(ops, n_conv, n_bn, head)


@FUZZ
@given(model=cnns(), seed=st.integers(0, 2 ** 16))
def test_fuzz_slim_is_consistent_or_leaves_alone(model, seed):
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # half the channels of every BN masked: gamma = beta = 0
        for bn in model.bns:
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 1.5, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            zero = torch.randperm(C, generator=gen)[: C // 2]
            bn.weight[zero] = 0
            bn.bias[zero] = 0
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        want = model(x)  # the masked model: removing its zero channels must not change it
    report = prune.slim(model, 0.5, x)
    used = {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
            and any(f"bns.{i}" == n for op in model.ops if op[0] != "pool" for i in [op[2]])}
    assert used <= set(report.kept) | set(report.left_alone)
    for name, (kept, total) in report.kept.items():
        assert model.get_submodule(name).num_features == kept and kept >= total // 2
    for name in report.left_alone:
        assert model.get_submodule(name).num_features == C  # untouched
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


# -- whole torch and real models -------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_sparsify_nn_transformer_equals_masked_dense(batch_first):
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=batch_first).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    sparse = copy.deepcopy(model)
    report = sk.sparsify(sparse)
    assert report.converted and all("out_proj" in name for name in report.skipped)
    ref = masked_dense(model, report.converted)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(sparse(src, tgt), ref(src, tgt), rtol=1e-4, atol=1e-5)
