"""Build sparsekit and its one extension, sparsekit._C.

C++ sources are always built. CUDA sources are built when torch is a CUDA build and nvcc
is found (or FORCE_CUDA=1); whether a GPU is present never decides it. Environment:
  FORCE_CUDA=1            build CUDA kernels even if nvcc is not found on PATH
  SPARSEKIT_NO_CUDA=1     build the C++ kernels only
  CUDA_HOME               the CUDA toolkit root (otherwise found from nvcc)
  TORCH_CUDA_ARCH_LIST    defaults to "8.0;9.0+PTX" when no GPU is visible (machine code for
                          sm_80 and sm_90, and sm_90 PTX that newer GPUs' drivers compile)
  MAX_JOBS                parallel compile jobs (defaults to a number cores and memory allow)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_root(nvcc):
    """The toolkit root nvcc really runs from.

    `nvcc` on PATH may be a wrapper script outside the toolkit (so <dir>/.. is wrong and
    the link fails with `cannot find -lcudart`). `nvcc --dryrun` prints the real root.
    """
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "x.cu"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout + out.stderr
    for key in ("TOP", "_HERE_"):
        match = re.search(rf"^#\$ {key}=(\S+)", text, re.MULTILINE)
        if match:
            path = os.path.realpath(match.group(1))
            root = path if key == "TOP" else os.path.dirname(path)
            if os.path.exists(os.path.join(root, "bin", "nvcc")):
                return root
    return None


def _configure_cuda():
    """Decide whether to build CUDA kernels; sets CUDA_HOME before torch reads it."""
    import torch

    if _flag("SPARSEKIT_NO_CUDA"):
        return False, "disabled by SPARSEKIT_NO_CUDA"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        if nvcc:
            home = _nvcc_root(nvcc)
        if home:
            os.environ["CUDA_HOME"] = home
    if not home:
        if _flag("FORCE_CUDA"):
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # No GPU: the architectures the kernels are written for, plus PTX that newer GPUs
        # compile at load time. With GPUs: theirs (what torch would pick), written down so
        # build_info reports what was really built.
        visible = sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                          for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(visible) or "8.0;9.0+PTX"
    return True, f"CUDA_HOME={home}, arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')}"


def _default_jobs():
    # nvcc with torch headers takes ~2 GB per job; keep the machine responsive.
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gb // 3))))


def _nvcc_version():
    from torch.utils.cpp_extension import CUDA_HOME

    try:
        out = subprocess.run(
            [os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
            capture_output=True, text=True, timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return ""
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else ""


def _write_build_config(torch_version, with_cuda, cuda_version):
    """Records what _C is built against, so import can refuse a stale build politely."""
    path = os.path.join(ROOT, "sparsekit", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time: what sparsekit._C was built against.\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_VERSION = {cuda_version!r}\n")


def _extensions():
    with_cuda, why = _configure_cuda()
    print(f"sparsekit: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why})")
    os.environ.setdefault("MAX_JOBS", _default_jobs())

    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    torch_version = torch.__version__.split("+")[0]
    sources = [os.path.join("csrc", "sparsekit.cpp"), os.path.join("csrc", "autograd.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    define = [("SPARSEKIT_TORCH_VERSION", f'"{torch_version}"')]
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unused-function"]
    # libgomp: torch ships and loads libgomp.so.1 first, so the soname resolves to its copy
    # and torch.set_num_threads governs our OpenMP regions too.
    link = ["-fopenmp"]
    cuda_version = None
    if with_cuda:
        cuda_version = _nvcc_version() or torch.version.cuda
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define += [
            ("SPARSEKIT_WITH_CUDA", None),
            ("SPARSEKIT_CUDA_VERSION", f'"{cuda_version}"'),
            ("SPARSEKIT_CUDA_ARCH_LIST", f'"{os.environ.get("TORCH_CUDA_ARCH_LIST", "auto")}"'),
        ]
        ext = CUDAExtension(
            "sparsekit._C",
            sources,
            define_macros=define,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("sparsekit._C", sources, define_macros=define,
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    _write_build_config(torch_version, with_cuda, cuda_version)
    return [ext]


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class PersistentBuildExtension(BuildExtension):
        """Keeps objects and ninja's state in ./build/temp-<torch>-<cpu|cuda>, so rebuilds
        are incremental and builds against different torch wheels do not mix.

        (An editable install would otherwise compile in a fresh temporary folder.)
        """

        def finalize_options(self):
            super().finalize_options()
            import torch

            flavour = "cuda" if any(e.name == "sparsekit._C" and any(
                src.endswith(".cu") for src in e.sources) for e in self.extensions) else "cpu"
            tag = f"{torch.__version__.split('+')[0]}-{flavour}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

    return PersistentBuildExtension.with_options(use_ninja=True)


packages = find_packages(include=["sparsekit", "sparsekit.*"]) + ["sparsekit.kernels"]

setup(
    packages=packages,
    package_dir={"sparsekit.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext_class()},
)
