"""Checkpoints: canonical N:M metadata is validated once, at construction and load, with an
error naming the key (or argument), the row and the group; SparseConv2d's full geometry
travels with its state_dict."""

import io
import re

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import reference
from sparsekit.format import check_metadata
from nm_inputs import random_nm

PATTERNS = [(2, 4), (1, 2), (1, 4), (2, 3), (3, 8), (4, 8), (3, 7), (5, 32), (31, 32)]


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("k", [0, 1, 2, 5, 10, 33, 64])
def test_compressed_metadata_is_canonical(n, m, k):
    t = sk.compress(random_nm(6, k, n, m), n, m)
    assert check_metadata(t.metadata, k, n, m, values=t.values) is None


@pytest.mark.parametrize("byte,kept", [(0x0, (0, 0)), (0x5, (1, 1)), (0xF, (3, 3)),
                                       (0x1, (1, 0)), (0xB, (3, 2))])
def test_non_increasing_2_4_nibbles_are_refused(byte, kept):
    t = sk.compress(random_nm(4, 16, 2, 4), 2, 4)
    bad = t.metadata.clone()
    bad[2, 1] = (bad[2, 1] & 0x0F) | (byte << 4)  # row 2, group 3 (high nibble of byte 1)
    with pytest.raises(ValueError, match=re.escape(
            f"layer.metadata is not canonical 2:4 metadata at row 2, group 3 (columns 12..15): "
            f"kept indices {kept}")):
        check_metadata(bad, 16, 2, 4, name="layer.metadata")


def test_indices_into_padding_are_refused_where_the_group_has_real_columns():
    # k = 6 with 2:4: group 1 has two real columns (4, 5), so it must keep exactly them or
    # lower ones; (1, 2) points at column 6, past k.
    t = sk.compress(torch.tensor([[1.0, 0.0, 0.0, 2.0, 3.0, 0.0]]), 2, 4)
    bad = t.metadata.clone()
    bad[0, 0] = (bad[0, 0] & 0x0F) | ((1 | 2 << 2) << 4)
    with pytest.raises(ValueError, match="row 0, group 1 .*zero padding beyond k=6"):
        check_metadata(bad, 6, 2, 4)
    # k = 5: group 1 has one real column, so it keeps exactly (0, 1); (0, 2) is not canonical.
    t = sk.compress(torch.tensor([[1.0, 0.0, 0.0, 2.0, 3.0]]), 2, 4)
    assert t.metadata[0, 0] >> 4 == 0b0100
    bad = t.metadata.clone()
    bad[0, 0] = (bad[0, 0] & 0x0F) | ((0 | 2 << 2) << 4)
    with pytest.raises(ValueError, match=r"group 1 .*must keep exactly \(0, 1\)"):
        check_metadata(bad, 5, 2, 4)


def test_values_at_padding_and_trailing_bits_are_refused():
    t = sk.compress(random_nm(3, 10, 3, 8), 3, 8)  # group 1: 2 real columns, slot 2 padding
    values = t.values.clone()
    values[1, 5] = 1.0
    with pytest.raises(ValueError, match="row 1, group 1 .*w.values holds a nonzero entry"):
        check_metadata(t.metadata, 10, 3, 8, values=values, values_name="w.values")
    bad = t.metadata.clone()
    bad[2, -1] |= 0x80  # 18 bits of fields, the rest of byte 2 must be 0
    with pytest.raises(ValueError, match="row 2, group 1 .*bits after the last index field"):
        check_metadata(bad, 10, 3, 8)


def test_index_at_or_above_m_is_refused():
    t = sk.compress(random_nm(2, 12, 2, 3), 2, 3)
    bad = t.metadata.clone()
    bad[1, 0] |= 0b11  # first index of row 1, group 0 becomes 3 >= m
    with pytest.raises(ValueError, match=r"row 1, group 0 .*below m=3"):
        check_metadata(bad, 12, 2, 3)


def test_check_metadata_bad_arguments():
    t = sk.compress(random_nm(2, 8, 2, 4), 2, 4)
    with pytest.raises(TypeError, match="meta must be uint8"):
        check_metadata(t.metadata.int(), 8, 2, 4, name="meta")
    with pytest.raises(ValueError, match=r"meta must have shape \[rows, 1\]"):
        check_metadata(t.metadata[:, :0], 8, 2, 4, name="meta")
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        check_metadata(t.metadata, -1, 2, 4)
    with pytest.raises(ValueError, match="n must satisfy"):
        check_metadata(t.metadata, 8, 4, 4)
    with pytest.raises(ValueError, match=r"values must have shape \(2, 4\)"):
        check_metadata(t.metadata, 8, 2, 4, values=t.values[:, :2])


def test_check_metadata_first_bad_group_in_a_large_matrix():
    # Large enough for several row blocks and the table path; the error still names the
    # right row and group.
    t = sk.compress(random_nm(300, 4096, 2, 4), 2, 4)
    bad = t.metadata.clone()
    bad[217, 300] = 0x55
    with pytest.raises(ValueError, match="row 217, group 600 "):
        check_metadata(bad, 4096, 2, 4)


def _corrupt_linear_state(layer):
    state = layer.state_dict()
    state["metadata"] = state["metadata"].clone()
    state["metadata"][1, 0] = 0x55  # group 0 and 1 of row 1: indices (1, 1)
    return state


def test_sparse_linear_load_refuses_corrupt_metadata_naming_the_key():
    model = nn.Sequential(sk.SparseLinear.from_dense(nn.Linear(16, 4)))
    state = model.state_dict()
    state["0.metadata"] = state["0.metadata"].clone()
    state["0.metadata"][1, 0] = 0x55
    fresh = nn.Sequential(sk.SparseLinear(16, 4))
    before = fresh[0].metadata.clone()
    with pytest.raises(ValueError, match=r"0\.metadata is not canonical 2:4 metadata at row 1, "
                                         r"group 0"):
        fresh.load_state_dict(state)
    assert torch.equal(fresh[0].metadata, before)


def test_sparse_linear_load_refuses_values_in_padding():
    layer = sk.SparseLinear.from_dense(nn.Linear(5, 3))
    state = layer.state_dict()
    state["values"] = state["values"].clone()
    state["values"][0, 3] = 7.0  # group 1 has one real column: slot 1 is padding
    with pytest.raises(ValueError, match=r"values holds a nonzero entry"):
        sk.SparseLinear(5, 3).load_state_dict(state)


def test_forward_and_to_dense_agree_on_what_is_corrupt():
    # The module that refused the checkpoint cannot compute with it; to_dense of a pair
    # the load would refuse refuses too (one rule: sparsekit.format.check_metadata).
    layer = sk.SparseLinear.from_dense(nn.Linear(8, 2))
    state = _corrupt_linear_state(layer)
    with pytest.raises(ValueError, match="row 1, group 0"):
        layer.load_state_dict(state)
    for decompress in (sk.ops.nm_decompress, reference.nm_decompress):
        # indices into the padding of a group with enough real columns: k = 6, group 1
        values, meta = sk.ops.nm_compress(torch.tensor([[1.0, 0, 0, 2, 3, 0]]), 2, 4)
        meta[0, 0] = (meta[0, 0] & 0x0F) | ((1 | 2 << 2) << 4)
        with pytest.raises(ValueError, match="row 0, group 1"):
            decompress(values, meta, 6, 2, 4)


def test_sparse_linear_good_checkpoint_round_trips():
    layer = sk.SparseLinear.from_dense(nn.Linear(33, 7), "3:8")
    fresh = sk.SparseLinear(33, 7, pattern="3:8")
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(4, 33)
    assert torch.equal(fresh(x), layer(x))


def test_nmtensor_constructor_validates_metadata():
    t = sk.compress(random_nm(3, 8, 2, 4), 2, 4)
    bad = t.metadata.clone()
    bad[2, 0] = 0xF0 | (bad[2, 0] & 0x0F)
    with pytest.raises(ValueError, match="row 2, group 1"):
        sk.NMTensor(t.values, bad, t.shape, 2, 4)


@pytest.mark.parametrize("weights_only", [True, False])
def test_nmtensor_torch_load_validates(weights_only):
    t = sk.compress(random_nm(3, 8, 2, 4), 2, 4)
    t.metadata[1, 0] = 0x11  # (1, 0) in both groups
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="row 1, group 0") as info:
        torch.load(buf, weights_only=weights_only)
    # weights_only wraps errors raised while unpickling; the cause is ours
    assert "not canonical" in str(info.value)
    good = sk.compress(random_nm(3, 8, 2, 4), 2, 4)
    buf = io.BytesIO()
    torch.save({"w": good}, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=weights_only)["w"]
    assert torch.equal(back.to_dense(), good.to_dense())


def _conv_state(kernel_size, in_channels, **kwargs):
    conv = nn.Conv2d(in_channels, 4, kernel_size, **kwargs)
    return sk.SparseConv2d.from_dense(conv).state_dict()


@pytest.mark.parametrize("target", [
    dict(in_channels=8, kernel_size=(1, 3)),            # same kh*kw*C, transposed kernel
    dict(in_channels=24, kernel_size=1),                # same kh*kw*C, 1x1 with 3x channels
    dict(in_channels=8, kernel_size=(3, 1), stride=2),
    dict(in_channels=8, kernel_size=(3, 1), padding=1),
    dict(in_channels=8, kernel_size=(3, 1), dilation=2),
])
def test_sparse_conv_geometry_must_match(target):
    state = _conv_state((3, 1), 8)
    layer = sk.SparseConv2d(target.pop("in_channels"), 4, target.pop("kernel_size"), **target)
    with pytest.raises(ValueError, match="another SparseConv2d geometry"):
        layer.load_state_dict(state)


def test_sparse_conv_checkpoint_round_trips_and_checks_metadata():
    conv = sk.SparseConv2d.from_dense(nn.Conv2d(8, 4, (3, 1), padding=(1, 0)))
    fresh = sk.SparseConv2d(8, 4, (3, 1), padding=(1, 0))
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh.load_state_dict(state)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(fresh(x), conv(x))
    good = state["linear.metadata"]
    state["linear.metadata"] = good.clone()
    state["linear.metadata"][3, 1] = 0x00
    with pytest.raises(ValueError, match=r"linear\.metadata is not canonical .* row 3, group 2"):
        fresh.load_state_dict(state)
    state["linear.metadata"] = good
    del state["_extra_state"]
    with pytest.raises(RuntimeError, match="_extra_state"):
        sk.SparseConv2d(8, 4, (3, 1), padding=(1, 0)).load_state_dict(state)
