"""The implicit-GEMM N:M convolution (ops.nm_conv2d, SparseConv2d) against the masked
dense convolution in fp64, on every CPU ISA variant this machine runs, odd shapes, both
memory formats and every dtype the kernel claims."""

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import ops, reference

from cpu_isa import COMPILED_ISAS as ISAS, rel_err, run_on_isa  # noqa: E402
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (batch, C_in, out, (kh, kw), stride, padding, dilation, (H, W))
CASES = [
    (2, 3, 5, (3, 3), (1, 1), (1, 1), (1, 1), (9, 9)),       # C_in not a multiple of M
    (1, 6, 7, (7, 7), (2, 2), (3, 3), (1, 1), (17, 15)),     # 7x7 stride 2, C_in % 4 = 2
    (3, 8, 9, (1, 1), (1, 1), (0, 0), (1, 1), (6, 5)),       # 1x1
    (2, 16, 12, (3, 3), (1, 1), (2, 2), (2, 2), (11, 13)),   # dilation 2
    (1, 12, 33, (3, 3), (2, 2), (1, 1), (1, 1), (14, 14)),   # stride 2
    (2, 4, 6, (3, 2), (2, 1), (0, 1), (1, 2), (10, 9)),      # mixed stride/padding/dilation
    (0, 8, 4, (3, 3), (1, 1), (1, 1), (1, 1), (5, 5)),       # batch 0
    (2, 64, 20, (3, 3), (1, 1), (1, 1), (1, 1), (30, 31)),   # many tiles, channel blocks
    (5, 32, 16, (3, 3), (1, 1), (1, 1), (1, 1), (3, 4)),     # images smaller than a tile
    (1, 20, 3, (5, 5), (3, 3), (0, 0), (1, 1), (12, 16)),    # stride 3: 9 phases
    (1, 128, 520, (3, 3), (1, 1), (1, 1), (1, 1), (5, 6)),   # lanes forms: K in 2 blocks
    (2, 1, 5, (3, 3), (1, 1), (1, 1), (1, 1), (8, 7)),       # 1 channel: groups over 2 rows
    (1, 5, 4, (2, 3), (1, 2), (0, 1), (2, 1), (7, 8)),       # 5 channels, dilated rows
    (1, 2, 6, (3, 3), (1, 1), (2, 2), (2, 2), (9, 9)),       # 2 channels, dilation 2
    (1, 1, 6, (3, 3), (1, 1), (2, 2), (2, 2), (9, 9)),       # groups over 4 runs: planes
]


@pytest.fixture(params=ISAS)
def isa(request):
    yield from run_on_isa(request.param)


def conv_operands(batch, c, out, kernel, hw, n=2, m=4, dtype=torch.float32):
    kh, kw = kernel
    w = torch.randn(out, kh * kw * c, dtype=torch.float64).to(dtype)
    t = sk.compress(w, n, m, prune=True)
    x = torch.randn(batch, c, *hw, dtype=torch.float64).to(dtype)
    bias = torch.randn(out, dtype=torch.float64).to(dtype)
    return t, x, bias


def masked_dense(t, c, kernel):
    """The conv weight [out, C_in, kh, kw] that the compressed one stands for."""
    kh, kw = kernel
    dense = t.to_dense().double()
    return dense.view(dense.shape[0], kh, kw, c).permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}c{c[1]}o{c[2]}k{c[3][0]}{c[3][1]}s{c[4][0]}d{c[6][0]}")
def test_conv_matches_masked_dense_conv(isa, case, channels_last, dtype):
    batch, c, out, kernel, stride, padding, dilation, hw = case
    t, x, bias = conv_operands(batch, c, out, kernel, hw, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = ops.nm_conv2d(x, t.values, t.metadata, bias, c, *kernel, stride, padding, dilation, 2, 4)
    ref = nn.functional.conv2d(x.double(), masked_dense(t, c, kernel), bias.double(), stride,
                               padding, dilation)
    assert y.dtype == dtype and y.shape == ref.shape
    # Channels-last in, channels-last out (reference.conv2d_output_format); else NCHW.
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last and x.shape[1] > 1
                           and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous()
                           else torch.contiguous_format)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (3, 7), (1, 2), (2, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_any_nm_pattern(isa, n, m, dtype):
    # The general kernel: any N:M, C_in a multiple of M (channel blocks) or not.
    for c in (m * 3, m + 1):
        t, x, bias = conv_operands(2, c, 7, (3, 3), (9, 10), n, m, dtype)
        y = ops.nm_conv2d(x, t.values, t.metadata, bias, c, 3, 3, (1, 2), (1, 0), (1, 1), n, m)
        ref = nn.functional.conv2d(x.double(), masked_dense(t, c, (3, 3)), bias.double(), (1, 2),
                                   (1, 0), (1, 1))
        assert rel_err(y, ref) < TOL[dtype]


def test_conv_without_bias_and_reference_agree(isa):
    t, x, _ = conv_operands(2, 8, 5, (3, 3), (7, 6))
    y = ops.nm_conv2d(x, t.values, t.metadata, None, 8, 3, 3, (1, 1), (1, 1), (1, 1), 2, 4)
    ref = reference.nm_conv2d(x.double(), t.values.double(), t.metadata, None, 8, 3, 3, (1, 1),
                              (1, 1), (1, 1), 2, 4)
    assert rel_err(y, ref) < TOL[torch.float32]


def test_conv_fp64_runs_exactly_through_dense_fallback():
    t, x, bias = conv_operands(2, 5, 4, (3, 3), (6, 7), dtype=torch.float64)
    y = ops.nm_conv2d(x, t.values, t.metadata, bias, 5, 3, 3, (2, 1), (1, 1), (1, 2), 2, 4)
    ref = nn.functional.conv2d(x, masked_dense(t, 5, (3, 3)), bias, (2, 1), (1, 1), (1, 2))
    assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)


def test_conv_gradcheck_fp64():
    t, x, bias = conv_operands(2, 5, 3, (3, 2), (6, 5), dtype=torch.float64)
    x.requires_grad_()
    values = t.values.clone().requires_grad_()
    bias.requires_grad_()

    def f(x, values, bias):
        return ops.nm_conv2d(x, values, t.metadata, bias, 5, 3, 2, (2, 1), (1, 0), (1, 2), 2, 4)

    assert torch.autograd.gradcheck(f, (x, values, bias))
    assert torch.autograd.gradgradcheck(f, (x, values, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernel_gradients_equal_reference_gradients(isa, dtype):
    t, x, bias = conv_operands(2, 8, 6, (3, 3), (9, 8), dtype=dtype)
    gy = torch.randn(2, 6, 5, 8, dtype=torch.float64)
    grads = []
    for fn, cast in ((ops.nm_conv2d, dtype), (reference.nm_conv2d, torch.float64)):
        xi = x.detach().to(cast).requires_grad_()
        vi = t.values.detach().to(cast).requires_grad_()
        bi = bias.detach().to(cast).requires_grad_()
        y = fn(xi, vi, t.metadata, bi, 8, 3, 3, (2, 1), (1, 1), (1, 1), 2, 4)
        y.backward(gy.to(cast))
        grads.append((xi.grad, vi.grad, bi.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < TOL[dtype]


def test_conv_batch_zero_backward():
    t, x, bias = conv_operands(0, 8, 4, (3, 3), (5, 5))
    x.requires_grad_()
    values = t.values.clone().requires_grad_()
    y = ops.nm_conv2d(x, values, t.metadata, bias, 8, 3, 3, (1, 1), (1, 1), (1, 1), 2, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape and values.grad.abs().sum() == 0


def test_conv_torch_compile_fullgraph_forward_and_backward():
    t, x, bias = conv_operands(2, 8, 6, (3, 3), (7, 7))
    values = t.values.clone().requires_grad_()

    def loss(x, values):
        return ops.nm_conv2d(x, values, t.metadata, bias, 8, 3, 3, (1, 1), (1, 1), (1, 1), 2,
                             4).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v2 = values.detach().clone().requires_grad_()
    compiled(x1, values).backward()
    loss(x2, v2).backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(values.grad, v2.grad, rtol=1e-5, atol=1e-4)


def test_sparse_conv2d_module_under_torch_compile():
    layer = sk.SparseConv2d.from_dense(nn.Conv2d(8, 6, 3, padding="same", dilation=2))
    x = torch.randn(2, 8, 9, 7)
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.allclose(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def _opcheck_samples():
    for dtype in (torch.float32, torch.bfloat16):
        t, x, bias = conv_operands(2, 8, 5, (3, 3), (6, 7), dtype=dtype)
        yield (x, t.values, t.metadata, bias, 8, 3, 3, [2, 1], [1, 1], [1, 2], 2, 4)
        yield (x.contiguous(memory_format=torch.channels_last), t.values, t.metadata, None, 8, 3,
               3, [1, 1], [0, 0], [1, 1], 2, 4)
    t, x, bias = conv_operands(2, 8, 5, (3, 3), (6, 7))
    yield (x.requires_grad_(), t.values.clone().requires_grad_(), t.metadata,
           bias.requires_grad_(), 8, 3, 3, [1, 1], [1, 1], [1, 1], 2, 4)


@pytest.mark.parametrize("args", list(_opcheck_samples()))
def test_conv_opcheck(args):
    torch.library.opcheck(torch.ops.sparsekit.nm_conv2d.default, args)


def test_conv_bad_input_is_named():
    t, x, bias = conv_operands(1, 8, 5, (3, 3), (6, 7))
    call = torch.ops.sparsekit.nm_conv2d
    with pytest.raises(ValueError, match="x must be"):
        call(x[:, :4], t.values, t.metadata, bias, 8, 3, 3, [1, 1], [0, 0], [1, 1], 2, 4)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        call(x, t.values, t.metadata, bias, 8, 3, 3, [0, 1], [0, 0], [1, 1], 2, 4)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        call(x, t.values, t.metadata, bias, 8, 3, 3, [1, 1], [-1, 0], [1, 1], 2, 4)
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        call(x, t.values, t.metadata, bias, 8, 3, 3, [1, 1], [0, 0], [4, 1], 2, 4)
    with pytest.raises(TypeError, match="dtype of the weight values"):
        call(x.double(), t.values, t.metadata, bias, 8, 3, 3, [1, 1], [0, 0], [1, 1], 2, 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        call(x, t.values, t.metadata, bias[:2], 8, 3, 3, [1, 1], [0, 0], [1, 1], 2, 4)
    with pytest.raises(ValueError, match="values"):
        call(x, t.values, t.metadata, bias, 8, 3, 2, [1, 1], [0, 0], [1, 1], 2, 4)


# -- SparseConv2d on the kernel ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding="same"),
    dict(kernel_size=4, padding="same", dilation=1),   # even kernel: asymmetric 'same'
    dict(kernel_size=(2, 3), padding="same", dilation=2),
    dict(kernel_size=7, stride=2, padding=3),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=1),
])
def test_sparse_conv2d_equals_masked_conv(kwargs, channels_last, dtype):
    conv = nn.Conv2d(6, 5, **kwargs)
    layer = sk.SparseConv2d.from_dense(conv).to(dtype)
    x = torch.randn(2, 6, 11, 10, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = layer(x.to(dtype))
    ref = nn.functional.conv2d(x, layer.dense_weight().double(), conv.bias.double(), conv.stride,
                               conv.padding, conv.dilation)
    assert y.shape == ref.shape and rel_err(y, ref) < TOL[dtype]


def test_sparse_conv2d_trains_through_the_kernel():
    layer = sk.SparseConv2d.from_dense(nn.Conv2d(8, 6, 3, padding=1))
    dense = layer.to_dense()
    x = torch.randn(3, 8, 7, 6)
    layer(x).square().sum().backward()
    dense(x).square().sum().backward()
    flat = dense.weight.grad.permute(0, 2, 3, 1).reshape(6, -1)  # the (kh, kw, C_in) order
    cols, inside = reference.kept_columns(layer.metadata, layer.reduction, 2, 4)
    assert torch.allclose(layer.values.grad, torch.gather(flat, 1, cols) * inside, rtol=1e-4,
                          atol=1e-5)
    assert torch.allclose(layer.bias.grad, dense.bias.grad, rtol=1e-4, atol=1e-5)
