"""sparsekit.masks against torch.nn.utils.prune, the plain-torch reference and brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsekit import masks, reference

SEED = 20260
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(7, 13), (3, 5, 6), (64, 130)]
NM_PATTERNS = [(1, 2), (2, 4), (4, 8), (3, 7), (16, 32), (31, 32)]
INF = math.inf

hypothesis_settings = settings(max_examples=30, deadline=None)


# tests/conftest.py seeds the global RNG before every test; inputs here use their own generators.


def _gen(offset: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(SEED + offset)


# ---------------------------------------------------------------------------------------------
# inputs


def _pool(dtype: torch.dtype, numel: int) -> torch.Tensor:
    """Distinct positive values exactly representable in dtype (as float64), at least numel."""
    if dtype == torch.float16:  # every fp16 in [2^-10, 2^10)
        return torch.arange(0x1400, 0x6400, dtype=torch.int16).view(torch.float16).double()
    if dtype == torch.bfloat16:  # every bf16 in [2^-40, 2^40)
        return torch.arange(0x2B80, 0x5380, dtype=torch.int16).view(torch.bfloat16).double()
    if dtype == "mixed":  # bf16 values that fp16 holds exactly too: [2^-14, 2^15)
        return torch.arange(0x3880, 0x4780, dtype=torch.int16).view(torch.bfloat16).double()
    return torch.arange(1, numel + 1, dtype=torch.float64) / numel


def tie_free(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random signs, pairwise distinct |values| exactly representable in dtype."""
    numel = math.prod(shape)
    pool = _pool(dtype, numel)
    assert numel <= len(pool)
    values = pool[torch.randperm(len(pool), generator=gen)[:numel]]
    signs = torch.randint(0, 2, (numel,), generator=gen).double() * 2 - 1
    out_dtype = torch.float32 if dtype == "mixed" else dtype
    return (values * signs).view(shape).to(out_dtype)


def separated_slices(shape, dim: int, n: float, dtype, gen: torch.Generator) -> torch.Tensor:
    """Random tensor whose slices along dim have Ln norms 1.05**perm: a 5% gap between any two,
    far above fp16/bf16 rounding, so the ranking is tie-free in every dtype."""
    # |x| in [1, 2): no tiny entries, so even the min-norm (n = -inf) scaling stays in range
    x = (1 + torch.rand(shape, dtype=torch.float64, generator=gen)) * torch.randn(shape, generator=gen).sign()
    other = [d for d in range(len(shape)) if d != dim % len(shape)]
    size = shape[dim]
    view = [1] * len(shape)
    view[dim] = size
    norms = torch.linalg.vector_norm(x, ord=n, dim=other, keepdim=True)
    scale = 1.05 ** torch.randperm(size, generator=gen).double()
    return (x / norms * scale.view(view)).to(dtype)


def _holder(w: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(w.clone())
    return module


def _set_weight(module: torch.nn.Module, w: torch.Tensor) -> torch.nn.Module:
    with torch.no_grad():
        module.weight.copy_(w)
    return module


def _layer(kind: str, dtype) -> torch.nn.Module:
    layer = torch.nn.Linear(130, 64) if kind == "linear" else torch.nn.Conv2d(8, 16, 3)
    return layer.to(dtype)


def _expected_pruned(amount, count: int) -> int:
    return amount if isinstance(amount, int) else round(amount * count)


# ---------------------------------------------------------------------------------------------
# magnitude / threshold / random / global: equal to torch.nn.utils.prune


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 0.999, 1.0, 0, 17, "numel"])
def test_magnitude_equals_l1_unstructured(shape, dtype, amount):
    w = tie_free(shape, dtype, _gen())
    amount = w.numel() if amount == "numel" else amount
    holder = _holder(w)
    prune.l1_unstructured(holder, "weight", amount)
    mask = masks.magnitude(w, amount)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    assert torch.equal(mask, holder.weight_mask.bool())
    assert int((~mask).sum()) == _expected_pruned(amount, w.numel())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_magnitude_on_modules(kind, dtype):
    layer = _layer(kind, dtype)
    _set_weight(layer, tie_free(layer.weight.shape, dtype, _gen(1)))
    w = layer.weight.detach().clone()
    prune.l1_unstructured(layer, "weight", amount=0.6)
    assert torch.equal(masks.magnitude(w, 0.6), layer.weight_mask.bool())


def test_magnitude_scores_replace_abs_w():
    w = torch.tensor([4.0, -3.0, 2.0, -1.0])
    scores = torch.tensor([0.1, 0.2, 5.0, 6.0])  # ranked as is: the small |w| are important
    assert masks.magnitude(w, 2).tolist() == [True, True, False, False]
    assert masks.magnitude(w, 2, scores=scores).tolist() == [False, False, True, True]


def test_magnitude_ties_keep_lower_index():
    w = torch.tensor([[1.0, -1.0, 1.0, 2.0, -1.0, 0.5]])
    # prune 3: 0.5 and two of the four 1s; the two 1s at the highest indices go
    assert masks.magnitude(w, 3).tolist() == [[True, True, False, True, False, False]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_keeps_abs_at_least_t(dtype):
    w = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 3.0], dtype=dtype)
    assert masks.threshold(w, 0.5).tolist() == [True, True, False, False, True, True]
    assert masks.threshold(w, 0).all()
    assert not masks.threshold(w, INF).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_is_exact_not_rounded_to_dtype(dtype):
    w = torch.tensor([0.1, -0.1], dtype=dtype)
    exact = abs(float(w[0]))  # the stored value, exactly
    t_above = math.nextafter(exact, INF)  # rounds to exact in fp16/bf16/fp32, yet is larger
    assert masks.threshold(w, exact).all()
    assert not masks.threshold(w, t_above).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.5, 1.0, 5])
def test_random_prunes_torch_count(shape, dtype, amount):
    w = torch.randn(shape, dtype=torch.float64).to(dtype)
    mask = masks.random(w, amount)
    holder = _holder(w)
    prune.random_unstructured(holder, "weight", amount)
    assert int((~mask).sum()) == int((holder.weight_mask == 0).sum())
    assert int((~mask).sum()) == _expected_pruned(amount, w.numel())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("amount", [0.3, 0.5, 7])
def test_random_equals_random_unstructured_after_same_seed(shape, amount):
    w = torch.randn(shape)
    holder = _holder(w)
    torch.manual_seed(7)
    prune.random_unstructured(holder, "weight", amount)
    torch.manual_seed(7)
    assert torch.equal(masks.random(w, amount), holder.weight_mask.bool())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_random_on_modules_after_same_seed(kind):
    layer = _layer(kind, torch.float32)
    w = layer.weight.detach().clone()
    torch.manual_seed(3)
    prune.random_unstructured(layer, "weight", amount=0.4)
    torch.manual_seed(3)
    assert torch.equal(masks.random(w, 0.4), layer.weight_mask.bool())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_random_draws_fp32_whatever_the_dtype(dtype):
    w = torch.randn(64, 130)
    torch.manual_seed(5)
    expected = masks.random(w, 0.5)
    torch.manual_seed(5)
    assert torch.equal(masks.random(w.to(dtype), 0.5), expected)


def test_random_uses_generator():
    w = torch.randn(64, 130)
    first = masks.random(w, 0.5, generator=torch.Generator().manual_seed(11))
    again = masks.random(w, 0.5, generator=torch.Generator().manual_seed(11))
    other = masks.random(w, 0.5, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # the global RNG is not touched when a generator is given
    torch.manual_seed(1)
    masks.random(w, 0.5, generator=torch.Generator().manual_seed(11))
    after = torch.rand(4)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(4), after)


@pytest.mark.parametrize("amount", [0.0, 0.2, 0.5, 0.9, 1.0, 100])
def test_global_magnitude_equals_global_unstructured(amount):
    layers = [torch.nn.Linear(40, 24), torch.nn.Conv2d(4, 8, 3), torch.nn.Linear(24, 10)]
    values = tie_free((sum(layer.weight.numel() for layer in layers),), torch.float32, _gen(2))
    start = 0
    for layer in layers:
        count = layer.weight.numel()
        _set_weight(layer, values[start : start + count].view(layer.weight.shape))
        start += count
    weights = [layer.weight.detach().clone() for layer in layers]
    prune.global_unstructured([(layer, "weight") for layer in layers],
                              pruning_method=prune.L1Unstructured, amount=amount)
    got = masks.global_magnitude(weights, amount)
    assert len(got) == len(layers)
    for mask, layer in zip(got, layers):
        assert mask.dtype == torch.bool
        assert torch.equal(mask, layer.weight_mask.bool())
    assert sum(int((~m).sum()) for m in got) == _expected_pruned(amount, values.numel())


def test_global_magnitude_mixed_dtypes():
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float16]
    shapes = [(24, 40), (8, 4, 3, 3), (10, 24), (5,)]
    values = tie_free((sum(math.prod(s) for s in shapes),), "mixed", _gen(3))
    tensors, start = [], 0
    for shape, dtype in zip(shapes, dtypes):
        count = math.prod(shape)
        tensors.append(values[start : start + count].view(shape).to(dtype))
        start += count
    holders = [_holder(t) for t in tensors]
    prune.global_unstructured([(h, "weight") for h in holders],
                              pruning_method=prune.L1Unstructured, amount=0.45)
    for mask, holder in zip(masks.global_magnitude(tensors, 0.45), holders):
        assert torch.equal(mask, holder.weight_mask.bool())


def test_global_magnitude_ranks_across_tensors_and_scores():
    big, small = torch.full((2, 3), 10.0), torch.full((4,), 0.1)
    keep_big, keep_small = masks.global_magnitude([big, small], 4)
    assert keep_big.all() and not keep_small.any()
    # scores flip the ranking
    keep_big, keep_small = masks.global_magnitude([big, small], 4, scores=[small.new_zeros(2, 3) - 1, small])
    assert keep_small.all() and int(keep_big.sum()) == 2


def test_empty_inputs():
    empty = torch.empty(0, 8)
    for mask in [masks.magnitude(empty, 0.5), masks.random(empty, 0.5), masks.threshold(empty, 1.0),
                 masks.ln_structured(empty, 0.5), masks.block(empty, 0.5), masks.nm(empty, 2, 4)]:
        assert mask.dtype == torch.bool and mask.shape == empty.shape
    assert masks.global_magnitude([], 0.5) == []
    # slices with no entries: the count still follows amount, the mask is empty
    assert masks.ln_structured(torch.empty(4, 0), 2, dim=0).shape == (4, 0)


# ---------------------------------------------------------------------------------------------
# ln_structured / block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, INF, -INF, 0.5])
@pytest.mark.parametrize("shape,dim", [((64, 130), 0), ((64, 130), 1), ((64, 130), -1),
                                       ((16, 8, 3, 3), 0), ((16, 8, 3, 3), 1), ((16, 8, 3, 3), -1)])
@pytest.mark.parametrize("amount", [0.3, 0.5, 2])
def test_ln_structured_equals_torch(shape, dim, n, dtype, amount):
    w = separated_slices(shape, dim, n, dtype, _gen(4))
    holder = _holder(w)
    prune.ln_structured(holder, "weight", amount=amount, n=n, dim=dim)
    mask = masks.ln_structured(w, amount, n=n, dim=dim)
    assert torch.equal(mask, holder.weight_mask.bool())
    other = [d for d in range(w.dim()) if d != dim % w.dim()]
    assert int((~mask.all(dim=other)).sum()) == _expected_pruned(amount, shape[dim])


@pytest.mark.parametrize("n", [1, 2, INF])
@pytest.mark.parametrize("kind,dim", [("linear", 0), ("linear", 1), ("conv", 0), ("conv", 1), ("conv", -1)])
def test_ln_structured_on_modules(kind, dim, n):
    layer = _layer(kind, torch.float32)
    _set_weight(layer, separated_slices(layer.weight.shape, dim, n, torch.float32, _gen(5)))
    w = layer.weight.detach().clone()
    prune.ln_structured(layer, "weight", amount=0.5, n=n, dim=dim)
    assert torch.equal(masks.ln_structured(w, 0.5, n=n, dim=dim), layer.weight_mask.bool())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_norms_ranked_in_fp32(dtype):
    # fp16 row L2 norms of 1e4..4e4 x sqrt(130) overflow to inf and would all tie
    w = (torch.arange(1, 5, dtype=torch.float32) * 1e4).view(4, 1).expand(4, 130).to(dtype)
    assert masks.ln_structured(w, 1, n=2, dim=0)[:, 0].tolist() == [False, True, True, True]
    assert masks.block(w, 1, block=(1, 130), n=2)[:, 0].tolist() == [False, True, True, True]


def test_masks_accept_parameters():
    layer = torch.nn.Linear(16, 8)
    for mask in [masks.magnitude(layer.weight, 0.5), masks.nm(layer.weight, 2, 4),
                 masks.ln_structured(layer.weight, 0.5), masks.block(layer.weight, 0.5)]:
        assert mask.dtype == torch.bool and not mask.requires_grad and int(mask.sum()) == 64


def test_block_ranks_whole_blocks_with_ragged_edges():
    # 5 x 7 in 2 x 3 blocks: 3 x 3 blocks, the last row and column ragged
    w = torch.zeros(5, 7)
    w[4, 6] = 100.0  # a 1 x 1 ragged corner block, the largest norm
    w[0:2, 0:3] = 1.0  # norm 6
    w[2:4, 3:6] = 0.5  # norm 3
    mask = masks.block(w, 6, block=(2, 3))  # 9 blocks, keep 3
    expected = torch.zeros(5, 7, dtype=torch.bool)
    expected[4, 6] = expected[0:2, 0:3] = expected[2:4, 3:6] = True
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("n", [1, 2, INF, -INF])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_equals_brute_force(dtype, n):
    w = torch.randn(13, 3, 2, 3, generator=_gen(6), dtype=torch.float64).to(dtype)  # [13, 18]
    bh, bw = 4, 5
    w2 = w.double().reshape(13, 18)
    norms = {}
    for r0, c0 in itertools.product(range(0, 13, bh), range(0, 18, bw)):
        norms[r0, c0] = torch.linalg.vector_norm(w2[r0 : r0 + bh, c0 : c0 + bw], ord=n).item()
    pruned = sorted(norms, key=norms.get)[:5]  # 4 x 4 = 16 blocks, prune round(0.3 * 16) = 5
    expected = torch.ones(13, 18, dtype=torch.bool)
    for r0, c0 in pruned:
        expected[r0 : r0 + bh, c0 : c0 + bw] = False
    assert torch.equal(masks.block(w, 0.3, block=(bh, bw), n=n), expected.view(w.shape))


# ---------------------------------------------------------------------------------------------
# nm


def _group_counts(mask: torch.Tensor, m: int, dim: int) -> torch.Tensor:
    moved = mask.movedim(dim, -1)
    k = moved.shape[-1]
    padded = torch.nn.functional.pad(moved.to(torch.int64), (0, (-k) % m))
    return padded.reshape(-1, padded.shape[-1] // m, m).sum(-1)


def _expected_counts(k: int, n: int, m: int) -> torch.Tensor:
    counts = [n] * (k // m) + ([min(n, k % m)] if k % m else [])
    return torch.tensor(counts)


def _dims(shape):
    return sorted({0, len(shape) - 1, -1} | ({1} if len(shape) > 2 else set()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_nm_kept_count_and_reference(shape, n, m, dtype):
    w = torch.randn(shape, dtype=torch.float64, generator=_gen(7)).to(dtype)
    for dim in _dims(shape):
        mask = masks.nm(w, n, m, dim=dim)
        assert mask.dtype == torch.bool and mask.shape == w.shape
        counts = _group_counts(mask, m, dim)
        assert torch.equal(counts, _expected_counts(w.shape[dim], n, m).expand_as(counts))
        moved = w.abs().movedim(dim, -1)
        expected = reference.nm_mask(moved.reshape(-1, moved.shape[-1]), n, m)
        assert torch.equal(mask, expected.view(moved.shape).movedim(-1, dim))


def _exhaustive_kept_sums(absw: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Best kept |w| sum per group by trying every pattern: abs-matrix @ patterns^T, argmax."""
    patterns = torch.tensor(sorted(set(itertools.permutations([1] * n + [0] * (m - n)))),
                            dtype=torch.float64)
    groups = absw.reshape(-1, m)
    best = torch.argmax(groups @ patterns.t(), dim=1)
    return (groups * patterns[best]).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (3, 7)])
def test_nm_keeps_the_best_pattern(n, m, dtype):
    w = torch.randn(33, 28, dtype=torch.float64, generator=_gen(8)).to(dtype)
    absw = w.abs().double()
    kept = (absw * masks.nm(w, n, m)).reshape(-1, m).sum(-1)
    torch.testing.assert_close(kept, _exhaustive_kept_sums(absw, n, m), rtol=1e-12, atol=0)


def test_nm_scores_activation_aware():
    w = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 0.6, 0.7, 0.8]])
    x_norm = torch.tensor([10.0, 10.0, 0.1, 0.1, 1.0, 1.0, 1.0, 1.0])
    assert masks.nm(w, 2, 4).tolist() == [[False, False, True, True, False, False, True, True]]
    got = masks.nm(w, 2, 4, scores=w.abs() * x_norm)
    assert got.tolist() == [[True, True, False, False, False, False, True, True]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_nm_scores_equal_reference_on_scores(dtype):
    w = torch.randn(64, 130, generator=_gen(9)).to(dtype)
    x = torch.randn(32, 130, generator=_gen(10))
    scores = w.abs().float() * x.norm(dim=0)
    expected = reference.nm_mask(scores, 2, 4)
    assert torch.equal(masks.nm(w, 2, 4, scores=scores), expected)
    assert not torch.equal(expected, masks.nm(w, 2, 4))  # the activations changed the choice


def test_nm_ties_keep_lower_index():
    assert masks.nm(torch.ones(3, 10), 2, 4).tolist() == [[True, True, False, False] * 2 + [True, True]] * 3
    w = torch.tensor([[-1.0, 1.0, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0]])
    assert masks.nm(w, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    assert masks.nm(w, 1, 2).tolist() == [[True, False, True, False, False, True, True, False]]


def test_nm_any_dim_is_transposed_last_dim():
    w = torch.randn(3, 10, 6, generator=_gen(11))
    assert torch.equal(masks.nm(w, 2, 4, dim=1), masks.nm(w.transpose(1, 2), 2, 4).transpose(1, 2))
    assert torch.equal(masks.nm(w, 3, 7, dim=0), masks.nm(w.movedim(0, -1), 3, 7).movedim(-1, 0))
    assert masks.nm(w, 2, 4, dim=0).is_contiguous()


def test_nm_non_contiguous_input():
    base = torch.randn(20, 24, generator=_gen(12))
    w = base.t()  # [24, 20], not contiguous
    assert torch.equal(masks.nm(w, 2, 4), masks.nm(w.contiguous(), 2, 4))


# ---------------------------------------------------------------------------------------------
# properties


def _shapes(max_dims: int = 3, min_dims: int = 1):
    return st.lists(st.integers(1, 9), min_size=min_dims, max_size=max_dims).map(tuple)


def _amounts(count: int):
    return st.one_of(st.floats(0.0, 1.0), st.integers(0, count))


@hypothesis_settings
@given(shape=_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), data=st.data())
def test_property_magnitude_and_random_counts(shape, dtype, seed, data):
    w = torch.randn(shape, generator=_gen(seed)).to(dtype)
    amount = data.draw(_amounts(w.numel()))
    n_prune = _expected_pruned(amount, w.numel())
    mask = masks.magnitude(w, amount)
    assert int(mask.sum()) == w.numel() - n_prune
    if 0 < n_prune < w.numel():  # every kept |w| >= every pruned |w|
        assert w.abs()[mask].min() >= w.abs()[~mask].max()
    assert int(masks.random(w, amount, generator=_gen(seed)).sum()) == w.numel() - n_prune


@hypothesis_settings
@given(shape=_shapes(min_dims=2), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       n=st.sampled_from([1, 2, INF]), data=st.data())
def test_property_ln_structured_whole_slices(shape, dtype, seed, n, data):
    w = torch.randn(shape, generator=_gen(seed)).to(dtype)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    amount = data.draw(_amounts(shape[dim]))
    mask = masks.ln_structured(w, amount, n=n, dim=dim)
    other = [d for d in range(w.dim()) if d != dim % w.dim()]
    kept, any_kept = mask.all(dim=other), mask.any(dim=other)
    assert torch.equal(kept, any_kept)  # a slice is all kept or all pruned
    assert int((~kept).sum()) == _expected_pruned(amount, shape[dim])


@hypothesis_settings
@given(shape=_shapes(max_dims=4), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       bh=st.integers(1, 5), bw=st.integers(1, 5), n=st.sampled_from([1, 2, INF]), data=st.data())
def test_property_block_whole_blocks(shape, dtype, seed, bh, bw, n, data):
    w = torch.randn(shape, generator=_gen(seed)).to(dtype)
    rows, cols = shape[0], math.prod(shape[1:])
    num_blocks = -(-rows // bh) * -(-cols // bw)
    amount = data.draw(_amounts(num_blocks))
    mask = masks.block(w, amount, block=(bh, bw), n=n)
    assert mask.shape == w.shape
    padded = torch.nn.functional.pad(mask.reshape(rows, cols).to(torch.int64),
                                     (0, (-cols) % bw, 0, (-rows) % bh), value=-1)
    tiles = padded.view(-(-rows // bh), bh, -(-cols // bw), bw)
    kept = (tiles == 1).any(dim=3).any(dim=1)
    pruned = (tiles == 0).any(dim=3).any(dim=1)
    assert not (kept & pruned).any()  # a block is all kept or all pruned
    assert int(pruned.sum()) == _expected_pruned(amount, num_blocks)


@hypothesis_settings
@given(shape=_shapes(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       nm_pattern=st.integers(2, 32).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))),
       data=st.data())
def test_property_nm_counts(shape, dtype, seed, nm_pattern, data):
    n, m = nm_pattern
    w = torch.randn(shape, generator=_gen(seed)).to(dtype)
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    counts = _group_counts(masks.nm(w, n, m, dim=dim), m, dim)
    assert torch.equal(counts, _expected_counts(shape[dim], n, m).expand_as(counts))


# ---------------------------------------------------------------------------------------------
# bad input


_W = torch.randn(6, 8)
_NAN_W = torch.tensor([[1.0, float("nan"), 2.0, 3.0]])

BAD_INPUTS = [
    # w
    (lambda: masks.magnitude(_W.to(torch.int32), 0.5), TypeError, "w"),
    (lambda: masks.magnitude(_W > 0, 0.5), TypeError, "w"),
    (lambda: masks.threshold([1.0, 2.0], 0.5), TypeError, "w"),
    (lambda: masks.random(_W.to(torch.complex64), 0.5), TypeError, "w"),
    (lambda: masks.nm(_W.to(torch.int64)), TypeError, "w"),
    (lambda: masks.nm(torch.tensor(1.0)), ValueError, "w"),
    (lambda: masks.ln_structured(torch.randn(8), 0.5), ValueError, "w"),
    (lambda: masks.block(_W.to(torch.uint8), 0.5), TypeError, "w"),
    (lambda: masks.magnitude(_NAN_W, 0.5), ValueError, "w"),
    (lambda: masks.ln_structured(_NAN_W, 0.5), ValueError, "w"),
    (lambda: masks.block(_NAN_W, 0.5, block=(1, 2)), ValueError, "w"),
    (lambda: masks.nm(_NAN_W), ValueError, "w"),
    # amount
    (lambda: masks.magnitude(_W, True), TypeError, "amount"),
    (lambda: masks.magnitude(_W, "0.5"), TypeError, "amount"),
    (lambda: masks.magnitude(_W, -0.1), ValueError, "amount"),
    (lambda: masks.magnitude(_W, 1.5), ValueError, "amount"),
    (lambda: masks.magnitude(_W, float("nan")), ValueError, "amount"),
    (lambda: masks.magnitude(_W, -1), ValueError, "amount"),
    (lambda: masks.magnitude(_W, 49), ValueError, "amount"),
    (lambda: masks.random(_W, 49), ValueError, "amount"),
    (lambda: masks.random(_W, 1.01), ValueError, "amount"),
    (lambda: masks.ln_structured(_W, 7, dim=0), ValueError, "amount"),
    (lambda: masks.block(_W, 7, block=(2, 4)), ValueError, "amount"),  # 3 x 2 = 6 blocks
    (lambda: masks.global_magnitude([_W, _W], 97), ValueError, "amount"),
    (lambda: masks.global_magnitude([_W], False), TypeError, "amount"),
    # t
    (lambda: masks.threshold(_W, float("nan")), ValueError, "t"),
    (lambda: masks.threshold(_W, "1"), TypeError, "t"),
    (lambda: masks.threshold(_W, True), TypeError, "t"),
    # generator
    (lambda: masks.random(_W, 0.5, generator=3), TypeError, "generator"),
    # dim
    (lambda: masks.ln_structured(_W, 0.5, dim=2), ValueError, "dim"),
    (lambda: masks.ln_structured(_W, 0.5, dim=-3), ValueError, "dim"),
    (lambda: masks.ln_structured(_W, 0.5, dim=1.0), TypeError, "dim"),
    (lambda: masks.nm(_W, dim=2), ValueError, "dim"),
    (lambda: masks.nm(_W, dim=-3), ValueError, "dim"),
    # norm order n
    (lambda: masks.ln_structured(_W, 0.5, n=float("nan")), ValueError, "n"),
    (lambda: masks.ln_structured(_W, 0.5, n="fro"), TypeError, "n"),
    (lambda: masks.block(_W, 0.5, n=True), TypeError, "n"),
    # block
    (lambda: masks.block(_W, 0.5, block=(0, 4)), ValueError, "block"),
    (lambda: masks.block(_W, 0.5, block=(4,)), ValueError, "block"),
    (lambda: masks.block(_W, 0.5, block=4), ValueError, "block"),
    (lambda: masks.block(_W, 0.5, block=(2.0, 4)), TypeError, "block"),
    # n, m for nm
    (lambda: masks.nm(_W, 0, 4), ValueError, "n"),
    (lambda: masks.nm(_W, 4, 4), ValueError, "n"),
    (lambda: masks.nm(_W, 5, 4), ValueError, "n"),
    (lambda: masks.nm(_W, -1, 4), ValueError, "n"),
    (lambda: masks.nm(_W, 2, 33), ValueError, "m"),
    (lambda: masks.nm(_W, 1, 1), ValueError, "m"),
    (lambda: masks.nm(_W, True, 4), TypeError, "n"),
    (lambda: masks.nm(_W, 2, 4.0), TypeError, "m"),
    # scores
    (lambda: masks.nm(_W, scores=torch.rand(6, 9)), ValueError, "scores"),
    (lambda: masks.nm(_W, scores=torch.ones(6, 8, dtype=torch.int32)), TypeError, "scores"),
    (lambda: masks.nm(_W, scores=_W.tolist()), TypeError, "scores"),
    (lambda: masks.nm(_NAN_W.abs().nan_to_num(), scores=_NAN_W), ValueError, "scores"),
    (lambda: masks.magnitude(_W, 0.5, scores=torch.rand(48)), ValueError, "scores"),
    (lambda: masks.magnitude(_NAN_W.nan_to_num(), 0.5, scores=_NAN_W), ValueError, "scores"),
    (lambda: masks.global_magnitude([_W], 0.5, scores=[_W, _W]), ValueError, "scores"),
    (lambda: masks.global_magnitude([_W], 0.5, scores=_W), TypeError, "scores"),
    (lambda: masks.global_magnitude([_W], 0.5, scores=[_W.t()]), ValueError, "scores"),
    # tensors
    (lambda: masks.global_magnitude(_W, 0.5), TypeError, "tensors"),
    (lambda: masks.global_magnitude([_W, _W.long()], 0.5), TypeError, "tensors"),
    (lambda: masks.global_magnitude([_W, _NAN_W], 0.5), ValueError, "tensors"),
]


@pytest.mark.parametrize("call,error,name", BAD_INPUTS, ids=[f"{i}-{c[2]}" for i, c in enumerate(BAD_INPUTS)])
def test_bad_input_names_the_argument(call, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        call()


# ---------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_masks_equal_cpu(dtype):
    w = tie_free((64, 130), dtype, _gen(13))
    slices = separated_slices((64, 130), 1, 2, dtype, _gen(14))
    cases = [(lambda t: masks.magnitude(t, 0.37), w), (lambda t: masks.threshold(t, 0.5), w),
             (lambda t: masks.ln_structured(t, 0.25, n=2, dim=1), slices),
             (lambda t: masks.block(t, 0.5, block=(4, 8)), w),
             (lambda t: masks.nm(t, 2, 4), w), (lambda t: masks.nm(t, 3, 7, dim=0), w)]
    for fn, x in cases:
        got = fn(x.cuda())
        assert got.device.type == "cuda" and got.dtype == torch.bool
        assert torch.equal(got.cpu(), fn(x))
    wc = w.cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    assert int(masks.random(wc, 0.5, generator=gen).sum()) == wc.numel() // 2
