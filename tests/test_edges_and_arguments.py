"""Edge shapes (ragged last groups, k = 0, 0 rows, batch 0, unbatched input), argument
checks (SparseConv2d geometry, schedules, dtypes, devices) and numerics of masks (select,
never multiply)."""

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import ops, prune, reference
from sparsekit.prune import masking


def masked_dense(layer):
    """The dense weight the layer computes with, for an fp64 reference."""
    return layer.dense_weight().double()


# -- edge shapes ------------------------------------------------------------------------

@pytest.mark.parametrize("in_features,pattern", [(1, "2:4"), (5, "2:4"), (33, "2:4"),
                                                 (10, "3:8"), (2, "3:8"), (9, "4:8")])
def test_fp64_backward_with_a_last_group_shorter_than_n(in_features, pattern):
    torch.manual_seed(0)
    layer = sk.SparseLinear.from_dense(nn.Linear(in_features, 6).double(), pattern)
    x = torch.randn(3, in_features, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    w = masked_dense(layer).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    nn.functional.linear(x_ref, w, layer.bias.detach()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    cols, inside = reference.kept_columns(layer.metadata, in_features, layer.n, layer.m)
    torch.testing.assert_close(layer.values.grad, torch.gather(w.grad, 1, cols) * inside)
    values = layer.values.detach().clone().requires_grad_()
    x2 = torch.randn(2, in_features, dtype=torch.float64, requires_grad=True)

    def f(x_, v_):
        return ops.nm_linear(x_, v_, layer.metadata, None, in_features, layer.n, layer.m)

    assert torch.autograd.gradcheck(f, (x2, values))
    assert torch.autograd.gradgradcheck(f, (x2, values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("batch", [1, 3, 20, 40, 70])  # 40, 70: the batch forwards
@pytest.mark.parametrize("k,rows", [(0, 3), (4, 0), (0, 0)])
def test_ops_with_k_zero_or_no_rows_match_the_reference(dtype, batch, k, rows):
    n, m = 2, 4
    groups = -(-k // m)
    values = torch.randn(rows, groups * n, dtype=dtype)
    metadata = reference.nm_compress(torch.zeros(rows, k, dtype=dtype), n, m)[1]
    x = torch.randn(batch, k, dtype=dtype)
    gy = torch.randn(batch, rows, dtype=dtype)
    bias = torch.randn(rows, dtype=dtype)
    for b in (bias, None):
        got = ops.nm_linear(x, values, metadata, b, k, n, m)
        assert torch.equal(got, reference.nm_linear(x, values, metadata, b, k, n, m))
        if b is not None:
            assert torch.equal(got, bias.expand(batch, rows))
    assert torch.equal(ops.nm_linear_grad_input(gy, values, metadata, k, n, m),
                       torch.zeros(batch, k, dtype=dtype))
    assert torch.equal(ops.nm_sddmm(gy, x, metadata, k, n, m),
                       torch.zeros(rows, groups * n, dtype=dtype))


@pytest.mark.parametrize("kernel_size,kwargs", [(1, {}), (3, {"padding": 1}), (3, {"stride": 2}),
                                                ((3, 1), {"padding": "same"})])
def test_sparse_conv_batch_zero_and_unbatched_like_conv2d(kernel_size, kwargs):
    conv = nn.Conv2d(8, 4, kernel_size, **kwargs)
    layer = sk.SparseConv2d.from_dense(conv)
    dense = layer.to_dense()
    empty = torch.randn(0, 8, 7, 6, requires_grad=True)
    out = layer(empty)
    assert out.shape == dense(empty).shape
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    assert torch.equal(layer.values.grad, torch.zeros_like(layer.values))
    x = torch.randn(8, 7, 6)
    y = layer(x)
    assert y.shape == dense(x).shape
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, layer(x.unsqueeze(0))[0])
    with pytest.raises(ValueError, match=r"x must be \[batch, 8, H, W\] or unbatched"):
        layer(torch.randn(3, 7, 6))


# -- arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=-1), "kernel_size must be >= 1"),
    (dict(kernel_size=(3, 0)), "kernel_size must be >= 1"),
    (dict(kernel_size=3, stride=0), "stride must be >= 1"),
    (dict(kernel_size=3, stride=(1, -2)), "stride must be >= 1"),
    (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
    (dict(kernel_size=3, padding=-1), "padding must be >= 0"),
    (dict(kernel_size=3, padding=(0, -1)), "padding must be >= 0"),
    (dict(kernel_size=3, stride=True), "stride must be an int or a pair of ints"),
])
def test_sparse_conv_rejects_bad_geometry(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sk.SparseConv2d(8, 4, **kwargs)


@pytest.mark.parametrize("name,args", [("in_channels", (-1, 4)), ("in_channels", (0, 4)),
                                       ("out_channels", (8, 0)), ("in_channels", (2.0, 4))])
def test_sparse_conv_names_its_own_arguments(name, args):
    with pytest.raises(ValueError, match=f"^{name} must be a positive int"):
        sk.SparseConv2d(*args, kernel_size=3)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool,
                                   torch.complex64])
@pytest.mark.parametrize("make", [lambda d: sk.SparseLinear(8, 4, dtype=d),
                                  lambda d: sk.SparseConv2d(8, 4, 3, dtype=d)],
                         ids=["linear", "conv"])
def test_non_float_dtype_is_a_type_error_naming_dtype(make, dtype):
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        make(dtype)


@pytest.mark.parametrize("bad", [
    lambda: prune.exponential(1.0, 0.5), lambda: prune.linear(0.6, 0.2),
    lambda: prune.cubic(0.9, 0.0), lambda: prune.exponential(0.5, 0.2, every=0),
    lambda: prune.Schedule(0.0, 0.5, 0, 4, 0, "linear"),
    lambda: prune.Schedule(0.8, 0.5, 0, 4, 1, "exponential"),
    lambda: prune.Schedule(0.0, 0.5, 0, 4, 1, "sine"),
])
def test_schedules_that_divide_by_zero_or_go_backwards_are_refused(bad):
    with pytest.raises(ValueError, match="final must be >= initial|every must be|kind must be"):
        bad()


def test_exponential_schedule_edges_stay_finite():
    for s in (prune.exponential(1.0, 1.0), prune.exponential(0.5, 1.0),
              prune.exponential(0.0, 0.0, steps=0)):
        values = [s(t) for t in range(-1, 15)]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert values == sorted(values)


def _op_calls(metadata, values, mask, weight):
    x = torch.randn(2, 8)
    return [
        lambda: ops.nm_linear(x, values, metadata, None, 8, 2, 4),
        lambda: ops.nm_decompress(values, metadata, 8, 2, 4),
        lambda: ops.nm_linear_grad_input(torch.randn(2, 3), values, metadata, 8, 2, 4),
        lambda: ops.nm_sddmm(torch.randn(2, 3), x, metadata, 8, 2, 4),
        lambda: torch.ops.sparsekit.masked_linear(x, weight, mask, None),
        lambda: torch.ops.sparsekit.masked_linear_grad_input(torch.randn(2, 3), weight, mask),
        lambda: torch.ops.sparsekit.masked_linear_grad_weight(torch.randn(2, 3), x, mask),
    ]


@pytest.mark.parametrize("which", range(7))
def test_cpu_tensors_with_meta_metadata_raise(which):
    # The Meta key wins the dispatch; it used to return uninitialized CPU memory.
    metadata = torch.empty(3, 1, dtype=torch.uint8, device="meta")
    call = _op_calls(metadata, torch.randn(3, 4), metadata, torch.randn(3, 8))[which]
    with pytest.raises(ValueError, match="must be on the device of"):
        call()


def test_all_meta_arguments_still_give_shapes():
    meta = torch.device("meta")
    y = ops.nm_linear(torch.empty(2, 8, device=meta), torch.empty(3, 4, device=meta),
                      torch.empty(3, 1, dtype=torch.uint8, device=meta), None, 8, 2, 4)
    assert y.shape == (2, 3) and y.device == meta


# -- numerics -------------------------------------------------------------------------------

@pytest.mark.parametrize("bad_value", [float("inf"), float("-inf"), float("nan")])
def test_masked_forward_selects_zero_at_pruned_positions(bad_value):
    lin = nn.Linear(8, 3)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[0, 2] = mask[2, 7] = False
    with torch.no_grad():
        lin.weight[0, 2] = bad_value
        lin.weight[2, 7] = bad_value
    clean = torch.where(mask, lin.weight.detach(), 0)
    masking.attach_mask(lin, "weight", mask)
    x = torch.randn(4, 8, requires_grad=True)
    y = lin(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, nn.functional.linear(x, clean, lin.bias))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(lin.parametrizations.weight.original.grad[~mask], torch.zeros(2))
    masking.remove_mask(lin)
    assert torch.equal(lin.weight.detach(), clean)
