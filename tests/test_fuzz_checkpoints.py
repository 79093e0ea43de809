"""Fuzz: randomly corrupted SparseLinear / SparseConv2d state_dicts.

A pure-Python oracle decodes every group of the (possibly corrupted) metadata by the rules
of DESIGN.md's canonical form. Loading must raise ValueError exactly when the oracle finds
a non-canonical group, and the error must name the state_dict key and the first bad row
and group; a state_dict that loads must compute what its dense form computes. Bounded:
a few dozen examples per test, each printed by hypothesis when it fails.
"""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import sparsekit as sk
from sparsekit.reference import index_bits
from nm_inputs import random_nm

PATTERNS = [(2, 4), (1, 2), (1, 4), (2, 3), (3, 8), (4, 8), (3, 7), (5, 16)]
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def oracle_first_bad(metadata, values, k, n, m):
    """(row, group) of the first non-canonical group in row-major order, or None."""
    bits = index_bits(m)
    groups = -(-k // m)
    for r, row in enumerate(metadata.tolist()):
        stream = sum(byte << (8 * i) for i, byte in enumerate(row))
        for g in range(groups):
            idx = [(stream >> ((g * n + j) * bits)) & ((1 << bits) - 1) for j in range(n)]
            width = min(m, k - g * m)
            vals = values[r, g * n:(g + 1) * n].tolist()
            if (any(i >= m for i in idx) or any(a >= b for a, b in zip(idx, idx[1:]))
                    or idx[-1] >= max(width, n)
                    or any(i >= width and v != 0 for i, v in zip(idx, vals))):
                return r, g
        if stream >> (groups * n * bits):
            return r, groups - 1
    return None


@st.composite
def corrupted_linear_state(draw):
    n, m = draw(st.sampled_from(PATTERNS))
    k = draw(st.integers(1, 40))
    rows = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Linear(k, rows)
    with torch.no_grad():
        dense.weight.copy_(random_nm(rows, k, n, m, generator=gen))
    layer = sk.SparseLinear.from_dense(dense, f"{n}:{m}")
    state = {key: v.clone() if isinstance(v, torch.Tensor) else v
             for key, v in layer.state_dict().items()}
    kind = draw(st.sampled_from(["byte", "bit", "padding_value", "none"]))
    meta = state["metadata"]
    if kind == "byte" and meta.numel():
        r, c = draw(st.integers(0, meta.shape[0] - 1)), draw(st.integers(0, meta.shape[1] - 1))
        meta[r, c] = draw(st.integers(0, 255))
    elif kind == "bit" and meta.numel():
        r, c = draw(st.integers(0, meta.shape[0] - 1)), draw(st.integers(0, meta.shape[1] - 1))
        meta[r, c] ^= 1 << draw(st.integers(0, 7))
    elif kind == "padding_value":
        v = state["values"]
        r, c = draw(st.integers(0, v.shape[0] - 1)), draw(st.integers(0, v.shape[1] - 1))
        v[r, c] = 1.0
    return n, m, k, rows, state


@FUZZ
@given(case=corrupted_linear_state(), prefix=st.sampled_from(["", "block.0."]))
def test_corrupt_linear_state_dict_raises_at_load(case, prefix):
    n, m, k, rows, state = case
    bad = oracle_first_bad(state["metadata"], state["values"], k, n, m)
    target = sk.SparseLinear(k, rows, pattern=f"{n}:{m}")
    if prefix:
        holder = nn.Module()
        holder.block = nn.Sequential(target)
        module, state = holder, {prefix + key: v for key, v in state.items()}
    else:
        module = target
    before = target.metadata.clone()
    if bad is None:
        module.load_state_dict(state)
        x = torch.randn(3, k, dtype=torch.float64)
        w = target.dense_weight().double()
        ref = nn.functional.linear(x, w, target.bias.detach().double())
        torch.testing.assert_close(target(x.float()).double(), ref, rtol=1e-4, atol=1e-4)
    else:
        row, group = bad
        with pytest.raises(ValueError, match=rf"^{prefix}metadata is not canonical {n}:{m} "
                                             rf"metadata at row {row}, group {group} "):
            module.load_state_dict(state)
        assert torch.equal(target.metadata, before)  # nothing loaded


@FUZZ
@given(case=corrupted_linear_state(), weights_only=st.booleans())
def test_corrupt_nmtensor_raises_at_torch_load(case, weights_only):
    n, m, k, rows, state = case
    bad = oracle_first_bad(state["metadata"], state["values"], k, n, m)
    t = sk.NMTensor.__new__(sk.NMTensor)
    t.__dict__.update(values=state["values"], metadata=state["metadata"], _shape=(rows, k),
                      n=n, m=m)  # as a hostile file would hold it
    buf = io.BytesIO()
    torch.save({"w": t}, buf)
    buf.seek(0)
    if bad is None:
        back = torch.load(buf, weights_only=weights_only)["w"]
        assert torch.equal(back.metadata, state["metadata"])
    else:
        with pytest.raises(Exception, match=f"row {bad[0]}, group {bad[1]} "):
            torch.load(buf, weights_only=weights_only)


GEOMETRY = st.fixed_dictionaries({
    "in_channels": st.integers(1, 6), "kernel_size": st.tuples(st.integers(1, 3), st.integers(1, 3)),
    "stride": st.tuples(st.integers(1, 2), st.integers(1, 2)),
    "padding": st.tuples(st.integers(0, 1), st.integers(0, 1)),
    "dilation": st.tuples(st.integers(1, 2), st.integers(1, 2)),
})


@FUZZ
@given(saved=GEOMETRY, target=GEOMETRY, pattern=st.sampled_from(["2:4", "1:4", "3:8"]))
def test_conv_state_dict_loads_only_into_its_geometry(saved, target, pattern):
    conv = nn.Conv2d(saved["in_channels"], 3, **{k: v for k, v in saved.items() if k != "in_channels"})
    state = sk.SparseConv2d.from_dense(conv, pattern).state_dict()
    layer = sk.SparseConv2d(target["in_channels"], 3, pattern=pattern,
                            **{k: v for k, v in target.items() if k != "in_channels"})
    if saved == target:
        layer.load_state_dict(state)
        x = torch.randn(2, saved["in_channels"], 6, 6)
        torch.testing.assert_close(layer(x), layer.to_dense()(x), rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ValueError, match="another SparseConv2d geometry"):
            layer.load_state_dict(state)
