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

import functools
import math
import numbers

import torch

from . import ops
from .reference import index_bits

__all__ = ["NMTensor", "compress", "check_metadata", "parse_pattern", "check_pattern"]

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


def _unpack_fields(metadata: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """uint8 [rows, B] little-endian bit stream -> uint8 fields [rows, count] (bits <= 5).

    The stream is cut into chunks of lcm(bits, 8) bits (whole bytes holding whole fields,
    one byte for 2:4), so each field's position inside its chunk is a constant: one strided
    shift-and-mask per field of a chunk, never an index tensor per field."""
    rows, nbytes = metadata.shape
    chunk_bits = bits * 8 // math.gcd(bits, 8)
    chunk_bytes, per_chunk = chunk_bits // 8, chunk_bits // bits
    chunks = -(-nbytes // chunk_bytes)
    padded = torch.nn.functional.pad(metadata, (0, chunks * chunk_bytes - nbytes))
    c = padded.view(rows, chunks, chunk_bytes)
    mask = (1 << bits) - 1
    out = torch.empty(rows, chunks, per_chunk, dtype=torch.uint8, device=metadata.device)
    for f in range(per_chunk):
        byte, shift = divmod(f * bits, 8)
        field = c[..., byte] >> shift
        if shift + bits > 8:  # the field continues in the next byte
            field = field | (c[..., byte + 1] << (8 - shift))
        out[..., f] = field & mask
    return out.view(rows, chunks * per_chunk)[:, :count]


# Fields per validation block: bounds the temporaries (a few bytes per field) at a time.
_CHECK_FIELDS_PER_BLOCK = 1 << 22


@functools.lru_cache(maxsize=None)
def _byte_ok_table(n: int, m: int) -> torch.Tensor:
    """bool [256]: whether a metadata byte holding 8 / (n*b) whole groups, all with m real
    columns, is canonical (each group's indices below m and strictly increasing)."""
    bits = index_bits(m)
    ok = []
    for byte in range(256):
        fields = [(byte >> (i * bits)) & ((1 << bits) - 1) for i in range(8 // bits)]
        groups = [fields[g * n:(g + 1) * n] for g in range(8 // (n * bits))]
        ok.append(all(max(g) < m and all(a < b for a, b in zip(g, g[1:])) for g in groups))
    return torch.tensor(ok)


def _check_groups(meta, values, r0, g0, k, n, m, name, values_name, last_byte):
    """Checks groups g0.. of rows r0.. whose fields start at the first bit of `meta`; raises
    ValueError naming the first bad (row, group). `last_byte`: meta ends with the row's
    last byte, whose bits after the last field must be 0. `values`: the slots of the same
    groups, or None."""
    bits = index_bits(m)
    rows, groups = meta.shape[0], -(-k // m) - g0
    idx = _unpack_fields(meta, bits, groups * n).view(rows, groups, n)
    bad = (idx >= m).any(-1)
    if n > 1:
        bad |= (idx[..., 1:] <= idx[..., :-1]).any(-1)
    order_bad = bad.clone()
    tail = k % m  # real columns of the last group when it is partial: only it touches padding
    if last_byte and tail:
        # Indices below max(tail, n): with increasing indices that is "no padding" when the
        # group has n real columns, and exactly 0..n-1 when it has fewer.
        bad[:, -1] |= idx[:, -1, -1] >= max(tail, n)
        if values is not None:
            bad[:, -1] |= ((idx[:, -1] >= tail) & (values[:, -n:] != 0)).any(-1)
    tail_bits = (g0 + groups) * n * bits % 8
    if last_byte and tail_bits:
        bad[:, -1] |= (meta[:, -1] >> tail_bits) != 0
    if not bool(bad.any()):
        return
    row, group = torch.nonzero(bad)[0].tolist()
    kept = tuple(idx[row, group].tolist())
    w = min(m, k - (g0 + group) * m)
    if bool(order_bad[row, group]):
        why = f"kept indices {kept} must be strictly increasing and below m={m}"
    elif kept[-1] >= max(w, n):
        why = (f"kept indices {kept} point into the zero padding beyond k={k}, though the group "
               f"has {w} real column(s)" + (f" (it must keep exactly {tuple(range(n))})"
                                            if w < n else ""))
    elif values is not None and any(i >= w and v != 0 for i, v in
                                    zip(kept, values[row, group * n:(group + 1) * n].tolist())):
        why = (f"{values_name} holds a nonzero entry at a padding position beyond k={k} "
               f"(kept indices {kept})")
    else:
        why = f"the bits after the last index field must be 0 (last byte {int(meta[row, -1])})"
    group += g0
    lo, hi = group * m, min(group * m + m, k) - 1
    raise ValueError(f"{name} is not canonical {n}:{m} metadata at row {r0 + row}, group {group} "
                     f"(columns {lo}..{hi}): {why}")


def _passes_compiled_decompress(metadata, values, k, n, m, count, bits) -> bool:
    """CPU fast path for patterns without the byte table: the compiled decompress kernel
    applies the same rule (csrc/nm_format.h) in parallel, a block of rows at a time; the
    bits after the last field are checked here. False when it is not available or finds
    something, and the torch path then locates the error and says what it is."""
    if (metadata.device.type != "cpu" or 8 % (n * bits) == 0
            or not torch._C._dispatch_has_kernel_for_dispatch_key("sparsekit::nm_decompress",
                                                                  "CPU")):
        return False
    tail_bits = count * bits % 8
    if tail_bits and bool(((metadata[:, -1] >> tail_bits) != 0).any()):
        return False
    rows = metadata.shape[0]
    block = max(1, _CHECK_FIELDS_PER_BLOCK // max(k, 1))
    for r0 in range(0, rows, block):
        vals = (torch.zeros(min(block, rows - r0), count, dtype=torch.float16) if values is None
                else values[r0:r0 + block])
        if not vals.is_floating_point() or vals.element_size() < 2:
            return False
        try:
            ops.nm_decompress(vals, metadata[r0:r0 + block], k, n, m)
        except ValueError:
            return False
    return True


def check_metadata(metadata: torch.Tensor, k: int, n: int, m: int, name: str = "metadata", *,
                   values: torch.Tensor | None = None, values_name: str = "values") -> None:
    """Raises ValueError unless `metadata` is canonical N:M metadata for a [rows, k] weight.

    Canonical (DESIGN.md): uint8 [rows, ceil(ceil(k/m)*n*b/8)], b = ceil(log2 m); inside every
    group the n kept indices are below m and strictly increasing; a group with at least n
    real columns (columns below k) never points into K's zero padding, and a group with
    fewer real columns keeps exactly indices 0..n-1 (all its columns, then the lowest
    padding slots); the unused bits after the last field are 0. With `values` (the kept
    entries, [rows, ceil(k/m)*n]) the slots pointing into padding must also hold 0.

    The error names `name` (e.g. the state_dict key), the row and the group. Vectorized
    torch: runs on the tensor's device (CPU or CUDA) and returns None when all is well.
    Patterns whose groups fill whole bytes (2:4, 1:2, 2:3, 1:4) check full groups with one
    256-entry table lookup per byte; on the CPU the others first try the compiled
    decompress kernel, which applies the same rule.

    >>> t = compress(torch.randn(4, 8), 2, 4, prune=True)
    >>> check_metadata(t.metadata, 8, 2, 4)
    >>> check_metadata(torch.full((4, 1), 0x05, dtype=torch.uint8), 8, 2, 4)
    Traceback (most recent call last):
        ...
    ValueError: metadata is not canonical 2:4 metadata at row 0, group 0 (columns 0..3): kept indices (1, 1) must be strictly increasing and below m=4
    """
    n, m = check_pattern(n, m)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    k = int(k)
    if not isinstance(metadata, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(metadata).__name__}")
    if metadata.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 (packed N:M indices), got {metadata.dtype}")
    bits = index_bits(m)
    groups = -(-k // m)
    count = groups * n
    meta_bytes = (count * bits + 7) // 8
    if metadata.dim() != 2 or metadata.shape[1] != meta_bytes:
        raise ValueError(f"{name} must have shape [rows, {meta_bytes}] for k={k} and {n}:{m}, "
                         f"got {tuple(metadata.shape)}")
    rows = metadata.shape[0]
    if values is not None:
        if not isinstance(values, torch.Tensor):
            raise TypeError(f"{values_name} must be a torch.Tensor, got {type(values).__name__}")
        if tuple(values.shape) != (rows, count):
            raise ValueError(f"{values_name} must have shape {(rows, count)} for {name} of "
                             f"shape {tuple(metadata.shape)}, k={k} and {n}:{m}, got "
                             f"{tuple(values.shape)}")
        if values.device != metadata.device:
            raise ValueError(f"{values_name} and {name} must be on one device, got "
                             f"{values.device} and {metadata.device}")
    if rows == 0 or count == 0:
        return
    if _passes_compiled_decompress(metadata, values, k, n, m, count, bits):
        return
    # Full groups of byte-sized chunks go through the table; the rest (the last, partial
    # group with its padding, or every group of other patterns) through the field decoder.
    per_byte = 8 // (n * bits) if 8 % (n * bits) == 0 else 0
    table_bytes = (k // m) // per_byte if per_byte else 0
    g0 = table_bytes * per_byte
    block = max(1, _CHECK_FIELDS_PER_BLOCK // max(count, 1))
    for r0 in range(0, rows, block):
        meta = metadata[r0:r0 + block]
        if table_bytes:
            ok = _byte_ok_table(n, m).to(meta.device)[meta[:, :table_bytes].int()]
            if not bool(ok.all()):
                row, byte = torch.nonzero(~ok)[0].tolist()
                _check_groups(meta[row:row + 1, byte:byte + 1], None, r0 + row,
                              byte * per_byte, (byte + 1) * per_byte * m, n, m, name,
                              values_name, False)
        if g0 < groups:
            _check_groups(meta[:, table_bytes:],
                          None if values is None else values[r0:r0 + block, g0 * n:],
                          r0, g0, k, n, m, name, values_name, True)


class NMTensor:
    """An N:M sparse matrix in the canonical compressed form (values + metadata).

    Attributes: `values`, `metadata`, `shape` (the logical [rows, K]), `n`, `m`.
    `to_dense()` reconstructs the dense matrix exactly. Survives torch.save/load (also
    with weights_only=True once sparsekit is imported), copy.deepcopy and `.to()`.
    The constructor, and unpickling, validate the pair (`check_metadata`): metadata that is
    not canonical raises ValueError naming the row and group.

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
        if metadata.device.type != "meta":  # meta tensors hold no data to check
            check_metadata(metadata, k, n, m, values=values)
        self._set(values, metadata, shape, n, m)

    def _set(self, values, metadata, shape, n, m):
        self.values = values
        self.metadata = metadata
        self._shape = shape
        self.n = n
        self.m = m

    @classmethod
    def _canonical(cls, values, metadata, shape, n, m) -> "NMTensor":
        # For tensors canonical by construction (compress, .to(), clone): no second check.
        t = cls.__new__(cls)
        t._set(values, metadata, tuple(shape), n, m)
        return t

    def __setstate__(self, state):
        # Unpickling (torch.load, also with weights_only=True, and copy) goes through every
        # check of the constructor: a stored NMTensor is as untrusted as any other input.
        try:
            args = (state["values"], state["metadata"], state["_shape"], state["n"], state["m"])
        except (TypeError, KeyError):
            raise ValueError("not the state of a sparsekit NMTensor (values, metadata, shape, "
                             "n, m)") from None
        self.__init__(*args)

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
        return NMTensor._canonical(values, metadata, self._shape, self.n, self.m)

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
        return NMTensor._canonical(self.values.clone(), self.metadata.clone(), self._shape, self.n,
                                   self.m)

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
    return NMTensor._canonical(values, metadata, w.shape, n, m)
