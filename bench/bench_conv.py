"""2:4 convolutions on the CPU against torch's own convolution on the same pruned weights,
timed alternately in one run:
  - every distinct convolution shape of torchvision's ResNet-18 (224x224 input) at batch
    1 and 16, fp32 and bf16: SparseConv2d (the implicit-GEMM kernel ops.nm_conv2d; 1x1 kernels the direct
    N:M product) against F.conv2d on the masked dense weight. Each timed call runs through
    several weight copies (up to 40 MB of dense weights at batch 1), so larger layers read
    their weights from memory, not from a cache that one copy would stay in;
  - the whole ResNet-18 (random init), sk.sparsify(model, "2:4") against the same pruned
    weights stored dense (sk.densify), at batch 1 and 16, in fp32 and in bf16 (both models
    cast), and a training step at batch 8 (fp32).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparsekit as sk

from common import layer_choices, layer_weight_bytes, machine_info, paired_seconds

torchvision = pytest.importorskip("torchvision", reason="torchvision not installed (make setup)")

REPEATS = 5
WEIGHT_SET_BYTES = 40 << 20


def resnet18_conv_shapes():
    """(C_in, C_out, kernel, stride, padding, input H) of every distinct Conv2d of ResNet-18
    at 224x224, in first-use order."""
    model = torchvision.models.resnet18()
    shapes, hooks = [], []

    def hook(module, inputs, output):
        key = (module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
               module.padding[0], inputs[0].shape[2])
        if key not in shapes:
            shapes.append(key)

    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    return shapes


SHAPES = resnet18_conv_shapes()


def _shape_id(shape):
    c_in, c_out, k, s, p, h = shape
    return f"{c_in}-{c_out}-k{k}s{s}-{h}px"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_resnet18_conv_layer(benchmark, shape, batch, dtype):
    c_in, c_out, k, stride, padding, h = shape
    dt = getattr(torch, dtype)
    dense_bytes = c_out * c_in * k * k * dt.itemsize
    copies = max(1, min(16 if batch == 1 else 4, math.ceil(WEIGHT_SET_BYTES / dense_bytes)))
    torch.manual_seed(0)
    layers, weights = [], []
    for _ in range(copies):
        conv = nn.Conv2d(c_in, c_out, k, stride, padding, bias=False)
        layer = sk.SparseConv2d.from_dense(conv, "2:4").to(dt)
        layers.append(layer)
        # The same pruned weights, dense, with nn.Conv2d's own strides (a 1x1 weight from
        # the [out, in] matrix has channels-last-looking strides, which would make
        # F.conv2d convert every input to channels-last).
        w = layer.dense_weight()
        weights.append(torch.empty_like(w, memory_format=torch.contiguous_format).copy_(w))
    x = torch.randn(batch, c_in, h, h, dtype=dt)

    def sparse():
        with torch.no_grad():
            for layer in layers:
                layer(x)

    def dense():
        with torch.no_grad():
            for w in weights:
                nn.functional.conv2d(x, w, None, stride, padding)

    kernel = "nm_linear (1x1 direct)" if k == 1 else "nm_conv2d (implicit GEMM)"
    benchmark.group = f"ResNet-18 conv {_shape_id(shape)} {dtype} batch {batch}"
    benchmark.pedantic(sparse, rounds=REPEATS, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(dense, sparse, REPEATS)
    benchmark.extra_info.update(
        kind="conv_layer", what=f"{c_in}->{c_out} {k}x{k} s{stride} p{padding} @{h}x{h}",
        dtype=dtype, batch=batch, copies=copies, kernel=kernel, target=0.95,
        layer_choices=layer_choices(layers[0]),
        dense_s=dense_s / copies, sparse_s=sparse_s / copies, ratio=dense_s / sparse_s,
        dense_weight_bytes=dense_bytes * copies,
        sparse_weight_bytes=sum(layer.weight_nbytes for layer in layers), **machine_info())


@pytest.fixture(scope="module")
def resnet18_pair():
    torch.manual_seed(0)
    sparse = torchvision.models.resnet18().eval()
    report = sk.sparsify(sparse, "2:4")
    dense = sk.densify(copy.deepcopy(sparse)).eval()  # the same pruned weights, dense
    return dense, sparse, report


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 16])
def test_resnet18(benchmark, resnet18_pair, batch, dtype):
    dense, sparse, report = resnet18_pair
    if dtype != "float32":  # both sides cast: the same pruned weights, rounded alike
        dense = copy.deepcopy(dense).to(getattr(torch, dtype))
        sparse = copy.deepcopy(sparse).to(getattr(torch, dtype))
    x = torch.randn(batch, 3, 224, 224, dtype=getattr(torch, dtype))

    def run(model):
        with torch.no_grad():
            return model(x)

    benchmark.group = f"ResNet-18 2:4 {dtype} batch {batch}"
    benchmark.pedantic(run, args=(sparse,), rounds=3, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(lambda: run(dense), lambda: run(sparse),
                                       REPEATS if batch == 1 else 3)
    benchmark.extra_info.update(
        kind="module", what=f"ResNet-18 (torchvision, random init) 2:4, batch {batch}",
        dtype=dtype, batch=batch, converted=len(report.converted),
        dense_s=dense_s, sparse_s=sparse_s, ratio=dense_s / sparse_s,
        dense_weight_bytes=layer_weight_bytes(dense),
        sparse_weight_bytes=layer_weight_bytes(sparse), **machine_info())


def test_resnet18_train_step(benchmark, resnet18_pair):
    """One SGD-free training step (forward, cross-entropy, backward) at batch 8, fp32, both
    models in train mode: the sparse convolutions' backward is torch's convolution backward
    on the decompressed weight (ops._nm_conv2d_backward)."""
    dense, sparse, report = (copy.deepcopy(m) for m in resnet18_pair)
    torch.manual_seed(0)
    x, target = torch.randn(8, 3, 224, 224), torch.randint(0, 1000, (8,))
    with torch.no_grad():
        sparse.eval()(x)  # the forward's kernel choices, measured as in inference
    dense.train()
    sparse.train()

    def step(model):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()

    benchmark.group = "ResNet-18 2:4 train step batch 8"
    benchmark.pedantic(step, args=(sparse,), rounds=2, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(lambda: step(dense), lambda: step(sparse), 3)
    benchmark.extra_info.update(
        kind="module", what="ResNet-18 (torchvision, random init) 2:4, train step, batch 8",
        dtype="float32", batch=8, dense_s=dense_s, sparse_s=sparse_s, ratio=dense_s / sparse_s,
        dense_weight_bytes=layer_weight_bytes(dense),
        sparse_weight_bytes=layer_weight_bytes(sparse), **machine_info())
