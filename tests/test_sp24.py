"""The 2:4 sparse tensor-core path (csrc/sp24_layout.h, csrc/cuda/sp24_linear.cu).

Without a GPU: the packed layout is replayed through a CPU emulation of mma.sp m16n8k32
(sp24_emulate_linear, which restates the PTX fragment rules: once with the registers as
the small-batch kernel loads them, once through the large-batch kernel's shared-memory
stage, ldmatrix and output mapping) and must reproduce W @ x exactly; the built extension must hold sparse MMA instructions (HMMA.SP) for sm_80 and
sm_90. With a GPU (`cuda` marker): the kernels against the reference.
"""

import glob
import os
import re
import subprocess

import pytest
import torch

import sparsekit as sk
from sparsekit import ops, reference

HALF_DTYPES = [torch.float16, torch.bfloat16]

needs_ext = pytest.mark.skipif(not sk.build_info()["extension_loaded"],
                               reason="sparsekit._C is not built")


def integer_nm(rows, k, dtype, generator=None):
    """A 2:4 weight of small integers (exact in fp16, bf16 and any fp64 sum), with groups
    holding 2, 1 or 0 nonzeros, so products can be compared exactly."""
    w = torch.randint(1, 8, (rows, k), generator=generator).double()
    w *= torch.where(torch.rand(rows, k, generator=generator) < 0.5, -1.0, 1.0)
    keep = reference.nm_mask(torch.rand(rows, k, generator=generator, dtype=torch.float64), 2, 4)
    keep &= torch.rand(rows, k, generator=generator) < 0.85
    return (w * keep).to(dtype)


def packed(w):
    t = sk.compress(w, 2, 4)
    return torch.ops.sparsekit.sp24_pack(t.values, t.metadata, w.shape[1])


SHAPES = [(16, 32, 1), (16, 32, 8), (37, 70, 5), (33, 131, 19), (5, 4, 1), (64, 256, 9),
          (3, 130, 17), (130, 100, 260), (200, 264, 129)]


@needs_ext
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("rows,k,batch", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("staged", [False, True], ids=["fragments", "staged"])
def test_emulated_mma_reproduces_the_product_exactly(rows, k, batch, dtype, with_bias, staged):
    # fragments: the registers as the small-batch kernel loads them; staged: through the
    # large-batch kernel's shared-memory stage and ldmatrix.
    w = integer_nm(rows, k, dtype)
    x = torch.randint(-6, 7, (batch, k)).to(dtype)
    bias = torch.randint(-6, 7, (rows,)).to(dtype) if with_bias else None
    pv, pm = packed(w)
    y = torch.ops.sparsekit.sp24_emulate_linear(x, pv, pm, bias, rows, k, staged)
    expected = x.double() @ w.double().T
    if with_bias:
        expected += bias.double()
    assert y.dtype == torch.float64
    assert torch.equal(y, expected)


@needs_ext
def test_emulated_mma_on_real_valued_weights_matches_fp64():
    torch.manual_seed(1)
    w = reference.nm_mask(torch.randn(48, 200), 2, 4) * torch.randn(48, 200)
    w = w.half()
    x = torch.randn(11, 200).half()
    pv, pm = packed(w)
    y = torch.ops.sparsekit.sp24_emulate_linear(x, pv, pm, None, 48, 200)
    torch.testing.assert_close(y, x.double() @ w.double().T, rtol=1e-12, atol=1e-12)


@needs_ext
@pytest.mark.parametrize("staged", [False, True], ids=["fragments", "staged"])
def test_emulation_detects_a_wrong_layout(staged):
    # The check must be able to fail: swapping the metadata words of the two K halves, or
    # two lanes' values, gives a different product.
    w = integer_nm(32, 64, torch.float16)
    x = torch.randint(-6, 7, (8, 64)).half()
    pv, pm = packed(w)
    expected = x.double() @ w.double().T
    words = pm.view(-1, 16, 4).clone()
    words[:, [0, 1]] = words[:, [1, 0]]
    y = torch.ops.sparsekit.sp24_emulate_linear(x, pv, words.view(-1), None, 32, 64, staged)
    assert not torch.equal(y, expected)
    lanes = pv.view(-1, 32, 8).clone()
    lanes[:, [0, 5]] = lanes[:, [5, 0]]
    y = torch.ops.sparsekit.sp24_emulate_linear(x, lanes.view(-1), pm, None, 32, 64, staged)
    assert not torch.equal(y, expected)


@needs_ext
@pytest.mark.parametrize("rows,k", [(5, 6), (17, 4), (1, 1), (40, 250)])
def test_packed_metadata_is_valid_ordered_metadata_everywhere(rows, k):
    # Padding (rows past the last, groups past k) must still hold valid nibbles: 0b0000,
    # 0b0101, 0b1010, 0b1111 are undefined behaviour on the hardware, and ordered metadata
    # needs the first index below the second.
    w = integer_nm(rows, k, torch.bfloat16)
    pv, pm = packed(w)
    words = pm.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)])
    assert bool(((nibbles & 3) < (nibbles >> 2)).all())
    # The packed values hold exactly the kept values, zeros elsewhere.
    t = sk.compress(w, 2, 4)
    assert torch.equal(pv.float().abs().sum(), t.values.float().abs().sum())


@needs_ext
def test_pack_and_emulate_reject_bad_input():
    w = integer_nm(16, 32, torch.float16)
    t = sk.compress(w, 2, 4)
    with pytest.raises(TypeError, match="values must be float16 or bfloat16"):
        torch.ops.sparsekit.sp24_pack(t.values.float(), t.metadata, 32)
    with pytest.raises(ValueError, match="values must have shape"):
        torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 64)
    pv, pm = torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 32)
    with pytest.raises(ValueError, match="packed_values must be contiguous 1-D"):
        torch.ops.sparsekit.sp24_emulate_linear(torch.ones(1, 32).half(), pv[:-8], pm, None, 16, 32)
    with pytest.raises(TypeError, match="packed_meta must be int32"):
        torch.ops.sparsekit.sp24_emulate_linear(torch.ones(1, 32).half(), pv, pm.long(), None, 16, 32)
    with pytest.raises(ValueError, match="x must be 2-D"):
        torch.ops.sparsekit.sp24_emulate_linear(torch.ones(1, 31).half(), pv, pm, None, 16, 32)


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


@needs_ext
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_built_spmm_kernels_use_sparse_tensor_cores(arch):
    info = sk.build_info()
    if not info["with_cuda"]:
        pytest.skip("C++-only build: no CUDA kernels to disassemble")
    built = {a.split("+")[0].replace(".", "") for a in (info["cuda_arch_list"] or "").split(";")}
    if arch.removeprefix("sm_") not in built:
        pytest.skip(f"this build targets {info['cuda_arch_list']}, not {arch}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump in the triton wheel")
    (so,) = glob.glob(os.path.join(os.path.dirname(sk.__file__), "_C*.so"))
    sass = subprocess.run([tool, "-sass", "-arch", arch, so], capture_output=True, text=True,
                          check=True).stdout
    per_function = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        per_function[name] = (len(re.findall(r"HMMA\.SP\.16832\.F32 ", block)),
                              len(re.findall(r"HMMA\.SP\.16832\.F32\.BF16 ", block)))
    for kernel in ("small_batch_kernel", "large_batch_kernel"):
        for dtype, which in (("6__half", 0), ("13__nv_bfloat16", 1)):
            found = {n: c[which] for n, c in per_function.items()
                     if "sp24_linear" in n and kernel in n and dtype in n}
            assert found, f"no {kernel} for {dtype} in the {arch} code"
            assert all(c > 0 for c in found.values()), f"{kernel} lacks HMMA.SP on {arch}: {found}"


# ---- on a GPU ----------------------------------------------------------------------------

BATCHES = [1, 3, 8, 9, 16, 17, 64, 130, 257]


def _rel_err(y, ref):
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("rows,k", [(37, 70), (64, 256), (130, 1000), (16, 4096), (300, 136)])
@pytest.mark.parametrize("batch", BATCHES)
def test_sp24_linear_matches_reference_on_gpu(rows, k, batch, dtype):
    gen = torch.Generator().manual_seed(rows * 7 + k + batch)
    w = (reference.nm_mask(torch.rand(rows, k, generator=gen, dtype=torch.float64), 2, 4)
         * (torch.randn(rows, k, generator=gen, dtype=torch.float64))).to(dtype)
    x = torch.randn(batch, k, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(rows, generator=gen, dtype=torch.float64).to(dtype)
    t = sk.compress(w.cuda(), 2, 4)
    pv, pm = torch.ops.sparsekit.sp24_pack(t.values, t.metadata, k)
    for b in (None, bias.cuda()):
        y = torch.ops.sparsekit.sp24_linear(x.cuda(), pv, pm, b, rows, k)
        ref = x.double() @ w.double().T + (0 if b is None else bias.double())
        assert y.dtype == dtype and y.shape == (batch, rows)
        assert _rel_err(y.cpu(), ref) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_self_check_passes_on_this_gpu(monkeypatch, dtype):
    # The dispatcher's own check: where it fails, 2:4 layers run Triton instead (with a warning).
    monkeypatch.setattr(ops, "_SP24_CHECKED", {})
    assert ops._sp24_self_check(torch.device("cuda", torch.cuda.current_device()), dtype) is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sp24_linear_large_batch_without_split_k(dtype):
    # Enough output tiles (16 x 17) that the large-batch kernel runs without splitting K.
    gen = torch.Generator().manual_seed(5)
    w = integer_nm(2048, 264, dtype, generator=gen)
    x = torch.randint(-3, 4, (2100, 264), generator=gen).to(dtype)
    pv, pm = packed(w.cuda())
    y = torch.ops.sparsekit.sp24_linear(x.cuda(), pv, pm, None, 2048, 264)
    assert _rel_err(y.cpu(), x.double() @ w.double().T) < 1e-2


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sp24_pack_on_gpu_equals_cpu(dtype):
    w = integer_nm(70, 333, dtype)
    pv, pm = packed(w)
    pv_cuda, pm_cuda = packed(w.cuda())
    assert torch.equal(pv_cuda.cpu().view(torch.int16), pv.view(torch.int16))
    assert torch.equal(pm_cuda.cpu(), pm)


@pytest.mark.cuda
def test_sp24_linear_handles_unaligned_x_and_exact_integers():
    w = integer_nm(48, 67, torch.float16).cuda()
    base = torch.randint(-6, 7, (5, 68)).half().cuda()
    x = base[:, 1:]  # not contiguous and not 16-byte aligned
    t = sk.compress(w, 2, 4)
    pv, pm = torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 67)
    y = torch.ops.sparsekit.sp24_linear(x, pv, pm, None, 48, 67)
    assert torch.equal(y.double(), x.double() @ w.double().T)


@pytest.mark.cuda
def test_nm_linear_on_gpu_runs_sp24_and_repacks_after_update():
    lin = torch.nn.Linear(256, 96).half().cuda()
    layer = sk.SparseLinear.from_dense(lin, pattern="2:4")
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    assert "sparse tensor-core" in ops.explain("nm_linear", x, layer.values, layer.metadata,
                                               layer.bias, 256, 2, 4)
    y1 = layer(x)
    packed_first = ops._sp24_cached(layer.values)
    layer(x)
    assert ops._sp24_cached(layer.values) is packed_first  # cached
    with torch.no_grad():
        layer.values.mul_(2)
    y2 = layer(x)
    assert ops._sp24_cached(layer.values) is not packed_first  # repacked
    torch.testing.assert_close(y2 - layer.bias, 2 * (y1 - layer.bias), rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sparse_linear_trains_on_gpu(dtype):
    layer = sk.SparseLinear.from_dense(torch.nn.Linear(130, 70), pattern="2:4").to(dtype).cuda()
    xs = torch.randn(9, 130, device="cuda").to(dtype).requires_grad_()
    gy = torch.randn(9, 70, device="cuda").to(dtype)
    y = layer(xs)
    y.backward(gy)
    v, meta = layer.values.detach().double(), layer.metadata
    ref_y = reference.nm_linear(xs.detach().double(), v, meta, layer.bias.double(), 130, 2, 4)
    ref_gx = reference.nm_linear_grad_input(gy.double(), v, meta, 130, 2, 4)
    ref_gv = reference.nm_sddmm(gy.double(), xs.detach().double(), meta, 130, 2, 4)
    assert _rel_err(y.detach(), ref_y) < 1e-2
    assert _rel_err(xs.grad, ref_gx) < 1e-2
    assert _rel_err(layer.values.grad, ref_gv) < 1e-2
    assert torch.equal(layer.bias.grad.double(), gy.double().sum(0).to(dtype).double()) or \
        _rel_err(layer.bias.grad, gy.double().sum(0)) < 1e-2


@pytest.mark.cuda
def test_set_cuda_backend_changes_speed_not_results():
    layer = sk.SparseLinear.from_dense(torch.nn.Linear(128, 64), pattern="2:4").half().cuda()
    x = torch.randn(3, 128, device="cuda", dtype=torch.float16)
    results = {}
    for backend in ("sp24", "triton", "reference"):
        previous = ops.set_cuda_backend(backend)
        try:
            results[backend] = layer(x)
        finally:
            ops.set_cuda_backend(previous)
    torch.testing.assert_close(results["sp24"], results["reference"], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(results["triton"], results["reference"], rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="name must be one of"):
        ops.set_cuda_backend("cusparselt")


# ---- the CUDA dispatch around the kernels, exercised on the CPU -----------------------------

@needs_ext
def test_cuda_dispatch_glue_with_the_emulated_kernel(monkeypatch):
    # The CUDA implementation of nm_linear, run on CPU tensors with the kernel replaced by
    # its CPU emulation: flattening of leading dims, bias, the per-weight packing cache.
    def emulated(x2d, pv, pm, bias, rows, k):
        return torch.ops.sparsekit.sp24_emulate_linear(x2d, pv, pm, bias, rows, k).to(x2d.dtype)

    monkeypatch.setattr(ops, "_sp24_linear", emulated)
    monkeypatch.setattr(ops, "_nm_choice", lambda forward, *a: ("sp24", "emulated"))
    w = integer_nm(24, 40, torch.float16)
    t = sk.compress(w, 2, 4)
    values, metadata = t.values.clone(), t.metadata
    x = torch.randint(-3, 4, (2, 3, 40)).half()
    bias = torch.randint(-3, 4, (24,)).half()
    y = ops._nm_linear_cuda(x, values, metadata, bias, 40, 2, 4)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float16
    assert torch.equal(y.double(), x.double() @ w.double().T + bias.double())
    first = ops._sp24_cached(values)
    ops._nm_linear_cuda(x, values, metadata, None, 40, 2, 4)
    assert ops._sp24_cached(values) is first
    values.mul_(2)
    y2 = ops._nm_linear_cuda(x, values, metadata, None, 40, 2, 4)
    assert ops._sp24_cached(values) is not first
    assert torch.equal(y2.double(), 2 * (x.double() @ w.double().T))
    with pytest.raises(ValueError, match="x must have k = 40"):
        ops._nm_linear_cuda(x[..., :39], values, metadata, None, 40, 2, 4)


@needs_ext
@pytest.mark.interpreter
def test_cuda_dispatch_glue_with_triton_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="this torch comes without triton")
    monkeypatch.setattr(ops, "_nm_choice", lambda forward, *a: ("triton", "forced"))
    w = integer_nm(12, 20, torch.float32)
    t = sk.compress(w, 2, 4)
    x = torch.randn(2, 3, 20)
    gy = torch.randn(2, 3, 12)
    y = ops._nm_linear_cuda(x, t.values, t.metadata, None, 20, 2, 4)
    torch.testing.assert_close(y, reference.nm_linear(x, t.values, t.metadata, None, 20, 2, 4),
                               rtol=1e-5, atol=1e-5)
    gx = ops._nm_linear_grad_input_cuda(gy, t.values, t.metadata, 20, 2, 4)
    torch.testing.assert_close(gx, reference.nm_linear_grad_input(gy, t.values, t.metadata, 20, 2, 4),
                               rtol=1e-5, atol=1e-5)
    gv = ops._nm_sddmm_cuda(gy, x, t.metadata, 20, 2, 4)
    torch.testing.assert_close(gv, reference.nm_sddmm(gy, x, t.metadata, 20, 2, 4),
                               rtol=1e-5, atol=1e-5)


def test_cuda_backend_choice_explains_itself(monkeypatch):
    x = torch.randn(2, 8).half()
    values = torch.randn(4, 4).half()
    previous = ops.set_cuda_backend("reference")
    try:
        backend, why = ops._nm_choice(True, x, values, 2, 4)
        assert backend == "reference" and "set_cuda_backend('reference')" in why
    finally:
        ops.set_cuda_backend(previous)
    backend, why = ops._nm_choice(True, x.float(), values.float(), 2, 4)
    assert backend != "sp24"  # fp32 never goes to the sparse tensor cores
    with pytest.raises(ValueError, match="name must be one of"):
        ops.set_cuda_backend("cusparselt")


def _emulated_kernel(x2d, pv, pm, bias, rows, k):
    return torch.ops.sparsekit.sp24_emulate_linear(x2d, pv, pm, bias, rows, k).to(x2d.dtype)


@needs_ext
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_self_check_passes_a_right_kernel(monkeypatch, dtype):
    monkeypatch.setattr(ops, "_SP24_CHECKED", {})
    monkeypatch.setattr(ops, "_sp24_linear", _emulated_kernel)
    assert ops._sp24_self_check("cpu", dtype) == {"small": None, "tiled": None}
    assert ops._SP24_CHECKED[torch.device("cpu"), dtype] == {"small": None, "tiled": None}


@needs_ext
@pytest.mark.parametrize("broken", ["metadata of another tile", "rows swapped", "raises"])
def test_self_check_fails_a_wrong_kernel_and_the_dispatcher_avoids_it(monkeypatch, broken):
    # A kernel that reads the layout slightly wrong (as a GPU would if its mma.sp took the
    # metadata from other lanes than the layout assumes) must be caught, said, and avoided.
    def wrong(x2d, pv, pm, bias, rows, k):
        if broken == "raises":
            raise RuntimeError("CUDA error: no kernel image is available for execution\nmore")
        if broken == "metadata of another tile":
            pm = pm.clone()
            pm[::64] = pm[1::64]  # lane 0 reads tile 1's (valid) word for tile 0
        y = _emulated_kernel(x2d, pv, pm, bias, rows, k)
        return y[:, torch.arange(rows) ^ 1] if broken == "rows swapped" else y

    monkeypatch.setattr(ops, "_SP24_CHECKED", {})
    monkeypatch.setattr(ops, "_CHOICES", {})
    monkeypatch.setattr(ops, "_sp24_linear", wrong)
    monkeypatch.setattr(ops, "_sp24_reason", lambda *a: None)  # as if on a capable GPU
    x, values = torch.randn(2, 8).half(), torch.randn(4, 4).half()
    with pytest.warns(RuntimeWarning, match="failed its self-check"):
        backend, why = ops._nm_choice(True, x, values, 2, 4)
    assert backend != "sp24"
    assert "failed its self-check" in why
    assert ("no kernel image" in why) if broken == "raises" else ("must be exact" in why)
    assert ops._nm_choice(True, x, values, 2, 4) == (backend, why)  # decided once


@needs_ext
def test_first_call_inside_graph_capture_does_not_decide_for_good(monkeypatch):
    # The self-check synchronises, which graph capture forbids: a first call inside capture
    # takes another backend for now and leaves the decision to a later call.
    monkeypatch.setattr(ops, "_SP24_CHECKED", {})
    monkeypatch.setattr(ops, "_CHOICES", {})
    monkeypatch.setattr(ops, "_sp24_linear", _emulated_kernel)
    monkeypatch.setattr(ops, "_sp24_reason", lambda *a: None)
    x, values = torch.randn(2, 8).half(), torch.randn(4, 4).half()
    monkeypatch.setattr(ops, "_capturing", lambda: True)
    backend, why = ops._nm_choice(True, x, values, 2, 4)
    assert backend != "sp24" and "graph capture" in why
    assert not ops._CHOICES and not ops._SP24_CHECKED
    monkeypatch.setattr(ops, "_capturing", lambda: False)
    assert ops._nm_choice(True, x, values, 2, 4)[0] == "sp24"
    monkeypatch.setattr(ops, "_capturing", lambda: True)  # checked now: capture may use it
    assert ops._nm_choice(True, x, values, 2, 4)[0] == "sp24"


@needs_ext
def test_trainable_weights_are_packed_inside_graph_capture(monkeypatch):
    # Under capture a cached packed copy would be baked into the graph and go stale after an
    # optimizer step; trainable weights are packed in the graph, frozen ones use the cache.
    monkeypatch.setattr(ops, "_capturing", lambda: True)
    t = sk.compress(integer_nm(16, 32, torch.float16), 2, 4)
    trainable = t.values.clone().requires_grad_(True)
    packed_now = ops._sp24_packed(trainable, t.metadata, 32)
    assert ops._sp24_cached(trainable) is None
    assert torch.equal(packed_now[0], torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 32)[0])
    frozen = t.values.clone()
    assert ops._sp24_packed(frozen, t.metadata, 32) is ops._sp24_cached(frozen)


@needs_ext
def test_packing_cache_drops_dead_weights():
    w = integer_nm(16, 32, torch.float16)
    t = sk.compress(w, 2, 4)
    values = t.values.clone()
    ops._sp24_packed(values, t.metadata, 32)
    key = id(values)
    assert key in ops._SP24_CACHE and ops._sp24_cached(values) is not None
    del values
    assert key not in ops._SP24_CACHE


@needs_ext
def test_a_failing_tiled_kernel_leaves_the_small_batch_kernel_in_use(monkeypatch):
    # A GPU whose shared memory cannot hold the tiled pipeline (or that lacks its kernel)
    # must lose only that kernel: small batches keep the sparse tensor cores.
    def tiled_fails(x2d, pv, pm, bias, rows, k):
        if x2d.shape[0] > ops._SP24_SMALL_MAX_BATCH:
            raise RuntimeError("CUDA error: too many resources requested for launch")
        return _emulated_kernel(x2d, pv, pm, bias, rows, k)

    monkeypatch.setattr(ops, "_SP24_CHECKED", {})
    monkeypatch.setattr(ops, "_CHOICES", {})
    monkeypatch.setattr(ops, "_sp24_linear", tiled_fails)
    monkeypatch.setattr(ops, "_sp24_reason", lambda *a: None)
    values = torch.randn(4, 4).half()
    with pytest.warns(RuntimeWarning, match="tiled kernel failed its self-check") as record:
        checked = ops._sp24_self_check("cpu", torch.float16)
    assert checked["small"] is None and "too many resources" in checked["tiled"]
    assert not any("small kernel" in str(w.message) for w in record)
    for rows in (1, ops._SP24_SMALL_MAX_BATCH):
        x = torch.randn(rows, 8).half()
        assert ops._nm_choice(True, x, values, 2, 4)[0] == "sp24"
    x = torch.randn(2, ops._SP24_SMALL_MAX_BATCH // 2 + 1, 8).half()  # 3-D: rows = 18
    backend, why = ops._nm_choice(True, x, values, 2, 4)
    assert backend != "sp24" and "tiled kernel failed" in why


@needs_ext
def test_small_batch_limit_and_mma_instruction_match_the_build():
    info = sk.build_info()
    assert info["sp24_small_max_batch"] == ops._SP24_SMALL_MAX_BATCH
    if info["with_cuda"]:
        major, minor = (int(v) for v in info["cuda_version"].split(".")[:2])
        ordered = (major, minor) >= (12, 5)
        assert info["sp24_mma"] == ("mma.sp::ordered_metadata" if ordered else "mma.sp")
    else:
        assert info["sp24_mma"] is None


@needs_ext
@pytest.mark.parametrize("smem,stages", [
    (232448, 4),  # sm_90: 227 KiB per block
    (166912, 4),  # sm_80 / sm_87: 163 KiB
    (101376, 3),  # sm_86 / sm_89 / sm_120: 99 KiB, below the 4 stages' 108 KiB
    (65536, 2),
    (49152, 0),   # not even two stages: the tiled kernel is refused, not launched
])
def test_tiled_pipeline_depth_follows_the_shared_memory_limit(smem, stages):
    assert sk._ext.EXTENSION.sp24_tiled_stages(smem) == stages


@needs_ext
@pytest.mark.parametrize("nibble", [0x0, 0x5, 0xF, 0x1, 0x6])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_pack_refuses_metadata_that_mma_sp_cannot_take(nibble, dtype):
    # Equal or decreasing indices are undefined behaviour for mma.sp: packing must refuse
    # them with the row and group, as the CPU emulation and to_dense do.
    t = sk.compress(integer_nm(3, 20, dtype), 2, 4)
    metadata = t.metadata.clone()
    row, group = 2, 3  # group 3 is the high nibble of byte 1
    metadata[row, 1] = (metadata[row, 1] & 0x0F) | (nibble << 4)
    with pytest.raises(ValueError, match=f"metadata row {row}, group {group}: kept indices "
                                         f"{nibble & 3} and {nibble >> 2} are not strictly"):
        torch.ops.sparsekit.sp24_pack(t.values, metadata, 20)


@needs_ext
def test_packed_tensors_must_be_aligned_for_vector_loads():
    t = sk.compress(integer_nm(16, 64, torch.float16), 2, 4)
    pv, pm = torch.ops.sparsekit.sp24_pack(t.values, t.metadata, 64)
    x = torch.ones(1, 64).half()
    pv_view = torch.empty(pv.numel() + 8, dtype=pv.dtype)[1:1 + pv.numel()]
    pv_view.copy_(pv)
    pm_view = torch.empty(pm.numel() + 4, dtype=pm.dtype)[1:1 + pm.numel()]
    pm_view.copy_(pm)
    with pytest.raises(ValueError, match="packed_values must start on a 16-byte boundary"):
        torch.ops.sparsekit.sp24_emulate_linear(x, pv_view, pm, None, 16, 64)
    with pytest.raises(ValueError, match="packed_meta must start on a 16-byte boundary"):
        torch.ops.sparsekit.sp24_emulate_linear(x, pv, pm_view, None, 16, 64)
    want = torch.ops.sparsekit.sp24_emulate_linear(x, pv, pm, None, 16, 64)
    assert torch.equal(torch.ops.sparsekit.sp24_emulate_linear(x, pv_view.clone(), pm, None, 16, 64),
                       want)


def _nvcc():
    import shutil

    return shutil.which("nvcc")


_MMA_PROBE = r"""
#include "sp24_mma.cuh"
__global__ void probe(const uint4* a, const uint32_t* b, const uint32_t* e, float* d) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  const uint32_t bb[4] = {b[0], b[1], b[2], b[3]};
  sparsekit::sp24::mma_sp<false>(acc, a[threadIdx.x], bb, e[threadIdx.x]);
  sparsekit::sp24::mma_sp<true>(acc, a[threadIdx.x], bb, e[threadIdx.x]);
  for (int i = 0; i < 4; ++i) d[threadIdx.x * 4 + i] = acc[i];
}
"""


@pytest.mark.parametrize("plain", [False, True], ids=["ordered_metadata", "plain_mma_sp"])
def test_both_mma_sp_spellings_compile_to_sparse_tensor_core_code(tmp_path, plain):
    # CUDA 12.0-12.4 lack mma.sp::ordered_metadata (PTX ISA 8.5): their builds take plain
    # mma.sp. Compile the kernels' MMA both ways, here, for sm_80 and sm_90.
    if _nvcc() is None:
        pytest.skip("no nvcc on PATH")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump in the triton wheel")
    src = tmp_path / "probe.cu"
    src.write_text(_MMA_PROBE)
    include = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda")
    defines = ["-DSPARSEKIT_SP24_PLAIN_MMA_SP"] if plain else []
    ptx = subprocess.run([_nvcc(), "-ptx", "-arch=sm_80", "-std=c++17", f"-I{include}", *defines,
                          str(src), "-o", str(tmp_path / "probe.ptx")],
                         capture_output=True, text=True)
    assert ptx.returncode == 0, ptx.stderr
    text = (tmp_path / "probe.ptx").read_text()
    assert ("ordered_metadata" in text) != plain
    assert re.search(r"mma\.sp(::ordered_metadata)?\.sync\.aligned\.m16n8k32", text)
    for arch in ("sm_80", "sm_90"):
        cubin = tmp_path / f"probe_{arch}.cubin"
        out = subprocess.run([_nvcc(), "-cubin", f"-arch={arch}", "-std=c++17", f"-I{include}",
                              *defines, str(src), "-o", str(cubin)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        assert re.search(r"HMMA\.SP\.16832\.F32 ", sass), f"no f16 HMMA.SP for {arch}"
        assert re.search(r"HMMA\.SP\.16832\.F32\.BF16 ", sass), f"no bf16 HMMA.SP for {arch}"
