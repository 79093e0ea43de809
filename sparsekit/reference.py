"""Plain-torch reference of every sparsekit op: the oracle that kernels are tested against,
and the fallback that keeps the library usable where no kernel is built.

Written for clarity, not speed. Layout conventions are those of DESIGN.md's canonical
compressed N:M format (see sparsekit.format).
"""

from __future__ import annotations

import torch

__all__ = ["index_bits", "nm_mask", "nm_compress", "nm_decompress", "pack_bits", "unpack_bits",
           "kept_columns", "kept_entries", "nm_linear", "nm_linear_grad_input", "nm_sddmm", "nm_conv2d",
           "pack_mask_bits",
           "unpack_mask_bits", "dense_mask", "masked_linear", "masked_linear_grad_input",
           "masked_linear_grad_weight", "bitmask_compress", "bitmask_kept", "bitmask_decompress",
           "bitmask_linear", "bitmask_linear_grad_input", "bitmask_sddmm"]


def index_bits(m: int) -> int:
    """Bits per kept index for groups of m: ceil(log2 m)."""
    return (m - 1).bit_length()


def _pad_last(t: torch.Tensor, m: int, value) -> torch.Tensor:
    pad = (-t.shape[-1]) % m
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, pad), value=value)


def nm_mask(scores: torch.Tensor, n: int, m: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask keeping the n largest scores (|scores| if absolute) in every m consecutive
    entries of each row.

    Ties go to the lower index (a stable descending sort). A last group shorter than m is
    padded with -inf, so it keeps min(n, its length) entries. NaN scores raise ValueError.
    """
    if torch.isnan(scores).any():
        where = torch.nonzero(torch.isnan(scores))[0].tolist()
        raise ValueError(
            f"scores contain NaN (first at row {where[0]}, column {where[1]}); "
            "N:M selection needs comparable scores"
        )
    if absolute:
        scores = scores.abs()
    rows, k = scores.shape
    groups = -(-k // m)
    s = _pad_last(scores.to(torch.float64), m, float("-inf")).view(rows, groups, m)
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.view(rows, groups * m)[:, :k].contiguous()


def pack_bits(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs integer fields [rows, F] (each < 2**bits) little-endian into uint8 [rows, B]."""
    rows, count = fields.shape
    shifts = torch.arange(bits, device=fields.device)
    stream = ((fields.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, count * bits)
    stream = _pad_last(stream, 8, 0).view(rows, -(-count * bits // 8), 8)
    weights = 1 << torch.arange(8, device=fields.device)
    return (stream * weights).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 [rows, B] -> int64 fields [rows, count]."""
    rows = packed.shape[0]
    shifts = torch.arange(8, device=packed.device)
    stream = ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 1).reshape(rows, packed.shape[1] * 8)
    stream = stream[:, : count * bits].reshape(rows, count, bits)
    weights = 1 << torch.arange(bits, device=packed.device)
    return (stream * weights).sum(-1)


def nm_compress(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense N:M matrix [rows, K] -> (values [rows, G*n], metadata uint8) (canonical form).

    Raises ValueError naming the first (row, group) holding more than n nonzeros.
    """
    rows, k = w.shape
    groups = -(-k // m)
    wp = _pad_last(w, m, 0).view(rows, groups, m)
    nonzero = wp != 0  # -0.0 counts as zero
    counts = nonzero.sum(-1)
    if (counts > n).any():
        row, group = torch.nonzero(counts > n)[0].tolist()
        hi = min(group * m + m, k) - 1
        raise ValueError(
            f"w is not {n}:{m} sparse: row {row}, group {group} (columns {group * m}..{hi}) "
            f"holds {counts[row, group].item()} nonzeros, more than {n}; prune it first "
            "(sparsekit.masks.nm, or compress(..., prune=True))"
        )
    # Nonzeros first, then the lowest unused indices; the kept set is then read in order.
    position = torch.arange(m, device=w.device)
    priority = nonzero.to(torch.int64) * m + (m - 1 - position)
    idx = torch.topk(priority, n, dim=-1).indices.sort(dim=-1).values
    values = torch.gather(wp, -1, idx).reshape(rows, groups * n)
    metadata = pack_bits(idx.reshape(rows, groups * n), index_bits(m))
    return values.contiguous(), metadata


def nm_decompress(values: torch.Tensor, metadata: torch.Tensor, k: int, n: int, m: int) -> torch.Tensor:
    """(values, metadata) in the canonical form -> dense [rows, k].

    Raises ValueError naming the first (row, group) whose metadata is not canonical.
    """
    rows = values.shape[0]
    groups = -(-k // m)
    idx = unpack_bits(metadata, index_bits(m), groups * n).view(rows, groups, n)
    vals = values.view(rows, groups, n)
    bad = (idx >= m).any(-1)
    if n > 1:
        bad |= (idx[..., 1:] <= idx[..., :-1]).any(-1)
    group_start = torch.arange(groups, device=values.device).view(1, groups, 1) * m
    in_padding = group_start + idx >= k
    bad |= (in_padding & (vals != 0)).any(-1)
    # A group with n or more real columns never points into the padding; one with fewer
    # keeps exactly 0..n-1 (with increasing indices: the last index is below both).
    width = (k - group_start.view(1, groups)).clamp(max=m)
    bad |= idx[..., -1] >= width.clamp(min=n)
    if bad.any():
        row, group = torch.nonzero(bad)[0].tolist()
        hi = min(group * m + m, k) - 1
        raise ValueError(
            f"metadata is corrupt at row {row}, group {group} (columns {group * m}..{hi}): "
            f"kept indices must be strictly increasing, below m={m}, point into the padding "
            f"beyond k={k} only in a group of fewer than n={n} real columns (keeping "
            f"0..n-1), and padding must hold zeros"
        )
    dense = torch.zeros(rows, groups, m, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, idx, vals)
    return dense.view(rows, groups * m)[:, :k].contiguous()


def _padded_weight(values, metadata, k: int, n: int, m: int) -> torch.Tensor:
    # W over K padded to a multiple of m: the products read values in padding slots against
    # zero columns (as every kernel does), so only decompress refuses nonzeros there.
    return nm_decompress(values, metadata, -(-k // m) * m, n, m)


def nm_linear(x, values, metadata, bias, k: int, n: int, m: int) -> torch.Tensor:
    """y = x @ W^T (+ bias), W the dense form of (values, metadata): [rows, k]."""
    x = _pad_last(x, m, 0) if k % m else x
    return torch.nn.functional.linear(x, _padded_weight(values, metadata, k, n, m), bias)


def nm_linear_grad_input(grad_out, values, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """grad_x = grad_out @ W: [..., rows] -> [..., k]."""
    return torch.matmul(grad_out, _padded_weight(values, metadata, k, n, m)[:, :k])


def kept_columns(metadata: torch.Tensor, k: int, n: int, m: int):
    """(columns, inside): the dense column of every kept slot, [rows, ceil(k/m)*n], clamped
    into [0, k), and whether the slot lies inside k (False for K's padding)."""
    rows, groups = metadata.shape[0], -(-k // m)
    idx = unpack_bits(metadata, index_bits(m), groups * n).view(rows, groups, n)
    cols = (idx + torch.arange(groups, device=metadata.device).view(1, groups, 1) * m)
    cols = cols.reshape(rows, groups * n)
    return cols.clamp(max=max(k - 1, 0)), cols < k


def kept_entries(dense: torch.Tensor, metadata: torch.Tensor, k: int, n: int, m: int):
    """dense [rows, k] at every kept (r, j), in the values layout [rows, ceil(k/m)*n] (0 in
    K's padding slots): the values' gradient from a dense weight's (differentiable)."""
    cols, inside = kept_columns(metadata, k, n, m)
    if k == 0:
        return dense.new_zeros(cols.shape)
    return torch.gather(dense, 1, cols) * inside


def nm_sddmm(grad_out, x, metadata, k: int, n: int, m: int) -> torch.Tensor:
    """Gradient of the kept values: (grad_out^T @ x)[r, col(r, j)] for every kept (r, j),
    in the values layout [rows, ceil(k/m)*n]."""
    rows = metadata.shape[0]
    batch = x.shape[:-1].numel()  # not -1: k or rows may be 0
    dense = grad_out.reshape(batch, rows).t() @ x.reshape(batch, k)  # [rows, k]
    return kept_entries(dense, metadata, k, n, m)


def nm_conv2d(x, values, metadata, bias, in_channels: int, kh: int, kw: int, stride, padding,
              dilation, n: int, m: int) -> torch.Tensor:
    """2-D convolution with the weight (values, metadata) [out, kh*kw*in_channels], the conv
    weight [out, in_channels, kh, kw] permuted to [out, kh, kw, in_channels] and flattened
    (DESIGN.md); returns a [B, out, H_out, W_out] tensor, channels-last in memory when x is
    (and not also NCHW-contiguous), else contiguous: the layout every nm_conv2d returns."""
    rows = values.shape[0]
    w = nm_decompress(values, metadata, kh * kw * in_channels, n, m)
    w = w.view(rows, kh, kw, in_channels).permute(0, 3, 1, 2)
    y = torch.nn.functional.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))
    return y.contiguous(memory_format=conv2d_output_format(x))


def conv2d_output_format(x: torch.Tensor) -> torch.memory_format:
    """nm_conv2d's output layout for input x: channels-last when x is channels-last and not
    also NCHW-contiguous (a tensor with one channel or 1x1 images is both), else NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# -- masked products (a dense weight and a mask: sparsekit.prune's masks while training) --

def pack_mask_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool mask [rows, k] -> uint8 [rows, ceil(k/8)]: column c at bit c % 8 of byte c // 8
    (pack_bits with 1-bit fields, computed in uint8 so a large mask needs no int64 copy)."""
    rows, k = mask.shape
    padded = _pad_last(mask.to(torch.uint8), 8, 0).view(rows, -(-k // 8), 8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(-1, dtype=torch.uint8)


def unpack_mask_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_mask_bits: uint8 [rows, ceil(k/8)] -> bool [rows, k]."""
    return unpack_bits(bits, 1, k).bool()


def dense_mask(mask: torch.Tensor, rows: int, k: int, n: int = 0, m: int = 0) -> torch.Tensor:
    """The bool [rows, k] mask that `mask` encodes: packed bits when n = m = 0, else the kept
    positions of canonical N:M metadata. Raises ValueError naming `mask` on a wrong shape."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.uint8:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError("mask must be a uint8 tensor (packed bits, or N:M metadata when n, m "
                        f"are given), got {got}")
    if n == 0 and m == 0:
        want = (rows, -(-k // 8))
        if tuple(mask.shape) != want:
            raise ValueError(f"mask must be packed bits of shape {want} for a [{rows}, {k}] "
                             f"weight, got {tuple(mask.shape)}")
        return unpack_mask_bits(mask, k)
    if not 0 < n < m <= 32:
        raise ValueError(f"n, m must be 0, 0 (packed bits) or an N:M pattern with "
                         f"0 < n < m <= 32, got {n}, {m}")
    want = (rows, (-(-k // m) * n * index_bits(m) + 7) // 8)
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must be N:M metadata of shape {want} for a [{rows}, {k}] weight "
                         f"and {n}:{m}, got {tuple(mask.shape)}")
    cols, inside = kept_columns(mask, k, n, m)
    dense = torch.zeros(rows, max(k, 1), dtype=torch.bool, device=mask.device)
    dense.scatter_(1, cols, inside)
    # Slots past k were clamped onto column k-1: put back what the slots inside k say.
    dense[:, -1:] = (inside & (cols == max(k - 1, 0))).any(1, keepdim=True)
    return dense[:, :k]


def masked_linear(x, weight, mask, bias, n: int = 0, m: int = 0) -> torch.Tensor:
    """y = x @ (weight * mask)^T (+ bias); pruned entries select 0 (as the kernels do)."""
    keep = dense_mask(mask, weight.shape[0], weight.shape[1], n, m)
    return torch.nn.functional.linear(x, torch.where(keep, weight, 0), bias)


def masked_linear_grad_input(grad_out, weight, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_x = grad_out @ (weight * mask): [..., rows] -> [..., k]."""
    keep = dense_mask(mask, weight.shape[0], weight.shape[1], n, m)
    return torch.matmul(grad_out, torch.where(keep, weight, 0))


def masked_linear_grad_weight(grad_out, x, mask, n: int = 0, m: int = 0) -> torch.Tensor:
    """grad_W = (grad_out^T @ x) * mask: [rows, k], exactly 0 at every pruned entry."""
    rows, k = grad_out.shape[-1], x.shape[-1]
    keep = dense_mask(mask, rows, k, n, m)
    batch = x.shape[:-1].numel()  # not -1: k or rows may be 0
    dense = grad_out.reshape(batch, rows).t() @ x.reshape(batch, k)
    return torch.where(keep, dense, 0)


# -- bitmask format (unstructured sparsity; sparsekit.bitmask) -----------------------------

BITMASK_CHUNK = 16


def bitmask_compress(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, mask, offsets) of a 2-D matrix: values [nnz] its nonzeros in row-major order,
    mask int16 [rows, ceil(k/16)] with bit j of chunk c set when column 16c + j is nonzero,
    offsets int64 [rows + 1] where each row's values start. NaN raises ValueError."""
    if torch.isnan(w).any():
        where = torch.nonzero(torch.isnan(w))[0].tolist()
        raise ValueError(f"w contains NaN (first at row {where[0]}, column {where[1]}); "
                         "a NaN weight cannot be compressed")
    rows, k = w.shape
    kept = w != 0
    chunks = -(-k // BITMASK_CHUNK)
    bits = _pad_last(kept, BITMASK_CHUNK, False).view(rows, chunks, BITMASK_CHUNK).to(torch.int32)
    words = (bits << torch.arange(BITMASK_CHUNK, device=w.device, dtype=torch.int32)).sum(-1)
    mask = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16)
    offsets = torch.zeros(rows + 1, dtype=torch.int64, device=w.device)
    offsets[1:] = kept.sum(1).cumsum(0)
    return w[kept], mask, offsets


def bitmask_kept(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [rows, k]: the kept positions the mask words encode."""
    shifts = torch.arange(BITMASK_CHUNK, device=mask.device, dtype=torch.int32)
    bits = ((mask.to(torch.int32) & 0xFFFF).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], mask.shape[1] * BITMASK_CHUNK)[:, :k].bool()


def bitmask_decompress(values, mask, offsets, k: int) -> torch.Tensor:
    """Dense [rows, k] matrix of the bitmask triple (offsets are implied by the mask)."""
    kept = bitmask_kept(mask, k)
    dense = values.new_zeros(kept.shape)
    dense[kept] = values
    return dense


def bitmask_linear(x, values, mask, offsets, bias, k: int) -> torch.Tensor:
    """y = x @ W^T (+ bias), W the dense form of the bitmask triple."""
    return torch.nn.functional.linear(x, bitmask_decompress(values, mask, offsets, k), bias)


def bitmask_linear_grad_input(grad_out, values, mask, offsets, k: int) -> torch.Tensor:
    """grad_x = grad_out @ W: [..., rows] -> [..., k]."""
    return torch.matmul(grad_out, bitmask_decompress(values, mask, offsets, k))


def bitmask_sddmm(grad_out, x, mask, offsets, k: int) -> torch.Tensor:
    """Gradient of the kept values: (grad_out^T @ x) at the kept positions, [nnz]."""
    rows = mask.shape[0]
    dense = grad_out.reshape(-1, rows).t() @ x.reshape(-1, k)
    return dense[bitmask_kept(mask, k)]
