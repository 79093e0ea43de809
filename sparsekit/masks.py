"""Sparsity masks: which weights a pruning method keeps.

Every function returns a ``torch.bool`` tensor of the input's shape, on the input's device,
True where the weight is kept. Weights may be float32, float16, bfloat16 or float64.
Unstructured and structured methods follow ``torch.nn.utils.prune`` (same counts, same masks
on tie-free input); ties are broken deterministically, the lower (row-major) index kept
first. ``nm`` (N:M, e.g. 2:4) runs the C++/CUDA kernel behind ``sparsekit.ops.nm_mask``.

``amount`` means what it means in ``torch.nn.utils.prune``: a float in [0, 1] is the
fraction to prune (``round(amount * count)``, Python rounding), an int is the number of
units to prune (0 <= amount <= count).

Example::

    >>> import torch, sparsekit as sk
    >>> w = torch.randn(64, 128)
    >>> sk.masks.nm(w, 2, 4).view(64, 32, 4).sum(-1).unique()
    tensor([2])
    >>> int(sk.masks.magnitude(w, 0.75).sum())
    2048
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from . import ops
from .format import check_pattern

__all__ = ["magnitude", "threshold", "random", "ln_structured", "block", "nm", "global_magnitude"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t.detach()


def _check_scores(scores, w: torch.Tensor, name: str = "scores") -> torch.Tensor:
    scores = _check_tensor(scores, name)
    if scores.shape != w.shape:
        raise ValueError(f"{name} must have w's shape {tuple(w.shape)}, got {tuple(scores.shape)}")
    if scores.device != w.device:
        raise ValueError(f"{name} must be on w's device {w.device}, got {scores.device}")
    return scores


def _check_no_nan(t: torch.Tensor, name: str) -> None:
    if torch.isnan(t).any():
        raise ValueError(f"{name} must not contain NaN: NaN cannot be ranked")


def _num_to_prune(amount, count: int) -> int:
    """Units to prune out of `count`, with torch.nn.utils.prune's meaning of `amount`."""
    if isinstance(amount, bool) or not isinstance(amount, numbers.Real):
        raise TypeError(f"amount must be an int (a count) or a float in [0, 1], got {amount!r}")
    if isinstance(amount, numbers.Integral):
        if not 0 <= amount <= count:
            raise ValueError(f"amount must be a count between 0 and {count} when an int, got {amount}")
        return int(amount)
    if not 0.0 <= float(amount) <= 1.0:  # also rejects NaN
        raise ValueError(f"amount must be a fraction in [0, 1] when a float, got {amount}")
    return round(float(amount) * count)


def _check_dim(dim, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {dim!r}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got {dim}")
    return int(dim) % ndim


def _check_norm_order(n) -> float:
    """The Ln norm order: any real number that torch.linalg.vector_norm accepts."""
    if isinstance(n, bool) or not isinstance(n, numbers.Real):
        raise TypeError(f"n must be a real number (the Ln norm order, e.g. 1, 2, inf), got {n!r}")
    if math.isnan(n):
        raise ValueError("n must not be NaN")
    return n


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _norm_dtype(dtype: torch.dtype):
    # Half-precision norms are ranked in fp32; fp32/fp64 exactly as torch.nn.utils.prune does.
    return torch.float32 if dtype in _HALF_DTYPES else None


# ---------------------------------------------------------------------------------------------
# selection


def _keep_mask(flat: torch.Tensor, n_prune: int, prune_largest: bool = False) -> torch.Tensor:
    """Bool keep-mask of a 1-D NaN-free `flat` with its `n_prune` smallest (or largest) entries
    pruned. Among entries equal to the threshold the lower indices are kept.

    O(numel) (kthvalue, not a sort); matches topk(k=n_prune) wherever the k-th value is unique.
    """
    numel = flat.numel()
    if n_prune == 0:
        return torch.ones(numel, dtype=torch.bool, device=flat.device)
    if n_prune == numel:
        return torch.zeros(numel, dtype=torch.bool, device=flat.device)
    if prune_largest:
        thr = torch.kthvalue(flat, numel - n_prune + 1).values
        keep = flat < thr
    else:
        thr = torch.kthvalue(flat, n_prune).values
        keep = flat > thr
    keep_tied = numel - n_prune - int(keep.sum())
    if keep_tied > 0:
        tied = torch.nonzero(flat == thr).squeeze(1)  # ascending indices
        keep[tied[:keep_tied]] = True
    return keep


def _slice_mask(keep: torch.Tensor, shape: torch.Size, dim: int) -> torch.Tensor:
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return keep.view(view).expand(shape).contiguous()


# ---------------------------------------------------------------------------------------------
# public masks


def magnitude(w: torch.Tensor, amount, scores: torch.Tensor | None = None) -> torch.Tensor:
    """Unstructured magnitude mask: prunes the `amount` smallest |w| (or smallest `scores`).

    Same mask as ``torch.nn.utils.prune.l1_unstructured`` on tie-free input. `scores`, when
    given, is ranked as is (not its absolute value), e.g. ``w.abs() * x_norm``.

    Args:
        w: float tensor of any shape.
        amount: float in [0, 1] (fraction of w.numel(), Python-rounded) or int count in
            [0, w.numel()].
        scores: optional float tensor of w's shape and device, larger = more important.

    Raises ValueError on NaN in the ranked tensor (named ``w`` or ``scores``).

    Example::

        >>> magnitude(torch.tensor([0.5, -3.0, 1.0, -0.1]), 0.5)
        tensor([False,  True,  True, False])
    """
    w = _check_tensor(w, "w")
    n_prune = _num_to_prune(amount, w.numel())
    if scores is None:
        ranked, name = w.abs(), "w"
    else:
        ranked, name = _check_scores(scores, w), "scores"
    _check_no_nan(ranked, name)
    return _keep_mask(ranked.reshape(-1), n_prune).view(w.shape)


def threshold(w: torch.Tensor, t) -> torch.Tensor:
    """Keeps the entries with |w| >= t (compared exactly, whatever w's dtype); NaN is never kept.

    Args:
        w: float tensor of any shape.
        t: a real, non-NaN number (t <= 0 keeps every non-NaN entry, t = inf only infinities).

    Example::

        >>> threshold(torch.tensor([0.5, -3.0, 1.0, -0.1]), 1.0)
        tensor([False,  True,  True, False])
    """
    w = _check_tensor(w, "w")
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise TypeError(f"t must be a real number, got {t!r}")
    t = float(t)
    if math.isnan(t):
        raise ValueError("t must not be NaN")
    # Smallest value of w's dtype that is >= t, so that `|w| >= t_w` in w's dtype is exactly
    # `|w| >= t` (a plain comparison would round t to the dtype first).
    t_w = torch.tensor(t, dtype=torch.float64).to(w.dtype)
    if float(t_w) < t:
        t_w = torch.nextafter(t_w, torch.tensor(math.inf, dtype=w.dtype))
    return w.abs() >= float(t_w)


def random(w: torch.Tensor, amount, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random unstructured mask: prunes `amount` entries chosen uniformly at random.

    Draws ``torch.rand`` fp32 values of w's shape on w's device (from `generator` when given,
    else the global RNG) and prunes the largest ones, like
    ``torch.nn.utils.prune.random_unstructured``: with generator=None and a float32 w the mask
    equals torch's after the same ``torch.manual_seed``.

    Args:
        w: float tensor of any shape (only its shape, dtype check and device are used).
        amount: float in [0, 1] or int count in [0, w.numel()].
        generator: optional torch.Generator on w's device type.

    Example::

        >>> int(random(torch.randn(10, 10), 0.3).sum())
        70
    """
    w = _check_tensor(w, "w")
    n_prune = _num_to_prune(amount, w.numel())
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != w.device.type:
            raise ValueError(f"generator must be on w's device type {w.device.type}, got {generator.device}")
    prob = torch.rand(w.shape, dtype=torch.float32, device=w.device, generator=generator)
    return _keep_mask(prob.view(-1), n_prune, prune_largest=True).view(w.shape)


def ln_structured(w: torch.Tensor, amount, n=2, dim: int = 0) -> torch.Tensor:
    """Structured mask: prunes whole slices along `dim` with the smallest Ln norm.

    The norm of slice i is taken over all other dims (for a Linear weight [out, in] and dim=0:
    one norm per output row). Same mask as ``torch.nn.utils.prune.ln_structured`` on tie-free
    input; fp16/bf16 norms are computed in fp32.

    Args:
        w: float tensor with at least 2 dims (as torch.nn.utils.prune requires).
        amount: float in [0, 1] or int count in [0, w.shape[dim]] of slices to prune.
        n: norm order, any real number torch.linalg.vector_norm accepts (1, 2, inf, -inf, ...).
        dim: the dim whose slices are pruned, negative allowed.

    Example::

        >>> w = torch.tensor([[1.0, 1.0], [3.0, 0.0], [0.1, 0.2]])
        >>> ln_structured(w, 1, n=2, dim=0)[:, 0]
        tensor([ True,  True, False])
    """
    w = _check_tensor(w, "w")
    if w.dim() < 2:
        raise ValueError(f"w must have at least 2 dims for structured pruning, got shape {tuple(w.shape)}")
    n = _check_norm_order(n)
    dim = _check_dim(dim, w.dim())
    n_prune = _num_to_prune(amount, w.shape[dim])
    if w.numel() == 0:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    other = [d for d in range(w.dim()) if d != dim]
    norms = torch.linalg.vector_norm(w, ord=n, dim=other, dtype=_norm_dtype(w.dtype))
    _check_no_nan(norms, "w")
    return _slice_mask(_keep_mask(norms, n_prune), w.shape, dim)


def block(w: torch.Tensor, amount, block=(4, 4), n=1) -> torch.Tensor:
    """Block mask: prunes whole bh x bw blocks with the smallest Ln norm.

    w is viewed as 2-D ``[w.shape[0], w[0].numel()]`` (so a conv weight [out, in, kh, kw]
    tiles over out x (in*kh*kw)) and cut into blocks from the top-left; edge blocks may be
    ragged, their norm is taken over their real entries only. fp16/bf16 norms are in fp32.

    Args:
        w: float tensor with at least 1 dim (a 1-D w is one column).
        amount: float in [0, 1] or int count in [0, num_blocks] of blocks to prune, where
            num_blocks = ceil(rows / bh) * ceil(cols / bw).
        block: (bh, bw), two positive ints.
        n: norm order, any real number torch.linalg.vector_norm accepts.

    Example::

        >>> w = torch.arange(16.0).view(4, 4)
        >>> block(w, 0.5, block=(2, 2)).int()
        tensor([[0, 0, 0, 0],
                [0, 0, 0, 0],
                [1, 1, 1, 1],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    w = _check_tensor(w, "w")
    if w.dim() < 1:
        raise ValueError("w must have at least 1 dim for block pruning, got a 0-d tensor")
    if not isinstance(block, Sequence) or len(block) != 2:
        raise ValueError(f"block must be a pair (bh, bw) of positive ints, got {block!r}")
    bh, bw = (_check_count(b, "block") for b in block)
    if bh < 1 or bw < 1:
        raise ValueError(f"block must be a pair (bh, bw) of positive ints, got {block!r}")
    n = _check_norm_order(n)
    rows, cols = w.shape[0], math.prod(w.shape[1:])
    row_blocks, col_blocks = -(-rows // bh), -(-cols // bw)
    n_prune = _num_to_prune(amount, row_blocks * col_blocks)
    if w.numel() == 0:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    w2 = w.reshape(rows, cols)
    pad_r, pad_c = row_blocks * bh - rows, col_blocks * bw - cols
    if pad_r or pad_c:
        # Padding that adds nothing to the norm: |0|^n = 0 for n >= 0, |inf|^n = 0 for n < 0
        # (and inf never wins a min for n = -inf).
        fill = 0.0 if n >= 0 else math.inf
        w2 = torch.nn.functional.pad(w2, (0, pad_c, 0, pad_r), value=fill)
    tiles = w2.view(row_blocks, bh, col_blocks, bw)
    norms = torch.linalg.vector_norm(tiles, ord=n, dim=(1, 3), dtype=_norm_dtype(w.dtype))
    _check_no_nan(norms, "w")
    keep = _keep_mask(norms.reshape(-1), n_prune).view(row_blocks, 1, col_blocks, 1)
    keep = keep.expand(row_blocks, bh, col_blocks, bw).reshape(row_blocks * bh, col_blocks * bw)
    return keep[:rows, :cols].reshape(w.shape)


def nm(
    w: torch.Tensor, n: int = 2, m: int = 4, dim: int = -1, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """N:M mask: keeps exactly n entries in every group of m consecutive entries along `dim`.

    Each group keeps its n largest |w| (or largest `scores`, e.g. ``w.abs() * x.norm(dim=0)``
    for activation-aware pruning); ties go to the lower index. When w.shape[dim] % m != 0
    the last, shorter group keeps min(n, its length). Runs sparsekit.ops.nm_mask (C++/CUDA,
    falling back to the reference).

    Args:
        w: float tensor with at least 1 dim.
        n, m: ints with 0 < n < m <= 32 (2:4 for sparse tensor cores).
        dim: the dim the groups run along (the reduction dim K for a Linear weight: -1).
        scores: optional float tensor of w's shape and device, larger = more important.

    Raises ValueError on NaN in the ranked tensor (named ``w`` or ``scores``).

    Example::

        >>> nm(torch.tensor([[0.1, -2.0, 0.3, 0.4, 5.0, 0.0]]), 2, 4)
        tensor([[False,  True, False,  True,  True,  True]])
    """
    w = _check_tensor(w, "w")
    n, m = check_pattern(n, m)
    if w.dim() < 1:
        raise ValueError("w must have at least 1 dim for N:M pruning, got a 0-d tensor")
    dim = _check_dim(dim, w.dim())
    if scores is None:  # the kernel ranks |w| itself: no abs() pass over the weight
        ranked, name, absolute = w, "w", True
    else:
        ranked, name, absolute = _check_scores(scores, w), "scores", False
    if w.numel() == 0:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    ranked = ranked.movedim(dim, -1)
    moved_shape = ranked.shape
    scores2d = ranked.reshape(-1, moved_shape[-1]).contiguous()
    try:
        mask2d = ops.nm_mask(scores2d, n, m, absolute)
    except (ValueError, RuntimeError) as err:
        # The kernel checks for NaN itself; look only once it has refused, to name the argument.
        if torch.isnan(scores2d).any():
            raise ValueError(f"{name} must not contain NaN: NaN cannot be ranked") from err
        raise
    return mask2d.view(moved_shape).movedim(-1, dim).contiguous()


def global_magnitude(tensors, amount, scores=None) -> list[torch.Tensor]:
    """One magnitude ranking across several tensors: prunes the `amount` smallest |w| overall.

    Same masks as ``torch.nn.utils.prune.global_unstructured(..., pruning_method=
    prune.L1Unstructured, amount=amount)`` on tie-free input. Tensors may differ in shape and
    dtype; they are ranked together in fp32 (fp64 if any is fp64), which is exact.

    Args:
        tensors: list (or tuple) of float tensors, all on one device.
        amount: float in [0, 1] of the total numel, or int count in [0, total numel].
        scores: optional list of float tensors, one per tensor with its shape, ranked as is
            instead of |w|.

    Returns: a list of bool masks, one per tensor, in order.

    Example::

        >>> a, b = torch.tensor([1.0, -4.0]), torch.tensor([[0.5, 3.0]])
        >>> global_magnitude([a, b], 2)
        [tensor([False,  True]), tensor([[False,  True]])]
    """
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"tensors must be a list or tuple of tensors, got {type(tensors).__name__}")
    tensors = [_check_tensor(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    if scores is not None:
        if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
            raise TypeError(f"scores must be a list or tuple of tensors, got {type(scores).__name__}")
        if len(scores) != len(tensors):
            raise ValueError(f"scores must hold one tensor per tensor ({len(tensors)}), got {len(scores)}")
        ranked = [_check_scores(s, t, f"scores[{i}]") for i, (s, t) in enumerate(zip(scores, tensors))]
        name = "scores"
    else:
        ranked, name = [t.abs() for t in tensors], "tensors"
    n_prune = _num_to_prune(amount, sum(t.numel() for t in tensors))
    if not tensors:
        return []
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError(f"tensors must all be on one device, got {sorted({str(t.device) for t in tensors})}")
    dtype = torch.float64 if any(r.dtype == torch.float64 for r in ranked) else torch.float32
    flat = torch.cat([r.reshape(-1).to(dtype) for r in ranked])
    _check_no_nan(flat, name)
    keep = _keep_mask(flat, n_prune)
    masks, start = [], 0
    for t in tensors:
        masks.append(keep[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return masks
