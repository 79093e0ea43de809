"""One-shot pruning from calibration data: SparseGPT, Wanda and magnitude, block by block.

    report = sk.prune.oneshot(model, calibration, method="sparsegpt", pattern="2:4")
    print(report)                     # per layer: sparsity, relative error ||WX - ŴX|| / ||WX||
    sk.sparsify(model, "2:4")         # or oneshot(..., convert=True)

The model's eligible nn.Linear / nn.Conv2d weights are pruned in place (zeros left in the
dense weights), in the order data flows, each from inputs that already went through the
pruned layers before it, as in the papers:

- A model with repeated blocks (a transformer's ``nn.ModuleList`` of decoder layers, found
  automatically or named by ``blocks=``): the inputs (positional and keyword) of the first
  block are captured on every calibration batch; then block after block, one pass of the
  block over those inputs gathers the statistics of all its layers, its layers are pruned,
  and a second pass of the pruned block gives the next block's inputs. Layers outside the
  blocks (embeddings, a language-model head) are left dense, as in the papers.
- Any other model: layer after layer in the order they first run, each layer's statistics
  gathered by a forward pass of the whole (partly pruned) model over the calibration data,
  stopped at that layer. One pass per layer: fine for small models.

Methods (N:M with ``pattern="N:M"``, or unstructured with ``sparsity=``):

- "sparsegpt" (Frantar and Alistarh, 2023): H = 2XXᵀ/n from the layer's inputs, dampened
  by ``damp`` times its mean diagonal; the upper Cholesky factor U of H⁻¹; columns in
  blocks of ``blocksize`` with lazy batched updates of the columns after each block; the
  mask chosen by the OBS saliency w²/U_ii² (per group of M columns for N:M; over the rows
  and columns of each column block for unstructured), each pruned weight's error spread
  over the columns not yet visited. Inputs that never fire (zero diagonal) are pruned.
- "wanda" (Sun et al., 2024): scores |W_ij|·‖X_j‖₂, the lowest pruned per output row
  (unstructured) or per group of M (N:M); no weight update.
- "magnitude": the lowest |w| per layer (unstructured) or per group (N:M); the calibration
  data only serve the error report.

Statistics are fp32 whatever the model's dtype. Inside a block, the layers that read one
input (q/k/v projections, or gate/up projections, share one Hessian) are pruned together,
group after group in the order data reaches them, each group's statistics gathered from
what the block's already-pruned layers produce: one Hessian is in memory at a time.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import masks
from ..convert import SparsifyReport, sparsify
from ..format import parse_pattern

__all__ = ["ONESHOT_METHODS", "LayerReport", "OneShotReport", "oneshot", "sparsegpt_prune",
           "wanda_mask"]

ONESHOT_METHODS = ("sparsegpt", "wanda", "magnitude")


@dataclass
class LayerReport:
    """One pruned layer: the fraction of its weight that is zero afterwards, the relative
    reconstruction error ‖WX − ŴX‖_F / ‖WX‖_F on the calibration inputs it saw, and the
    seconds spent pruning it (statistics excluded)."""

    name: str
    shape: tuple
    sparsity: float
    error: float
    seconds: float


@dataclass
class OneShotReport:
    """What `oneshot` did: the layers pruned (in order), those skipped (with reasons), how
    the model was walked (``blocks``: the name of its repeated blocks, or None for layer by
    layer), the calibration it used, the seconds, and `sparsify`'s report when converted."""

    method: str
    target: str
    blocks: str | None
    calibration_batches: int
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    converted: SparsifyReport | None = None
    # With owl=True: {block or layer name: (outlier ratio, sparsity it was given)}.
    owl: dict[str, tuple[float, float]] | None = None

    @property
    def sparsity(self) -> float:
        """Zeros over all pruned weights' entries."""
        total = sum(math.prod(r.shape) for r in self.layers)
        return sum(r.sparsity * math.prod(r.shape) for r in self.layers) / max(total, 1)

    @property
    def mean_error(self) -> float:
        return sum(r.error for r in self.layers) / max(len(self.layers), 1)

    def __str__(self) -> str:
        walk = f"block by block over {self.blocks}" if self.blocks else "layer by layer"
        lines = [f"oneshot {self.method} {self.target}: {len(self.layers)} layers pruned {walk} "
                 f"from {self.calibration_batches} calibration batches in {self.seconds:.1f} s; "
                 f"sparsity {self.sparsity:.2%}, mean relative error {self.mean_error:.4f}",
                 f"  {'layer':44s} {'shape':>12s} {'sparsity':>9s} {'rel. error':>10s} {'s':>6s}"]
        for r in self.layers:
            shape = "x".join(str(s) for s in r.shape)
            lines.append(f"  {r.name:44s} {shape:>12s} {r.sparsity:9.2%} {r.error:10.4f} {r.seconds:6.2f}")
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        if self.converted is not None:
            lines.append(str(self.converted))
        return "\n".join(lines)


class _Stop(Exception):
    """Raised from a hook to end a forward pass once what it needed has been seen."""


# ---------------------------------------------------------------------------------------
# The methods, on a 2-D weight [rows, K] (Linear: [out, in]; Conv2d: [out, kh*kw*C_in])


def _nm_prune_count(length: int, n: int) -> int:
    """Entries pruned in a group of `length` columns: a full group keeps n, a last shorter
    group keeps min(n, length) (the convention of masks.nm)."""
    return max(length - n, 0)


def sparsegpt_prune(w: torch.Tensor, hessian: torch.Tensor, n: int | None = None,
                    m: int | None = None, sparsity: float | None = None,
                    blocksize: int = 128, damp: float = 0.01) -> torch.Tensor:
    """SparseGPT on one 2-D weight: returns the pruned and updated weight (fp32, a new
    tensor) for N:M (`n`, `m`) or unstructured `sparsity`, from `hessian` = 2XXᵀ/count
    (fp32 [K, K], not modified). Exactly round(sparsity * numel) entries are pruned in the
    unstructured case; exactly n kept per group of m (min(n, length) in a shorter last
    group) in the N:M case."""
    w = w.detach().to(torch.float32).clone()
    rows, cols = w.shape
    h = hessian.to(torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0  # an input that never fires: its weights do nothing on the data
    if m is not None:
        blocksize = max(m, blocksize // m * m)  # groups never straddle two column blocks
    mean_diag = torch.diagonal(h).mean()
    for attempt in range(6):  # raise the dampening until H is numerically positive definite
        hd = h.clone()
        torch.diagonal(hd).add_(damp * (10 ** attempt) * mean_diag)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            hinv = torch.cholesky_inverse(chol)
            hinv, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                break
    else:
        raise RuntimeError("SparseGPT: the Hessian stays singular after dampening x1e5")
    del h, hd, chol
    # The column loop is thousands of small ops: on one thread it runs ~20x faster here
    # than on two whose OpenMP barriers wait for each other under load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _sparsegpt_columns(w, hinv, n, m, sparsity, blocksize)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt_columns(w, hinv, n, m, sparsity, blocksize):
    rows, cols = w.shape
    total_pruned = round(sparsity * rows * cols) if sparsity is not None else 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if sparsity is not None:
            # Exactly the layer's total over all blocks: each block prunes its share of the
            # running total, so the rounding never accumulates.
            k = (round(sparsity * rows * i2) - round(sparsity * rows * i1)) if i2 < cols else \
                total_pruned - round(sparsity * rows * i1)
            if k > 0:
                saliency = (w1 ** 2 / d1.unsqueeze(0) ** 2).flatten()
                pruned.view(-1)[torch.topk(saliency, k, largest=False).indices] = True
        for i in range(count):
            if m is not None and i % m == 0:
                length = min(m, count - i)
                k = _nm_prune_count(length, n)
                if k:
                    saliency = w1[:, i:i + length] ** 2 / d1[i:i + length].unsqueeze(0) ** 2
                    idx = torch.topk(saliency, k, dim=1, largest=False).indices
                    pruned[:, i:i + length].scatter_(1, idx, True)
            col = w1[:, i]
            q = col.masked_fill(pruned[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / d1[i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def wanda_mask(w: torch.Tensor, input_norm: torch.Tensor, n: int | None = None,
               m: int | None = None, sparsity: float | None = None) -> torch.Tensor:
    """Wanda's keep-mask for a 2-D weight: scores |W_ij|·‖X_j‖₂ (`input_norm` [K]), the
    round(sparsity * K) lowest pruned in every row, or the n highest kept per group of m."""
    scores = w.detach().abs().to(torch.float32) * input_norm.to(torch.float32).unsqueeze(0)
    if m is not None:
        return masks.nm(w, n, m, scores=scores)
    keep = torch.ones_like(scores, dtype=torch.bool)
    k = round(sparsity * scores.shape[1])
    if k:
        keep.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, False)
    return keep


# ---------------------------------------------------------------------------------------
# Layers: the 2-D view of a weight and of its inputs


def _weight_2d(layer: nn.Module) -> torch.Tensor:
    w = layer.weight.detach()
    if isinstance(layer, nn.Conv2d):  # [out, C, kh, kw] -> [out, kh*kw*C]: groups along C_in
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w


def _set_weight_2d(layer: nn.Module, w2: torch.Tensor) -> None:
    weight = layer.weight
    if isinstance(layer, nn.Conv2d):
        out, c, kh, kw = weight.shape
        w2 = w2.view(out, kh, kw, c).permute(0, 3, 1, 2)
    with torch.no_grad():
        weight.copy_(w2.to(weight.dtype))


def _inputs_2d(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the 2-D weight's K columns: [samples, K], fp32."""
    x = x.detach().to(torch.float32)
    if isinstance(layer, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        kh, kw = layer.kernel_size
        padding = layer.padding
        if isinstance(padding, str):  # "same" / "valid": pad as the convolution does
            if padding == "valid":
                padding = (0, 0)
            else:
                total = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
                x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2,
                              total[0] // 2, total[0] - total[0] // 2))
                padding = (0, 0)
        cols = F.unfold(x, layer.kernel_size, layer.dilation, padding, layer.stride)
        b, _, length = cols.shape
        cols = cols.view(b, layer.in_channels, kh * kw, length).permute(0, 3, 2, 1)
        return cols.reshape(-1, kh * kw * layer.in_channels)
    return x.reshape(-1, x.shape[-1])


class _Stats:
    """XXᵀ of one layer input (shared by the layers that read the same tensor), summed; or
    only its diagonal, the squared input norms (``full=False``: Wanda without errors)."""

    def __init__(self, k: int, full: bool = True):
        self.xxt = torch.zeros(k, k, dtype=torch.float32) if full else None
        self.sq = torch.zeros(k, dtype=torch.float32)
        self.count = 0
        self.last = None  # the tensor last added: layers reading it again add nothing

    def add(self, layer: nn.Module, x: torch.Tensor) -> None:
        if x is self.last:
            return
        self.last = x
        x2 = _inputs_2d(layer, x)
        if self.xxt is not None:
            self.xxt.addmm_(x2.t(), x2)
        else:
            self.sq += x2.pow(2).sum(0)
        self.count += x2.shape[0]

    def input_norms(self) -> torch.Tensor:
        sq = torch.diagonal(self.xxt) if self.xxt is not None else self.sq
        return sq.clamp_min(0).sqrt()


def _prune_layer(name: str, layer: nn.Module, stats: _Stats | None, method: str, n, m, sparsity,
                 blocksize: int, damp: float) -> LayerReport:
    start = time.perf_counter()
    w = _weight_2d(layer).to(torch.float32, copy=True)  # the dense weight, kept for the error
    xxt = stats.xxt if stats is not None else None
    if method == "sparsegpt":
        new = sparsegpt_prune(w, xxt * (2.0 / max(stats.count, 1)), n, m, sparsity, blocksize, damp)
    else:
        if method == "wanda":
            keep = wanda_mask(w, stats.input_norms(), n, m, sparsity)
        elif m is not None:
            keep = masks.nm(w, n, m)
        else:
            keep = masks.magnitude(w, sparsity)
        new = w * keep
    _set_weight_2d(layer, new)
    seconds = time.perf_counter() - start
    rel = math.nan
    if xxt is not None:
        delta = (w - new).double()
        xxt64 = xxt.double()
        ref = torch.sum((w.double() @ xxt64) * w.double()).clamp_min(0).sqrt()
        err = torch.sum((delta @ xxt64) * delta).clamp_min(0).sqrt()
        rel = float(err / ref) if ref > 0 else 0.0
    zeros = float((layer.weight == 0).float().mean())
    return LayerReport(name, tuple(layer.weight.shape), zeros, rel, seconds)


# ---------------------------------------------------------------------------------------
# Arguments


def _check_method_and_target(method, pattern, sparsity, blocksize, damp):
    if not isinstance(method, str) or method not in ONESHOT_METHODS:
        raise ValueError(f"method must be one of {ONESHOT_METHODS}, got {method!r}")
    if (pattern is None) == (sparsity is None):
        raise ValueError("give exactly one of pattern ('N:M') or sparsity (a float in [0, 1))")
    n = m = None
    if pattern is not None:
        n, m = parse_pattern(pattern)
    else:
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
            raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
        sparsity = float(sparsity)
        if not 0.0 <= sparsity < 1.0:  # also rejects NaN
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if isinstance(damp, bool) or not isinstance(damp, numbers.Real) or not damp > 0:
        raise ValueError(f"damp must be a positive float, got {damp!r}")
    return n, m, sparsity


def _calibration_batches(calibration, batch_size: int) -> list[tuple[tuple, dict]]:
    """Each calibration batch as (args, kwargs) of one model call."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() == 0 or calibration.shape[0] == 0:
            raise ValueError(f"calibration is empty: a tensor of shape {tuple(calibration.shape)}")
        items = list(calibration.split(batch_size))
    elif isinstance(calibration, Mapping):
        items = [calibration]
    elif isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError("calibration must be a tensor (split along dim 0 into batches), a dict "
                        "of keyword inputs, or an iterable of tensors / tuples / dicts, got "
                        f"{type(calibration).__name__}")
    else:
        items = list(calibration)
    if not items:
        raise ValueError("calibration is empty: it gave no batch")
    batches = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            if item.numel() == 0:
                raise ValueError(f"calibration batch {i} is an empty tensor")
            batches.append(((item,), {}))
        elif isinstance(item, Mapping):
            batches.append(((), dict(item)))
        elif isinstance(item, (tuple, list)):
            batches.append((tuple(item), {}))
        else:
            raise TypeError(f"calibration batch {i} must be a tensor, a tuple of positional "
                            f"inputs or a dict of keyword inputs, got {type(item).__name__}")
    return batches


def _eligible(model: nn.Module, include, exclude, m, report: OneShotReport) -> dict[str, nn.Module]:
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else (exclude or [])
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    layers, seen = {}, set()
    for name, module in model.named_modules():
        # The model itself may be the one layer (name ""): pruned, though sparsify needs a parent.
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or id(module) in seen:
            continue
        seen.add(id(module))
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            report.skipped[name] = "not included"
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            report.skipped[name] = "excluded"
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
            report.skipped[name] = "grouped convolution or padding_mode other than 'zeros'"
            continue
        own = f"{name}.weight" if name else "weight"
        tied = [p for p in owners.get(id(module.weight), []) if p != own]
        if tied:
            report.skipped[name] = f"weight tied to {tied[0]}: pruning it would prune that too"
            continue
        k = _weight_2d(module).shape[1]
        if m is not None and k < m:
            report.skipped[name] = f"too small (reduction dim {k} < {m})"
            continue
        layers[name] = module
    return layers


def _find_blocks(model: nn.Module, layers: dict[str, nn.Module], blocks):
    """(name, ModuleList) of the repeated blocks holding the most eligible layers, or None."""
    if blocks is False:
        return None
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            raise ValueError(f"blocks={blocks!r} names no submodule of the model") from None
        if not isinstance(found, (nn.ModuleList, nn.Sequential)) or len(found) == 0:
            raise ValueError(f"blocks={blocks!r} must name a non-empty nn.ModuleList or nn.Sequential")
        return blocks, found
    if blocks is not None:
        raise TypeError(f"blocks must be None (found automatically), False or a module name, got {blocks!r}")
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        prefix = f"{name}."
        count = sum(1 for lname in layers if lname.startswith(prefix))
        if count > best_count:
            best, best_count = (name, module), count
    return best


# ---------------------------------------------------------------------------------------
# The walk


def _call(model, batch):
    args, kwargs = batch
    return model(*args, **kwargs)


def _feed(target, batches, blame=None, after=None):
    """Runs `target` on every calibration batch; a hook's _Stop ends a batch early. An error
    is re-raised, as the calibration's fault (naming blame(batch index)) when `blame` is
    given. `after()` runs after each batch."""
    for j, batch in enumerate(batches):
        try:
            _call(target, batch)
        except _Stop:
            pass
        except Exception as err:
            if blame is not None:
                raise _user_error(err, blame(j)) from err
            raise
        if after is not None:
            after()


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, Mapping):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise TypeError(f"a block returned {type(out).__name__}: its first output must be a tensor")


def _with_hidden(batch, hidden):
    """The block call (args, kwargs) with its data input replaced by `hidden`."""
    args, kwargs = batch
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


def _stats_hooks(layers: dict[str, nn.Module], stats: dict[str, _Stats], full: bool,
                 stop_after: str | None = None):
    handles = []
    by_input: dict[int, _Stats] = {}

    def make(name, layer):
        def hook(module, args):
            x = args[0]
            st = stats.get(name)
            if st is None:  # first call: share the statistics of a layer that read this tensor
                st = by_input.get(id(x))
                if st is None or st.last is not x:
                    st = _Stats(_weight_2d(layer).shape[1], full)
                    by_input[id(x)] = st
                stats[name] = st
            st.add(layer, x)
            if name == stop_after:
                raise _Stop
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(make(name, layer)))
    return handles


def _release(stats: dict[str, _Stats]) -> None:
    for st in stats.values():
        st.last = None


@torch.no_grad()
def oneshot(model: nn.Module, calibration, method: str = "sparsegpt", pattern: str | None = None,
            sparsity: float | None = None, include=None, exclude=None, blocks=None,
            batch_size: int = 8, blocksize: int = 128, damp: float = 0.01, errors: bool = True,
            convert: bool = False, progress: bool = True, owl: bool = False,
            owl_threshold: float = 5.0, owl_range: float = 0.08) -> OneShotReport:
    """Prunes every eligible nn.Linear / nn.Conv2d of `model` in place from calibration data,
    with SparseGPT, Wanda or magnitude, to an N:M `pattern` or an unstructured `sparsity`
    (see the module docstring for the walk and the methods). Zeros stay in the dense
    weights; ``convert=True`` then calls `sparsekit.sparsify` on the pruned layers (N:M).

    Args:
        model: any nn.Module; its forward is called with the calibration batches.
        calibration: a tensor of model inputs (split along dim 0 into `batch_size` batches),
            a dict of keyword inputs, or an iterable of tensors, tuples of positional inputs
            or dicts (e.g. ``{"input_ids": ids}``).
        method: "sparsegpt", "wanda" or "magnitude".
        pattern / sparsity: exactly one: "N:M" (0 < N < M <= 32), or a float in [0, 1).
        include / exclude: glob patterns on module names, as in `sparsify`. Layers whose
            weight is tied to another parameter (a tied language-model head) are skipped.
        blocks: the name of the model's repeated blocks (an nn.ModuleList), None to find
            them (the ModuleList holding the most eligible layers), False for layer by layer.
        blocksize, damp: SparseGPT's column block and dampening (fraction of H's mean
            diagonal).
        errors: report each layer's relative reconstruction error (gathers XXᵀ whatever
            the method). False: Wanda gathers only its input norms, and magnitude on a
            model with repeated blocks prunes without running the model at all (the
            calibration is then only checked); the report's errors are NaN.
        progress: a tqdm progress bar.
        owl, owl_threshold, owl_range: non-uniform sparsity for unstructured pruning (OWL,
            Yin et al., 2024). A first pass over the unpruned model measures, per block
            (or per layer without blocks), the fraction of Wanda scores |W|·‖X‖ above
            ``owl_threshold`` times their mean: the outliers. Blocks with more outliers
            keep more weights: the fractions are mapped linearly onto sparsities
            ``2 * owl_range`` apart (most outliers: lowest), shifted so that their mean is
            ``sparsity`` (with two blocks: ``sparsity ± owl_range``). The report's ``owl``
            holds each block's fraction and sparsity.

    Returns a `OneShotReport`. Raises ValueError / TypeError naming the argument, with the
    model unchanged, for an unknown method, a bad pattern or sparsity, empty calibration,
    calibration the model cannot run, or a model without an eligible layer.
    """
    from tqdm.auto import tqdm

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n, m, sparsity = _check_method_and_target(method, pattern, sparsity, blocksize, damp)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if convert and pattern is None:
        raise ValueError("convert=True needs pattern='N:M': sparsify converts N:M layers only")
    if not isinstance(owl, bool):
        raise TypeError(f"owl must be a bool, got {type(owl).__name__}")
    if owl:
        if sparsity is None:
            raise ValueError("owl=True needs sparsity= (OWL spreads an unstructured sparsity "
                             "over the layers; an N:M pattern is the same everywhere)")
        if isinstance(owl_threshold, bool) or not isinstance(owl_threshold, numbers.Real) or \
                not (owl_threshold > 0 and math.isfinite(owl_threshold)):
            raise ValueError(f"owl_threshold must be a positive float, got {owl_threshold!r}")
        # Any sparsity lies within sparsity ± 2 * owl_range.
        if isinstance(owl_range, bool) or not isinstance(owl_range, numbers.Real) or \
                not (0 < owl_range and sparsity - 2 * owl_range >= 0 and sparsity + 2 * owl_range < 1):
            raise ValueError(f"owl_range must be > 0 with sparsity - 2 * owl_range >= 0 and "
                             f"sparsity + 2 * owl_range < 1, got {owl_range!r} for sparsity {sparsity}")
    batches = _calibration_batches(calibration, batch_size)
    target = pattern if pattern is not None else f"{sparsity:.0%} unstructured"
    report = OneShotReport(method, target, None, len(batches))
    layers = _eligible(model, include, exclude, m, report)
    if not layers:
        raise ValueError("model has no eligible layer (nn.Linear / nn.Conv2d matching include "
                         f"and exclude, untied, wide enough): skipped {report.skipped or 'none found'}")
    found = _find_blocks(model, layers, blocks)
    full = bool(errors) or method == "sparsegpt"

    start = time.perf_counter()
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False  # no key/value cache objects among the captured inputs
    try:
        # Everything that can fail on the user's input fails before a weight changes: the
        # first pass over the whole model (layer by layer), or the capture of the first
        # block's inputs and the statistics pass of that block (block by block).
        if found is not None:
            block_name, block_list = found
            report.blocks = block_name
            for name in [name for name in layers if not name.startswith(block_name + ".")]:
                report.skipped[name] = f"outside the repeated blocks {block_name}"
                del layers[name]
            if not layers:
                raise ValueError(f"model has no eligible layer inside its blocks {block_name!r} "
                                 f"(skipped: {report.skipped})")
            if owl:
                sparsity = _owl_sparsities(
                    _owl_block_ratios(block_list, block_name, layers, batches, owl_threshold,
                                      model),
                    sparsity, owl_range, report,
                    {name: f"{block_name}.{name[len(block_name) + 1:].split('.')[0]}" for name in layers})
            if method == "magnitude" and not errors:  # nothing to gather: no model call
                for name, layer in tqdm(layers.items(), desc="oneshot magnitude", disable=not progress):
                    report.layers.append(_prune_layer(name, layer, None, method, n, m,
                                                      _sparsity_of(sparsity, name), blocksize, damp))
            else:
                _walk_blocks(model, block_list, block_name, layers, batches, report, method, n, m,
                             sparsity, blocksize, damp, full, tqdm, progress)
        else:
            order = _first_pass(model, layers, batches[0])
            for name in [name for name in layers if name not in order]:
                report.skipped[name] = "never ran on the calibration data"
                del layers[name]
            if not layers:
                raise ValueError("model has no eligible layer that runs on the calibration data "
                                 f"(skipped: {report.skipped})")
            if owl:
                sparsity = _owl_sparsities(_owl_layer_ratios(model, layers, batches, owl_threshold),
                                           sparsity, owl_range, report, None)
            _walk_layers(model, order, layers, batches, report, method, n, m, sparsity,
                         blocksize, damp, full, tqdm, progress)
    finally:
        if use_cache is not None:
            config.use_cache = use_cache
        model.train(was_training)
    if convert:
        report.converted = sparsify(model, pattern, include=[r.name for r in report.layers])
    report.seconds = time.perf_counter() - start
    return report


def _sparsity_of(sparsity, name: str):
    """The layer's sparsity: one for all, or (OWL) a dict by layer name; None for N:M."""
    return sparsity[name] if isinstance(sparsity, dict) else sparsity


def _outlier_ratio(units: list[tuple[nn.Module, _Stats]], threshold: float) -> float:
    """The fraction of Wanda scores |W_ij|·‖X_j‖ over the layers of one unit (a block or a
    layer) above `threshold` times their mean."""
    scores = [(_weight_2d(layer).detach().float().abs() * st.input_norms()[None, :]).flatten()
              for layer, st in units]
    flat = torch.cat(scores)
    return (flat > threshold * flat.mean()).float().mean().item() if flat.numel() else 0.0


def _owl_block_ratios(block_list, block_name, layers, batches, threshold, model) -> dict[str, float]:
    """Outlier ratio of each block holding eligible layers, from the unpruned model."""
    captured = _capture_first_block(model, block_list, block_name, batches)
    ratios: dict[str, float] = {}
    for i, block in enumerate(block_list):
        prefix = f"{block_name}.{i}."
        mine = {name: layer for name, layer in layers.items() if name.startswith(prefix)}
        stats: dict[str, _Stats] = {}
        handles = _stats_hooks(mine, stats, False)
        try:
            outputs = []
            for j, batch in enumerate(captured):
                try:
                    outputs.append(_first_tensor(_call(block, batch)))
                except Exception as err:
                    raise _user_error(err, f"{block_name}[{i}] on calibration batch {j}") from err
                _release(stats)
        finally:
            for h in handles:
                h.remove()
        if stats:
            ratios[f"{block_name}.{i}"] = _outlier_ratio(
                [(mine[name], st) for name, st in stats.items()], threshold)
        captured = [_with_hidden(batch, out) for batch, out in zip(captured, outputs)]
    return ratios


def _owl_layer_ratios(model, layers, batches, threshold) -> dict[str, float]:
    """Outlier ratio of each eligible layer (no repeated blocks), from the unpruned model."""
    stats: dict[str, _Stats] = {}
    handles = _stats_hooks(layers, stats, False)
    try:
        for i, batch in enumerate(batches):
            try:
                _call(model, batch)
            except Exception as err:
                raise _user_error(err, f"calibration batch {i}") from err
            _release(stats)
    finally:
        for h in handles:
            h.remove()
    return {name: _outlier_ratio([(layers[name], st)], threshold) for name, st in stats.items()}


def _owl_sparsities(ratios: dict[str, float], sparsity: float, spread: float, report,
                    unit_of: dict[str, str] | None) -> dict[str, float]:
    """OWL: unit u keeps (1 - sparsity) + d_u - mean(d), d = 2 * spread * (ratio - min) /
    (max - min): sparsities 2 * spread apart at most, their mean over units = sparsity.
    Returns {layer name: sparsity} (units are blocks, via unit_of, or the layers)."""
    values = torch.tensor(list(ratios.values()), dtype=torch.float64)
    low, high = values.min(), values.max()
    d = (values - low) / (high - low) * 2 * spread if high > low else torch.zeros_like(values)
    unit_sparsity = {u: float(sparsity - (dv - d.mean())) for u, dv in zip(ratios, d)}
    report.owl = {u: (ratios[u], unit_sparsity[u]) for u in ratios}
    if unit_of is None:
        return unit_sparsity
    # Layers of a block with no statistics (they never ran) keep the target sparsity.
    return {name: unit_sparsity.get(unit, sparsity) for name, unit in unit_of.items()}


def _user_error(err: Exception, what: str) -> ValueError:
    return ValueError(f"calibration: the model cannot run {what} ({type(err).__name__}: {err})")


def _first_pass(model, layers, batch) -> list[str]:
    """Runs the model on one batch: the eligible layers in the order they first run."""
    order: list[str] = []

    def record(name):
        def hook(module, args):
            if name not in order:
                order.append(name)
        return hook

    handles = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    try:
        _call(model, batch)
    except Exception as err:
        raise _user_error(err, "its first batch") from err
    finally:
        for h in handles:
            h.remove()
    return order


def _capture_first_block(model, block_list, block_name, batches) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives on each calibration batch (the model's
    forward is cut off there)."""
    captured: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block_list[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        _feed(model, batches, blame=lambda j: f"calibration batch {j}")
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise ValueError(f"calibration: {block_name}[0] ran on {len(captured)} of "
                         f"{len(batches)} batches")
    return captured


def _walk_blocks(model, block_list, block_name, layers, batches, report, method, n, m, sparsity,
                 blocksize, damp, full, tqdm, progress):
    captured = _capture_first_block(model, block_list, block_name, batches)
    bar = tqdm(range(len(block_list)), desc=f"oneshot {method}", disable=not progress)
    for i in bar:
        block = block_list[i]
        prefix = f"{block_name}.{i}."
        mine = {name: layer for name, layer in layers.items() if name.startswith(prefix)}
        if mine:
            groups, repeated = _input_groups(block, mine, captured[0], i == 0, block_name)
            for name in [name for name in mine if not any(name in g for g in groups)]:
                report.skipped[name] = "never ran on the calibration data"
                del mine[name]
            # One group of layers reading one input at a time, in the order data reaches
            # them: its statistics (one Hessian) from inputs the block's already-pruned
            # layers produce, then pruned, then freed.
            for group in groups:
                stats: dict[str, _Stats] = {}
                members = {name: mine[name] for name in group}
                handles = _stats_hooks(members, stats, full,
                                       stop_after=None if repeated else group[-1])
                # Before anything is pruned (block 0) an error is the calibration's fault.
                blame = (lambda j: f"{block_name}[0] on calibration batch {j}") if i == 0 else None
                try:
                    _feed(block, captured, blame=blame, after=lambda: _release(stats))
                finally:
                    for h in handles:
                        h.remove()
                for name, layer in members.items():
                    report.layers.append(_prune_layer(name, layer, stats[name], method, n, m,
                                                      _sparsity_of(sparsity, name), blocksize, damp))
                del stats
            if mine:
                bar.set_postfix(error=f"{sum(r.error for r in report.layers[-len(mine):]) / len(mine):.4f}")
        if i + 1 < len(block_list):
            captured = [_with_hidden(batch, _first_tensor(_call(block, batch))) for batch in captured]


def _input_groups(block, layers: dict[str, nn.Module], batch, first_block: bool, block_name: str):
    """The block's layers grouped by the input tensor they read, in the order they run on
    one calibration batch (q/k/v, or gate/up, form one group), and whether any layer ran
    more than once (then statistics passes run the whole block instead of stopping early)."""
    fired: list[tuple[str, torch.Tensor]] = []

    def make(name):
        def hook(module, args):
            fired.append((name, args[0]))
        return hook

    handles = [layer.register_forward_pre_hook(make(name)) for name, layer in layers.items()]
    try:
        try:
            _call(block, batch)
        except Exception as err:
            if first_block:
                raise _user_error(err, f"{block_name}[0] on calibration batch 0") from err
            raise
    finally:
        for h in handles:
            h.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    seen: set[str] = set()
    repeated = False
    for name, x in fired:
        if name in seen:
            repeated = True
            continue
        seen.add(name)
        for tensor, names in groups:
            if tensor is x:
                names.append(name)
                break
        else:
            groups.append((x, [name]))
    return [names for _, names in groups], repeated


def _walk_layers(model, order, layers, batches, report, method, n, m, sparsity, blocksize, damp,
                 full, tqdm, progress):
    for name in tqdm(order, desc=f"oneshot {method}", disable=not progress):
        layer = layers[name]
        stats: dict[str, _Stats] = {}
        handles = _stats_hooks({name: layer}, stats, full, stop_after=name)
        try:
            _feed(model, batches, after=lambda: _release(stats))
        finally:
            for h in handles:
                h.remove()
        report.layers.append(_prune_layer(name, layer, stats[name], method, n, m,
                                          _sparsity_of(sparsity, name), blocksize, damp))
