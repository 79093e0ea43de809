"""Op registration: opcheck, schemas, fake impls under torch.compile, dispatch and the
fallback when the extension is missing or stale."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import sparsekit as sk
from sparsekit import ops
from nm_inputs import random_nm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _samples():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for (rows, k), (n, m) in [((5, 13), (2, 4)), ((8, 64), (2, 4)), ((3, 21), (3, 7))]:
            w = random_nm(rows, k, n, m, dtype)
            values, metadata = ops.nm_compress(w, n, m)
            yield "nm_mask", (torch.randn(rows, k).to(dtype), n, m)
            yield "nm_compress", (w, n, m)
            yield "nm_decompress", (values, metadata, k, n, m)


@pytest.mark.parametrize("name,args", list(_samples()), ids=lambda x: x if isinstance(x, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.sparsekit, name).default, args)


def test_schemas_declared_once_match_python_fallback():
    for name, schema in ops.SCHEMAS.items():
        registered = str(torch._C._get_schema(f"sparsekit::{name}", ""))
        assert registered == f"sparsekit::{schema}"
    if sk.build_info()["extension_loaded"]:
        for name, schema in ops.INTERNAL_SCHEMAS.items():
            registered = str(torch._C._get_schema(f"sparsekit::{name}", ""))
            assert registered == f"sparsekit::{schema}"


def test_cpp_schemas_are_the_ones_in_sparsekit_cpp():
    with open(os.path.join(ROOT, "csrc", "sparsekit.cpp")) as f:
        source = f.read()
    # A schema may be split over adjacent string literals: join them first.
    declared = ["".join(re.findall(r'"([^"]*)"', call))
                for call in re.findall(r"lib\.def\(((?:\s*\"[^\"]*\")+)\s*\)", source)]
    assert sorted(declared) == sorted([*ops.SCHEMAS.values(), *ops.INTERNAL_SCHEMAS.values()])


def test_extension_is_loaded_with_cpu_kernels():
    info = sk.build_info()
    assert info["extension_loaded"], info["load_error"]
    assert info["torch_version"] == torch.__version__.split("+")[0]
    for name in ops.SCHEMAS:
        if name not in ops.REFERENCE_ON_CPU:
            assert "CPU" in info["kernels"][name]
    assert "scalar" in info["cpu_isa_compiled"]


def test_cuda_kernels_built_whenever_toolkit_and_cuda_torch_exist():
    # The build decides on nvcc and a CUDA torch, never on a visible GPU.
    info = sk.build_info()
    from torch.utils.cpp_extension import CUDA_HOME  # noqa: F401  (import: it reads env)

    nvcc_found = bool(os.environ.get("CUDA_HOME")) or any(
        os.access(os.path.join(p, "nvcc"), os.X_OK) for p in os.environ.get("PATH", "").split(":"))
    if torch.version.cuda is None or not nvcc_found:
        pytest.skip("CPU-only torch or no nvcc: a C++-only build is expected")
    assert info["with_cuda"], "torch is a CUDA build and nvcc exists, but _C has no CUDA kernels"
    for name in ("nm_mask", "nm_compress", "nm_decompress"):  # the CUDA format kernels
        assert "CUDA" in info["kernels"][name]


def test_explain_names_the_kernel():
    w = torch.randn(4, 8)
    assert "compiled CPU kernel" in sk.explain("nm_mask", w, 2, 4)
    assert "fake" in sk.explain("nm_mask", w.to("meta"), 2, 4)
    with pytest.raises(ValueError, match="op must be one of"):
        sk.explain("nm_gemm", w)
    with pytest.raises(ValueError, match="args must include"):
        sk.explain("nm_mask", 2, 4)


def test_torch_compile_fullgraph_through_format_ops():
    def round_trip(w):
        mask = ops.nm_mask(w.abs(), 2, 4)
        values, metadata = ops.nm_compress(torch.where(mask, w, 0.0), 2, 4)
        return ops.nm_decompress(values * 2, metadata, w.shape[1], 2, 4)

    w = torch.randn(16, 40)
    compiled = torch.compile(round_trip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), round_trip(w))


def _run_python(code, env_extra):
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_without_extension_reference_ops_keep_library_usable():
    result = _run_python(
        """
        import torch, sparsekit as sk
        assert sk.build_info()["extension_loaded"] is False
        w = torch.randn(6, 10)
        t = sk.compress(w, 2, 4, prune=True)
        assert torch.equal(t.to_dense(), torch.where(sk.masks.nm(w, 2, 4), w, 0.0))
        print(sk.explain("nm_compress", w))
        """,
        {"SPARSEKIT_DISABLE_EXTENSION": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "plain-torch reference" in result.stdout


def test_without_extension_python_autograd_formulas_hold():
    # A compiled build runs the C++ autograd of the N:M products (csrc/autograd.cpp); the
    # Python formulas in ops.py serve builds without it and must stay right on their own.
    result = _run_python(
        """
        import torch, sparsekit as sk
        from sparsekit import ops
        assert sk.build_info()["extension_loaded"] is False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(5, 16, generator=g, dtype=torch.float64)
        t = sk.compress(w, 2, 4, prune=True)
        v = t.values.clone().requires_grad_()
        x = torch.randn(3, 16, generator=g, dtype=torch.float64, requires_grad=True)
        gy = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
        md = t.metadata
        gc, ggc = torch.autograd.gradcheck, torch.autograd.gradgradcheck
        assert gc(lambda a, v, b: ops.nm_linear(a, v, md, b, 16, 2, 4), (x, v, b))
        assert ggc(lambda a, v: ops.nm_linear(a, v, md, None, 16, 2, 4), (x, v))
        assert ggc(lambda g, v: ops.nm_linear_grad_input(g, v, md, 16, 2, 4), (gy, v))
        assert ggc(lambda g, a: ops.nm_sddmm(g, a, md, 16, 2, 4), (gy, x))
        print("gradchecks ok")
        """,
        {"SPARSEKIT_DISABLE_EXTENSION": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "gradchecks ok" in result.stdout


def test_compiled_build_runs_the_cpp_autograd():
    # Python's register_autograd on these ops would override the C++ kernels and put a
    # Python call back on every product.
    if not sk.build_info()["extension_loaded"]:
        pytest.skip("sparsekit._C is not built")
    for name in ("nm_linear", "nm_linear_grad_input", "nm_sddmm"):
        autograd = [line for line in torch._C._dispatch_dump(f"sparsekit::{name}").splitlines()
                    if line.startswith("Autograd[alias]:")]
        assert len(autograd) == 1 and "csrc/autograd.cpp" in autograd[0], autograd


def test_stale_build_gives_rebuild_message_and_falls_back():
    result = _run_python(
        """
        import sys, types, warnings
        stale = types.ModuleType("sparsekit._build_config")
        stale.TORCH_VERSION, stale.WITH_CUDA, stale.CUDA_VERSION = "0.0.1", False, None
        sys.modules["sparsekit._build_config"] = stale
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, sparsekit as sk
        print([str(w.message) for w in caught])
        t = sk.compress(torch.randn(4, 8), 2, 4, prune=True)
        print(t.to_dense().shape)
        """,
        {},
    )
    assert result.returncode == 0, result.stderr
    assert "built for torch 0.0.1" in result.stdout
    assert "pip install --no-build-isolation" in result.stdout
    assert "torch.Size([4, 8])" in result.stdout


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (3, 7), (16, 32)])
def test_cuda_kernels_match_reference(dtype, n, m):
    w = random_nm(33, 257, n, m, dtype)
    values, metadata = ops.nm_compress(w.cuda(), n, m)
    ref_values, ref_metadata = sk.reference.nm_compress(w, n, m)
    assert torch.equal(values.cpu(), ref_values) and torch.equal(metadata.cpu(), ref_metadata)
    assert torch.equal(ops.nm_decompress(values, metadata, 257, n, m).cpu(),
                       sk.reference.nm_decompress(ref_values, ref_metadata, 257, n, m))
    scores = torch.randn(33, 257).to(dtype)
    assert torch.equal(ops.nm_mask(scores.cuda(), n, m).cpu(), sk.reference.nm_mask(scores, n, m))
    bad = w.clone()
    bad[7, :m] = 1.0
    with pytest.raises(ValueError, match="row 7, group 0"):
        ops.nm_compress(bad.cuda(), n, m)


# -- the nm_mask kernel's fast paths (2:4 fp32 AVX2, 2:4 scalar, generic) -----------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1, 4), (3, 20), (300, 64), (7, 36), (5, 130)])
@pytest.mark.parametrize("absolute", [False, True])
def test_nm_mask_kernel_matches_reference_with_ties(dtype, shape, absolute):
    heavy_ties = torch.randint(-3, 4, shape).to(dtype)
    distinct = torch.randn(shape, dtype=torch.float64).to(dtype)
    for scores in (heavy_ties, distinct):
        assert torch.equal(ops.nm_mask(scores, 2, 4, absolute),
                           sk.reference.nm_mask(scores, 2, 4, absolute))


def test_nm_mask_kernel_reports_first_nan():
    scores = torch.randn(512, 256)
    scores[400, 3] = float("nan")
    scores[41, 130] = float("nan")
    for absolute in (False, True):
        with pytest.raises(ValueError, match=r"row 41, column 130"):
            ops.nm_mask(scores, 2, 4, absolute)
    with pytest.raises(ValueError, match=r"row 41, column 130"):
        ops.nm_mask(scores, 3, 8)
