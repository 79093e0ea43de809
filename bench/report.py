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


def choice_summary(choices) -> str | None:
    """{sk.explain(layer) text: layers} -> "sparse: N layers, dense: M layers" (the name
    after the layer description), or None without per-layer explanations."""
    if not choices:
        return None
    by_choice: dict[str, int] = {}
    for text, count in choices.items():
        parts = text.split(": ")
        name = parts[1].split(" (")[0] if len(parts) > 1 else text
        by_choice[name] = by_choice.get(name, 0) + count
    return ", ".join(f"{name}: {n} layer{'s' if n > 1 else ''}"
                     for name, n in sorted(by_choice.items(), key=lambda kv: -kv[1]))


def kernel_summary(kernels, choices=None) -> str:
    """{sk.explain text: calls} -> "op: why (xN)" per distinct text, most calls first;
    prefixed by the per-layer kernel choice where the layers report one."""
    chosen = choice_summary(choices)
    ops = _op_summary(kernels)
    return ops if chosen is None else f"{chosen} ({ops})"


def _op_summary(kernels) -> str:
    if not kernels:
        return "n/a"
    parts = []
    for text, count in sorted(kernels.items(), key=lambda kv: -kv[1]):
        head, _, why = text.partition(": ")
        op = head.split(" on ")[0].replace("sparsekit::", "")
        parts.append(f"{op}: {why or head} (x{count})")
    return "; ".join(parts)


def _verdict(info):
    target = info.get("target")
    if target is None:
        return ""
    return " (target %.2gx: %s)" % (target, "met" if info["ratio"] >= target else "NOT met")


def linear_rows(data):
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind", "").startswith("linear"):
            what = "fwd+bwd" if info["kind"] == "linear_backward" else "forward"
            row = (f"{what} {info['dtype']} {info['shape'][0]}x{info['shape'][1]}", str(info["batch"]),
                   f"{info['dense_s'] * 1e3:.2f} ms", f"{info['sparse_s'] * 1e3:.2f} ms",
                   f"{info['ratio']:.2f}x{_verdict(info)}")
            if "stream_gbps" in info:  # weights cycled past the last-level cache
                row += (f"{info['copies']} ({info['sparse_set_bytes'] / 2**20:.0f} / "
                        f"{info['dense_set_bytes'] / 2**20:.0f} MiB)",
                        f"{info['dense_gbps']:.1f}", f"{info['sparse_gbps']:.1f}",
                        f"{info['stream_gbps']:.1f}",
                        kernel_summary(info.get("kernels"), info.get("layer_choices")))
            yield row


def module_rows(data):
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "module":
            yield (info["what"], info.get("dtype", "float32"), f"{info['dense_s'] * 1e3:.1f} ms",
                   f"{info['sparse_s'] * 1e3:.1f} ms",
                   f"{info['ratio']:.2f}x",
                   f"{info['sparse_weight_bytes'] / info['dense_weight_bytes']:.3f}")


def unstructured_rows(data):
    """bench/bench_unstructured.py: the bitmask format against dense and torch's CSR."""
    def target(ratio, goal):
        return f" ({goal:g}: {'met' if ratio >= goal else 'NOT met'})" if goal else ""

    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") != "unstructured_linear":
            continue
        dtype = {"float32": "fp32", "bfloat16": "bf16"}.get(info["dtype"], info["dtype"])
        csr = (f"{info['csr_ratio']:.2f}x{target(info['csr_ratio'], info.get('target_csr'))}"
               if info.get("csr_ratio") else "")
        yield (f"{'x'.join(map(str, info['shape']))} {dtype}, {info['batch']}, "
               f"{round(info['sparsity'] * 100)}%",
               f"{info['sparse_s'] * 1e3:.2f} ms", f"{info['dense_s'] * 1e3:.2f} ms",
               f"{info['ratio']:.2f}x{target(info['ratio'], info.get('target'))}", csr,
               f"{info['weight_bytes_ratio']:.3f}",
               f"{info['sparse_gbs']:.1f} ({info['stream_gbs']:.1f})")


def model_rows(data):
    """Whole models of bench/bench_models.py: dense against sparsified, same weights."""
    def when(seconds, tokens):
        if tokens:
            return f"{seconds * 1e3:.1f} ms ({tokens / seconds:.1f} tok/s)"
        return f"{seconds * 1e3:.1f} ms"

    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "model":
            yield (info["what"], info["dtype"], when(info["dense_s"], info.get("tokens")),
                   when(info["sparse_s"], info.get("tokens")), f"{info['ratio']:.2f}x{_verdict(info)}",
                   f"{info['sparse_weight_bytes'] / info['dense_weight_bytes']:.3f} "
                   f"({info['sparse_model_bytes'] / info['dense_model_bytes']:.3f})",
                   f"{info['converted']} ({len(info['skipped'])} skipped)",
                   kernel_summary(info.get("kernels"), info.get("layer_choices")))


def triton_rows(data):
    """GPU rows of bench/bench_triton.py: the Triton kernels against cuBLAS dense and torch's
    semi-structured 2:4 on the same weights."""
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        kind = info.get("kind", "")
        if kind not in ("triton_masked_fwd_bwd", "triton_nm_forward"):
            continue
        met = "met" if info["ratio"] >= info["target"] else "NOT met"
        if kind == "triton_masked_fwd_bwd":
            what = f"masked_gemm fwd+bwd {info['dtype']} {info['shape'][0]}x{info['shape'][1]}"
            target = f"within {1 / info['target']:.2f}x: {met}"
            semi = ""
        else:
            what = f"nm_gemm 2:4 {info['dtype']} {info['shape'][0]}x{info['shape'][1]}"
            target = f"{info['target']:.1f}x: {met}"
            semi = ("n/a" if info.get("ratio_vs_semi_structured") is None
                    else f"{info['semi_structured_s'] * 1e6:.1f} us "
                         f"({info['ratio_vs_semi_structured']:.2f}x)")
        yield (what, str(info["batch"]), f"{info['dense_s'] * 1e6:.1f} us",
               f"{info['sparse_s'] * 1e6:.1f} us", f"{info['ratio']:.2f}x (target {target})", semi)


def cuda_rows(data):
    """GPU rows of bench/bench_cuda.py: the sparse tensor-core kernel (and Triton) against
    cuBLAS dense and torch's semi-structured 2:4 on the same weights, graph-timed."""
    def us(seconds, name):
        return f"{seconds[name] * 1e6:.1f} us" if name in seconds else "n/a"

    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "gpu_linear_forward":
            sec = info["seconds"]
            verdict = "met" if info["ratio_sp24"] >= info["target_vs_dense"] else "NOT met"
            semi = "n/a" if info.get("sp24_vs_semi") is None else f"{info['sp24_vs_semi']:.2f}x"
            yield (f"forward fp16 {info['shape'][0]}x{info['shape'][1]}", str(info["batch"]),
                   us(sec, "dense"), us(sec, "sp24"), us(sec, "triton"),
                   us(sec, "semi_structured"),
                   f"{info['ratio_sp24']:.2f}x (target {info['target_vs_dense']}x: {verdict})",
                   semi)
        elif info.get("kind") == "gpu_train_step":
            sec = info["seconds"]
            yield (f"SparseLinear train step fp16 {info['shape'][0]}x{info['shape'][1]}",
                   str(info["batch"]), us(sec, "dense"), us(sec, "sparse"), "", "",
                   f"{info['ratio']:.2f}x", "")


def _conv_choice(choices) -> str:
    """What the timed layers ran: the per-call choice ("sparse" / "dense") and why, from
    `sk.explain(layer)` of the first weight copy (all copies share one decision)."""
    if not choices:
        return "n/a"
    text = next(iter(choices))
    parts = text.split(": ")
    head, _, why = text.rpartition("): ")
    if len(parts) < 3 or not head:
        return text
    return f"{parts[1].split(' (')[0]}: {why}"


def conv_rows(data):
    """Rows of bench/bench_conv.py: one 2:4 convolution shape (SparseConv2d) against
    F.conv2d on the same pruned weight."""
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("kind") == "conv_layer":
            yield (info["what"], info.get("dtype", "float32"), str(info["batch"]), info["kernel"],
                   f"{info['dense_s'] * 1e3:.3f} ms", f"{info['sparse_s'] * 1e3:.3f} ms",
                   f"{info['ratio']:.2f}x{_verdict(info)}",
                   _conv_choice(info.get("layer_choices")))


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
    ax.set_ylabel("speed-up over dense nn.Linear (x)")
    info = next(b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind"))
    ax.set_title(f"2:4 SparseLinear vs nn.Linear (weights past the cache), CPU "
                 f"{info['threads']} threads, torch {info['torch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def table(header, rows):
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def gpu_line(data, kind_prefix):
    gpu = next(b["extra_info"] for b in data["benchmarks"]
               if b.get("extra_info", {}).get("kind", "").startswith(kind_prefix))
    print(f"\nGPU: {gpu.get('gpu', '?')}, torch {gpu.get('torch', '?')}, triton "
          f"{gpu.get('triton', '?')}, CUDA {gpu.get('cuda', '?')}\n")


def main(path):
    with open(path) as f:
        data = json.load(f)
    info = next((b["extra_info"] for b in data["benchmarks"] if "cpu" in b.get("extra_info", {})), {})
    llc = next((b["extra_info"]["llc_bytes"] for b in data["benchmarks"]
                if "llc_bytes" in b.get("extra_info", {})), None)
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cores', '?')} cores, "
          f"{info.get('threads', '?')} threads, torch {info.get('torch', '?')}"
          + (f", {llc / 2**20:.0f} MiB last-level cache" if llc else "") + "\n")
    basic = list(rows(data))
    if basic:
        table(["what", "sparsekit", "baseline (same run)", "ratio"], basic)
    linear = list(linear_rows(data))
    if linear:
        print()
        header = ["2:4 Linear", "batch", "dense nn.Linear", "SparseLinear", "speed-up"]
        if any(len(r) > 5 for r in linear):
            header += ["weight copies (sparse / dense set)", "dense GB/s", "sparse GB/s",
                       "streaming read GB/s", "what the sparse layer ran (sk.explain)"]
        table(header, (r + ("",) * (len(header) - len(r)) for r in linear))
        png = path.rsplit(".", 1)[0] + "_linear.png"
        if plot_linear(data, png):
            print(f"\nPlot: {png}")
    triton = list(triton_rows(data))
    if triton:
        gpu_line(data, "triton")
        table(["Triton kernel", "batch", "dense (cuBLAS)", "sparsekit", "speed-up",
               "torch semi-structured (its time / ours)"], triton)
    cuda = list(cuda_rows(data))
    if cuda:
        gpu_line(data, "gpu_")
        table(["2:4 on the GPU", "batch", "dense (cuBLAS)", "sparsekit sp24", "sparsekit Triton",
               "torch semi-structured", "sp24 vs dense", "sp24 vs semi-structured"], cuda)
    models = list(model_rows(data))
    if models:
        print()
        table(["model (2:4)", "dtype", "dense", "sparsified", "speed-up",
               "weight bytes vs dense (whole model)", "layers converted",
               "what the sparse layers ran (sk.explain)"], models)
    conv = list(conv_rows(data))
    if conv:
        print()
        table(["conv 2:4", "dtype", "batch", "sparse kernel", "dense F.conv2d", "sparsekit",
               "speed-up", "what SparseConv2d ran (sk.explain)"], conv)
    unstructured = list(unstructured_rows(data))
    if unstructured:
        print()
        table(["shape, dtype, batch, sparsity", "bitmask", "dense", "vs dense",
               "torch CSR vs bitmask", "bytes vs dense", "weight GB/s (streaming read)"],
              unstructured)
    modules = list(module_rows(data))
    if modules:
        print()
        table(["module (2:4)", "dtype", "dense", "sparsified", "speed-up", "weight bytes vs dense"],
              modules)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/cpu.json")
