"""An LLM-style MLP block (4096 -> 11008 -> 4096, GELU), dense against sparsified (2:4) on
the same weights, timed alternately: forward and training step. Whole models (ResNet-18,
all-MiniLM-L6-v2, the digits CNN, a SmolLM2-size decoder) are in bench_models.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsekit as sk

from common import layer_weight_bytes, machine_info, paired_seconds

REPEATS = 5


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 11008), nn.GELU(), nn.Linear(11008, 4096))


@pytest.mark.parametrize("mode,batch", [("forward", 8), ("train step", 64)])
def test_mlp_block(benchmark, mode, batch):
    dense = _mlp()
    for module in dense.modules():
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.mul_(sk.masks.nm(module.weight, 2, 4))
    sparse = copy.deepcopy(dense)
    sk.sparsify(sparse, "2:4")
    x, target = torch.randn(batch, 4096), torch.randn(batch, 4096)
    opts = {id(m): torch.optim.SGD(m.parameters(), lr=1e-4) for m in (dense, sparse)}

    def run(model):
        if mode == "forward":
            with torch.no_grad():
                return model(x)
        opt = opts[id(model)]
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        return loss

    benchmark.group = f"MLP 4096-11008-4096 {mode} batch {batch}"
    benchmark.pedantic(run, args=(sparse,), rounds=REPEATS, iterations=1, warmup_rounds=1)
    dense_s, sparse_s = paired_seconds(lambda: run(dense), lambda: run(sparse), REPEATS)
    benchmark.extra_info.update(
        kind="module", what=f"MLP 4096-11008-4096 {mode}, batch {batch}", dtype="float32",
        batch=batch, dense_s=dense_s, sparse_s=sparse_s, ratio=dense_s / sparse_s,
        dense_weight_bytes=layer_weight_bytes(dense), sparse_weight_bytes=layer_weight_bytes(sparse),
        **machine_info())
