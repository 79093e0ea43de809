"""The bitmask format (unstructured sparsity): compress / decompress, the CPU products
bitmask_linear, bitmask_linear_grad_input and bitmask_sddmm against the fp64 reference on
every ISA variant this machine runs, autograd, opcheck, torch.compile, bad input, and
SparseLinear(pattern="unstructured")."""

import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekit as sk
from sparsekit import ops, reference
from sparsekit.bitmask import BitmaskTensor, compress_bitmask

from cpu_isa import rel_err, run_on_isa  # noqa: E402

ISAS = [isa for isa in ("avx512bf16", "avx512", "scalar") if isa in sk.build_info().get("cpu_isa_compiled", [])]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}


@pytest.fixture(params=ISAS)
def isa(request):
    def bitmask_variant():
        if sk.build_info()["cpu_bitmask_isa_active"] != request.param:
            return f"the bitmask kernels have no {request.param} variant on this CPU"
        return None

    yield from run_on_isa(request.param, bitmask_variant)


def sparse_weight(rows, k, sparsity, dtype=torch.float32, special=True):
    """Random weight at `sparsity`, with (when big enough) an empty row, an empty column and
    a fully dense row."""
    w = torch.randn(rows, k, dtype=torch.float64)
    w = torch.where(torch.rand(rows, k) < sparsity, torch.zeros(()), w)
    if special and rows >= 3 and k >= 2:
        w[0] = 0                                          # empty row
        w[:, 1] = 0                                       # empty column
        w[2] = torch.randn(k, dtype=torch.float64)       # fully dense row
        w[2, 1] = 0.5
    return w.to(dtype)


def operands(batch, k, rows, sparsity, dtype):
    t = compress_bitmask(sparse_weight(rows, k, sparsity, dtype))
    x = torch.randn(*batch, k, dtype=torch.float64).to(dtype)
    gy = torch.randn(*batch, rows, dtype=torch.float64).to(dtype)
    bias = torch.randn(rows, dtype=torch.float64).to(dtype)
    return t, x, gy, bias


# (batch shape, K, rows): batch 0, small batches 1..8 (row-major kernel), larger ones
# (batch in lanes, tile remainders), K not a multiple of 16.
SHAPES = [((1,), 64, 16), ((5,), 37, 9), ((3, 4), 100, 7), ((8,), 130, 3), ((9,), 16, 5),
          ((16,), 130, 1), ((17,), 36, 5), ((300,), 130, 33), ((0,), 24, 6), ((2, 0, 3), 8, 4),
          ((2,), 1, 3), ((130,), 45, 4)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("batch,k,rows", SHAPES)
def test_products_match_fp64_reference(isa, dtype, sparsity, batch, k, rows):
    t, x, gy, bias = operands(batch, k, rows, sparsity, dtype)
    v64 = t.values.double()
    y = ops.bitmask_linear(x, t.values, t.mask, t.offsets, bias, k)
    assert y.dtype == dtype and y.shape == (*batch, rows)
    ref = reference.bitmask_linear(x.double(), v64, t.mask, t.offsets, bias.double(), k)
    assert rel_err(y, ref) < TOL[dtype]
    y0 = ops.bitmask_linear(x, t.values, t.mask, t.offsets, None, k)
    assert rel_err(y0, reference.bitmask_linear(x.double(), v64, t.mask, t.offsets, None, k)) < TOL[dtype]
    gx = ops.bitmask_linear_grad_input(gy, t.values, t.mask, t.offsets, k)
    assert gx.shape == x.shape and gx.dtype == dtype
    ref = reference.bitmask_linear_grad_input(gy.double(), v64, t.mask, t.offsets, k)
    assert rel_err(gx, ref) < TOL[dtype]
    gv = ops.bitmask_sddmm(gy, x, t.mask, t.offsets, k)
    assert gv.shape == t.values.shape and gv.dtype == dtype
    ref = reference.bitmask_sddmm(gy.double(), x.double(), t.mask, t.offsets, k)
    assert rel_err(gv, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 8, 64])
def test_long_rows(isa, dtype, batch):
    t, x, gy, bias = operands((batch,), 4099, 37, 0.9, dtype)
    y = ops.bitmask_linear(x, t.values, t.mask, t.offsets, bias, 4099)
    ref = reference.bitmask_linear(x.double(), t.values.double(), t.mask, t.offsets, bias.double(), 4099)
    assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.44, 0.46, 0.7])
@pytest.mark.parametrize("k", [1, 15, 17, 63, 64, 65, 100, 129, 200])
def test_small_batch_kernels_every_block_remainder(isa, dtype, density, k):
    """The row-major kernels (batch 1-8): 64-column blocks up to 45% kept (with one, two
    and more passes per block, and a fully dense row), 16-column chunks above, K ending
    inside a block and a chunk. The block kernels gather x at kept columns only, so inf in
    pruned columns of x must not reach y there (the chunk kernels and the dense path
    multiply every column, and give NaN as F.linear on the dense weight does)."""
    torch.manual_seed(k)
    rows = 11
    w = sparse_weight(rows, k, 1 - density, dtype)
    w[:, ::64] = 0  # the column a block's unused lanes point at: inf in x below
    t = compress_bitmask(w)
    dense = ops.bitmask_decompress(t.values, t.mask, t.offsets, k)
    pruned_column = (dense == 0).all(0)
    for batch in range(1, 9):
        x = torch.randn(batch, k, dtype=torch.float64)
        if density < 0.45:
            x[:, pruned_column] = float("inf")
        x = x.to(dtype)
        y = ops.bitmask_linear(x, t.values, t.mask, t.offsets, None, k)
        xr = x.double().masked_fill(pruned_column, 0.0)
        ref = reference.bitmask_linear(xr, t.values.double(), t.mask, t.offsets, None, k)
        assert torch.isfinite(y).all()
        assert rel_err(y, ref) < TOL[dtype]


def test_non_contiguous_inputs(isa):
    t, x, gy, bias = operands((6,), 40, 9, 0.7, torch.float32)
    xt = torch.randn(40, 6).t()
    y = ops.bitmask_linear(xt, t.values, t.mask, t.offsets, bias, 40)
    assert rel_err(y, reference.bitmask_linear(xt.double(), t.values.double(), t.mask, t.offsets,
                                               bias.double(), 40)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("rows,k", [(1, 1), (7, 16), (5, 33), (40, 129), (3, 0), (0, 5)])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.999, 1.0])
def test_compress_matches_reference_and_round_trips(dtype, rows, k, sparsity):
    w = sparse_weight(rows, k, sparsity, dtype, special=False)
    values, mask, offsets = ops.bitmask_compress(w)
    rv, rm, ro = reference.bitmask_compress(w)
    assert torch.equal(values, rv) and torch.equal(mask, rm) and torch.equal(offsets, ro)
    assert values.dtype == dtype and mask.dtype == torch.int16 and offsets.dtype == torch.int64
    assert torch.equal(ops.bitmask_decompress(values, mask, offsets, k), w)
    assert torch.equal(reference.bitmask_decompress(values, mask, offsets, k), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,k", [(1, 1), (7, 16), (5, 33), (40, 129), (3, 0), (0, 5), (9, 64)])
def test_decompress_into_every_remainder(isa, dtype, rows, k):
    """bitmask_decompress_into (the dense path's scratch fill): 32 columns per step for
    16-bit entries, 16 for 32-bit, portable for 64-bit; K ending inside a step."""
    w = sparse_weight(rows, k, 0.6, dtype)
    t = compress_bitmask(w)
    out = torch.full((rows, k), 7.0, dtype=dtype)  # stale values must all be overwritten
    assert ops.bitmask_decompress_into(t.values, t.mask, t.offsets, k, out) is out
    assert torch.equal(out, w)
    assert torch.equal(ops.bitmask_decompress(t.values, t.mask, t.offsets, k), w)


def test_decompress_into_checks_out_and_triple():
    t = compress_bitmask(sparse_weight(6, 40, 0.7))
    with pytest.raises(ValueError, match=r"out must have shape \[6, 40\]"):
        ops.bitmask_decompress_into(t.values, t.mask, t.offsets, 40, torch.empty(6, 41))
    with pytest.raises(TypeError, match="out must have the values' dtype"):
        ops.bitmask_decompress_into(t.values, t.mask, t.offsets, 40, torch.empty(6, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        ops.bitmask_decompress_into(t.values, t.mask, t.offsets, 40, torch.empty(40, 6).t())
    bad = t.mask.clone()
    bad[3, 0] ^= 1 << 4
    with pytest.raises(ValueError, match="mask and offsets disagree at row 3"):
        ops.bitmask_decompress_into(t.values, bad, t.offsets, 40, torch.empty(6, 40))


def test_negative_zero_is_pruned_and_format_is_canonical():
    w = torch.tensor([[0.0, -0.0, 2.0, 0.0] * 5])
    t = compress_bitmask(w)
    assert t.nnz == 5 and torch.equal(t.values, torch.full((5,), 2.0))
    assert torch.equal(compress_bitmask(t.to_dense()).mask, t.mask)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 12), k=st.integers(0, 70), sparsity=st.floats(0, 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_property_round_trip(rows, k, sparsity, dtype, seed):
    torch.manual_seed(seed)
    w = sparse_weight(rows, k, sparsity, dtype, special=False)
    t = compress_bitmask(w)
    assert torch.equal(t.to_dense(), w)
    again = compress_bitmask(t.to_dense())
    assert torch.equal(again.values, t.values) and torch.equal(again.mask, t.mask)
    assert torch.equal(again.offsets, t.offsets)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(0, 20), k=st.integers(1, 90), rows=st.integers(1, 20),
       sparsity=st.floats(0, 1), seed=st.integers(0, 2**31 - 1))
def test_property_products_equal_reference(batch, k, rows, sparsity, seed):
    torch.manual_seed(seed)
    t, x, gy, bias = operands((batch,), k, rows, sparsity, torch.float32)
    y = ops.bitmask_linear(x, t.values, t.mask, t.offsets, bias, k)
    ref = reference.bitmask_linear(x.double(), t.values.double(), t.mask, t.offsets, bias.double(), k)
    assert rel_err(y, ref) < 1e-5


def test_gradcheck():
    t, x, gy, bias = operands((3,), 21, 5, 0.6, torch.float64)
    values = t.values.clone().requires_grad_()
    args = (x.requires_grad_(), values, t.mask, t.offsets, bias.requires_grad_(), 21)
    assert torch.autograd.gradcheck(lambda x, v, b: ops.bitmask_linear(x, v, t.mask, t.offsets, b, 21),
                                    (args[0], values, args[4]))
    assert torch.autograd.gradgradcheck(lambda x, v: ops.bitmask_linear(x, v, t.mask, t.offsets, None, 21),
                                        (args[0], values))


def test_fp32_kernel_gradients_match_reference(isa):
    t, x, gy, bias = operands((12,), 50, 7, 0.8, torch.float32)
    v = t.values.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    ops.bitmask_linear(xr, v, t.mask, t.offsets, bias, 50).backward(gy)
    v64 = t.values.double().requires_grad_()
    x64 = x.double().requires_grad_()
    reference.bitmask_linear(x64, v64, t.mask, t.offsets, bias.double(), 50).backward(gy.double())
    assert rel_err(xr.grad, x64.grad) < 1e-5 and rel_err(v.grad, v64.grad) < 1e-5


def _opcheck_samples():
    for dtype in (torch.float32, torch.bfloat16):
        for batch in (3, 20):
            t, x, gy, bias = operands((batch,), 40, 6, 0.7, dtype)
            yield "bitmask_linear", (x, t.values, t.mask, t.offsets, bias, 40)
            yield "bitmask_linear", (x, t.values, t.mask, t.offsets, None, 40)
            yield "bitmask_linear_grad_input", (gy, t.values, t.mask, t.offsets, 40)
            yield "bitmask_sddmm", (gy, x, t.mask, t.offsets, 40)
        yield "bitmask_decompress", (t.values, t.mask, t.offsets, 40)
        yield "bitmask_decompress_into", (t.values, t.mask, t.offsets, 40,
                                          torch.empty(6, 40, dtype=dtype))


@pytest.mark.parametrize("name,args", list(_opcheck_samples()), ids=lambda a: a if isinstance(a, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, args)


def test_opcheck_autograd_path():
    t, x, gy, bias = operands((3,), 40, 6, 0.7, torch.float32)
    args = (x.requires_grad_(), t.values.clone().requires_grad_(), t.mask, t.offsets,
            bias.requires_grad_(), 40)
    torch.library.opcheck(torch.ops.sparsekit.bitmask_linear.default, args)


def test_opcheck_compress():
    w = sparse_weight(6, 40, 0.7)
    torch.library.opcheck(torch.ops.sparsekit.bitmask_compress.default, (w,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_forward_and_backward():
    t, x, gy, bias = operands((6,), 48, 10, 0.8, torch.float32)
    values = t.values.clone().requires_grad_()

    def loss(x, values):
        return ops.bitmask_linear(x, values, t.mask, t.offsets, bias, 48).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v2 = values.detach().clone().requires_grad_()
    compiled(x1, values).backward()
    loss(x2, v2).backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(values.grad, v2.grad, rtol=1e-5, atol=1e-6)


def test_build_info_names_bitmask_isa():
    assert sk.build_info()["cpu_bitmask_isa_active"] in ("avx512bf16", "avx512", "scalar")


# -- bad input ----------------------------------------------------------------------------

def test_nan_weight_is_refused():
    w = sparse_weight(4, 20, 0.5)
    w[2, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 2, column 7"):
        compress_bitmask(w)
    with pytest.raises(ValueError, match="NaN.*row 2, column 7"):
        reference.bitmask_compress(w)
    keep = torch.ones_like(w, dtype=torch.bool)
    keep[2, 7] = False  # pruned NaN: gone, nothing to refuse
    assert compress_bitmask(w, keep).nnz == int((w.nan_to_num() != 0).logical_and(keep).sum())


def test_bad_mask_argument():
    w = sparse_weight(4, 20, 0.5)
    with pytest.raises(ValueError, match="mask must have w's shape"):
        compress_bitmask(w, torch.ones(4, 19, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        compress_bitmask(w, torch.ones(4, 20))
    lin = torch.nn.Linear(20, 4)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        sk.SparseLinear.from_dense(lin, "unstructured", mask=torch.ones(4, 20, dtype=torch.int64))
    with pytest.raises(ValueError, match="mask must have w's shape"):
        sk.SparseLinear.from_dense(lin, "unstructured", mask=torch.ones(20, 4, dtype=torch.bool))


@pytest.mark.parametrize("op", ["linear", "grad_input", "sddmm", "decompress"])
def test_inconsistent_triples_raise(isa, op):
    t, x, gy, bias = operands((3,), 40, 6, 0.5, torch.float32)

    def call(values, mask, offsets):
        if op == "linear":
            return ops.bitmask_linear(x, values, mask, offsets, bias, 40)
        if op == "grad_input":
            return ops.bitmask_linear_grad_input(gy, values, mask, offsets, 40)
        if op == "sddmm":
            return ops.bitmask_sddmm(gy, x, mask, offsets, 40)
        return ops.bitmask_decompress(values, mask, offsets, 40)

    more_bits = t.mask.clone()
    more_bits[3, 0] = -1  # all 16 bits: more than row 3's offsets allow
    with pytest.raises(ValueError, match="mask and offsets disagree at row 3"):
        call(t.values, more_bits, t.offsets)
    past_k = t.mask.clone()
    past_k[1, 2] |= 1 << 9  # column 41 >= k
    if op != "sddmm":  # sddmm takes its count from offsets: fix them to match
        with pytest.raises(ValueError, match="row 1"):
            call(t.values, past_k, t.offsets)
    offsets = t.offsets.clone()
    offsets[2] += 1000
    with pytest.raises(ValueError, match="offsets must not decrease|disagree"):
        call(t.values, t.mask, offsets)
    if op != "sddmm":
        with pytest.raises(ValueError, match="offsets must end at values.numel"):
            call(t.values[:-1], t.mask, t.offsets)
    with pytest.raises(ValueError, match="mask must have shape"):
        call(t.values, t.mask[:, :2], t.offsets)
    with pytest.raises(TypeError, match="mask must be int16"):
        call(t.values, t.mask.to(torch.int32), t.offsets)
    with pytest.raises(TypeError, match="offsets must be int64"):
        call(t.values, t.mask, t.offsets.int())
    with pytest.raises(ValueError, match="offsets must"):
        call(t.values, t.mask, t.offsets[:-1])


def test_operand_errors():
    t, x, gy, bias = operands((3,), 40, 6, 0.5, torch.float32)
    with pytest.raises(ValueError, match="x must have k = 40"):
        ops.bitmask_linear(x[:, :39], t.values, t.mask, t.offsets, bias, 40)
    with pytest.raises(TypeError, match="x .* must have the dtype"):
        ops.bitmask_linear(x.double(), t.values, t.mask, t.offsets, bias, 40)
    with pytest.raises(ValueError, match="bias must have"):
        ops.bitmask_linear(x, t.values, t.mask, t.offsets, bias[:5], 40)
    with pytest.raises(ValueError, match="same batch"):
        ops.bitmask_sddmm(torch.randn(4, 6), x, t.mask, t.offsets, 40)


# -- BitmaskTensor and SparseLinear(pattern="unstructured") -------------------------------

def test_bitmask_tensor_bytes_save_deepcopy_to():
    w = torch.randn(256, 512)
    t = compress_bitmask(w, sk.masks.magnitude(w, 0.8))
    assert t.compression_ratio < 0.24 and abs(t.sparsity - 0.8) < 1e-3
    t90 = compress_bitmask(w, sk.masks.magnitude(w, 0.9))
    assert t90.compression_ratio < 0.14
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    assert isinstance(back, BitmaskTensor) and torch.equal(back.to_dense(), t.to_dense())
    cp = copy.deepcopy(t)
    assert torch.equal(cp.to_dense(), t.to_dense()) and cp.values is not t.values
    h = t.to(torch.bfloat16)
    assert h.dtype == torch.bfloat16 and torch.equal(h.mask, t.mask)
    assert t.to(torch.float32) is t
    with pytest.raises(TypeError, match="floating"):
        t.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_unstructured(dtype):
    lin = torch.nn.Linear(70, 33).to(dtype)
    keep = sk.masks.magnitude(lin.weight.detach(), 0.8)
    layer = sk.SparseLinear.from_dense(lin, "unstructured", mask=keep)
    assert layer.pattern == "unstructured" and layer.values.numel() == int(keep.sum())
    w = torch.where(keep, lin.weight.detach(), torch.zeros((), dtype=dtype))
    assert torch.equal(layer.dense_weight(), w)
    x = torch.randn(5, 70, dtype=dtype)
    ref = torch.nn.functional.linear(x.double(), w.double(), lin.bias.detach().double())
    assert rel_err(layer(x), ref) < TOL[dtype]
    nnz = int(keep.sum())
    assert layer.weight_nbytes == nnz * layer.values.element_size() + 33 * 5 * 2 + 34 * 8
    dense = layer.to_dense()
    assert torch.equal(dense.weight, w)
    # trains: gradients reach the kept values only
    layer(x).float().square().sum().backward()
    assert layer.values.grad.shape == layer.values.shape
    # state_dict into a fresh module (nnz taken from the state_dict), deepcopy, .to
    fresh = sk.SparseLinear(70, 33, pattern="unstructured", dtype=dtype)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dense_weight(), w)
    assert torch.equal(copy.deepcopy(layer).dense_weight(), w)
    assert layer.to(torch.float64)(x.double()).dtype == torch.float64
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False).dense_weight(), w)


def test_sparse_linear_unstructured_state_dict_checks():
    layer = sk.SparseLinear.from_dense(torch.nn.Linear(40, 6), "unstructured")
    sd = layer.state_dict()
    bad = dict(sd)
    bad["offsets"] = sd["offsets"].clone()
    bad["offsets"][3] += 1
    with pytest.raises(ValueError, match="disagree"):
        sk.SparseLinear(40, 6, pattern="unstructured").load_state_dict(bad)
    with pytest.raises(ValueError, match="state_dict is for a unstructured SparseLinear"):
        sk.SparseLinear(40, 6, pattern="2:4").load_state_dict(sd)
    nm = sk.SparseLinear.from_dense(torch.nn.Linear(40, 6), "2:4").state_dict()
    with pytest.raises(ValueError, match="state_dict is for a 2:4 SparseLinear"):
        sk.SparseLinear(40, 6, pattern="unstructured").load_state_dict(nm)
    with pytest.raises(ValueError, match="scores"):
        sk.SparseLinear.from_dense(torch.nn.Linear(40, 6), "unstructured", scores=torch.randn(6, 40))


def test_sparsify_unstructured_model():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    with torch.no_grad():
        for lin in (model[0], model[2]):
            lin.weight.mul_(sk.masks.magnitude(lin.weight, 0.8))
    x = torch.randn(4, 64)
    ref = model(x)
    report = sk.sparsify(model, pattern="unstructured")
    assert report.converted == ["0", "2"]
    assert isinstance(model[0], sk.SparseLinear) and model[0].pattern == "unstructured"
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert report.weight_bytes_after < 0.3 * report.weight_bytes_before  # small: offsets count
    sk.densify(model)
    assert torch.allclose(model(x), ref, atol=1e-5)


def test_pruner_finalize_unstructured_and_conv():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
    pruner = sk.prune.Pruner(model, sk.prune.linear(0.0, 0.9, steps=3))
    for _ in range(4):
        pruner.step()
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ref = model(x)
    report = pruner.finalize(pattern="unstructured")
    assert sorted(report.converted) == ["0", "3"]
    assert isinstance(model[0], sk.SparseConv2d) and model[0].pattern == "unstructured"
    assert isinstance(model[3], sk.SparseLinear) and model[3].pattern == "unstructured"
    assert model[3].values.numel() == pytest.approx(0.1 * 16 * 6 * 6 * 10, abs=1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_kernel_choice_covers_unstructured_layers():
    lin = torch.nn.Linear(64, 24)
    keep = sk.masks.magnitude(lin.weight.detach(), 0.5)
    layer = sk.SparseLinear.from_dense(lin, "unstructured", mask=keep)
    x = torch.randn(3, 64)
    ref = torch.nn.functional.linear(x, lin.weight.detach() * keep, lin.bias.detach())
    outs = {}
    for mode in ("sparse", "dense", "auto"):
        layer.kernel_choice = mode
        outs[mode] = layer(x)
        assert torch.allclose(outs[mode], ref, atol=1e-5)
    assert "bitmask@0.5" in str(layer._kernel_key(x))
    assert "bitmask" in sk.explain(layer, x)
    conv = sk.SparseConv2d.from_dense(torch.nn.Conv2d(4, 6, 3, padding=1), "unstructured")
    xc = torch.randn(2, 4, 5, 5)
    conv.kernel_choice = "sparse"
    ys = conv(xc)
    conv.kernel_choice = "dense"
    assert torch.allclose(ys, conv(xc), atol=1e-5)
