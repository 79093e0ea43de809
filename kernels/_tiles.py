"""Pieces shared by the Triton kernels: decoding canonical N:M metadata and masks into
dense tiles on chip, the tensor-core product, config lists and argument checks.

Tiles along K use the *group layout*: a dense K-tile of BLOCK_G groups is held as
[BLOCK_G, MP] with MP = next_pow2(M), dense column g*M + p at (g, p). For power-of-two M
this is simply the contiguous tile; for other M the positions p >= M are holes that hold
zeros on both sides of the product, so every N:M pattern (0 < N < M <= 32) runs through
the same kernels. A packed bit mask is the same layout with M = 8 (one byte per group).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once: tests/conftest.py sets it before triton is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Dtypes the kernels compute in (fp32 accumulate throughout).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_M = 32


AUTOTUNE_ENV = "SPARSEKIT_TRITON_AUTOTUNE"


class Tuned:
    """A kernel autotuned over its config list, next to the same kernel pinned to the list's
    first config. `kernel[grid](...)` picks per launch: the first config under the
    interpreter (autotuning more than one config needs do_bench, which it cannot run) or with
    SPARSEKIT_TRITON_AUTOTUNE=0 (tests check results, not speed, and skip minutes of
    tuning), the tuned kernel otherwise."""

    def __init__(self, fn, configs, key, prune_configs_by):
        self.configs = list(configs)
        self.tuned = triton.autotune(configs=self.configs, key=key,
                                     prune_configs_by=prune_configs_by)(fn)
        self.first = triton.autotune(configs=self.configs[:1], key=key,
                                     prune_configs_by=prune_configs_by)(fn)
        self.fn = self.tuned  # the decorated kernel, as triton's wrappers name it

    def __getitem__(self, grid):
        pinned = INTERPRET or os.environ.get(AUTOTUNE_ENV, "1") == "0"
        return (self.first if pinned else self.tuned)[grid]


def autotune(configs, key, prune_configs_by=None):
    """Like triton.autotune, returning a `Tuned` kernel (see there)."""
    return lambda fn: Tuned(fn, configs, key, prune_configs_by)


def prune_block_k(configs, named_args, **kwargs):
    """early_config_prune: drops configs whose K-tile holds less than one group, and
    batch tiles far wider than the batch; keeps at least one."""
    mp = named_args.get("MP", kwargs.get("MP", 1))
    batch = named_args.get("B", kwargs.get("B"))
    keep = [c for c in configs if c.kwargs.get("BLOCK_K", mp) >= mp]
    if batch is not None and "BLOCK_B" in configs[0].kwargs:
        want = max(16, triton.next_power_of_2(max(int(batch), 1)))
        narrow = [c for c in keep if c.kwargs["BLOCK_B"] <= want]
        keep = narrow or keep
    return keep or configs[:1]


def block_g(args) -> int:
    """Groups per K-tile for the heuristics decorator: BLOCK_K // MP, at least 1."""
    return max(args["BLOCK_K"] // args["MP"], 1)


def runs(args) -> bool:
    """For the heuristics decorator (after BLOCK_G): whether a K-tile's slots can be read as
    contiguous runs of values and metadata bytes: N a power of two (a reshape axis), the
    index width dividing 8, and every tile's metadata a whole number of bytes."""
    n, bits = args["N"], args["BITS"]
    return (n & (n - 1)) == 0 and 8 % bits == 0 and (args["BLOCK_G"] * n * bits) % 8 == 0


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow torch's own setting (tf32 only when torch allows it)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not INTERPRET:
        return "tf32"
    return "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """bf16 tl.dot is silently wrong under the interpreter: the interpreted kernels widen
    bf16 operands to fp32 before the product (the GPU path keeps bf16 tensor cores)."""
    return INTERPRET and dtype == torch.bfloat16


def index_bits(m: int) -> int:
    return (m - 1).bit_length()


def pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


# -- argument checks (clear errors naming the argument) ------------------------------------

def check_tensor(name: str, t, dims: int = 2, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be one of {names}, got {t.dtype}")


def check_device(**tensors) -> torch.device:
    """All tensors on one device, and that device one the kernels run on: CUDA, or the CPU
    under TRITON_INTERPRET=1."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise ValueError(f"{name} must be on {device} like {items[0][0]}, got {t.device}")
    if device.type != "cuda" and not (INTERPRET and device.type == "cpu"):
        raise ValueError(
            f"{items[0][0]} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1 set "
            f"before triton is imported), got device {device}")
    return device


def unit_inner(t):
    """t with a unit stride in its last dim (the kernels index values, metadata, masks and
    bias rows as contiguous runs; x, grad_out and weight take any strides)."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def check_pattern(n, m) -> tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 2 <= m <= MAX_M:
        raise ValueError(f"m must be in [2, {MAX_M}], got {m}")
    if not 0 < n < m:
        raise ValueError(f"n must satisfy 0 < n < m (m = {m}), got {n}")
    return n, m


def check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative int (the dense width), got {k!r}")
    return k


def check_metadata(metadata, rows: int, k: int, n: int, m: int, rows_from: str) -> None:
    check_tensor("metadata", metadata, 2, (torch.uint8,))
    slots = -(-k // m) * n
    want = (rows, (slots * index_bits(m) + 7) // 8)
    if tuple(metadata.shape) != want:
        raise ValueError(f"metadata must have shape {want} for {rows} rows ({rows_from}), k={k} "
                         f"and {n}:{m}, got {tuple(metadata.shape)}")


# -- on-chip decoding ---------------------------------------------------------------------

@triton.jit
def slot_index(meta_ptr, stride_meta, rows, slots, valid, META_COLS, BITS: tl.constexpr):
    """Kept index (0..M-1) held by each slot: bits [slot*BITS, slot*BITS + BITS) of the row's
    little-endian metadata. `rows` and `slots` broadcast together; invalid slots read 0."""
    bit = slots * BITS
    byte = bit >> 3
    ptr = meta_ptr + rows * stride_meta + byte
    word = tl.load(ptr, mask=valid, other=0).to(tl.int32)
    if (8 % BITS) != 0:
        # 3- and 5-bit indices may straddle a byte boundary.
        hi = tl.load(ptr + 1, mask=valid & (byte + 1 < META_COLS), other=0).to(tl.int32)
        word = word | (hi << 8)
    return (word >> (bit & 7)) & ((1 << BITS) - 1)


@triton.jit
def slot_index_run(meta_ptr, stride_meta, rows, s0, R, S, BITS: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Kept indices [BLOCK_R, BLOCK_S] of the consecutive slots s0 .. s0+BLOCK_S-1, read as a
    contiguous run of metadata bytes and split with shifts (no byte read twice). Needs BITS
    to divide 8 (1:2, 2:4, N:16, ...) and s0*BITS, BLOCK_S*BITS multiples of 8."""
    b = tl.arange(0, BLOCK_S * BITS // 8)
    first = s0 * BITS // 8
    ok = (rows < R)[:, None] & ((first + b) * (8 // BITS) < S)[None, :]
    byte = tl.load(meta_ptr + rows[:, None] * stride_meta + first + b[None, :], mask=ok,
                   other=0).to(tl.int32)
    shifts = tl.arange(0, 8 // BITS) * BITS  # little-endian: lower slots in lower bits
    idx = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(idx, (BLOCK_R, BLOCK_S))


@triton.jit
def tile_cols(g0, K, M: tl.constexpr, MP: tl.constexpr, BLOCK_G: tl.constexpr):
    """Dense columns [BLOCK_G*MP] of the K-tile holding groups g0 .. g0+BLOCK_G-1 (group
    layout, flattened), and which of them exist. For power-of-two M these are simply
    g0*M + arange, which keeps loads and stores contiguous (vectorized)."""
    if M == MP:
        cols = g0 * M + tl.arange(0, BLOCK_G * MP)
        ok = cols < K
    else:
        p = tl.arange(0, MP)
        cols2 = (g0 + tl.arange(0, BLOCK_G))[:, None] * M + p[None, :]
        ok2 = (p < M)[None, :] & (cols2 < K)
        cols = tl.reshape(cols2, (BLOCK_G * MP,))
        ok = tl.reshape(ok2, (BLOCK_G * MP,))
    return cols, ok


@triton.jit
def nm_dense_tile(values_ptr, meta_ptr, stride_v, stride_meta, rows, g0, R, G, META_COLS,
                  N: tl.constexpr, BITS: tl.constexpr, MP: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, RUNS: tl.constexpr):
    """The dense weight tile [BLOCK_R, BLOCK_G*MP] (group layout, the columns of tile_cols)
    of `rows` and groups g0.., expanded on chip from the compressed values and metadata:
    slot j of group g lands at its kept index; everything else is 0."""
    p = tl.arange(0, MP)
    if RUNS:
        # The tile's slots are one contiguous run per row: vectorized loads of values and
        # metadata, then [BLOCK_R, BLOCK_G, N] -> [BLOCK_R, BLOCK_G, MP] by compare-select.
        s0 = g0 * N
        s = s0 + tl.arange(0, BLOCK_G * N)
        v = tl.load(values_ptr + rows[:, None] * stride_v + s[None, :],
                    mask=(rows < R)[:, None] & (s < G * N)[None, :], other=0.0)
        idx = slot_index_run(meta_ptr, stride_meta, rows, s0, R, G * N, BITS, BLOCK_R,
                             BLOCK_G * N)
        v3 = tl.reshape(v, (BLOCK_R, BLOCK_G, N))
        i3 = tl.reshape(idx, (BLOCK_R, BLOCK_G, N))
        hit = i3[:, :, :, None] == p[None, None, None, :]
        # At most one slot of a group hits a position: the sum is exact.
        tile = tl.sum(tl.where(hit, v3[:, :, :, None], 0.0), axis=2).to(v.dtype)
    else:
        groups = g0 + tl.arange(0, BLOCK_G)
        valid = (rows < R)[:, None] & (groups < G)[None, :]
        r2 = rows[:, None]
        tile = tl.zeros((BLOCK_R, BLOCK_G, MP), dtype=values_ptr.dtype.element_ty)
        for j in tl.static_range(N):
            slot = groups[None, :] * N + j
            v = tl.load(values_ptr + r2 * stride_v + slot, mask=valid, other=0.0)
            idx = slot_index(meta_ptr, stride_meta, r2, slot, valid, META_COLS, BITS)
            tile = tl.where(idx[:, :, None] == p[None, None, :], v[:, :, None], tile)
    return tl.reshape(tile, (BLOCK_R, BLOCK_G * MP))


@triton.jit
def keep_tile(mask_ptr, stride_mask, rows, g0, R, G, MASK_COLS, MASK_IS_BITS: tl.constexpr,
              N: tl.constexpr, BITS: tl.constexpr, MP: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_G: tl.constexpr):
    """Bool keep-tile [BLOCK_R, BLOCK_G*MP] (group layout) of a mask given either as packed
    bits (group = byte, bit p of byte g is column 8g + p) or as N:M metadata."""
    groups = g0 + tl.arange(0, BLOCK_G)
    p = tl.arange(0, MP)
    valid = (rows < R)[:, None] & (groups < G)[None, :]
    r2 = rows[:, None]
    if MASK_IS_BITS:
        byte = tl.load(mask_ptr + r2 * stride_mask + groups[None, :], mask=valid, other=0)
        keep = ((byte.to(tl.int32)[:, :, None] >> p[None, None, :]) & 1) != 0
    else:
        keep = tl.zeros((BLOCK_R, BLOCK_G, MP), dtype=tl.int1)
        for j in tl.static_range(N):
            slot = groups[None, :] * N + j
            idx = slot_index(mask_ptr, stride_mask, r2, slot, valid, MASK_COLS, BITS)
            keep = keep | ((idx[:, :, None] == p[None, None, :]) & valid[:, :, None])
    return tl.reshape(keep, (BLOCK_R, BLOCK_G * MP))


@triton.jit
def mma(acc, a, b, UPCAST: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc += a @ b in fp32 (tensor cores; fp32 operands at torch's tf32 setting)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    if IS_FP32:
        return tl.dot(a, b, acc, input_precision=PRECISION)
    return tl.dot(a, b, acc)


@triton.jit
def swizzle(pid, grid_a, grid_b, GROUP: tl.constexpr):
    """Grouped program order (tiles of GROUP rows along a share the b-tiles while they sit
    in L2), as in the Triton matmul tutorial."""
    width = GROUP * grid_b
    group_id = pid // width
    first = group_id * GROUP
    size = tl.minimum(grid_a - first, GROUP)
    pid_a = first + ((pid % width) % size)
    pid_b = (pid % width) // size
    return pid_a, pid_b
