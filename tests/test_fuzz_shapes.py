"""Fuzz: random shapes through SparseLinear and SparseConv2d, forward and backward.

Shapes include an empty batch, K not a multiple of M (a last group with fewer than N real
columns too), and unbatched conv input; dtypes fp32, bf16 and fp64. Every result is compared
with the masked dense layer computed in fp64 (tolerances of DESIGN.md: ~1e-5 for fp32,
~1e-2 relative norm for bf16). Bounded: a few dozen examples per test, each printed by
hypothesis when it fails.
"""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekit as sk

PATTERNS = ["2:4", "1:4", "3:8", "2:3", "4:8", "1:2"]
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    if ref.numel() == 0:
        assert got.numel() == 0
        return 0.0
    return ((got - ref).norm() / ref.norm().clamp(min=1e-30)).item()


@FUZZ
@given(pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(DTYPES),
       in_features=st.integers(1, 70), out_features=st.integers(1, 12),
       batch=st.lists(st.integers(0, 13), min_size=1, max_size=3),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_linear_matches_masked_dense(pattern, dtype, in_features, out_features, batch,
                                            bias, seed):
    torch.manual_seed(seed)
    layer = sk.SparseLinear.from_dense(nn.Linear(in_features, out_features, bias), pattern).to(dtype)
    w = layer.dense_weight().double().requires_grad_()
    b = layer.bias.detach().double().requires_grad_() if bias else None
    x = torch.randn(*batch, in_features, dtype=dtype, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch, out_features) and y.dtype == dtype
    x64 = x.detach().double().requires_grad_()
    ref = nn.functional.linear(x64, w, b)
    assert rel_err(y, ref) <= TOL[dtype]
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype).double()  # one gy for both
    y.backward(gy.to(dtype))
    ref.backward(gy)
    assert rel_err(x.grad, x64.grad) <= TOL[dtype]
    from sparsekit.reference import kept_columns
    cols, inside = kept_columns(layer.metadata, in_features, layer.n, layer.m)
    grad_values = torch.gather(w.grad, 1, cols) * inside
    assert rel_err(layer.values.grad, grad_values) <= TOL[dtype]
    if bias:
        assert rel_err(layer.bias.grad, b.grad) <= TOL[dtype]


CONV = st.fixed_dictionaries({
    "in_channels": st.integers(1, 9), "out_channels": st.integers(1, 5),
    "kernel_size": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "padding": st.one_of(st.tuples(st.integers(0, 2), st.integers(0, 2)), st.just("same")),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
})


@FUZZ
@given(geometry=CONV, pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(DTYPES),
       batch=st.one_of(st.integers(0, 3), st.none()), height=st.integers(5, 9),
       width=st.integers(5, 9), seed=st.integers(0, 2**16))
def test_sparse_conv_matches_masked_dense(geometry, pattern, dtype, batch, height, width, seed):
    torch.manual_seed(seed)
    if geometry["padding"] == "same":
        geometry = dict(geometry, stride=(1, 1))
    conv = nn.Conv2d(**geometry)
    layer = sk.SparseConv2d.from_dense(conv, pattern).to(dtype)
    dense = layer.to_dense().double()
    shape = (geometry["in_channels"], height, width)
    x = torch.randn(shape if batch is None else (batch, *shape), dtype=dtype, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().requires_grad_()
    ref = dense(x64)
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel_err(y, ref) <= TOL[dtype]
    gy = torch.randn(y.shape, dtype=torch.float64).to(dtype).double()  # one gy for both
    y.backward(gy.to(dtype))
    ref.backward(gy)
    assert rel_err(x.grad, x64.grad) <= TOL[dtype]
    assert layer.values.grad is not None and torch.isfinite(layer.values.grad).all()
    # The values' gradient is the dense weight's gradient at the kept positions.
    kh, kw = layer.kernel_size
    flat = dense.weight.grad.permute(0, 2, 3, 1).reshape(layer.out_channels, -1)
    from sparsekit.reference import kept_columns
    cols, inside = kept_columns(layer.metadata, layer.reduction, layer.linear.n, layer.linear.m)
    assert rel_err(layer.values.grad, torch.gather(flat, 1, cols) * inside) <= TOL[dtype]


@FUZZ
@given(pattern=st.sampled_from(PATTERNS), dtype=st.sampled_from(DTYPES), k=st.integers(0, 20),
       rows=st.integers(0, 6), batch=st.integers(0, 14), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_ops_with_empty_dims_match_the_reference(pattern, dtype, k, rows, batch, bias, seed):
    # k = 0 and 0 rows are not reachable through the modules (their sizes are >= 1) but
    # are through the ops: what the reference returns (the bias, or zeros), never an error.
    from nm_inputs import random_nm
    from sparsekit import ops, reference

    n, m = sk.parse_pattern(pattern)
    gen = torch.Generator().manual_seed(seed)
    values, metadata = ops.nm_compress(random_nm(rows, k, n, m, dtype, generator=gen), n, m)
    values.requires_grad_()
    b = torch.randn(rows, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(batch, k, dtype=dtype, requires_grad=True)
    y = ops.nm_linear(x, values, metadata, b, k, n, m)
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    ref = reference.nm_linear(x64, v64, metadata, b64, k, n, m)
    assert y.shape == ref.shape == (batch, rows)
    assert rel_err(y, ref) <= TOL[dtype]
    gy = torch.randn(batch, rows, dtype=torch.float64).to(dtype).double()
    y.backward(gy.to(dtype))
    gx_ref = reference.nm_linear_grad_input(gy, v64, metadata, k, n, m)
    gv_ref = reference.nm_sddmm(gy, x64.detach(), metadata, k, n, m)
    assert rel_err(x.grad, gx_ref) <= TOL[dtype]
    assert rel_err(values.grad, gv_ref) <= TOL[dtype]
    if bias:
        assert rel_err(b.grad, gy.sum(0)) <= TOL[dtype]
