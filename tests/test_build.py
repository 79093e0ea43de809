"""What the build produced: CUDA code for every target architecture (checked by
disassembling the extension, since no GPU runs here) and a truthful build report."""

import glob
import os
import shutil
import subprocess

import pytest

import sparsekit as sk

EXPECTED_KERNELS = ("compress_kernel", "decompress_kernel", "nm_mask_kernel")


def _cuobjdump():
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None:
        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.access(path, os.X_OK):
            return path
    return shutil.which("cuobjdump")


def _extension_path():
    return glob.glob(os.path.join(os.path.dirname(sk.__file__), "_C*.so"))[0]


def _arches():
    arch_list = sk.build_info().get("cuda_arch_list") or ""
    return sorted({a.split("+")[0].replace(".", "") for a in arch_list.replace(" ", ";").split(";") if a})


@pytest.fixture(scope="module")
def cuobjdump():
    if not sk.build_info().get("with_cuda"):
        pytest.skip("this build has no CUDA kernels")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (it ships in triton's wheel)")
    return tool


def test_cubins_for_every_target_arch(cuobjdump):
    listing = subprocess.run([cuobjdump, "--list-elf", _extension_path()], capture_output=True,
                             text=True, check=True).stdout
    arches = _arches()
    assert arches, "build_info reports no CUDA arch list"
    for arch in arches:
        assert f"sm_{arch}.cubin" in listing, f"no sm_{arch} code in the extension:\n{listing}"


def test_ptx_embedded_where_the_arch_list_asks_for_it(cuobjdump):
    # "9.0+PTX": sm_90 PTX of every CUDA source, which a newer GPU's driver compiles at load.
    arch_list = sk.build_info().get("cuda_arch_list") or ""
    wanted = [a.split("+")[0].replace(".", "") for a in arch_list.split(";") if a.endswith("+PTX")]
    if not wanted:
        pytest.skip(f"the arch list {arch_list!r} asks for no PTX")
    listing = subprocess.run([cuobjdump, "--list-ptx", _extension_path()], capture_output=True,
                             text=True, check=True).stdout
    sources = sorted(os.path.basename(f)[:-3] for f in glob.glob(
        os.path.join(os.path.dirname(os.path.dirname(sk.__file__)), "csrc", "cuda", "*.cu")))
    assert sources, "csrc/cuda not found next to the package"
    for arch in wanted:
        for source in sources:
            assert f"{source}.sm_{arch}.ptx" in listing, f"no sm_{arch} PTX of {source}:\n{listing}"


def test_format_kernels_compiled_for_every_arch(cuobjdump):
    for arch in _arches():
        sass = subprocess.run([cuobjdump, "-sass", "-arch", f"sm_{arch}", _extension_path()],
                              capture_output=True, text=True, check=True).stdout
        for kernel in EXPECTED_KERNELS:
            assert kernel in sass, f"{kernel} missing from sm_{arch} code"


def test_build_info_is_truthful():
    info = sk.build_info()
    assert info["extension_loaded"]
    assert set(info["cpu_isa_available"]) <= {"avx2", "avx512", "avx512bf16"}
    if info["with_cuda"]:
        assert info["cuda_version"] and info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None
