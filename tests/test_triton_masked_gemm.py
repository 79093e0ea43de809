"""Fused masked GEMM (sparsekit.kernels.masked_gemm), the masked_linear ops, and the CUDA path
of sparsekit.prune's masks.

Small odd shapes in fp32 and fp16 run wherever the kernels run: under TRITON_INTERPRET=1 on
the CPU (tests/conftest.py sets it without a GPU), compiled on a GPU when one is visible.
The ops' reference, fake impls and autograd run on the CPU. Tests marked `cuda` check the
registered op on CUDA tensors, torch.compile, every dtype and the prune module path.
"""

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import sparsekit as sk  # noqa: E402
from sparsekit import ops, prune, reference  # noqa: E402
import sparsekit.kernels as K  # noqa: E402
from nm_inputs import triton_device  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ROWS, K_DIM = 7, 45  # odd R; K a multiple of neither 8 (a mask byte), M nor a K-tile
MODES = ["bits", (2, 4), (1, 2), (4, 8), (3, 7)]


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def randn(*shape, dtype=torch.float32, device=None):
    t = torch.rand(*shape, dtype=torch.float64) + 0.25  # never 0: no agreement on zeros
    return (t * torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0)).to(dtype).to(device or triton_device())


def make_mask(mode, rows, k, device=None):
    """(bool keep [rows, k], mask argument, n, m) for packed bits or N:M metadata."""
    device = device or triton_device()
    if mode == "bits":
        keep = torch.rand(rows, k) < 0.5
        return keep.to(device), K.pack_mask_bits(keep).to(device), 0, 0
    n, m = mode
    keep = reference.nm_mask(torch.rand(rows, k, dtype=torch.float64), n, m)
    metadata = reference.nm_compress(keep.to(torch.float32), n, m)[1]
    return keep.to(device), metadata.to(device), n, m


def check_all(x, w, keep, mask, bias, n, m, gy):
    tol = TOL[x.dtype]
    w64 = torch.where(keep, w.double(), 0.0)
    y = K.masked_gemm_forward(x, w, mask, bias, n, m)
    want = nn.functional.linear(x.double(), w64, None if bias is None else bias.double())
    assert y.dtype == x.dtype and y.shape == want.shape
    assert rel_err(y, want) < tol
    gx = K.masked_gemm_grad_input(gy, w, mask, n, m)
    assert gx.shape == x.shape and rel_err(gx, gy.double() @ w64) < tol
    gw = K.masked_gemm_grad_weight(gy, x, mask, n, m)
    want_gw = torch.where(keep, gy.double().t() @ x.double(), 0.0)
    assert gw.shape == w.shape and gw.dtype == w.dtype
    assert rel_err(gw, want_gw) < tol
    assert torch.all(gw[~keep] == 0)  # pruned weights: exactly zero gradient
    assert torch.all(gw[keep] != 0)   # kept ones: the random data make none vanish


@pytest.mark.parametrize("batch", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_forward_and_backward_match_reference(mode, dtype, batch):
    keep, mask, n, m = make_mask(mode, ROWS, K_DIM)
    w, x, gy = (randn(ROWS, K_DIM, dtype=dtype), randn(batch, K_DIM, dtype=dtype),
                randn(batch, ROWS, dtype=dtype))
    bias = randn(ROWS, dtype=dtype) if batch != 3 else None
    check_all(x, w, keep, mask, bias, n, m, gy)


@pytest.mark.parametrize("mode", ["bits", (2, 4)], ids=str)
def test_several_tiles_in_every_dim(mode):
    keep, mask, n, m = make_mask(mode, 67, 131)
    check_all(randn(70, 131), randn(67, 131), keep, mask, randn(67), n, m, randn(70, 67))


@pytest.mark.parametrize("mode", ["bits", (2, 4)], ids=str)
def test_any_strides(mode):
    keep, mask, n, m = make_mask(mode, 9, 30)
    check_all(randn(30, 5).t(), randn(30, 9).t(), keep, mask.t().contiguous().t(),
              randn(18)[::2], n, m, randn(9, 5).t())


@pytest.mark.interpreter
def test_bf16_is_widened_under_the_interpreter():
    keep, mask, n, m = make_mask("bits", ROWS, K_DIM)
    bf = torch.bfloat16
    check_all(randn(17, K_DIM, dtype=bf), randn(ROWS, K_DIM, dtype=bf), keep, mask,
              randn(ROWS, dtype=bf), n, m, randn(17, ROWS, dtype=bf))


def test_pruned_inf_and_nan_weights_never_reach_the_output():
    keep, mask, _, _ = make_mask("bits", ROWS, K_DIM)
    w = randn(ROWS, K_DIM)
    w[~keep] = float("nan")
    w[~keep & (torch.arange(K_DIM, device=keep.device) % 2 == 0)] = float("inf")
    x = randn(5, K_DIM)
    y = K.masked_gemm_forward(x, w, mask)
    assert torch.isfinite(y).all()
    assert rel_err(y, x.double() @ torch.where(keep, w.double(), 0.0).t()) < 1e-5


@pytest.mark.parametrize("mode", ["bits", (2, 8)], ids=str)
def test_autograd_entry_point_with_leading_dims(mode):
    keep, mask, n, m = make_mask(mode, 9, 27)
    x = randn(4, 5, 27).requires_grad_()
    w = randn(9, 27).requires_grad_()
    b = randn(9).requires_grad_()
    y = K.masked_gemm(x, w, mask, b, n, m)
    gy = randn(*y.shape)
    y.backward(gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    nn.functional.linear(x64, w64 * keep, b64).backward(gy.double())
    assert y.shape == (4, 5, 9)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < 1e-5
    assert torch.all(w.grad[~keep] == 0)


def test_pack_mask_bits_layout_and_round_trip():
    keep = torch.rand(5, 21) < 0.5
    bits = K.pack_mask_bits(keep)
    assert bits.dtype == torch.uint8 and bits.shape == (5, 3)
    # Column c at bit c % 8 of byte c // 8: the generic little-endian packer agrees.
    assert torch.equal(bits, reference.pack_bits(keep.to(torch.int64), 1))
    assert torch.all(bits[:, -1] >> 5 == 0)  # 21 = 2*8 + 5: the last byte's high bits are 0
    assert torch.equal(K.unpack_mask_bits(bits, 21), keep)
    one = torch.zeros(1, 10, dtype=torch.bool)
    one[0, 9] = True
    assert K.pack_mask_bits(one).tolist() == [[0, 2]]


def test_reference_dense_mask_of_nm_metadata():
    w = torch.randn(6, 19)
    t = sk.compress(w, 3, 7, prune=True)
    keep = reference.dense_mask(t.metadata, 6, 19, 3, 7)
    assert torch.equal(keep, sk.masks.nm(w, 3, 7))


def test_bad_input_names_the_argument():
    keep, bits, _, _ = make_mask("bits", 4, 12)
    x, w = randn(3, 12), randn(4, 12)
    with pytest.raises(TypeError, match="pack_mask_bits"):
        K.masked_gemm_forward(x, w, keep)
    with pytest.raises(ValueError, match=r"mask must be packed bits of shape \(4, 2\)"):
        K.masked_gemm_forward(x, w, bits[:, :1])
    with pytest.raises(ValueError, match=r"mask \(N:M metadata\) must have shape"):
        K.masked_gemm_forward(x, w, bits, None, 1, 2)  # 1:2 metadata is [4, 1]
    with pytest.raises(TypeError, match="weight must be one of float32"):
        K.masked_gemm_forward(x, w.half(), bits)
    with pytest.raises(ValueError, match=r"x must be \[batch, K=12\]"):
        K.masked_gemm_forward(randn(3, 11), w, bits)
    with pytest.raises(ValueError, match="m must be in"):
        K.masked_gemm_forward(x, w, bits, None, 2, 0)
    with pytest.raises(TypeError, match="n and m must be ints"):
        K.masked_gemm_forward(x, w, bits, None, 2.0, 4)
    with pytest.raises(ValueError, match="bias must have 4 entries"):
        K.masked_gemm_forward(x, w, bits, randn(3))
    with pytest.raises(ValueError, match=r"grad_out must be \[batch, R=4\]"):
        K.masked_gemm_grad_input(randn(3, 5), w, bits)
    with pytest.raises(ValueError, match="same batch"):
        K.masked_gemm_grad_weight(randn(2, 4), x, bits)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        K.pack_mask_bits(bits)
    with pytest.raises(ValueError, match="mask must be 2-D"):
        K.pack_mask_bits(torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be"):
        K.unpack_mask_bits(bits, 20)


# -- the registered ops (reference on the CPU) ---------------------------------------------

def _op_samples():
    for mode in ("bits", (2, 4), (3, 7)):
        keep, mask, n, m = make_mask(mode, 5, 13, "cpu")
        x, w, gy = torch.randn(3, 13), torch.randn(5, 13), torch.randn(3, 5)
        yield "masked_linear", (x, w, mask, torch.randn(5), n, m)
        yield "masked_linear", (x.view(3, 1, 13), w, mask, None, n, m)
        yield "masked_linear_grad_input", (gy, w, mask, n, m)
        yield "masked_linear_grad_weight", (gy, x, mask, n, m)


@pytest.mark.parametrize("name,args", list(_op_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, args)


@pytest.mark.parametrize("mode", ["bits", (2, 4)], ids=str)
def test_ops_gradcheck_and_double_backward(mode):
    keep, mask, n, m = make_mask(mode, 4, 11, "cpu")
    x = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return ops.masked_linear(x, w, mask, b, n, m)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    ops.masked_linear(x, w, mask, b, n, m).sum().backward()
    assert torch.all(w.grad[~keep] == 0)


def test_explain_and_torch_compile_on_cpu():
    keep, bits, _, _ = make_mask("bits", 6, 20, "cpu")
    x, w = torch.randn(4, 20, requires_grad=True), torch.randn(6, 20, requires_grad=True)
    assert "plain-torch reference" in sk.explain("masked_linear", x, w, bits, None)
    assert "fake" in sk.explain("masked_linear", x.to("meta"), w.to("meta"), bits.to("meta"), None)

    def step(x, w):
        return ops.masked_linear(x, w, bits, None).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x, w)
    loss.backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    step(x2, w2).backward()
    assert torch.allclose(x.grad, x2.grad) and torch.allclose(w.grad, w2.grad)
    assert torch.all(w.grad[~keep] == 0)


# -- sparsekit.prune's masks: CPU behaviour unchanged, packed bits cached -------------------

def test_masked_linear_module_on_cpu_is_unchanged():
    torch.manual_seed(0)
    layer = nn.Linear(20, 6)
    keep = torch.rand(6, 20) < 0.5
    keys = sorted(layer.state_dict())
    prune.attach_mask(layer, mask=keep)
    x = torch.randn(3, 20)
    w = layer.parametrizations.weight.original
    assert torch.equal(layer(x), nn.functional.linear(x, w * keep, layer.bias))
    assert sorted(k for k in layer.state_dict() if "mask" not in k) == sorted(
        ["bias", "parametrizations.weight.original"])
    prune.remove_mask(layer)
    assert "forward" not in layer.__dict__ and type(layer) is nn.Linear
    assert sorted(layer.state_dict()) == keys
    assert torch.equal(layer(x), nn.functional.linear(x, w.detach() * keep, layer.bias))


def test_packed_bits_are_cached_and_follow_mask_changes():
    layer = nn.Linear(20, 6)
    prune.attach_mask(layer, mask=torch.rand(6, 20) < 0.5)
    holder = layer.parametrizations.weight[0]
    first = holder.packed_bits()
    assert holder.packed_bits() is first  # no repack while the mask is unchanged
    assert torch.equal(first, K.pack_mask_bits(prune.get_mask(layer)))
    new = torch.rand(6, 20) < 0.5
    prune.attach_mask(layer, mask=new)  # in-place copy into the live buffer
    assert torch.equal(holder.packed_bits(), K.pack_mask_bits(new))
    prune.get_mask(layer)[0, :] = False  # any in-place edit
    assert torch.equal(K.unpack_mask_bits(holder.packed_bits(), 20), prune.get_mask(layer))
    assert "_packed" not in str(layer.state_dict().keys())


def test_masked_module_compiles_fullgraph_on_cpu():
    layer = nn.Linear(20, 6)
    prune.attach_mask(layer, mask=torch.rand(6, 20) < 0.5)
    x = torch.randn(4, 20)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).sum().backward()
    grad = layer.parametrizations.weight.original.grad.clone()
    layer.zero_grad()
    layer(x).sum().backward()
    assert torch.equal(grad, layer.parametrizations.weight.original.grad)
    assert torch.all(grad[~prune.get_mask(layer)] == 0)


def test_kernels_reachable_from_the_package():
    import sparsekit

    assert sparsekit.kernels.masked_gemm is K.masked_gemm
    assert sparsekit.kernels.nm_gemm is K.nm_gemm


def test_subclassed_linear_keeps_its_own_forward():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer = Scaled(8, 3)
    prune.attach_mask(layer, mask=torch.rand(3, 8) < 0.5)
    assert "forward" not in layer.__dict__
    x = torch.randn(2, 8)
    assert torch.equal(layer(x), 2 * nn.functional.linear(x, layer.weight, layer.bias))


# -- on a GPU ------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 16, 300])
@pytest.mark.parametrize("mode", MODES, ids=str)
def test_cuda_kernels_match_reference(mode, dtype, batch):
    keep, mask, n, m = make_mask(mode, 257, 1001, "cuda")
    check_all(randn(batch, 1001, dtype=dtype, device="cuda"),
              randn(257, 1001, dtype=dtype, device="cuda"), keep, mask,
              randn(257, dtype=dtype, device="cuda"), n, m,
              randn(batch, 257, dtype=dtype, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["bits", (2, 4)], ids=str)
def test_cuda_registered_op_runs_triton(mode, dtype):
    keep, mask, n, m = make_mask(mode, 130, 200, "cuda")
    x = randn(2, 9, 200, dtype=dtype, device="cuda").requires_grad_()
    w = randn(130, 200, dtype=dtype, device="cuda").requires_grad_()
    b = randn(130, dtype=dtype, device="cuda").requires_grad_()
    assert "Triton kernel" in sk.explain("masked_linear", x, w, mask, b, n, m)
    y = ops.masked_linear(x, w, mask, b, n, m)
    gy = randn(*y.shape, dtype=dtype, device="cuda")
    y.backward(gy)
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, w, b))
    nn.functional.linear(x64, w64 * keep, b64).backward(gy.double())
    assert rel_err(y.detach(), nn.functional.linear(x64, w64 * keep, b64).detach()) < TOL[dtype]
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert rel_err(got, want) < TOL[dtype]
    assert torch.all(w.grad[~keep] == 0)
    # A dtype Triton does not cover falls back to the reference.
    assert "reference" in sk.explain("masked_linear", x.double(), w.double(), mask, None, n, m)
    assert ops.masked_linear(x.double(), w.double(), mask, None, n, m).dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_torch_compile_fullgraph(dtype):
    keep, bits, _, _ = make_mask("bits", 128, 256, "cuda")
    x = randn(64, 256, dtype=dtype, device="cuda")
    w = randn(128, 256, dtype=dtype, device="cuda").requires_grad_()

    def step(x, w):
        return ops.masked_linear(x, w, bits, None).float().square().mean()

    loss = torch.compile(step, fullgraph=True)(x, w)
    loss.backward()
    w2 = w.detach().clone().requires_grad_()
    step(x, w2).backward()
    assert rel_err(w.grad, w2.grad.double()) < TOL[dtype]
    assert torch.all(w.grad[~keep] == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_masked_module_takes_the_fused_path(dtype, monkeypatch):
    layer = nn.Linear(200, 70).to("cuda", dtype)
    keep = torch.rand(70, 200, device="cuda") < 0.5
    prune.attach_mask(layer, mask=keep)
    calls = []
    real = ops.masked_linear
    monkeypatch.setattr(ops, "masked_linear", lambda *a: calls.append(1) or real(*a))
    x = randn(33, 200, dtype=dtype, device="cuda")
    y = layer(x)
    y.float().sum().backward()
    assert calls, "the CUDA forward of a masked Linear did not run masked_linear"
    w = layer.parametrizations.weight.original
    want = nn.functional.linear(x.double(), w.detach().double() * keep, layer.bias.detach().double())
    assert rel_err(y.detach(), want) < TOL[dtype]
    assert torch.all(w.grad[~keep] == 0)
    holder = layer.parametrizations.weight[0]
    assert holder.packed_bits() is holder.packed_bits()


@pytest.mark.cuda
def test_cuda_masked_module_under_autocast_computes_in_fp16():
    layer = nn.Linear(64, 32).cuda()
    keep = torch.rand(32, 64, device="cuda") < 0.5
    prune.attach_mask(layer, mask=keep)
    x = randn(8, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        y = layer(x)
    assert y.dtype == torch.float16
    y.float().sum().backward()
    w = layer.parametrizations.weight.original
    assert w.grad.dtype == torch.float32 and torch.all(w.grad[~keep] == 0)
    want = nn.functional.linear(x.double(), w.detach().double() * keep, layer.bias.detach().double())
    assert rel_err(y.detach(), want) < 1e-2


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_autotuned_configs_give_the_same_result(monkeypatch):
    monkeypatch.setenv("SPARSEKIT_TRITON_AUTOTUNE", "1")
    keep, bits, n, m = make_mask("bits", 300, 520, "cuda")
    dt = torch.float16
    check_all(randn(200, 520, dtype=dt, device="cuda"), randn(300, 520, dtype=dt, device="cuda"),
              keep, bits, None, n, m, randn(200, 300, dtype=dt, device="cuda"))
