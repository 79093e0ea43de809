"""Turns a pytest-benchmark JSON file into the README's benchmark tables (markdown) and a
plot of the linear speed-up against batch size (PNG beside the JSON).

    python bench/report.py bench/results/cpu.json
"""

from __future__ import annotations

import json
import sys


def rows(data):
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "speedup_vs_baseline" in info:
            yield (f"masks.nm 2:4, {info['dtype']} {'x'.join(map(str, info['shape']))}",
                   f"{info['sparsekit_s'] * 1e3:.1f} ms",
                   f"exhaustive pattern search {info['baseline_s'] * 1e3:.1f} ms",
                   f"{info['speedup_vs_baseline']:.1f}x faster (target {info['target_speedup']:.0f}x)")
        elif "ratio_vs_clone" in info:
            yield (f"{info['op']} 2:4, {info['dtype']} {'x'.join(map(str, info['shape']))}",
                   f"{info['gbps']:.1f} GB/s",
                   f"clone() {info['clone_gbps']:.1f} GB/s",
                   f"{info['ratio_vs_clone']:.2f} of clone (target {info['target_ratio']})")


def linear_rows(data):
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind", "").startswith("linear"):
            target = info.get("target")
            verdict = "" if target is None else (" (target %.1fx: %s)" % (
                target, "met" if info["ratio"] >= target else "NOT met"))
            what = "backward" if info["kind"] == "linear_backward" else "forward"
            yield (f"{what} {info['dtype']} {info['shape'][0]}x{info['shape'][1]}", str(info["batch"]),
                   f"{info['dense_s'] * 1e3:.2f} ms", f"{info['sparse_s'] * 1e3:.2f} ms",
                   f"{info['ratio']:.2f}x{verdict}")


def module_rows(data):
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "module":
            yield (info["what"], f"{info['dense_s'] * 1e3:.1f} ms", f"{info['sparse_s'] * 1e3:.1f} ms",
                   f"{info['ratio']:.2f}x",
                   f"{info['sparse_weight_bytes'] / info['dense_weight_bytes']:.3f}")


def plot_linear(data, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    series = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "linear_forward":
            key = f"{info['dtype']} {info['shape'][0]}x{info['shape'][1]}"
            series.setdefault(key, []).append((info["batch"], info["ratio"]))
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch (rows of x)")
    ax.set_ylabel("speed-up over dense F.linear (x)")
    info = next(b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind"))
    ax.set_title(f"2:4 nm_linear vs dense, CPU {info['threads']} threads, torch {info['torch']}",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = next((b["extra_info"] for b in data["benchmarks"] if "cpu" in b.get("extra_info", {})), {})
    print(f"Machine: {info.get('cpu', '?')}, {info.get('threads', '?')} threads, "
          f"torch {info.get('torch', '?')}\n")
    print("| what | sparsekit | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    for row in rows(data):
        print("| " + " | ".join(row) + " |")
    linear = list(linear_rows(data))
    if linear:
        print("\n| N:M linear 2:4 | batch | dense F.linear | sparsekit | speed-up |")
        print("|---|---|---|---|---|")
        for row in linear:
            print("| " + " | ".join(row) + " |")
        png = path.rsplit(".", 1)[0] + "_linear.png"
        if plot_linear(data, png):
            print(f"\nPlot: {png}")
    modules = list(module_rows(data))
    if modules:
        print("\n| module (2:4, fp32) | dense | sparsified | speed-up | weight bytes vs dense |")
        print("|---|---|---|---|---|")
        for row in modules:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu.json")
