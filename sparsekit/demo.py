"""The tour (`python -m sparsekit tour`): every mask method on real PyTorch layers, the
2:4 compressed format and what it saves, a 2:4 linear layer multiplied on its compressed
weight against dense, and a picture of the masks."""

from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from . import _ext, build_info, compress, explain, masks, ops
from .timing import paired_seconds


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _mask_table(weight: torch.Tensor, conv_weight: torch.Tensor):
    """(name, mask) for every method, on a Linear weight (and the Conv2d for channels)."""
    return [
        ("magnitude 50%", masks.magnitude(weight, 0.5)),
        ("threshold |w| >= 0.01", masks.threshold(weight, 0.01)),
        ("random 50%", masks.random(weight, 0.5, generator=torch.Generator().manual_seed(0))),
        ("ln_structured rows 50% (L2)", masks.ln_structured(weight, 0.5, n=2, dim=0)),
        ("ln_structured columns 25% (L1)", masks.ln_structured(weight, 0.25, n=1, dim=1)),
        ("block 4x4 50%", masks.block(weight, 0.5, block=(4, 4))),
        ("2:4 (N:M)", masks.nm(weight, 2, 4)),
        ("1:4 (N:M)", masks.nm(weight, 1, 4)),
        ("global magnitude 50% (with conv)", masks.global_magnitude([weight, conv_weight], 0.5)[0]),
        ("conv filters 50% (L2, dim 0)", masks.ln_structured(conv_weight, 0.5, n=2, dim=0)),
    ]


def _figure(path: str, named_masks) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [(name, mask) for name, mask in named_masks if mask.dim() == 2]
    cols = 4
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, mask) in zip(axes.flat, shown):
        ax.imshow(mask[:24, :24].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{name}\nkept {mask.float().mean():.0%}", fontsize=9)
        ax.axis("on")
        ax.set_xticks([x - 0.5 for x in range(0, 25, 4)], labels=[])
        ax.set_yticks([])
        ax.grid(axis="x", color="tab:red", linewidth=0.6)
    fig.suptitle("Masks on the top-left 24x24 of a Linear(1024, 1024) weight "
                 "(black = kept; red lines every 4 columns = N:M groups)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_demo(out_dir: str, seed: int = 0) -> int:
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    info = build_info()
    print("sparsekit demo")
    print(f"  torch {torch.__version__}, {torch.get_num_threads()} threads; extension "
          f"{'loaded' if info['extension_loaded'] else 'NOT loaded: ' + str(_ext.LOAD_ERROR)}")
    if info["extension_loaded"]:
        print(f"  CUDA kernels compiled: {info['with_cuda']} ({info.get('cuda_arch_list')}); "
              f"CPU ISAs available: {', '.join(info['cpu_isa_available']) or 'none'}")

    linear = nn.Linear(1024, 1024)
    conv = nn.Conv2d(64, 128, 3, padding=1)
    weight, conv_weight = linear.weight.detach(), conv.weight.detach()

    print("\n1. Masks on a Linear(1024, 1024) weight and a Conv2d(64, 128, 3) weight")
    named = _mask_table(weight, conv_weight)
    results = {"masks": {}}
    for name, mask in named:
        kept = mask.float().mean().item()
        results["masks"][name] = {"kept_fraction": kept}
        print(f"   {name:34s} kept {kept:6.1%}")

    print("\n2. 2:4 compression of the Linear weight (values + 2-bit index metadata)")
    results["compress"] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        w = weight.to(dtype)
        start = time.perf_counter()
        t = compress(w, 2, 4, prune=True)
        seconds = time.perf_counter() - start
        exact = torch.equal(t.to_dense(), torch.where(masks.nm(w, 2, 4), w, torch.zeros((), dtype=dtype)))
        results["compress"][str(dtype)] = {
            "dense_bytes": t.dense_nbytes, "compressed_bytes": t.nbytes,
            "ratio": t.compression_ratio, "round_trip_exact": exact, "seconds": seconds}
        print(f"   {str(dtype):16s} dense {_bytes(t.dense_nbytes)} -> {_bytes(t.nbytes)} "
              f"({t.compression_ratio:.4f} of dense), prune+compress {seconds * 1e3:.1f} ms, "
              f"to_dense() exact: {exact}")
    print(f"   {explain('nm_compress', weight)}")

    print("\n3. Other N:M patterns (fp16): bytes relative to dense")
    for n, m in [(1, 2), (1, 4), (2, 8), (4, 8), (8, 16), (16, 32)]:
        t = compress(weight.half(), n, m, prune=True)
        print(f"   {f'{n}:{m}':6s} keeps {n / m:5.1%} of the weights in {t.compression_ratio:.4f} of the bytes")

    print("\n4. Multiplying on the compressed weight: 2:4 Linear(4096, 4096), fp32, CPU")
    results["linear"] = {}
    big = compress(torch.randn(4096, 4096), 2, 4, prune=True)
    dense_w = big.to_dense()
    for batch in (1, 8, 64):
        x = torch.randn(batch, 4096)
        sparse = lambda: ops.nm_linear(x, big.values, big.metadata, None, 4096, 2, 4)  # noqa: E731
        dense = lambda: torch.nn.functional.linear(x, dense_w)  # noqa: E731
        dense_s, sparse_s = paired_seconds(dense, sparse, 5)
        # Both sum in fp32 in different orders: compare by relative error, as the tests do.
        exact = ((sparse() - dense()).norm() / dense().norm()).item() < 1e-5
        results["linear"][batch] = {"dense_s": dense_s, "sparse_s": sparse_s, "matches_dense": exact}
        print(f"   batch {batch:3d}: dense {dense_s * 1e3:6.2f} ms, sparsekit {sparse_s * 1e3:6.2f} ms "
              f"({dense_s / sparse_s:.2f}x), weight {big.nbytes / dense_w.nbytes:.3f} of dense, "
              f"same result (fp32 rounding): {exact}")
    print(f"   {explain('nm_linear', x, big.values)}")

    figure = os.path.join(out_dir, "masks.png")
    if _figure(figure, named):
        print(f"\nFigure: {figure}")
    else:
        print("\n(matplotlib is not installed: no figure)")
    with open(os.path.join(out_dir, "tour.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"Results: {os.path.join(out_dir, 'tour.json')}")
    return 0
