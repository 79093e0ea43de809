"""SparseLinear and whole-model sparsify / densify."""

import copy
import io

import pytest
import torch
from torch import nn

import sparsekit as sk


def masked_linear(linear, n=2, m=4, scores=None):
    w = linear.weight.detach()
    keep = sk.masks.nm(w, n, m, scores=scores)
    return torch.where(keep, w, torch.zeros(())), keep


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "3:7"])
@pytest.mark.parametrize("in_features,out_features", [(64, 32), (37, 5), (130, 1)])
def test_from_dense_equals_masked_dense(pattern, in_features, out_features):
    n, m = sk.parse_pattern(pattern)
    lin = nn.Linear(in_features, out_features)
    layer = sk.SparseLinear.from_dense(lin, pattern)
    w, _ = masked_linear(lin, n, m)
    x = torch.randn(7, 3, in_features)
    assert rel_err(layer(x), nn.functional.linear(x, w, lin.bias)) < 1e-5
    assert torch.equal(layer.dense_weight(), w)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, w)
    assert torch.equal(dense.bias, lin.bias)


def test_scores_and_explicit_mask():
    lin = nn.Linear(32, 8)
    scores = torch.rand(8, 32)
    layer = sk.SparseLinear.from_dense(lin, scores=scores)
    assert torch.equal(layer.dense_weight(), masked_linear(lin, scores=scores)[0])
    mask = sk.masks.nm(torch.randn(8, 32), 2, 4)
    layer = sk.SparseLinear.from_dense(lin, mask=mask)
    assert torch.equal(layer.dense_weight() != 0, mask & (lin.weight != 0))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        sk.SparseLinear.from_dense(lin, mask=torch.ones(8, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores or mask"):
        sk.SparseLinear.from_dense(lin, scores=scores, mask=mask)


def test_training_updates_kept_weights_only():
    torch.manual_seed(0)
    lin = nn.Linear(48, 16)
    layer = sk.SparseLinear.from_dense(lin)
    kept = layer.dense_weight() != 0
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x, target = torch.randn(32, 48), torch.randn(32, 16)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = layer.dense_weight()
    assert torch.all(after[~kept] == 0)  # pruned weights cannot come back
    assert layer.values.grad.shape == layer.values.shape  # gradients are N/M-sized


def test_gradients_equal_masked_dense_layer():
    lin = nn.Linear(40, 12)
    layer = sk.SparseLinear.from_dense(lin)
    w, keep = masked_linear(lin)
    w = w.clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    x1 = torch.randn(6, 40, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).square().sum().backward()
    nn.functional.linear(x2, w, b).square().sum().backward()
    assert rel_err(x1.grad, x2.grad) < 1e-5
    assert rel_err(layer.bias.grad, b.grad) < 1e-5
    dense_grad = sk.ops.nm_decompress(layer.values.grad, layer.metadata, 40, 2, 4)
    assert rel_err(dense_grad, w.grad * keep) < 1e-5


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear():
    # CPU autocast (bf16) stands in for CUDA's: the cast happens before the op either way.
    lin = nn.Linear(40, 12)
    layer = sk.SparseLinear.from_dense(lin)
    w, keep = masked_linear(lin)
    x = torch.randn(5, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_dense = nn.functional.linear(x, w, lin.bias.detach())
    assert y.dtype == y_dense.dtype == torch.bfloat16
    want = sk.ops.nm_linear(x.bfloat16(), layer.values.detach().bfloat16(), layer.metadata,
                            layer.bias.detach().bfloat16(), 40, 2, 4)
    assert torch.equal(y, want)  # the same op on the same bf16 inputs
    assert rel_err(y, y_dense) < 2e-2
    y.float().square().sum().backward()
    # Gradients reach the fp32 parameters in fp32, through the casts.
    assert layer.values.grad.dtype == torch.float32 and layer.bias.grad.dtype == torch.float32
    dense_grad = sk.ops.nm_decompress(layer.values.grad, layer.metadata, 40, 2, 4)
    expect = 2 * y.float().T @ x.bfloat16().float()
    assert rel_err(dense_grad, expect * keep) < 2e-2
    assert layer(x).dtype == torch.float32  # outside autocast: unchanged


def test_meta_tensors_pass_through_the_autocast_check():
    # Shape inference on the meta device (no autocast exists there) keeps working.
    layer = sk.SparseLinear.from_dense(nn.Linear(40, 12)).to("meta")
    y = layer(torch.empty(3, 40, device="meta"))
    assert y.shape == (3, 12) and y.device.type == "meta"


def test_autocast_under_torch_compile_fullgraph():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    sk.sparsify(model, "2:4")
    x = torch.randn(4, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_eager = compiled(x), model(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_eager)
    assert compiled(x).dtype == torch.float32


def test_state_dict_round_trip_and_checks():
    layer = sk.SparseLinear.from_dense(nn.Linear(36, 10))
    state = layer.state_dict()
    assert {"values", "metadata", "bias", "_extra_state"} <= set(state)
    fresh = sk.SparseLinear(36, 10)
    fresh.load_state_dict(state)
    x = torch.randn(3, 36)
    assert torch.equal(fresh(x), layer(x))
    with pytest.raises(ValueError, match="is for a 2:4 SparseLinear"):
        sk.SparseLinear(36, 10, pattern="4:8").load_state_dict(state)
    bad = dict(state, metadata=state["metadata"][:, :1])
    with pytest.raises(ValueError, match="metadata must be uint8 of shape"):
        sk.SparseLinear(36, 10).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="size mismatch for values"):
        sk.SparseLinear(40, 10).load_state_dict(dict(state, _extra_state={"pattern": "2:4", "in_features": 40}))


def test_save_load_deepcopy_and_dtype_moves(tmp_path):
    layer = sk.SparseLinear.from_dense(nn.Linear(64, 16))
    x = torch.randn(4, 64)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), layer(x))
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.values.mul_(2)
    assert not torch.equal(twin(x), layer(x))
    for cast in (torch.bfloat16, torch.float16):
        moved = copy.deepcopy(layer).to(cast)
        assert moved.values.dtype == cast and moved.metadata.dtype == torch.uint8
        assert rel_err(moved(x.to(cast)), layer(x)) < 2e-2
    assert copy.deepcopy(layer).half().values.dtype == torch.float16
    assert copy.deepcopy(layer).bfloat16().values.dtype == torch.bfloat16


def test_repr_and_bytes():
    layer = sk.SparseLinear.from_dense(nn.Linear(64, 16))
    assert "pattern=2:4" in repr(layer) and "of dense" in repr(layer)
    assert layer.weight_nbytes == layer.values.nbytes + layer.metadata.nbytes
    assert layer.weight_nbytes / layer.dense_weight_nbytes == pytest.approx(17 / 32)


def test_bad_arguments():
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        sk.SparseLinear.from_dense(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="pattern"):
        sk.SparseLinear.from_dense(nn.Linear(8, 8), pattern="4:2")
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        sk.SparseLinear(0, 4)


# -- sparsify / densify --------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.shared = shared

    def forward(self, x):
        return self.shared(self.fc2(torch.relu(self.fc1(x))))


def make_model():
    shared = nn.Linear(32, 32)
    return nn.Sequential(
        nn.ModuleList([Block(shared), Block(shared)]),
        nn.Linear(32, 3),  # too small for min_features=33 in one test
        nn.Conv2d(3, 4, 3),
        nn.Conv2d(4, 4, 3, groups=4),  # depthwise: not supported, skipped with the reason
    )


def run(model, x):
    for block in model[0]:
        x = block(x)
    return model[1](x)


def test_sparsify_replaces_nested_shared_once_and_reports():
    torch.manual_seed(0)
    model = make_model()
    expected_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(5, 32)
    masked = copy.deepcopy(model)
    for module in masked.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.copy_(masked_linear(module)[0])
    report = sk.sparsify(model, "2:4")
    assert isinstance(model[0][0].fc1, sk.SparseLinear)
    assert model[0][0].shared is model[0][1].shared  # still one shared module
    assert isinstance(model[0][0].shared, sk.SparseLinear)
    assert isinstance(model[2], sk.SparseConv2d) and "2" in report.converted
    assert "depthwise" in report.skipped["3"]
    assert report.params_before == expected_params and report.params_after < expected_params
    assert report.weight_bytes_after < 0.54 * report.weight_bytes_before
    assert rel_err(run(model, x), run(masked, x)) < 1e-5
    assert "layers converted" in str(report)
    sk.densify(model)
    assert isinstance(model[0][0].fc1, nn.Linear) and not isinstance(model[0][0].fc1, sk.SparseLinear)
    assert model[0][0].shared is model[0][1].shared
    assert type(model[2]) is nn.Conv2d and not hasattr(model[2], "linear")
    assert rel_err(run(model, x), run(masked, x)) < 1e-5


def test_sparsify_include_exclude_and_small():
    model = make_model()
    report = sk.sparsify(model, include=["0.*.fc*"], exclude=["0.1.*"])
    assert sorted(report.converted) == ["0.0.fc1", "0.0.fc2"]
    assert report.skipped["0.1.fc1"] == "excluded"
    assert report.skipped["1"] == "not included"
    model = make_model()
    report = sk.sparsify(model, min_features=33)
    assert "too small" in report.skipped["1"] and "too small" in report.skipped["2"]
    with pytest.raises(ValueError, match="scores names layers"):
        sk.sparsify(make_model(), scores={"nope": torch.rand(3, 3)})


def test_torch_compile_fullgraph_sparsified_mlp():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sk.sparsify(model)
    x = torch.randn(8, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert rel_err(out, model(x)) < 1e-6
    out.sum().backward()
    assert model[0].values.grad is not None and model[2].bias.grad is not None


# -- SparseConv2d -------------------------------------------------------------------------

def conv_mask(conv, n=2, m=4):
    """The N:M mask of a conv weight along (kh, kw, C_in)-flattened input channels."""
    w = conv.weight.detach()
    flat = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    keep = sk.masks.nm(flat, n, m).view(w.shape[0], w.shape[2], w.shape[3], w.shape[1])
    return keep.permute(0, 3, 1, 2)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=1), dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, dilation=2, padding="same"), dict(kernel_size=(3, 5), padding=(1, 2), bias=False),
    dict(kernel_size=2, stride=(2, 1), padding="valid"),
], ids=["1x1", "3x3s2", "same-dil2", "3x5-nobias", "2x2-valid"])
@pytest.mark.parametrize("in_channels", [8, 6])
def test_conv_equals_conv2d_on_masked_weight(kwargs, in_channels):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, 5, **kwargs)
    layer = sk.SparseConv2d.from_dense(conv)
    masked = torch.where(conv_mask(conv), conv.weight.detach(), torch.zeros(()))
    assert torch.equal(layer.dense_weight(), masked)
    x = torch.randn(2, in_channels, 11, 9)
    ref = nn.functional.conv2d(x, masked, conv.bias, conv.stride, conv.padding, conv.dilation)
    assert rel_err(layer(x), ref) < 1e-5
    assert rel_err(layer.to_dense()(x), ref) < 1e-6


def test_conv_groups_along_channels_at_one_position():
    conv = nn.Conv2d(8, 3, 3)
    layer = sk.SparseConv2d.from_dense(conv)
    kept = layer.dense_weight() != 0  # [out, C, kh, kw]
    per_group = kept.permute(0, 2, 3, 1).reshape(3, 3, 3, 2, 4).sum(-1)
    assert torch.all(per_group == 2)  # 2 of every 4 consecutive channels at each position


def test_conv_trains_and_rejects_unsupported():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    layer = sk.SparseConv2d.from_dense(conv)
    x = torch.randn(2, 4, 7, 7, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.values.grad is not None and x.grad is not None and layer.bias.grad is not None
    with pytest.raises(ValueError, match="groups=2"):
        sk.SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        sk.SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    with pytest.raises(ValueError, match="x must be"):
        layer(torch.randn(2, 5, 7, 7))


class ResidualBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_resnet_style_cnn_integration():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        ResidualBlock(16), nn.Conv2d(16, 32, 1, stride=2), ResidualBlock(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    masked = copy.deepcopy(model)
    for m in masked.modules():
        with torch.no_grad():
            if isinstance(m, nn.Conv2d) and m.in_channels * m.kernel_size[0] * m.kernel_size[1] >= 4:
                m.weight.mul_(conv_mask(m))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(masked_linear(m)[0])
    report = sk.sparsify(model)
    assert len(report.converted) == 7 and not report.skipped
    x = torch.randn(4, 3, 16, 16)
    assert rel_err(model(x), masked(x)) < 1e-5
    model.train()
    model(x).logsumexp(-1).sum().backward()  # trains through the sparse layers
    assert model[0].values.grad is not None


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph_sparsified_cnn(training):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          ResidualBlock(8), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8 * 36, 4))
    sk.sparsify(model)
    model.train(training)
    x = torch.randn(2, 3, 6, 6)
    # One kernel for both sides: under "auto" each side would take whichever kernel its
    # first call measured faster, and the train-mode BatchNorm magnifies the rounding
    # difference between two correct kernels past the tolerance.
    with sk.kernel_choice("sparse"):
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        reference = copy.deepcopy(model)
        out = compiled(x)
        assert rel_err(out, reference(x)) < 1e-5
        if training:
            out.square().sum().backward()
            reference(x).square().sum().backward()
            assert rel_err(model[0].values.grad, reference[0].values.grad) < 1e-5


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_train_and_eval():
    # The default backend (inductor) generates and compiles C++ for the rest of the graph;
    # sparsekit's ops stay opaque custom ops inside it.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sk.sparsify(model)
    x = torch.randn(8, 64)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert rel_err(out, model(x)) < 1e-6
    out.sum().backward()
    assert model[0].values.grad is not None
    model.eval()
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-6
