"""The compressed N:M format: compress/decompress kernels against the reference, the
layout of DESIGN.md bit for bit, NMTensor's life cycle, and bad input."""

import copy
import io
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsekit as sk
from sparsekit import reference
from nm_inputs import random_nm

PATTERNS = [(2, 4), (1, 4), (1, 2), (4, 8), (3, 8), (3, 7), (5, 32), (16, 32), (31, 32), (2, 3)]
SHAPES = [(1, 1), (7, 13), (16, 64), (5, 130), (33, 257), (0, 8), (3, 0)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def bits_of(t):
    """Integer view of a float tensor, for bit-exact comparisons."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def canonical(w):
    """w with -0.0 replaced by +0.0: pruned zeros come back as +0.0."""
    return torch.where(w == 0, torch.zeros_like(w), w)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_match_reference_and_invert(n, m, shape, dtype):
    w = random_nm(*shape, n, m, dtype)
    values, metadata = sk.ops.nm_compress(w, n, m)
    ref_values, ref_metadata = reference.nm_compress(w, n, m)
    assert torch.equal(bits_of(values), bits_of(ref_values))
    assert torch.equal(metadata, ref_metadata)
    dense = sk.ops.nm_decompress(values, metadata, shape[1], n, m)
    assert dense.dtype == dtype and dense.shape == w.shape
    # Bit-exact on every entry that is not a pruned zero; pruned zeros are zeros.
    assert torch.equal(bits_of(canonical(dense)), bits_of(canonical(w)))
    assert torch.equal(bits_of(reference.nm_decompress(values, metadata, shape[1], n, m)),
                       bits_of(dense))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 12),
    k=st.integers(0, 70),
    pattern=st.sampled_from(PATTERNS),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_compress_to_dense_is_identity(rows, k, pattern, dtype, seed):
    n, m = pattern
    gen = torch.Generator().manual_seed(seed)
    w = random_nm(rows, k, n, m, dtype, generator=gen)
    t = sk.compress(w, n, m)
    assert torch.equal(bits_of(canonical(t.to_dense())), bits_of(canonical(w)))
    ref_values, ref_metadata = reference.nm_compress(w, n, m)
    assert torch.equal(bits_of(t.values), bits_of(ref_values))
    assert torch.equal(t.metadata, ref_metadata)


def test_special_values_round_trip_bit_exactly():
    w = torch.tensor([[float("nan"), 0.0, float("inf"), 0.0,
                       -0.0, float("-inf"), 0.0, 0.0,
                       1e-45, 0.0, 0.0, -0.0]])
    t = sk.compress(w, 2, 4)
    out = t.to_dense()
    assert torch.equal(bits_of(out[:, [0, 2, 5, 8]]), bits_of(w[:, [0, 2, 5, 8]]))
    # -0.0 at column 4 is its group's lowest unused index: a fill slot, kept as stored.
    assert torch.equal(bits_of(out[:, 4]), bits_of(w[:, 4]))
    # -0.0 at column 11 is not kept: it comes back as +0.0 (a pruned zero).
    assert bits_of(out[:, 11]).item() == 0


def test_2_4_metadata_nibbles_follow_design():
    # Row 0: group 0 keeps (0, 1) -> 0x4; group 1 keeps (2, 3) -> 2 | 3 << 2 = 0xE.
    # Row 1: group 0 keeps (1, 3) -> 1 | 3 << 2 = 0xD; group 1 is empty -> fill (0, 1) = 0x4.
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 4.0],
                      [0.0, 5.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0]])
    t = sk.compress(w, 2, 4)
    assert t.metadata.tolist() == [[0x4 | 0xE << 4], [0xD | 0x4 << 4]]
    assert t.values.tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]]


def test_fewer_than_n_fills_lowest_unused_indices():
    # 3:8 group with one nonzero at index 5: kept indices (0, 1, 5), values (0, 0, 7).
    w = torch.zeros(1, 8)
    w[0, 5] = 7.0
    t = sk.compress(w, 3, 8)
    assert t.values.tolist() == [[0.0, 0.0, 7.0]]
    # 3 bits per index, little-endian: 0 | 1 << 3 | 5 << 6 = 328 -> bytes (72, 1).
    assert t.metadata.tolist() == [[328 & 0xFF, 328 >> 8]]


def test_fields_spanning_bytes_3_bits():
    w = random_nm(4, 40, 3, 8)
    t = sk.compress(w, 3, 8)
    fields = reference.unpack_bits(t.metadata, 3, 5 * 3).view(4, 5, 3)
    nonzero = (w != 0).view(4, 5, 8)
    for r, g in itertools.product(range(4), range(5)):
        idx = fields[r, g].tolist()
        assert idx == sorted(set(idx)) and all(0 <= i < 8 for i in idx)
        assert set(torch.nonzero(nonzero[r, g]).flatten().tolist()) <= set(idx)


def test_padding_positions_beyond_k():
    # K = 5 with 2:4: the second group has one real column (4) and three padding slots.
    w = torch.tensor([[0.0, 3.0, 0.0, 0.0, 9.0]])
    t = sk.compress(w, 2, 4)
    assert t.values.tolist() == [[0.0, 3.0, 9.0, 0.0]]
    assert t.metadata.tolist() == [[(0 | 1 << 2) | (0 | 1 << 2) << 4]]
    assert torch.equal(t.to_dense(), w)


@pytest.mark.parametrize("n,m,bits", [(1, 2, 1), (2, 4, 2), (3, 7, 3), (4, 8, 3), (5, 32, 5), (8, 16, 4)])
def test_metadata_bytes(n, m, bits):
    rows, k = 3, 10 * m + 1
    t = sk.compress(random_nm(rows, k, n, m), n, m)
    groups = 11
    assert t.metadata.shape == (rows, -(-groups * n * bits // 8))
    assert t.values.shape == (rows, groups * n)


@pytest.mark.parametrize("dtype,ratio", [(torch.float16, 9 / 16), (torch.bfloat16, 9 / 16),
                                         (torch.float32, 17 / 32)])
def test_2_4_memory_ratio(dtype, ratio):
    t = sk.compress(random_nm(64, 256, 2, 4, dtype), 2, 4)
    assert t.nbytes == t.values.nbytes + t.metadata.nbytes
    assert t.compression_ratio == pytest.approx(ratio, abs=0)


def test_first_bad_group_is_reported_across_threads():
    w = random_nm(2000, 64, 2, 4)
    w[1500, 8:12] = 1.0
    w[37, 20:24] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(ValueError, match=r"row 37, group 5 \(columns 20..23\) holds 3 nonzeros"):
        sk.compress(w, 2, 4)
    with pytest.raises(ValueError, match=r"row 37, group 5 \(columns 20..23\) holds 3"):
        reference.nm_compress(w, 2, 4)


def test_prune_true_applies_nm_mask():
    w = torch.randn(9, 22)
    t = sk.compress(w, 2, 4, prune=True)
    expected = torch.where(sk.masks.nm(w, 2, 4), w, torch.zeros(()))
    assert torch.equal(t.to_dense(), expected)


def test_non_contiguous_input():
    w = random_nm(24, 16, 2, 4).t().contiguous().t()  # same values, transposed strides
    assert not w.is_contiguous()
    assert torch.equal(sk.compress(w, 2, 4).to_dense(), canonical(w))


# -- NMTensor life cycle ------------------------------------------------------------------

@pytest.fixture
def nm_tensor():
    return sk.compress(random_nm(6, 30, 2, 4), 2, 4)


def test_save_load_weights_only(nm_tensor, tmp_path):
    path = tmp_path / "t.pt"
    torch.save({"w": nm_tensor}, path)
    loaded = torch.load(path, weights_only=True)["w"]
    assert isinstance(loaded, sk.NMTensor)
    assert loaded.shape == nm_tensor.shape and (loaded.n, loaded.m) == (2, 4)
    assert torch.equal(loaded.to_dense(), nm_tensor.to_dense())


def test_deepcopy_is_independent(nm_tensor):
    other = copy.deepcopy(nm_tensor)
    other.values.add_(1)
    assert not torch.equal(other.values, nm_tensor.values)
    assert torch.equal(other.metadata, nm_tensor.metadata)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_to_dtype_casts_values_only(nm_tensor, dtype):
    cast = nm_tensor.to(dtype)
    assert cast.dtype == dtype and cast.metadata.dtype == torch.uint8
    assert torch.equal(cast.to_dense(), nm_tensor.to_dense().to(dtype))
    assert nm_tensor.to(torch.float32) is nm_tensor


def test_to_meta_device_runs_fake_kernels(nm_tensor):
    meta = nm_tensor.to("meta")
    assert meta.device.type == "meta" and meta.metadata.device.type == "meta"
    assert meta.to_dense().shape == nm_tensor.shape


def test_to_rejects_integer_dtype(nm_tensor):
    with pytest.raises(TypeError, match="dtype"):
        nm_tensor.to(torch.int32)


def test_repr_shows_pattern_and_ratio(nm_tensor):
    text = repr(nm_tensor)
    assert "pattern=2:4" in text and "of dense" in text


# -- bad input ----------------------------------------------------------------------------

def test_compress_rejects_bad_arguments():
    w = torch.zeros(4, 8)
    with pytest.raises(TypeError, match="w must be float32"):
        sk.compress(torch.zeros(4, 8, dtype=torch.int32), 2, 4)
    with pytest.raises(ValueError, match="w must be 2-D"):
        sk.compress(torch.zeros(2, 4, 8), 2, 4)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        sk.compress([[0.0]], 2, 4)
    with pytest.raises(ValueError, match="n must satisfy"):
        sk.compress(w, 4, 4)
    with pytest.raises(ValueError, match="m must be in"):
        sk.compress(w, 2, 33)
    with pytest.raises(TypeError, match="n must be an int"):
        sk.compress(w, True, 4)


def test_kernels_check_their_arguments():
    # The compiled ops validate on their own too (they may be called directly).
    with pytest.raises(ValueError, match="n must satisfy"):
        sk.ops.nm_compress(torch.zeros(2, 8), 5, 4)
    with pytest.raises(TypeError, match="w must be"):
        sk.ops.nm_compress(torch.zeros(2, 8, dtype=torch.int64), 2, 4)
    values, metadata = sk.ops.nm_compress(torch.zeros(2, 8), 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        sk.ops.nm_decompress(values[:, :3], metadata, 8, 2, 4)
    with pytest.raises(ValueError, match="metadata must have shape"):
        sk.ops.nm_decompress(values, metadata[:1], 8, 2, 4)
    with pytest.raises(TypeError, match="metadata must be uint8"):
        sk.ops.nm_decompress(values, metadata.int(), 8, 2, 4)


@pytest.mark.parametrize("decompress", [sk.ops.nm_decompress, reference.nm_decompress],
                         ids=["kernel", "reference"])
def test_corrupt_metadata_is_detected(decompress):
    w = random_nm(3, 12, 2, 3)
    values, metadata = sk.ops.nm_compress(w, 2, 3)
    bad = metadata.clone()
    bad[1, 0] |= 0b11  # first index of row 1, group 0 becomes 3 >= m
    with pytest.raises(ValueError, match="metadata is corrupt at row 1, group 0"):
        decompress(values, bad, 12, 2, 3)
    values4, metadata4 = sk.ops.nm_compress(random_nm(2, 8, 2, 4), 2, 4)
    dup = metadata4.clone()
    dup[0, 0] = 0x5 | (metadata4[0, 0] & 0xF0)  # group 0 keeps (1, 1)
    with pytest.raises(ValueError, match="row 0, group 0"):
        decompress(values4, dup, 8, 2, 4)
    # A nonzero value stored at a padding position (beyond k) would be lost: refused.
    values5, metadata5 = sk.ops.nm_compress(torch.tensor([[1.0, 0.0, 0.0, 0.0, 2.0]]), 2, 4)
    values5[0, 3] = 5.0  # second slot of group 1 points at column 5 >= k
    with pytest.raises(ValueError, match="row 0, group 1"):
        decompress(values5, metadata5, 5, 2, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows,k", [(3, 8), (37, 136), (5, 1024), (129, 520)])
def test_2_4_decompress_every_run_remainder(dtype, rows, k):
    # 2:4 with K % 8 == 0 decompresses one flat run of metadata bytes (AVX-512: 64 bytes per
    # step after a head up to a multiple of 64, then a tail; each thread's run starts
    # anywhere). Every part must equal the reference, and a corrupt group in any part must
    # be reported as the first bad one.
    w = random_nm(rows, k, 2, 4).to(dtype)
    values, metadata = sk.ops.nm_compress(w, 2, 4)
    assert torch.equal(sk.ops.nm_decompress(values, metadata, k, 2, 4), w)
    out = torch.full((rows * k + 1,), 7.0, dtype=dtype)[1:].view(rows, k)  # not 64-byte aligned
    sk.ops.nm_decompress_into(values, metadata, k, 2, 4, out)
    assert torch.equal(out, w)
    flat = metadata.view(-1)
    for byte in sorted({0, flat.numel() // 2, flat.numel() - 1}):
        bad = flat.clone()
        bad[byte] = (bad[byte] & 0xF0) | 0x5  # low group keeps (1, 1)
        row, group = divmod(2 * byte, k // 4)
        with pytest.raises(ValueError, match=f"row {row}, group {group}"):
            sk.ops.nm_decompress(values, bad.view_as(metadata), k, 2, 4)
        bad[byte] = (flat[byte] & 0x0F) | 0xB0  # high group keeps (3, 2)
        row, group = divmod(2 * byte + 1, k // 4)
        with pytest.raises(ValueError, match=f"row {row}, group {group}"):
            sk.ops.nm_decompress(values, bad.view_as(metadata), k, 2, 4)


def test_2_4_decompress_past_the_cache():
    # An output of at least the last-level cache's size (32 MiB here) is written with
    # non-temporal stores.
    w = random_nm(4096, 4096, 2, 4).to(torch.bfloat16)
    values, metadata = sk.ops.nm_compress(w, 2, 4)
    assert torch.equal(sk.ops.nm_decompress(values, metadata, 4096, 2, 4), w)


def test_nmtensor_constructor_checks_shapes():
    t = sk.compress(random_nm(4, 16, 2, 4), 2, 4)
    with pytest.raises(ValueError, match="values must have shape"):
        sk.NMTensor(t.values[:, 1:], t.metadata, t.shape, 2, 4)
    with pytest.raises(ValueError, match="metadata must have shape"):
        sk.NMTensor(t.values, t.metadata[:, :1], t.shape, 2, 4)
    with pytest.raises(TypeError, match="metadata must be a uint8"):
        sk.NMTensor(t.values, t.metadata.float(), t.shape, 2, 4)
    with pytest.raises(ValueError, match="shape must be"):
        sk.NMTensor(t.values, t.metadata, (4, 16, 1), 2, 4)


def test_parse_pattern():
    assert sk.parse_pattern("2:4") == (2, 4)
    assert sk.parse_pattern("16:32") == (16, 32)
    for bad in ["4:2", "2-4", "0:4", "2:64", 2]:
        with pytest.raises(ValueError, match="pattern"):
            sk.parse_pattern(bad)


# -- the 2:4 fast paths (K % 8 == 0: flat byte loops, AVX2 for fp32) -----------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [4, 5])  # the low and the high nibble of a metadata byte
def test_2_4_fast_path_reports_bad_group(dtype, group):
    w = random_nm(300, 64, 2, 4, dtype)
    w[123, group * 4: group * 4 + 3] = 1.0
    with pytest.raises(ValueError, match=rf"row 123, group {group} "):
        sk.compress(w, 2, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_2_4_fast_path_special_values(dtype):
    w = torch.tensor([[float("nan"), -0.0, 0.0, float("-inf"), 0.0, -0.0, 0.0, 0.0]]).to(dtype)
    t = sk.compress(w.repeat(5, 4), 2, 4)
    out = t.to_dense()
    assert torch.isnan(out[:, 0::8]).all() and (out[:, 3::8] == float("-inf")).all()
    # Group 0 keeps (0, 3); group 1 is empty and keeps its fill slots (0, 1) as stored.
    assert t.metadata[0, 0].item() == (0 | 3 << 2) | (0 | 1 << 2) << 4
    assert torch.equal(bits_of(out[:, 5::8]), bits_of(w.repeat(5, 4)[:, 5::8]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nibble", [0, 1])
def test_2_4_fast_path_rejects_corrupt_metadata(dtype, nibble):
    values, metadata = sk.ops.nm_compress(random_nm(4, 32, 2, 4, dtype), 2, 4)
    bad = metadata.clone()
    # Make one group keep (1, 1): not strictly increasing.
    shift = 4 * nibble
    bad[2, 1] = (bad[2, 1] & ~(0xF << shift)) | (0x5 << shift)
    with pytest.raises(ValueError, match=f"row 2, group {2 + nibble} "):
        sk.ops.nm_decompress(values, bad, 32, 2, 4)
