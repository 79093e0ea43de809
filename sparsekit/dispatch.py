"""Per-call kernel choice: a sparse layer runs whichever of its kernels is fastest for a call.

A sparse layer has several ways to compute the same output: its sparse kernel on the
compressed weight, or a dense path (decompress the kept values into a scratch buffer, then
torch's own GEMM / convolution). Which one wins depends on the layer shape, the batch, the
dtype, the device and the thread count, so the choice is made per **key**

    (op, format, layer shape, batch bucket, x dtype, weight dtype, device, threads)

    op       "linear", "conv2d", ...          format   "nm2:4", ... (the layer's format)
    bucket   the batch rows rounded up to a power of two (0 for an empty batch), so that
             varied sequence lengths share one decision instead of measuring every length

On the first call with a new key (mode "auto") the candidates are timed alternately on that
call's own input (one warm-up each, then `REPEATS` rounds, more for calls of microseconds
and up to `CLOSE_ROUNDS` while the two best are within `CLOSE` of each other, best time
each, under `torch.no_grad()`; the warm-up alone when a call is slow), the
fastest is cached and every later call with the key pays one dictionary lookup. A module
also remembers its last settled call (`remembered`): the next call with an input of the same
shape, dtype and device, at the same thread count, with no decision or global mode changed
since, runs the same candidate without building the key (a decoder calls hundreds of small
layers per token, and the key cost about as much as the rest of a layer's Python). Measuring holds a lock, so threads that meet
a new key together measure it once and the others wait for the decision. Only forward
calls are timed; a training step uses the forward's decision.

Forcing a choice:
    sparsekit.kernel_choice("dense")            # globally, until changed (returns previous)
    with sparsekit.kernel_choice("sparse"): ... # globally, restored on exit
    layer.kernel_choice = "dense"               # one module; wins over the global setting
Modes are "auto" (the default), or a candidate's name ("sparse", "dense").

Persistence: `save(path)` / `load(path)` write and read the decisions as JSON (with the
machine and torch version they were measured on: a file from another set-up is ignored
with a warning). With `set_cache_file(path)` or the environment variable
SPARSEKIT_KERNEL_CHOICE_FILE the file is read before the first measurement and rewritten
after each new one.

torch.compile: no timing happens while tracing. The decision cached for the key when the
graph is traced is compiled in (so run the model once eagerly, or load a file, first);
without one the graph runs "sparse", a deterministic default. The graph keeps its decision
until it is recompiled. Forced modes compile the forced path.

Scratch buffers (the dense path without autograd): `scratch(shape, dtype, device)` returns
a view of one buffer per (dtype, device, thread), grown to the largest dense weight that
thread has needed and reused by every layer after it: at most one dense weight per thread,
dtype and device is ever held, freed with the thread or by `release_scratch()`. The
compressed weight stays the only copy a layer stores. With autograd (grad enabled and any
input requiring grad) the dense path allocates its weight per call instead, since backward
keeps it.

Hooking in a new kernel (another format, another conv kernel): a module calls

    run(self, key, candidates, args)

with `key` from `make_key(...)` and `candidates` a dict {name: fn}; `fn(*args)` computes the
layer's output. It must hold "sparse" and "dense" (the forcible modes); more names may be
added and "auto" picks the fastest of all. A module may set `_kernel_descriptions` ({name:
text}) for `explain`, and must define `_kernel_key(x)` (the key for input x) for
`explain(module, x)`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import threading
import time
import warnings
from typing import Callable, Mapping, NamedTuple

import torch

__all__ = ["MODES", "REPEATS", "MAX_ROUNDS", "MIN_MEASURE_S", "CLOSE", "CLOSE_ROUNDS",
           "CLOSE_BUDGET_S", "IN_PLACE_ROUNDS", "IN_PLACE_MARGIN", "timed_call", "more_rounds",
           "Decision", "kernel_choice",
           "get_kernel_choice", "make_key", "batch_bucket", "run", "remembered", "measure",
           "ModuleChoice",
           "decisions", "clear", "save", "load", "set_cache_file", "scratch", "release_scratch",
           "explain_module", "explain_model", "ENV_FILE"]

MODES = ("auto", "sparse", "dense")
REPEATS = 3          # timed rounds per candidate on a key's first call (at least)
MAX_ROUNDS = 20      # at most, for calls so short that REPEATS rounds take < MIN_MEASURE_S
MIN_MEASURE_S = 2e-3
SLOW_CALL_S = 0.25   # a warm-up slower than this: one round only (measuring stays cheap)
CLOSE = 0.10         # the two best within 10% of each other after REPEATS rounds: more rounds,
CLOSE_ROUNDS = 8     # up to this many in all, while under CLOSE_BUDGET_S, so that noise on a
CLOSE_BUDGET_S = 0.25  # busy machine is less likely to pick the slower of two close kernels
IN_PLACE_ROUNDS = 3  # real calls timed per candidate to confirm a close decision in place
IN_PLACE_MARGIN = 0.25  # ... when the isolated times of the two best are this close
ENV_FILE = "SPARSEKIT_KERNEL_CHOICE_FILE"
DEFAULT = "sparse"   # where nothing is measured: tracing without a decision, meta, empty


class Decision(NamedTuple):
    """A cached choice: the candidate, each candidate's best time in seconds (None when
    nothing was timed), and where it came from ("measured", "loaded from <file>", or why a
    default was taken)."""

    choice: str
    times: dict | None
    source: str


_LOCK = threading.RLock()
_CACHE: dict = {}
_IN_PLACE: dict = {}  # key -> {candidate: [seconds of real calls]} while being confirmed
_global_mode = "auto"
# Bumped by every change to the cached decisions or to the global mode: a module's
# remembered call (remembered()) is valid only within the epoch it was made in.
_epoch = 0
_cache_file: str | None = None
_env_loaded = False


def _check_mode(mode, name="mode"):
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


class kernel_choice:
    """Forces the kernel of every sparse layer left at "auto": `kernel_choice("dense")` sets
    it now (the instance's `.previous` holds the old setting); `with kernel_choice("sparse"):`
    restores the previous setting on exit. "auto" (the default) measures and caches. The
    setting is process-wide (all threads)."""

    def __init__(self, mode: str):
        global _global_mode
        _check_mode(mode)
        self.mode, self.previous = mode, _global_mode
        _global_mode = mode
        _changed()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _global_mode
        _global_mode = self.previous
        _changed()
        return False

    def __repr__(self):
        return f"kernel_choice({self.mode!r})"


def _changed() -> None:
    global _epoch
    _epoch += 1


def get_kernel_choice() -> str:
    """The global mode: "auto", "sparse" or "dense"."""
    return _global_mode


def batch_bucket(rows: int) -> int:
    """rows rounded up to a power of two (0 stays 0): one decision per bucket."""
    return 0 if rows <= 0 else 1 << (rows - 1).bit_length()


def make_key(op: str, fmt: str, shape: tuple, rows: int, x: torch.Tensor,
             weight_dtype: torch.dtype) -> tuple:
    """The decision key of one call: op ("linear", "conv2d"), format ("nm2:4"), the layer's
    shape (a tuple of ints/strings, everything but the batch that decides the work), the
    batch rows (bucketed here), and x's dtype and device, the weight dtype, torch's threads."""
    return (op, fmt, shape, batch_bucket(rows), x.dtype, weight_dtype, x.device, _threads())


@torch._dynamo.assume_constant_result
def _threads() -> int:
    # torch.compile cannot trace get_num_threads: read at trace time, a constant in the graph.
    return torch.get_num_threads()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(candidates: Mapping[str, Callable], args: tuple, device: torch.device) -> dict:
    """Best seconds of each candidate on `args`, timed alternately after one warm-up each,
    under torch.no_grad(). Tests replace this function to make decisions deterministic."""
    def timed(fn):
        _sync(device)
        start = time.perf_counter()
        fn(*args)
        _sync(device)
        return time.perf_counter() - start

    with torch.no_grad():
        warm = {name: timed(fn) for name, fn in candidates.items()}
        if sum(warm.values()) > SLOW_CALL_S:  # slow calls: the warm-up is the measurement
            return warm
        best, spent, rounds = dict.fromkeys(candidates, math.inf), 0.0, 0
        while more_rounds(best, rounds, spent):
            for name, fn in candidates.items():
                elapsed = timed(fn)
                best[name], spent = min(best[name], elapsed), spent + elapsed
            rounds += 1
    return best


def more_rounds(best: Mapping[str, float], rounds: int, spent: float) -> bool:
    """Whether `measure` times another round, given each candidate's best time so far, the
    rounds done and the seconds spent: REPEATS rounds; tiny layers (microseconds a call) go
    on to MAX_ROUNDS or until MIN_MEASURE_S is spent, so one scheduler hiccup does not decide
    for them; and while the two best are within CLOSE of each other, up to CLOSE_ROUNDS
    rounds within CLOSE_BUDGET_S."""
    if rounds < REPEATS or (rounds < MAX_ROUNDS and spent < MIN_MEASURE_S):
        return True
    times = sorted(best.values())
    close = len(times) >= 2 and times[1] <= times[0] * (1 + CLOSE)
    return close and rounds < CLOSE_ROUNDS and spent < CLOSE_BUDGET_S


def _decide(key: tuple, candidates: Mapping[str, Callable], args: tuple) -> Decision:
    with _LOCK:
        decision = _CACHE.get(key)
        if decision is not None:
            return decision
        _load_env_file()
        decision = _CACHE.get(key)
        if decision is not None:
            return decision
        device = key[6]
        if key[3] == 0:
            return Decision(DEFAULT, None, "empty batch: nothing to compute, not measured")
        if device.type == "meta":
            return Decision(DEFAULT, None, "meta tensors: nothing to time")
        times = measure(candidates, args, device)
        choice = min(times, key=times.get)
        decision = Decision(choice, {k: float(v) for k, v in times.items()}, "measured")
        _CACHE[key] = decision
        _changed()
        ranked = sorted(times, key=times.get)
        if (IN_PLACE_ROUNDS > 0 and device.type == "cpu" and len(ranked) >= 2
                and times[ranked[1]] <= times[ranked[0]] * (1 + IN_PLACE_MARGIN)):
            _IN_PLACE[key] = {ranked[0]: [], ranked[1]: []}
        if _cache_file is not None:
            save(_cache_file)
        return decision


@torch._dynamo.assume_constant_result
def _traced_choice(key: tuple, mode: str) -> str:
    # Runs in plain Python while torch.compile traces; its answer is compiled in.
    if mode != "auto":
        return mode
    decision = _CACHE.get(key)
    return DEFAULT if decision is None else decision.choice


def run(owner, key: tuple, candidates: Mapping[str, Callable], args: tuple,
        x: torch.Tensor | None = None):
    """Calls the chosen candidate of `owner` (a module) for this key: forced by the module's
    `kernel_choice`, else by the global one, else the cached (or now measured) fastest.
    With `x` (the call's input) a settled choice is remembered on the module for the next
    call with an input of x's shape, dtype and device (remembered())."""
    mode = owner._kernel_mode
    if mode == "auto":
        mode = _global_mode
    if torch.compiler.is_compiling():
        return candidates[_traced_choice(key, mode)](*args)
    object.__setattr__(owner, "_kernel_last_key", key)  # for explain(module); not a Module attr
    epoch = _epoch
    if mode == "auto":
        decision = _CACHE.get(key)
        if decision is None:  # this call measures (its own run is not timed in place)
            decision = _decide(key, candidates, args)
            epoch = _epoch
        elif key in _IN_PLACE:
            if not torch.is_grad_enabled():
                return _run_in_place(key, candidates, args)
            return candidates[decision.choice](*args)  # not settled yet: not remembered
        mode = decision.choice
        if key in _IN_PLACE:  # just measured, and close: confirmed by the next calls
            return candidates[mode](*args)
    fn = candidates[mode]
    if x is not None:
        # (x.shape, dtype, device, threads, epoch) -> fn; not a Module attribute.
        object.__setattr__(owner, "_kernel_memo",
                           (x.shape, x.dtype, x.device, key[7], epoch, fn))
    return fn(*args)


def remembered(owner, x: torch.Tensor) -> Callable | None:
    """The candidate `run` remembered for `owner`'s last settled call if x has that call's
    shape, dtype and device, the thread count is the same and no decision or global mode
    changed since (else None: the caller goes through `run`). Skips building the key, which
    costs about as much as the rest of a small layer's Python (decoding calls hundreds of
    layers per token with one row of x)."""
    memo = owner.__dict__.get("_kernel_memo")
    if memo is None or torch.compiler.is_compiling():
        return None
    shape, dtype, device, threads, epoch, fn = memo
    if (epoch == _epoch and dtype is x.dtype and shape == x.shape and device == x.device
            and threads == torch.get_num_threads()):
        return fn
    return None


def timed_call(name: str, fn: Callable, args: tuple):
    """(fn(*args), seconds it took): one real call of candidate `name`, timed in place.
    Tests replace this function to make in-place confirmation deterministic."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _run_in_place(key: tuple, candidates: Mapping[str, Callable], args: tuple):
    """One real call of a key whose isolated timings were close: runs the less-timed of the
    two best candidates, times it, and once each has IN_PLACE_ROUNDS times, decides by
    their best. Timed in place, inside the model, each candidate meets the caches as the
    surrounding layers leave them (on their own, both find their weight in cache)."""
    with _LOCK:
        pending = _IN_PLACE.get(key)
        if pending is None:  # decided by another thread meanwhile
            return candidates[_CACHE[key].choice](*args)
        name = min(pending, key=lambda n: len(pending[n]))
    out, elapsed = timed_call(name, candidates[name], args)
    with _LOCK:
        pending = _IN_PLACE.get(key)
        if pending is None:
            return out
        pending[name].append(elapsed)
        if all(len(t) >= IN_PLACE_ROUNDS for t in pending.values()):
            del _IN_PLACE[key]
            best = {n: min(t) for n, t in pending.items()}
            isolated = _CACHE[key]
            times = dict(isolated.times or {})
            times.update(best)
            choice = min(best, key=best.get)
            _CACHE[key] = Decision(choice, times, f"confirmed in place (isolated: {isolated.choice})")
            _changed()
            if _cache_file is not None:
                save(_cache_file)
    return out


class ModuleChoice:
    """Mixin for modules whose forward goes through `run`: the per-module `kernel_choice`
    ("auto" by default; "sparse"/"dense" force it for this module whatever the global
    setting)."""

    _kernel_mode = "auto"

    @property
    def kernel_choice(self) -> str:
        return self._kernel_mode

    @kernel_choice.setter
    def kernel_choice(self, mode: str) -> None:
        object.__setattr__(self, "_kernel_mode", _check_mode(mode, "kernel_choice"))
        self.__dict__.pop("_kernel_memo", None)

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype / device) changes the weight dtype or device in the decision key.
        self.__dict__.pop("_kernel_memo", None)
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):
        # The remembered call (a function, and an epoch of this process) stays behind when
        # the module is pickled or deep-copied.
        state = super().__getstate__()
        state.pop("_kernel_memo", None)
        return state


# ---- inspection and persistence ---------------------------------------------------------

def decisions() -> dict:
    """A snapshot {key: Decision} of the cached decisions."""
    with _LOCK:
        return dict(_CACHE)


def clear() -> None:
    """Forgets every decision (the next call of each key measures again)."""
    with _LOCK:
        _CACHE.clear()
        _IN_PLACE.clear()
        _changed()


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__}


def _encode(value):
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value):
    if isinstance(value, dict) and "dtype" in value:
        return getattr(torch, value["dtype"])
    if isinstance(value, dict) and "device" in value:
        return torch.device(value["device"])
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    return value


def save(path: str | os.PathLike) -> None:
    """Writes the measured decisions to `path` (JSON, replaced atomically)."""
    with _LOCK:
        entries = [{"key": _encode(key), "choice": d.choice, "times": d.times}
                   for key, d in _CACHE.items() if d.times is not None]
        data = {"format": "sparsekit kernel choices", "version": 1, "machine": _machine(),
                "entries": entries}
        path = os.fspath(path)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)


def load(path: str | os.PathLike) -> int:
    """Reads decisions saved by `save` into the cache (they replace cached ones of the same
    key). Returns how many were read: 0, with a warning, when the file was measured on
    another machine or torch version."""
    path = os.fspath(path)
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != "sparsekit kernel choices":
        raise ValueError(f"path {path!r} is not a sparsekit kernel-choice file")
    if data.get("machine") != _machine():
        warnings.warn(f"sparsekit: kernel choices in {path} were measured on "
                      f"{data.get('machine')}, this is {_machine()}: ignored (they will be "
                      "measured again)",
                      RuntimeWarning, stacklevel=2)
        return 0
    with _LOCK:
        for entry in data["entries"]:
            key = _decode(entry["key"])
            _CACHE[key] = Decision(entry["choice"], entry["times"], f"loaded from {path}")
            _IN_PLACE.pop(key, None)
        _changed()
    return len(data["entries"])


def set_cache_file(path: str | os.PathLike | None) -> None:
    """Persists decisions in `path`: read now if it exists, rewritten after every new
    measurement. None stops persisting. The environment variable SPARSEKIT_KERNEL_CHOICE_FILE
    does the same from the first measurement on."""
    global _cache_file, _env_loaded
    with _LOCK:
        _env_loaded = True  # an explicit file replaces the environment's
        _cache_file = None if path is None else os.fspath(path)
        if _cache_file is not None and os.path.exists(_cache_file):
            load(_cache_file)


def _load_env_file():
    global _env_loaded
    if _env_loaded:
        return
    _env_loaded = True
    path = os.environ.get(ENV_FILE)
    if path:
        set_cache_file(path)


# ---- scratch buffers --------------------------------------------------------------------

_SCRATCH = threading.local()


def scratch(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of `shape` viewing this thread's scratch buffer for (dtype,
    device): valid until this thread's next `scratch` call of the same dtype and device.
    The buffer grows to the largest request and is never shrunk (see release_scratch)."""
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    numel = math.prod(shape)
    buf = buffers.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype, device] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Frees this thread's scratch buffers."""
    _SCRATCH.buffers = {}


# ---- explain ----------------------------------------------------------------------------

def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def explain_module(module, x: torch.Tensor | None = None) -> str:
    """What `module(x)` runs and why (with x None: its last eager call)."""
    return _explain(module, x)[1]


def _explain(module, x: torch.Tensor | None) -> tuple:
    """(the candidate module(x) runs, or None when not decided yet; why, in words)."""
    if not hasattr(module, "_kernel_key"):
        raise TypeError(f"module must be a sparsekit layer with kernel choice, got "
                        f"{type(module).__name__}")
    if x is not None:
        key = module._kernel_key(x)
    else:
        key = getattr(module, "_kernel_last_key", None)
        if key is None:
            raise ValueError("the module has not run yet: pass an input x")
    op, fmt, shape, bucket, x_dtype, w_dtype, device, threads = key
    where = (f"{type(module).__name__} {op} {fmt} {shape} at batch bucket {bucket} "
             f"({str(x_dtype).replace('torch.', '')} on {device}, {threads} threads)")
    describe = getattr(module, "_kernel_descriptions", {})

    def named(choice):
        text = describe.get(choice)
        return f"{choice} ({text})" if text else choice

    mode = module._kernel_mode
    if mode != "auto":
        return mode, f"{where}: {named(mode)}, forced by kernel_choice={mode!r} on the module"
    if _global_mode != "auto":
        return _global_mode, (f"{where}: {named(_global_mode)}, forced globally by "
                              f"sparsekit.kernel_choice({_global_mode!r})")
    decision = _CACHE.get(key)
    if decision is None:
        if bucket == 0:
            return DEFAULT, f"{where}: {named(DEFAULT)}, empty batch (nothing to compute, not measured)"
        timed = " and ".join(describe or ["the candidates"])
        return None, (f"{where}: not decided yet; the next call times {timed} and caches the "
                      f"faster (under torch.compile without a decision: {DEFAULT})")
    if decision.times:
        chosen_first = sorted(decision.times.items(), key=lambda kv: kv[0] != decision.choice)
        times = " vs ".join(f"{name} {_ms(t)}" for name, t in chosen_first)
        pending = _IN_PLACE.get(key)
        if pending is not None:
            done = sum(len(t) for t in pending.values())
            return decision.choice, (
                f"{where}: {named(decision.choice)}: {decision.source} {times}; close, so being "
                f"confirmed in place ({done} of {IN_PLACE_ROUNDS * len(pending)} real calls "
                f"timed, alternating {' and '.join(pending)})")
        return decision.choice, f"{where}: {named(decision.choice)}: {decision.source} {times}, cached"
    return decision.choice, f"{where}: {named(decision.choice)}: {decision.source}"


def explain_model(model) -> str:
    """What every sparse layer of `model` ran on its last call, one line each, after a
    count per candidate ("ResNet: 21 sparse layers (last calls: 17 sparse, 4 dense)"). A layer held inside
    another (a SparseConv2d's SparseLinear) is described by its owner."""
    inner, lines, counts = set(), [], {}
    for name, module in model.named_modules():
        if id(module) in inner or not hasattr(module, "_kernel_key"):
            continue
        inner.update(id(m) for m in module.modules() if m is not module)
        if getattr(module, "_kernel_last_key", None) is None:
            choice, text = "not called yet", f"{type(module).__name__}: not called yet"
        else:
            choice, text = _explain(module, None)
            choice = choice or "not decided yet"
        counts[choice] = counts.get(choice, 0) + 1
        lines.append(f"  {name or '(the model)'}: {text}")
    if not lines:
        raise TypeError(f"module must be a sparsekit layer or a model holding them, got "
                        f"{type(model).__name__} with no SparseLinear or SparseConv2d inside "
                        "(see sparsekit.sparsify)")
    total = sum(counts.values())
    summary = ", ".join(f"{n} {choice}" for choice, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return "\n".join([f"{type(model).__name__}: {total} sparse layer{'s' * (total != 1)} "
                      f"(last calls: {summary})"] + lines)
