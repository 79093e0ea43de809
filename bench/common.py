"""Shared by the benchmarks: timing the yardstick in the same run, and the set-up a
figure was measured on (machine, torch version, thread count)."""

from __future__ import annotations

import os
import platform

import torch

from sparsekit.timing import paired_seconds  # noqa: F401  (the benchmarks use it)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    """The set-up a figure was measured on. With a visible GPU also its name, the CUDA
    version torch was built with and the triton version (read from package metadata, so a
    CPU benchmark never imports triton)."""
    info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda,
                    triton=_package_version("triton"))
    return info


def cuda_paired_seconds(fn_a, fn_b, repeats: int, flush_bytes: int = 256 << 20):
    """Median GPU times (CUDA events) of fn_a and fn_b, called alternately after one warm-up
    each. Before every timed call a buffer larger than any L2 is overwritten, so weights
    are read from memory as in a real model (a 4096x4096 fp16 weight would otherwise sit in
    an H100's 50 MB L2). Only the call itself lies between its two events."""
    flush = torch.empty(flush_bytes, dtype=torch.uint8, device="cuda")
    fn_a(), fn_b()
    torch.cuda.synchronize()
    times = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
    median = [sorted(t)[len(t) // 2] for t in times]
    return median[0], median[1]


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| in float64."""
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def semi_structured(dense):
    """(torch's 2:4 semi-structured tensor of `dense`, None), or (None, why there is none)."""
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(dense), None
    except Exception as exc:  # unsupported shape / dtype / GPU / build
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of this CPU's largest cache (sysfs), or `default` where it cannot be read."""
    import glob

    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=default)


def layer_weight_bytes(model) -> int:
    """Bytes of the weights of model's Linear / Conv2d layers, compressed ones counted as
    stored (values + metadata); a layer held inside a SparseConv2d is counted once, there."""
    from torch import nn

    import sparsekit as sk

    total, inside = 0, set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, (sk.SparseLinear, sk.SparseConv2d)):
            total += module.weight_nbytes
            inside.update(id(m) for m in module.modules())
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            total += module.weight.nbytes
    return total


def model_bytes(model) -> int:
    """Bytes of all of model's parameters and buffers, each stored tensor counted once
    (tied weights are one tensor)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def kernels_used(fn, *args, grad: bool = False) -> dict[str, int]:
    """Runs fn(*args) once (under torch.no_grad() unless grad) and says which implementation each sparsekit op it
    called ran, as `sk.explain` words it for that call's own arguments: {explanation: number
    of calls}. Ops are seen below the modules (a TorchDispatchMode), so whatever path a
    module takes (sparse kernel, decompress + dense GEMM, ...) is what gets named."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import sparsekit as sk

    calls = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "sparsekit":
                try:
                    calls.append(sk.explain(func._opname, *args, *kwargs.values()))
                except ValueError:  # an op explain does not cover
                    calls.append(f"sparsekit::{func._opname}: called (sk.explain does not "
                                 "cover this op)")
            return func(*args, **kwargs)

    with torch.set_grad_enabled(grad), _Record():
        fn(*args)
    counts: dict[str, int] = {}
    for c in calls:
        counts[c] = counts.get(c, 0) + 1
    return counts


def layer_choices(model) -> dict[str, int]:
    """{`sk.explain(layer)` for its last call: number of layers} over model's sparse layers
    (a layer inside a SparseConv2d counted with it), where explain takes a layer (sparsekit
    with per-call kernel choice); {} otherwise."""
    import sparsekit as sk

    counts: dict[str, int] = {}
    inside = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, (sk.SparseLinear, sk.SparseConv2d)):
            continue
        inside.update(id(m) for m in module.modules())
        try:
            text = sk.explain(module)
        except (TypeError, ValueError):
            continue
        counts[text] = counts.get(text, 0) + 1
    return counts
