"""The main job behind `make demo`: prune a CNN trained on real data three ways.

Data: scikit-learn's handwritten digits (1797 8x8 images, shipped with the package, no
download), split once into train and test with a fixed seed; nothing is tuned on the test
split. A small CNN (conv + BatchNorm + linear) is trained, then:
  (a) 2:4 on every eligible layer, fine-tuned as SparseLinear / SparseConv2d;
  (b) network slimming: an L1 penalty on BN scales, 60% of channels removed, fine-tuned;
  (c) gradual unstructured magnitude pruning to 80% on the cubic schedule, then stored
      compressed in the bitmask format (SparseLinear(pattern="unstructured")).
It prints one table (accuracy, parameters, weight bytes, CPU latency) and writes
results.json and a figure into the output folder.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
from torch import nn

from . import prune, sparsify
from .nn import SparseConv2d, SparseLinear
from .timing import paired_seconds

TARGETS = {"2:4 fine-tuned": 1.0, "slimmed": 1.0, "80% unstructured": 1.5}  # max points lost
SLIM_RATIO = 0.6  # of BN channels; most parameters sit in the Linear after the last conv


def _progress(iterable, desc, total=None):
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, ncols=80)


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=0.25, random_state=seed, stratify=data.target)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (x[tr], y[tr]), (x[te], y[te])


def make_cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        return (model(data[0]).argmax(1) == data[1]).float().mean().item() * 100


def train(model, data, epochs, lr, seed, desc, on_step=None, bn_l1=0.0):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    x, y = data
    for _ in _progress(range(epochs), desc):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if bn_l1:
                loss = loss + prune.bn_l1_penalty(model, bn_l1)
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step()
    return model


def weights(model):
    """(stored weights, nonzero weights, weight bytes) of the conv/linear layers. A
    SparseConv2d's weight lives in the SparseLinear it holds, counted once there."""
    stored = nonzero = nbytes = 0
    for m in model.modules():
        if isinstance(m, SparseLinear):
            stored += m.values.numel()
            nonzero += int((m.values != 0).sum())
            nbytes += m.weight_nbytes
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            stored += m.weight.numel()
            nonzero += int((m.weight != 0).sum())
            nbytes += m.weight.nbytes
    return stored, nonzero, nbytes


def latencies(dense, model, x) -> tuple[float, float]:
    """Best seconds per batch of the dense model and `model`, timed alternately."""
    dense.eval()
    model.eval()
    with torch.no_grad():
        return paired_seconds(lambda: dense(x), lambda: model(x), 5)


def _figure(path, rows, sparse_model):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        removed = 1 - r["nonzero_weights"] / rows[0]["nonzero_weights"]
        ax1.scatter(removed * 100, r["accuracy"], s=60)
        ax1.annotate(r["model"], (removed * 100, r["accuracy"]), textcoords="offset points",
                     xytext=(6, 4), fontsize=9)
    ax1.set_xlabel("conv/linear weights removed (%)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("Accuracy vs sparsity (digits, test split)")
    ax1.grid(alpha=0.3)
    layer = next(m for m in sparse_model.children() if isinstance(m, SparseLinear))
    mask = (layer.dense_weight()[:16, :32] != 0).numpy()
    ax2.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    ax2.set_xticks([c - 0.5 for c in range(0, 33, 4)], labels=[])
    ax2.set_yticks([])
    ax2.grid(axis="x", color="tab:red", linewidth=0.8)
    ax2.set_title(f"2:4 mask of Linear({layer.in_features}, {layer.out_features}), "
                  "16x32 corner (black = kept)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(out_dir: str = "demo-output", seed: int = 0, epochs: int = 30, finetune: int = 12,
        quiet: bool = False) -> dict:
    say = (lambda *a: None) if quiet else print
    torch.manual_seed(seed)
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    train_set, test_set = load_digits_split(seed)
    say(f"sparsekit demo: digits, {len(train_set[1])} train / {len(test_set[1])} test images, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, seed {seed}")

    dense = train(make_cnn(), train_set, epochs, 2e-3, seed, "dense")
    models = {"dense": dense}

    # (a) 2:4 on every eligible layer, fine-tuned on the compressed layers.
    nm = copy.deepcopy(dense)
    report = sparsify(nm, "2:4")
    models["2:4 fine-tuned"] = train(nm, train_set, finetune, 5e-4, seed + 1, "2:4 fine-tune")

    # (b) network slimming: sparsify BN scales, remove half the channels, fine-tune.
    slimmed = train(copy.deepcopy(dense), train_set, finetune, 1e-3, seed + 2, "BN L1", bn_l1=1e-3)
    slim_report = prune.slim(slimmed, SLIM_RATIO, train_set[0][:8], min_channels=4)
    models["slimmed"] = train(slimmed, train_set, finetune, 5e-4, seed + 3, "slim fine-tune")

    # (c) gradual unstructured magnitude pruning to 80% (cubic schedule), then fine-tune.
    gradual = copy.deepcopy(dense)
    steps_per_epoch = -(-len(train_set[1]) // 64)
    pruner = prune.Pruner(gradual, prune.cubic(0.0, 0.8, steps=finetune // 2, every=steps_per_epoch))
    train(gradual, train_set, finetune, 5e-4, seed + 4, "gradual 80%", on_step=pruner.step)
    # Kept compressed: the bitmask format (SparseLinear / SparseConv2d, pattern="unstructured").
    pruner.finalize(pattern="unstructured")
    models["80% unstructured"] = gradual

    x_lat = test_set[0][:256]
    rows = []
    for name, model in models.items():
        stored, nonzero, nbytes = weights(model)
        dense_s, model_s = latencies(dense, model, x_lat)
        rows.append({"model": name, "accuracy": accuracy(model, test_set), "stored_weights": stored,
                     "nonzero_weights": nonzero, "weight_bytes": nbytes,
                     "latency_ms": model_s * 1e3, "dense_latency_ms": dense_s * 1e3})
    base = rows[0]
    for r in rows:
        r["accuracy_drop"] = base["accuracy"] - r["accuracy"]
        r["target_drop"] = TARGETS.get(r["model"])
        r["target_met"] = None if r["target_drop"] is None else r["accuracy_drop"] <= r["target_drop"]
        r["bytes_ratio"] = r["weight_bytes"] / base["weight_bytes"]
        r["latency_ratio"] = r["dense_latency_ms"] / r["latency_ms"]  # from the same paired run

    say(f"\n{'model':18s} {'accuracy':>9s} {'drop':>6s} {'weights':>9s} {'nonzero':>9s} "
        f"{'bytes':>10s} {'x dense':>8s} {'latency':>9s} {'speed-up':>8s}  target")
    for r in rows:
        target = "" if r["target_met"] is None else (
            f"<= {r['target_drop']:.1f} pt: {'met' if r['target_met'] else 'MISSED'}")
        say(f"{r['model']:18s} {r['accuracy']:8.2f}% {r['accuracy_drop']:6.2f} {r['stored_weights']:9,d} "
            f"{r['nonzero_weights']:9,d} {r['weight_bytes']:10,d} {r['bytes_ratio']:8.3f} "
            + (f"{r['latency_ms']:7.2f}ms {'':>8s}  (baseline; timed against itself: "
               f"{r['latency_ratio']:.2f}x, the timing noise)" if r is base else
               f"{r['latency_ms']:7.2f}ms {r['latency_ratio']:7.2f}x  {target}"))
    say(f"\n2:4: {len(report.converted)} layers converted "
        f"({', '.join(report.skipped) or 'none'} skipped); slimming: "
        f"{slim_report.params_before:,} -> {slim_report.params_after:,} parameters "
        f"({1 - slim_report.params_after / slim_report.params_before:.0%} removed; target >= 50%: "
        f"{'met' if slim_report.params_after <= 0.5 * slim_report.params_before else 'MISSED'})")
    results = {"seed": seed, "epochs": epochs, "finetune_epochs": finetune, "rows": rows,
               "slimming": {"params_before": slim_report.params_before,
                            "params_after": slim_report.params_after,
                            "kept": {k: list(v) for k, v in slim_report.kept.items()}},
               "seconds": time.perf_counter() - started}
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    figure = os.path.join(out_dir, "pruning.png")
    drew = _figure(figure, rows, models["2:4 fine-tuned"])
    say(f"Results: {os.path.join(out_dir, 'results.json')}" + (f", figure: {figure}" if drew else ""))
    say(f"Done in {results['seconds']:.0f} s.")
    return results
