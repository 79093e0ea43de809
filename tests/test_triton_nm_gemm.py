"""Triton GEMM on compressed N:M weights (sparsekit.kernels.nm_gemm) against the reference.

Small odd shapes in fp32 and fp16 run wherever the kernels run: under TRITON_INTERPRET=1 on
the CPU (tests/conftest.py sets it without a GPU), compiled on a GPU when one is visible.
Tests marked `cuda` need the GPU: bf16 tensor cores, LLM shapes, split-K, larger shapes.
"""

import pytest
import torch

pytest.importorskip("triton")

import sparsekit as sk  # noqa: E402
from sparsekit import reference  # noqa: E402
import sparsekit.kernels as K  # noqa: E402
from nm_inputs import random_nm, triton_device  # noqa: E402

PATTERNS = [(2, 4), (1, 2), (2, 8), (4, 8), (3, 7)]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# B = 1, 3 run the GEMV kernel (<= GEMV_MAX_BATCH rows), 17 the tl.dot kernel.
BATCHES = [1, 3, 17]
ROWS, K_DIM = 7, 45  # odd R; K a multiple of neither M nor any K-tile


def rel_err(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def nm_weight(rows, k, n, m, dtype, device=None):
    w = random_nm(rows, k, n, m, dtype)
    values, metadata = reference.nm_compress(w, n, m)
    return values.to(device or triton_device()), metadata.to(device or triton_device())


def randn(*shape, dtype=torch.float32, device=None):
    # Bounded away from zero: no accidental agreement on zeros.
    t = torch.rand(*shape, dtype=torch.float64) + 0.25
    return (t * torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0)).to(dtype).to(device or triton_device())


def check_all(x, values, metadata, bias, k, n, m, gy):
    """Forward, grad input and grad values of the launchers against the fp64 reference."""
    tol = TOL[x.dtype]
    v64 = values.double()
    y = K.nm_gemm_forward(x, values, metadata, bias, k, n, m)
    want = reference.nm_linear(x.double(), v64, metadata, None if bias is None else bias.double(),
                               k, n, m)
    assert y.dtype == x.dtype and y.shape == want.shape
    assert rel_err(y, want) < tol
    gx = K.nm_gemm_grad_input(gy, values, metadata, k, n, m)
    want_gx = reference.nm_linear_grad_input(gy.double(), v64, metadata, k, n, m)
    assert gx.dtype == x.dtype and gx.shape == want_gx.shape
    assert rel_err(gx, want_gx) < tol
    gv = K.nm_gemm_grad_values(gy, x, metadata, k, n, m)
    want_gv = reference.nm_sddmm(gy.double(), x.double(), metadata, k, n, m)
    assert gv.dtype == values.dtype and gv.shape == values.shape
    assert rel_err(gv, want_gv) < tol
    # Slots in K's padding (no dense column) get exactly 0.
    _, inside = reference.kept_columns(metadata.cpu(), k, n, m)
    assert torch.all(gv.cpu()[~inside] == 0)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,m", PATTERNS, ids=lambda v: str(v))
def test_forward_and_backward_match_reference(n, m, dtype, batch):
    values, metadata = nm_weight(ROWS, K_DIM, n, m, dtype)
    x, gy = randn(batch, K_DIM, dtype=dtype), randn(batch, ROWS, dtype=dtype)
    bias = randn(ROWS, dtype=dtype) if batch != 3 else None
    check_all(x, values, metadata, bias, K_DIM, n, m, gy)


@pytest.mark.parametrize("batch", [2, 70])
def test_several_tiles_in_every_dim(batch):
    # R, K and (for 70) the batch span more than one tile, so the K loop, row tiles and the
    # swizzled program order all run; K = 131 leaves a ragged last group and tile.
    values, metadata = nm_weight(67, 131, 2, 4, torch.float32)
    x, gy = randn(batch, 131), randn(batch, 67)
    check_all(x, values, metadata, randn(67), 131, 2, 4, gy)


@pytest.mark.parametrize("split", [2, 3])
def test_gemv_split_k_sums_partials(split):
    import sys

    k = 1100  # 550 slots of 2:4: two or three chunks of 256
    plan = sys.modules["sparsekit.kernels.nm_gemm"]._split_plan(torch.device("cpu"), 5, 550, split)
    assert plan == ((2, 512) if split == 2 else (3, 256))
    values, metadata = nm_weight(5, k, 2, 4, torch.float16)
    x, bias = randn(3, k, dtype=torch.float16), randn(5, dtype=torch.float16)
    y = K.nm_gemm_forward(x, values, metadata, bias, k, 2, 4, _split=split)
    want = reference.nm_linear(x.double(), values.double(), metadata, bias.double(), k, 2, 4)
    assert rel_err(y, want) < 1e-2


@pytest.mark.interpreter
def test_bf16_is_widened_under_the_interpreter():
    values, metadata = nm_weight(ROWS, K_DIM, 2, 4, torch.bfloat16)
    x, gy = randn(17, K_DIM, dtype=torch.bfloat16), randn(17, ROWS, dtype=torch.bfloat16)
    check_all(x, values, metadata, randn(ROWS, dtype=torch.bfloat16), K_DIM, 2, 4, gy)


@pytest.mark.parametrize("batch", [1, 20])
def test_autograd_entry_point_with_leading_dims(batch):
    n, m, k = 2, 8, 27
    values, metadata = nm_weight(9, k, n, m, torch.float32)
    x = randn(batch, 2, k).requires_grad_()
    v = values.clone().requires_grad_()
    b = randn(9).requires_grad_()
    y = K.nm_gemm(x, v, metadata, b, k, n, m)
    gy = randn(*y.shape)
    y.backward(gy)

    x64, v64, b64 = (t.detach().double().requires_grad_() for t in (x, values, b))
    want = reference.nm_linear(x64, v64, metadata, b64, k, n, m)
    want.backward(gy.double())
    assert y.shape == (batch, 2, 9)
    assert rel_err(y.detach(), want.detach()) < 1e-5
    for got, ref in ((x.grad, x64.grad), (v.grad, v64.grad), (b.grad, b64.grad)):
        assert got.shape == ref.shape and rel_err(got, ref) < 1e-5


def test_any_strides():
    # x, grad_out transposed views; values/metadata inside wider buffers or transposed;
    # a strided bias: the launchers read strides or make the inner dim contiguous.
    n, m, k, rows = 2, 4, 30, 9
    values, metadata = nm_weight(rows, k, n, m, torch.float32)
    wide = torch.zeros(rows, values.shape[1] + 5, device=values.device)
    wide[:, :values.shape[1]] = values
    values_view = wide[:, :values.shape[1]]
    metadata_t = metadata.t().contiguous().t()  # same values, stride (1, rows)
    x = randn(k, 5).t()
    gy = randn(rows, 5).t()
    bias = randn(2 * rows)[::2]
    check_all(x, values_view, metadata_t, bias, k, n, m, gy)
    check_all(randn(20, k)[::2], values.t().contiguous().t(), metadata, None, k, n, m,
              randn(10, rows))


def test_empty_batch_and_zero_width():
    values, metadata = nm_weight(4, 10, 2, 4, torch.float32)
    dev = triton_device()
    assert K.nm_gemm_forward(torch.empty(0, 10, device=dev), values, metadata, None, 10, 2,
                             4).shape == (0, 4)
    gv = K.nm_gemm_grad_values(torch.empty(0, 4, device=dev), torch.empty(0, 10, device=dev),
                               metadata, 10, 2, 4)
    assert gv.shape == values.shape and torch.all(gv == 0)
    v0, m0 = reference.nm_compress(torch.empty(4, 0, device=dev), 2, 4)
    bias = randn(4)
    assert torch.equal(K.nm_gemm_forward(torch.empty(3, 0, device=dev), v0, m0, bias, 0, 2, 4),
                       bias.expand(3, 4))


def test_autotuning_is_pinned_to_the_first_config_on_request(monkeypatch):
    import sys

    tiles = sys.modules["sparsekit.kernels._tiles"]
    kernel = tiles.Tuned.__new__(tiles.Tuned)
    kernel.first, kernel.tuned = {"grid": "first"}, {"grid": "tuned"}
    monkeypatch.setattr(tiles, "INTERPRET", False)
    monkeypatch.setenv("SPARSEKIT_TRITON_AUTOTUNE", "0")
    assert kernel["grid"] == "first"
    monkeypatch.delenv("SPARSEKIT_TRITON_AUTOTUNE")
    assert kernel["grid"] == "tuned"
    monkeypatch.setattr(tiles, "INTERPRET", True)
    assert kernel["grid"] == "first"


def test_supports():
    assert K.supports(torch.float16, 2, 4) and K.supports(torch.bfloat16, 3, 7)
    assert K.supports(torch.float32, 31, 32)
    assert not K.supports(torch.float64, 2, 4)
    assert not K.supports(torch.int32, 2, 4)
    assert not K.supports(torch.float16, 4, 2)
    assert not K.supports(torch.float16, 2, 64)
    assert not K.supports(torch.float16, 2.0, 4)
    assert not K.supports(torch.float16, 0, 4)
    assert not K.supports(torch.zeros(2, 2, dtype=torch.float16, device="meta"), 2, 4)


def test_bad_input_names_the_argument():
    values, metadata = nm_weight(4, 12, 2, 4, torch.float32)
    x = randn(3, 12)
    with pytest.raises(ValueError, match="metadata must have shape"):
        K.nm_gemm_forward(x, values, metadata[:, :-1], None, 12, 2, 4)
    with pytest.raises(TypeError, match="metadata must be"):
        K.nm_gemm_forward(x, values, metadata.to(torch.int32), None, 12, 2, 4)
    with pytest.raises(TypeError, match="values must have x's dtype"):
        K.nm_gemm_forward(x, values.half(), metadata, None, 12, 2, 4)
    with pytest.raises(ValueError, match=r"x must be \[batch, k=12\]"):
        K.nm_gemm_forward(randn(3, 13), values, metadata, None, 12, 2, 4)
    with pytest.raises(ValueError, match="x must be 2-D"):
        K.nm_gemm_forward(randn(12), values, metadata, None, 12, 2, 4)
    with pytest.raises(TypeError, match="x must be one of"):
        K.nm_gemm_forward(x.double(), values, metadata, None, 12, 2, 4)
    with pytest.raises(ValueError, match="n must satisfy"):
        K.nm_gemm_forward(x, values, metadata, None, 12, 4, 4)
    with pytest.raises(ValueError, match="m must be in"):
        K.nm_gemm_forward(x, values, metadata, None, 12, 2, 64)
    with pytest.raises(ValueError, match="values must have 6 columns"):
        K.nm_gemm_forward(x, values[:, :-1], metadata, None, 12, 2, 4)
    with pytest.raises(ValueError, match="bias must have 4 entries"):
        K.nm_gemm_forward(x, values, metadata, randn(5), 12, 2, 4)
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        K.nm_gemm_forward(x, values, metadata, None, -1, 2, 4)
    with pytest.raises(ValueError, match=r"grad_out must be \[batch, R=4\]"):
        K.nm_gemm_grad_input(randn(3, 5), values, metadata, 12, 2, 4)
    with pytest.raises(ValueError, match="same batch"):
        K.nm_gemm_grad_values(randn(2, 4), x, metadata, 12, 2, 4)
    with pytest.raises(ValueError, match="x must have k=12"):
        K.nm_gemm(randn(3, 11), values, metadata, None, 12, 2, 4)
    with pytest.raises(ValueError, match="must be on"):
        K.nm_gemm_forward(x, values.to("meta"), metadata, None, 12, 2, 4)


# -- on a GPU ------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 5, 16, 300])  # GEMV (1, 5), tl.dot (16, 300)
@pytest.mark.parametrize("n,m", PATTERNS + [(5, 32)], ids=lambda v: str(v))
def test_cuda_matches_reference(n, m, dtype, batch):
    values, metadata = nm_weight(257, 1001, n, m, dtype, "cuda")
    x, gy = randn(batch, 1001, dtype=dtype, device="cuda"), randn(batch, 257, dtype=dtype, device="cuda")
    check_all(x, values, metadata, randn(257, dtype=dtype, device="cuda"), 1001, n, m, gy)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (4096, 11008)])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_cuda_llm_shapes_fp16(shape, batch):
    rows, k = shape
    values, metadata = nm_weight(rows, k, 2, 4, torch.float16, "cuda")
    x = randn(batch, k, dtype=torch.float16, device="cuda")
    y = K.nm_gemm_forward(x, values, metadata, None, k, 2, 4)
    want = reference.nm_linear(x.double(), values.double(), metadata, None, k, 2, 4)
    assert rel_err(y, want) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("split", [2, 5])
def test_cuda_split_k(split):
    values, metadata = nm_weight(64, 8192, 2, 4, torch.float16, "cuda")
    x = randn(3, 8192, dtype=torch.float16, device="cuda")
    bias = randn(64, dtype=torch.float16, device="cuda")
    y = K.nm_gemm_forward(x, values, metadata, bias, 8192, 2, 4, _split=split)
    want = reference.nm_linear(x.double(), values.double(), metadata, bias.double(), 8192, 2, 4)
    assert rel_err(y, want) < 1e-2
    # The heuristic splits a short, wide weight on its own.
    auto = K.nm_gemm_forward(x, values, metadata, bias, 8192, 2, 4)
    assert rel_err(auto, want) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_autograd(dtype):
    values, metadata = nm_weight(96, 200, 2, 4, dtype, "cuda")
    x = randn(5, 7, 200, dtype=dtype, device="cuda").requires_grad_()
    v = values.clone().requires_grad_()
    y = K.nm_gemm(x, v, metadata, None, 200, 2, 4)
    gy = randn(*y.shape, dtype=dtype, device="cuda")
    y.backward(gy)
    x64, v64 = (t.detach().double().requires_grad_() for t in (x, values))
    reference.nm_linear(x64, v64, metadata, None, 200, 2, 4).backward(gy.double())
    assert rel_err(x.grad, x64.grad) < TOL[dtype]
    assert rel_err(v.grad, v64.grad) < TOL[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_sparse_linear_module_trains_like_reference(dtype):
    # SparseLinear's forward/backward on CUDA (whichever kernel the dispatcher picks) agrees
    # with the Triton entry point on the same weights.
    layer = sk.SparseLinear.from_dense(torch.nn.Linear(130, 66).to("cuda", dtype), "2:4")
    x = randn(12, 130, dtype=dtype, device="cuda")
    y = K.nm_gemm(x, layer.values, layer.metadata, layer.bias, 130, 2, 4)
    assert rel_err(y.detach(), layer(x).detach().double()) < TOL[dtype]


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("batch", [3, 40])
def test_cuda_every_autotuned_config_gives_the_same_result(batch, monkeypatch):
    # The other tests pin the first config; here the autotuner tries them all and keeps one.
    monkeypatch.setenv("SPARSEKIT_TRITON_AUTOTUNE", "1")
    values, metadata = nm_weight(300, 520, 2, 4, torch.float16, "cuda")
    x = randn(batch, 520, dtype=torch.float16, device="cuda")
    gy = randn(batch, 300, dtype=torch.float16, device="cuda")
    check_all(x, values, metadata, randn(300, dtype=torch.float16, device="cuda"), 520, 2, 4, gy)
