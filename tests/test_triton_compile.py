"""The Triton kernels compile for real GPUs, checked without one.

The interpreter runs the kernels' Python semantics only: it never lowers them, so a layout,
type or tensor-core problem (bf16 dot above all) would first show on a GPU. Here every
kernel is compiled ahead of time for sm_80 (A100) and sm_90 (H100) with triton's own
ptxas, and the products must lower to tensor-core instructions (mma.sync / wgmma).
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import sparsekit  # noqa: F401
    from sparsekit.kernels._tiles import runs
    nm = importlib.import_module("sparsekit.kernels.nm_gemm")
    mg = importlib.import_module("sparsekit.kernels.masked_gemm")
    UNIT = ("stride_xk", "stride_wk", "stride_gr", "stride_or", "stride_yr")

    def jit_of(k):
        while not isinstance(k, triton.runtime.jit.JITFunction):
            k = k.fn
        return k

    def build(kernel, dtype, ptrs, constexprs, config, arch):
        fn = jit_of(kernel)
        cx = dict(constexprs, **config.kwargs)
        if "BLOCK_K" in cx:
            cx["BLOCK_G"] = max(cx["BLOCK_K"] // cx["MP"], 1)
        if "RUNS" in fn.arg_names:
            cx["RUNS"] = runs(cx)
        for name in UNIT:  # the runtime specializes unit strides the same way
            if name in fn.arg_names:
                cx[name] = 1
        sig = {a: "constexpr" if a in cx else ("*u8" if a in ptrs else
               f"*{dtype}" if a.endswith("_ptr") else "i32") for a in fn.arg_names}
        src = ASTSource(fn, sig, cx)
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": config.num_warps,
                                      "num_stages": config.num_stages})
        return out.asm["ptx"]

    arch, dtype = int(sys.argv[1]), sys.argv[2]
    fp32 = dtype == "fp32"
    dot = dict(UPCAST=False, IS_FP32=fp32, PRECISION="ieee")
    report = {}
    for n, m in ((2, 4), (3, 7)):
        nmc = dict(N=n, M=m, MP=triton.next_power_of_2(m), BITS=(m - 1).bit_length(), **dot)
        cfg = nm._DOT_CONFIGS[1]
        report[f"nm_fwd {n}:{m}"] = build(nm._nm_gemm_fwd_kernel, dtype, ("meta_ptr",),
                                          dict(nmc, HAS_BIAS=True), cfg, arch)
        report[f"nm_grad_input {n}:{m}"] = build(nm._nm_gemm_grad_input_kernel, dtype,
                                                 ("meta_ptr",), nmc, cfg, arch)
        report[f"nm_grad_values {n}:{m}"] = build(nm._nm_gemm_grad_values_kernel, dtype,
                                                  ("meta_ptr",), nmc, cfg, arch)
    gemv = dict(N=2, M=4, BITS=2, HAS_BIAS=True, BLOCK_B=1)
    report["gemv"] = build(nm._nm_gemv_kernel, dtype, ("meta_ptr",), gemv,
                           nm._GEMV_CONFIGS[1], arch)
    report["gemv batch 8"] = build(nm._nm_gemv_kernel, dtype, ("meta_ptr",),
                                   dict(gemv, BLOCK_B=8), nm._GEMV_CONFIGS[0], arch)
    bits = dict(MASK_IS_BITS=True, N=1, M=8, MP=8, BITS=1, **dot)
    cfg = mg._CONFIGS[1]
    report["masked_fwd"] = build(mg._masked_gemm_fwd_kernel, dtype, ("mask_ptr",),
                                 dict(bits, HAS_BIAS=True), cfg, arch)
    report["masked_grad_input"] = build(mg._masked_gemm_grad_input_kernel, dtype,
                                        ("mask_ptr",), bits, cfg, arch)
    report["masked_grad_weight"] = build(mg._masked_gemm_grad_weight_kernel, dtype,
                                         ("mask_ptr",), bits, cfg, arch)
    tensor_cores = "wgmma" if arch >= 90 else "mma.sync"
    print(json.dumps({name: (tensor_cores in ptx) for name, ptx in report.items()}))
    """
)


@pytest.mark.parametrize("arch,dtype", [(90, "bf16"), (80, "fp16")])
def test_kernels_compile_for_gpus_and_use_tensor_cores(arch, dtype):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), dtype], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("triton's ptxas is missing")
    assert result.returncode == 0, result.stderr[-4000:]
    import json

    uses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(uses) == 11
    for name, tensor_cores in uses.items():
        # The GEMV kernel multiplies on CUDA cores by design; every other kernel must not.
        assert tensor_cores == (not name.startswith("gemv")), name
