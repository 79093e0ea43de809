"""The bitmask format for unstructured sparsity: `BitmaskTensor` and `compress_bitmask`.

A 2-D weight W[rows, K] with any pattern of zeros is stored as
  values   [nnz]                 W's dtype: the nonzeros in row-major order;
  mask     [rows, ceil(K/16)]    int16: bit j of word c is set when column 16c + j is kept
                                 (the bits of one word read as uint16; bits past K are 0);
  offsets  [rows + 1]            int64: row r's values are values[offsets[r]:offsets[r+1]]
                                 (a prefix sum of the rows' popcounts, so it is implied by
                                 the mask; it lets each thread start at any row).
Kept means nonzero (-0.0 counts as zero), so the triple is unique for a given matrix. Bytes
per weight: (1 - sparsity) * dtype bytes + 1/8, i.e. 0.23 of fp32 dense at 80% sparsity
and 0.13 at 90% (CSR with 16-bit column indices: 0.30 and 0.15; with int32 indices 0.40
and 0.20). Small-batch products decode a 16-bit word with one expand-load of the packed
values (AVX-512), so every byte streamed from memory is a kept value or one mask bit.
"""

from __future__ import annotations

import torch

from . import ops

__all__ = ["BitmaskTensor", "compress_bitmask"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
CHUNK = 16


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, K], got shape {tuple(w.shape)}; reshape it "
                         "first (e.g. w.flatten(1))")


class BitmaskTensor:
    """An unstructured sparse matrix in the bitmask format (values, mask, offsets).

    Attributes: `values`, `mask`, `offsets`, `shape` (the logical [rows, K]). `to_dense()`
    reconstructs the matrix exactly. Survives torch.save/load (also with weights_only=True
    once sparsekit is imported), copy.deepcopy and `.to()`.

    >>> t = compress_bitmask(torch.tensor([[0.0, 1.5, 0.0, -2.0], [0.0, 0.0, 0.0, 3.0]]))
    >>> t.values, t.mask, t.offsets
    (tensor([ 1.5000, -2.0000,  3.0000]), tensor([[10], [ 8]], dtype=torch.int16), tensor([0, 2, 3]))
    """

    def __init__(self, values: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, shape):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"shape must be the logical 2-D [rows, K], got {shape}")
        rows, k = shape
        if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES or values.dim() != 1:
            raise TypeError("values must be a 1-D float32/float16/bfloat16/float64 tensor")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.int16:
            raise TypeError("mask must be an int16 tensor")
        if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64:
            raise TypeError("offsets must be an int64 tensor")
        if tuple(mask.shape) != (rows, -(-k // CHUNK)):
            raise ValueError(f"mask must have shape {(rows, -(-k // CHUNK))} for shape {shape}, "
                             f"got {tuple(mask.shape)}")
        if tuple(offsets.shape) != (rows + 1,):
            raise ValueError(f"offsets must have shape {(rows + 1,)}, got {tuple(offsets.shape)}")
        if not values.device == mask.device == offsets.device:
            raise ValueError(f"values, mask and offsets must be on one device, got {values.device}, "
                             f"{mask.device} and {offsets.device}")
        self.values, self.mask, self.offsets = values, mask, offsets
        self._shape = shape

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def pattern(self) -> str:
        return "unstructured"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        total = self._shape[0] * self._shape[1]
        return 1.0 - self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes held: values, mask and offsets."""
        return self.values.nbytes + self.mask.nbytes + self.offsets.nbytes

    @property
    def dense_nbytes(self) -> int:
        return self._shape[0] * self._shape[1] * self.values.element_size()

    @property
    def compression_ratio(self) -> float:
        """nbytes / dense_nbytes (fp32 at 80% sparsity: about 0.23)."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else 1.0

    def to_dense(self) -> torch.Tensor:
        """The dense [rows, K] matrix, equal to the one compressed."""
        return ops.bitmask_decompress(self.values, self.mask, self.offsets, self._shape[1])

    def to(self, *args, **kwargs) -> "BitmaskTensor":
        """Like Tensor.to: a device moves all three tensors, a dtype casts the values only."""
        values = self.values.to(*args, **kwargs)
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype for BitmaskTensor values, got {values.dtype}")
        nb = kwargs.get("non_blocking", False)
        mask = self.mask.to(device=values.device, non_blocking=nb)
        offsets = self.offsets.to(device=values.device, non_blocking=nb)
        if values is self.values and mask is self.mask:
            return self
        return BitmaskTensor(values, mask, offsets, self._shape)

    def cpu(self) -> "BitmaskTensor":
        return self.to("cpu")

    def half(self) -> "BitmaskTensor":
        return self.to(torch.float16)

    def bfloat16(self) -> "BitmaskTensor":
        return self.to(torch.bfloat16)

    def float(self) -> "BitmaskTensor":
        return self.to(torch.float32)

    def clone(self) -> "BitmaskTensor":
        return BitmaskTensor(self.values.clone(), self.mask.clone(), self.offsets.clone(), self._shape)

    def __repr__(self) -> str:
        return (f"BitmaskTensor(shape={tuple(self._shape)}, sparsity={self.sparsity:.4f}, "
                f"dtype={self.dtype}, device={self.device}, nbytes={self.nbytes} "
                f"({self.compression_ratio:.4f} of dense))")


torch.serialization.add_safe_globals([BitmaskTensor])


def compress_bitmask(w: torch.Tensor, mask: torch.Tensor | None = None) -> BitmaskTensor:
    """Compresses the nonzeros of a 2-D matrix (of `w * mask` when a bool `mask` of w's shape
    is given) to a BitmaskTensor. NaN in the kept weights raises ValueError.

    >>> w = torch.randn(64, 256)
    >>> t = compress_bitmask(w, sparsekit.masks.magnitude(w, 0.8))
    >>> round(t.compression_ratio, 3)   # 0.2 of the values + 1/32 of mask bits + offsets
    0.235
    """
    _check_weight(w)
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if mask.shape != w.shape:
            raise ValueError(f"mask must have w's shape {tuple(w.shape)}, got {tuple(mask.shape)}")
        w = torch.where(mask.to(w.device), w, torch.zeros((), dtype=w.dtype, device=w.device))
    values, bits, offsets = ops.bitmask_compress(w.detach())
    return BitmaskTensor(values, bits, offsets, w.shape)
