"""CPU N:M products (nm_linear, nm_linear_grad_input, nm_sddmm) against the fp64
reference, on every ISA variant this machine runs, odd shapes and every dtype."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekit as sk
from sparsekit import ops, reference

from cpu_isa import COMPILED_ISAS as ISAS, rel_err, run_on_isa  # noqa: E402
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
PATTERNS = [(2, 4), (1, 4), (4, 8), (2, 8), (3, 7), (1, 2)]
# (batch shape, K, rows): batch 0, one row, K not a multiple of M or of the SIMD chunk.
SHAPES = [((1,), 64, 16), ((5,), 37, 9), ((3, 4), 100, 7), ((16,), 130, 1), ((17,), 36, 5),
          ((300,), 130, 33), ((0,), 24, 6), ((2, 0, 3), 8, 4)]


@pytest.fixture(params=ISAS)
def isa(request):
    yield from run_on_isa(request.param)


def operands(batch, k, rows, n, m, dtype):
    t = sk.compress(torch.randn(rows, k, dtype=torch.float64).to(dtype), n, m, prune=True)
    x = torch.randn(*batch, k, dtype=torch.float64).to(dtype)
    gy = torch.randn(*batch, rows, dtype=torch.float64).to(dtype)
    bias = torch.randn(rows, dtype=torch.float64).to(dtype)
    return t, x, gy, bias


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("batch,k,rows", SHAPES)
def test_products_match_fp64_reference(isa, dtype, n, m, batch, k, rows):
    t, x, gy, bias = operands(batch, k, rows, n, m, dtype)
    v64 = t.values.double()
    y = ops.nm_linear(x, t.values, t.metadata, bias, k, n, m)
    assert y.dtype == dtype and y.shape == (*batch, rows)
    assert rel_err(y, reference.nm_linear(x.double(), v64, t.metadata, bias.double(), k, n, m)) < TOL[dtype]
    gx = ops.nm_linear_grad_input(gy, t.values, t.metadata, k, n, m)
    assert gx.shape == x.shape
    assert rel_err(gx, reference.nm_linear_grad_input(gy.double(), v64, t.metadata, k, n, m)) < TOL[dtype]
    gv = ops.nm_sddmm(gy, x, t.metadata, k, n, m)
    assert gv.shape == t.values.shape and gv.dtype == dtype
    assert rel_err(gv, reference.nm_sddmm(gy.double(), x.double(), t.metadata, k, n, m)) < TOL[dtype]


def test_non_contiguous_and_3d_inputs(isa):
    t, x, gy, bias = operands((6, 5), 64, 12, 2, 4, torch.float32)
    xt = x.transpose(0, 1)  # [5, 6, 64], not contiguous
    y = ops.nm_linear(xt, t.values, t.metadata, bias, 64, 2, 4)
    ref = reference.nm_linear(xt.double(), t.values.double(), t.metadata, bias.double(), 64, 2, 4)
    assert rel_err(y, ref) < 1e-5


def test_large_batch_crosses_tiles(isa):
    # More rows of x than one batch tile: the kernels loop over tiles and accumulate.
    t, x, gy, bias = operands((261,), 96, 40, 2, 4, torch.float32)
    assert rel_err(ops.nm_linear(x, t.values, t.metadata, bias, 96, 2, 4),
                   reference.nm_linear(x.double(), t.values.double(), t.metadata, bias.double(), 96, 2, 4)) < 1e-5
    assert rel_err(ops.nm_sddmm(gy, x, t.metadata, 96, 2, 4),
                   reference.nm_sddmm(gy.double(), x.double(), t.metadata, 96, 2, 4)) < 1e-5


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 7)])
@pytest.mark.parametrize("batch", [513, 200, 2 * 256 + 150])
def test_fp32_batch_tiles_split_across_threads(isa, n, m, batch):
    # Many rows of x and a small weight (under 1 MB compressed): threads split the batch
    # tiles, each transposing its own (here from a strided x); the last tile is partial,
    # some tiles fill 9-15 registers (one accumulator set), and K needs padding.
    k, rows = 61, 37
    t, _, _, bias = operands((1,), k, rows, n, m, torch.float32)
    x = torch.randn(batch, 2 * k, dtype=torch.float64).float()[:, ::2]
    y = ops.nm_linear(x, t.values, t.metadata, bias, k, n, m)
    ref = reference.nm_linear(x.double(), t.values.double(), t.metadata, bias.double(), k, n, m)
    assert rel_err(y, ref) < 1e-5


def test_gradcheck_fp64_through_reference_and_op():
    # K a multiple of M: a value slot in K's padding is not a weight and must stay 0, so
    # gradcheck may not perturb it.
    t, x, gy, bias = operands((3,), 16, 5, 2, 4, torch.float64)
    values = t.values.clone().requires_grad_()
    x = x.requires_grad_()
    bias = bias.requires_grad_()
    for fn in (reference.nm_linear, ops.nm_linear):
        assert torch.autograd.gradcheck(lambda x, v, b: fn(x, v, t.metadata, b, 16, 2, 4),
                                        (x, values, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_gradients_equal_reference_gradients(isa, dtype):
    t, x, gy, bias = operands((7,), 40, 9, 2, 4, dtype)
    grads = []
    for fn, cast in ((ops.nm_linear, lambda a: a), (reference.nm_linear, lambda a: a.double())):
        xs = cast(x).clone().requires_grad_()
        vs = cast(t.values).clone().requires_grad_()
        bs = cast(bias).clone().requires_grad_()
        fn(xs, vs, t.metadata, bs, 40, 2, 4).backward(cast(gy))
        grads.append((xs.grad, vs.grad, bs.grad))
    for got, want in zip(*grads):
        assert rel_err(got, want) < TOL[dtype]


def test_pruned_weights_get_no_gradient_slot():
    t, x, gy, bias = operands((4,), 16, 3, 2, 4, torch.float32)
    values = t.values.clone().requires_grad_()
    ops.nm_linear(x, values, t.metadata, None, 16, 2, 4).sum().backward()
    assert values.grad.shape == t.values.shape  # only kept entries exist to be trained


def test_fp64_runs_exactly_through_dense_fallback():
    t, x, gy, bias = operands((3,), 20, 4, 2, 4, torch.float64)
    y = ops.nm_linear(x, t.values, t.metadata, bias, 20, 2, 4)
    assert torch.allclose(y, reference.nm_linear(x, t.values, t.metadata, bias, 20, 2, 4), rtol=1e-12)


def test_bad_input_is_named():
    t, x, gy, bias = operands((2,), 16, 4, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="x must have k = 16"):
        ops.nm_linear(torch.randn(2, 15), t.values, t.metadata, None, 16, 2, 4)
    with pytest.raises(TypeError, match="x .* must have the dtype of the weight values"):
        ops.nm_linear(x.half(), t.values, t.metadata, None, 16, 2, 4)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.nm_linear(x, t.values, t.metadata, torch.zeros(5), 16, 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        ops.nm_linear(x, t.values[:, :-1], t.metadata, None, 16, 2, 4)
    with pytest.raises(ValueError, match="metadata must have shape"):
        ops.nm_linear(x, t.values, t.metadata[:3], None, 16, 2, 4)
    with pytest.raises(ValueError, match="grad_out must have"):
        ops.nm_linear_grad_input(torch.randn(2, 5), t.values, t.metadata, 16, 2, 4)
    with pytest.raises(ValueError, match="metadata must have shape"):
        ops.nm_sddmm(gy, x, t.metadata[:, :1], 16, 2, 4)
    with pytest.raises(ValueError, match="same batch"):
        ops.nm_sddmm(torch.randn(3, 4), x, t.metadata, 16, 2, 4)


def _opcheck_samples():
    for dtype in (torch.float32, torch.bfloat16):
        t, x, gy, bias = operands((3,), 40, 6, 2, 4, dtype)
        yield "nm_linear", (x, t.values, t.metadata, bias, 40, 2, 4)
        yield "nm_linear", (x, t.values, t.metadata, None, 40, 2, 4)
        yield "nm_linear_grad_input", (gy, t.values, t.metadata, 40, 2, 4)
        yield "nm_sddmm", (gy, x, t.metadata, 40, 2, 4)


@pytest.mark.parametrize("name,args", list(_opcheck_samples()), ids=lambda a: a if isinstance(a, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, args)


def test_opcheck_autograd_path():
    t, x, gy, bias = operands((3,), 40, 6, 2, 4, torch.float32)
    args = (x.requires_grad_(), t.values.clone().requires_grad_(), t.metadata, bias.requires_grad_(), 40, 2, 4)
    torch.library.opcheck(torch.ops.sparsekit.nm_linear.default, args)


def test_build_info_reports_active_isa():
    info = sk.build_info()
    assert info["cpu_isa_active"] in info["cpu_isa_compiled"]
    assert not ops.set_cpu_isa("sse9")


@pytest.mark.parametrize("batch,k", [(1, 6200), (8, 1602), (3, 2090)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_column_blocks(isa, batch, k, dtype):
    # Long rows: the small-batch 2:4 kernel sweeps K in blocks and carries partial sums.
    t, x, gy, bias = operands((batch,), k, 5, 2, 4, dtype)
    y = ops.nm_linear(x, t.values, t.metadata, bias, k, 2, 4)
    ref = reference.nm_linear(x.double(), t.values.double(), t.metadata, bias.double(), k, 2, 4)
    assert rel_err(y, ref) < TOL[dtype]


def test_torch_compile_fullgraph_forward_and_backward():
    t, x, gy, bias = operands((6,), 48, 10, 2, 4, torch.float32)
    values = t.values.clone().requires_grad_()

    def loss(x, values):
        return ops.nm_linear(x, values, t.metadata, bias, 48, 2, 4).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    v2 = values.detach().clone().requires_grad_()
    compiled(x1, values).backward()
    loss(x2, v2).backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(values.grad, v2.grad, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(0, 20),
    k=st.integers(1, 90),
    rows=st.integers(1, 20),
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(list(TOL)),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_products_equal_reference(batch, k, rows, pattern, dtype, seed):
    n, m = pattern
    torch.manual_seed(seed)
    t, x, gy, bias = operands((batch,), k, rows, n, m, dtype)
    v64 = t.values.double()
    assert rel_err(ops.nm_linear(x, t.values, t.metadata, bias, k, n, m),
                   reference.nm_linear(x.double(), v64, t.metadata, bias.double(), k, n, m)) < TOL[dtype]
    assert rel_err(ops.nm_linear_grad_input(gy, t.values, t.metadata, k, n, m),
                   reference.nm_linear_grad_input(gy.double(), v64, t.metadata, k, n, m)) < TOL[dtype]
    assert rel_err(ops.nm_sddmm(gy, x, t.metadata, k, n, m),
                   reference.nm_sddmm(gy.double(), x.double(), t.metadata, k, n, m)) < TOL[dtype]


def test_gradcheck_every_differentiable_op_fp64():
    t, x, gy, bias = operands((3,), 16, 5, 2, 4, torch.float64)
    meta = t.metadata
    values = t.values.clone().requires_grad_()
    x = x.requires_grad_()
    gy = gy.requires_grad_()
    checks = [
        (lambda g, v: ops.nm_linear_grad_input(g, v, meta, 16, 2, 4), (gy, values)),
        (lambda g, a: ops.nm_sddmm(g, a, meta, 16, 2, 4), (gy, x)),
        (lambda v: ops.nm_decompress(v, meta, 16, 2, 4), (values,)),
    ]
    for fn, args in checks:
        assert torch.autograd.gradcheck(fn, args)
    # compress: gradients flow back to the kept entries of w only.
    w = t.to_dense().clone().requires_grad_()
    vals, _ = ops.nm_compress(w, 2, 4)
    vals.sum().backward()
    kept = ops.nm_decompress(torch.ones_like(vals), meta, 16, 2, 4)  # 1 at every kept slot
    assert torch.equal(w.grad, kept)


def test_double_backward_through_nm_linear():
    t, x, gy, bias = operands((4,), 16, 6, 2, 4, torch.float64)
    values = t.values.clone().requires_grad_()
    x = x.requires_grad_()
    assert torch.autograd.gradgradcheck(lambda a, v: ops.nm_linear(a, v, t.metadata, None, 16, 2, 4),
                                        (x, values))


def check_2_4_with_inf_at_pruned_columns(batch, k, rows, dtype=torch.bfloat16):
    """nm_linear of a 2:4 weight against the fp64 reference, with inf in the columns of x
    that every row pruned: only kept entries may be read, so y stays finite. Returns the
    weight and the finite x."""
    t, x, gy, bias = operands((batch,), k, rows, 2, 4, dtype)
    ref = reference.nm_linear(x.double(), t.values.double(), t.metadata, bias.double(), k, 2, 4)
    x_inf = x.clone()
    x_inf[:, t.to_dense().ne(0).sum(0).eq(0)] = float("inf")
    y = ops.nm_linear(x_inf, t.values, t.metadata, bias, k, 2, 4)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[dtype]
    return t, x


@pytest.mark.parametrize("rows", [1, 3, 4, 6, 9, 16, 35])
@pytest.mark.parametrize("batch", [1, 2, 4, 5, 7, 11])
@pytest.mark.parametrize("k", [4, 61, 64, 127, 192, 257])
def test_bf16_2_4_every_row_and_batch_remainder(isa, rows, batch, k):
    # The bf16 dot-product forward (avx512bf16) works on 4 weight rows by 4 rows of x and
    # 64-column chunks, and at one row of x on 16 weight rows per pass (rows 16 and 35: one
    # and two passes, then the 4-row passes): every remainder of each, and K ending inside
    # a chunk and a group. Inf at pruned columns of x must not reach y (only kept entries
    # are gathered).
    check_2_4_with_inf_at_pruned_columns(batch, k, rows)


@pytest.mark.parametrize("batch", [1, 3])
def test_bf16_2_4_rounds_like_torch_and_keeps_nan(isa, batch):
    # Sums exact in fp32 but not in bf16 (ties such as 259 = 258 + 1 round to even: 260,
    # 263 -> 264; 515 -> 516), so y must equal torch's rounding of them exactly: a kernel
    # that truncated, or rounded ties away, fails. Rows 0-31 take the one-row kernel's two
    # 16-row passes at batch 1, rows 32-34 the 4-row passes; one kept value is NaN.
    k, rows = 64, 35
    targets = torch.tensor([259., 263., 515., 257., 262., 1031., 3., 261.]).repeat(5)[:rows]
    w = torch.zeros(rows, k)
    w[:, 0] = 255.
    w[:, 1] = targets - 255.  # every value an integer of at most 8 bits: exact in bf16
    w[:, 4] = -1.
    w[:, 5] = 1.
    values, metadata = ops.nm_compress(w.to(torch.bfloat16), 2, 4)
    values[20, 0] = float("nan")
    bias = torch.full((rows,), 2., dtype=torch.bfloat16)
    x = torch.ones(batch, k, dtype=torch.bfloat16)
    y = ops.nm_linear(x, values, metadata, bias, k, 2, 4)
    expected = (targets + 2.).to(torch.bfloat16).expand(batch, rows).clone()
    expected[:, 20] = float("nan")
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(0.), expected.nan_to_num(0.))


def test_isa_fixture_forces_the_variant(isa):
    # The fixture forces `isa` for this test; the next test checks what it restores.
    assert sk.build_info()["cpu_isa_active"] == isa


def test_best_variant_active_after_forced_tests():
    best = next(i for i in ("avx512bf16", "avx512", "avx2", "scalar")
                if i in sk.build_info()["cpu_isa_available"] + ["scalar"])
    assert sk.build_info()["cpu_isa_active"] == best


@pytest.mark.parametrize("rows", [1, 3, 4, 13, 300])
@pytest.mark.parametrize("batch", [64, 65, 130])
@pytest.mark.parametrize("k", [4, 61, 64, 67, 256, 1000])
def test_bf16_2_4_batch_form_every_remainder(isa, rows, batch, k):
    # From batch 32 the avx512bf16 forward runs its batch form: by default the lanes form
    # (16 weight rows per register by 6 rows of x, K blocks of 64 groups, rows in blocks of
    # 256), or the pair GEMM (SPARSEKIT_CPU_BF16_BATCH=pairs: x's column pairs per group and
    # tile of 64 rows, 4 weight rows at a time, K blocks of 16 groups, rows in blocks of 128;
    # test_bf16_2_4_pair_gemm_in_a_subprocess): every remainder of each (rows 300: two and
    # three row blocks), K ending inside a block and inside a group, and inf at the pruned
    # columns of x (only kept entries are read).
    t, x = check_2_4_with_inf_at_pruned_columns(batch, k, rows)
    # Without bias, and with x as a strided view (copied into whole 64-column rows first).
    xs = torch.stack([x, -x], 2).flatten(1)[:, ::2]
    assert torch.equal(xs, x)
    y0 = ops.nm_linear(xs, t.values, t.metadata, None, k, 2, 4)
    ref0 = reference.nm_linear(x.double(), t.values.double(), t.metadata, None, k, 2, 4)
    assert rel_err(y0, ref0) < TOL[torch.bfloat16]


@pytest.mark.parametrize("rows", [3, 300])
@pytest.mark.parametrize("batch", [32, 33, 34, 35, 36, 37])
@pytest.mark.parametrize("k", [61, 1000])
def test_bf16_2_4_lanes_every_batch_remainder(isa, rows, batch, k):
    # The lanes form's register tiles hold 6 rows of x: batches 32-37 end on every
    # remainder (2, 3, 4, 5, 0, 1); rows 3 fill part of one register, rows 300 leave an odd
    # count of registers (one register row in the last tile) with 12 rows in the last one.
    check_2_4_with_inf_at_pruned_columns(batch, k, rows)


def test_bf16_2_4_pair_gemm_in_a_subprocess():
    # The pair GEMM is chosen once per process (SPARSEKIT_CPU_BF16_BATCH=pairs): its tests
    # (the two above and the large-weight one below) run in a process that chose it.
    if "avx512bf16" not in sk.build_info()["cpu_isa_available"]:
        pytest.skip("this CPU has no AVX512-BF16: the pair GEMM cannot run")
    env = dict(os.environ, SPARSEKIT_CPU_BF16_BATCH="pairs")
    done = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
         "batch_form_every_remainder or lanes_every_batch_remainder or pair_gemm_large_weight"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@pytest.mark.parametrize("rows", [3, 17, 300])
@pytest.mark.parametrize("batch", [17, 18, 19, 20, 21, 22, 130])
@pytest.mark.parametrize("k", [4, 68, 1200])
def test_fp32_2_4_lanes_every_remainder(isa, rows, batch, k):
    # From 17 rows of x, fp32 2:4 with K a multiple of 4 runs the lanes form on AVX-512 (16
    # weight rows per register, tiles of 2 registers by 6 rows of x, rows in blocks of 128,
    # K blocks of up to 512 KB packed: 256 groups for a whole block): batches 17-22 end on
    # every remainder of 6, rows 3 / 17 / 300 leave a partial register, an odd count of
    # registers and three row blocks, K 1200 (300 groups) runs two K blocks where a block
    # has 8 registers. Inf at the pruned columns of x must not reach y (only kept columns are
    # moved into the lanes); x as a row-strided view is read in place.
    t, x = check_2_4_with_inf_at_pruned_columns(batch, k, rows, torch.float32)
    wide = torch.randn(batch, k + 8)
    wide[:, :k] = x
    ref0 = reference.nm_linear(x.double(), t.values.double(), t.metadata, None, k, 2, 4)
    y0 = ops.nm_linear(wide[:, :k], t.values, t.metadata, None, k, 2, 4)
    assert rel_err(y0, ref0) < TOL[torch.float32]


@pytest.mark.parametrize("rows,k", [(517, 2051), (300, 4100)])
def test_bf16_2_4_pair_gemm_large_weight(isa, rows, k):
    # Weights over 1 MB compressed: threads split the weight rows (lanes form: in whole
    # registers of 16; pair GEMM: every x tile's pairs prepared first, in tiles of 32 rows of
    # x, two registers; small weights: 64, four); odd rows and K, many K blocks.
    t, x, gy, bias = operands((150,), k, rows, 2, 4, torch.bfloat16)
    assert t.values.numel() * 2 + t.metadata.numel() > 1 << 20
    ref = reference.nm_linear(x.double(), t.values.double(), t.metadata, bias.double(), k, 2, 4)
    y = ops.nm_linear(x, t.values, t.metadata, bias, k, 2, 4)
    assert rel_err(y, ref) < TOL[torch.bfloat16]
