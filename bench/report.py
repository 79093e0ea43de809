"""Turns a pytest-benchmark JSON file into the README's benchmark table (markdown).

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


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu.json")
