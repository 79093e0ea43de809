"""The compressed N:M format: `NMTensor` and `compress`.

A 2-D weight W[rows, K] that is N:M along K is stored as
  values    [rows, ceil(K/M)*N]  W's dtype: the kept entries, groups in order, increasing
                                 index inside a group (a group with fewer than N nonzeros
                                 fills its slots with its lowest unused indices, holding 0);
  metadata  [rows, ceil(ceil(K/M)*N*b/8)] uint8, b = ceil(log2 M) bits per kept index,
                                 little-endian: kept entry j of group g at bit (g*N+j)*b.
K is zero-padded to a multiple of M; the logical shape is kept. For 2:4, one metadata byte
holds two groups (low nibble first, low 2 bits = first index), the nibble layout sparse
tensor cores read, and fp16/bf16 weights take 9/16 of their dense bytes.
"""

from __future__ import annotations

import numbers

import torch

from . import ops
from .reference import index_bits

__all__ = ["NMTensor", "compress", "parse_pattern", "check_pattern"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_pattern(n, m) -> tuple[int, int]:
    """Validates an N:M pattern (0 < n < m <= 32, plain ints) and returns (n, m)."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    n, m = int(n), int(m)
    if not 2 <= m <= 32:
        raise ValueError(f"m must be in [2, 32], got {m}")
    if not 0 < n < m:
        raise ValueError(f"n must satisfy 0 < n < m (m = {m}), got {n}")
    return n, m


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), validated."""
    if not isinstance(pattern, str) or pattern.count(":") != 1:
        raise ValueError(f"pattern must be a string 'N:M' such as '2:4', got {pattern!r}")
    n, m = pattern.split(":")
    try:
        return check_pattern(int(n), int(m))
    except ValueError as exc:
        raise ValueError(f"pattern {pattern!r} is not a valid N:M pattern: {exc}") from None


def _check_weight(w, name="w"):
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [rows, K] with the N:M groups along K, got shape "
            f"{tuple(w.shape)}; reshape it first (e.g. w.flatten(1))"
        )


class NMTensor:
    """An N:M sparse matrix in the canonical compressed form (values + metadata).

    Attributes: `values`, `metadata`, `shape` (the logical [rows, K]), `n`, `m`.
    `to_dense()` reconstructs the dense matrix exactly. Survives torch.save/load (also
    with weights_only=True once sparsekit is imported), copy.deepcopy and `.to()`.

    >>> w = torch.tensor([[0.0, 1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0]])
    >>> t = compress(w, 2, 4)
    >>> t.values, t.metadata
    (tensor([[ 1.5000, -2.0000,  3.0000,  0.0000]]), tensor([[77]], dtype=torch.uint8))
    """

    def __init__(self, values: torch.Tensor, metadata: torch.Tensor, shape, n: int, m: int):
        n, m = check_pattern(n, m)
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2:
            raise ValueError(f"shape must be the logical 2-D [rows, K], got {shape}")
        rows, k = shape
        if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES:
            raise TypeError("values must be a float32/float16/bfloat16/float64 tensor")
        if not isinstance(metadata, torch.Tensor) or metadata.dtype != torch.uint8:
            raise TypeError("metadata must be a uint8 tensor")
        per_row = -(-k // m) * n
        meta_bytes = (per_row * index_bits(m) + 7) // 8
        if tuple(values.shape) != (rows, per_row):
            raise ValueError(
                f"values must have shape {(rows, per_row)} for shape {shape} and {n}:{m}, "
                f"got {tuple(values.shape)}"
            )
        if tuple(metadata.shape) != (rows, meta_bytes):
            raise ValueError(
                f"metadata must have shape {(rows, meta_bytes)} for shape {shape} and "
                f"{n}:{m}, got {tuple(metadata.shape)}"
            )
        if values.device != metadata.device:
            raise ValueError(
                f"values and metadata must be on one device, got {values.device} and "
                f"{metadata.device}"
            )
        self.values = values
        self.metadata = metadata
        self._shape = shape
        self.n = n
        self.m = m

    # -- properties ---------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def pattern(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes held: values plus metadata."""
        return self.values.nbytes + self.metadata.nbytes

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the same matrix stored dense."""
        return self._shape[0] * self._shape[1] * self.values.element_size()

    @property
    def compression_ratio(self) -> float:
        """nbytes / dense_nbytes (2:4 fp16: 0.5625)."""
        return self.nbytes / self.dense_nbytes if self.dense_nbytes else 1.0

    # -- conversions --------------------------------------------------------------------
    def to_dense(self) -> torch.Tensor:
        """The dense [rows, K] matrix, equal to the one compressed."""
        return ops.nm_decompress(self.values, self.metadata, self._shape[1], self.n, self.m)

    def to(self, *args, **kwargs) -> "NMTensor":
        """Like Tensor.to: a device moves both tensors, a dtype casts the values only."""
        values = self.values.to(*args, **kwargs)
        if values.dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype for NMTensor values, got {values.dtype}")
        metadata = self.metadata.to(device=values.device, non_blocking=kwargs.get("non_blocking", False))
        if values is self.values and metadata is self.metadata:
            return self
        return NMTensor(values, metadata, self._shape, self.n, self.m)

    def cpu(self) -> "NMTensor":
        return self.to("cpu")

    def cuda(self, device=None) -> "NMTensor":
        return self.to(torch.device("cuda") if device is None else torch.device("cuda", device)
                       if isinstance(device, int) else device)

    def half(self) -> "NMTensor":
        return self.to(torch.float16)

    def bfloat16(self) -> "NMTensor":
        return self.to(torch.bfloat16)

    def float(self) -> "NMTensor":
        return self.to(torch.float32)

    def clone(self) -> "NMTensor":
        return NMTensor(self.values.clone(), self.metadata.clone(), self._shape, self.n, self.m)

    def __repr__(self) -> str:
        return (
            f"NMTensor(shape={tuple(self._shape)}, pattern={self.pattern}, dtype={self.dtype}, "
            f"device={self.device}, nbytes={self.nbytes} ({self.compression_ratio:.4f} of dense))"
        )


# torch.load(weights_only=True) may rebuild NMTensor objects once sparsekit is imported.
torch.serialization.add_safe_globals([NMTensor])


def compress(w: torch.Tensor, n: int = 2, m: int = 4, prune: bool = False) -> NMTensor:
    """Compresses a 2-D N:M sparse matrix (groups along its last dim) to an NMTensor.

    Raises ValueError naming the first row and group that holds more than n nonzeros,
    unless `prune=True`, which first keeps the n largest |w| of every m (masks.nm).

    >>> t = compress(torch.randn(128, 256), 2, 4, prune=True)
    >>> t.compression_ratio   # fp32: values 1/2 of dense plus 1/32 of metadata
    0.53125
    """
    n, m = check_pattern(n, m)
    _check_weight(w)
    if prune:
        from . import masks

        w = torch.where(masks.nm(w, n, m), w, torch.zeros((), dtype=w.dtype, device=w.device))
    values, metadata = ops.nm_compress(w, n, m)
    return NMTensor(values, metadata, w.shape, n, m)
