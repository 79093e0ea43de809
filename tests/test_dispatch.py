"""Per-call kernel choice (sparsekit.dispatch): every forced choice equals the masked dense
layer, the cache under concurrent calls, explain, persistence, gradients, torch.compile.
Decisions are made deterministic by replacing dispatch.measure: no timed assertions."""

import copy
import json
import threading
import time

import pytest
import torch
from torch import nn

import sparsekit as sk
from sparsekit import dispatch

MODES = ("sparse", "dense", "auto")


@pytest.fixture(autouse=True)
def fresh_choices():
    dispatch.clear()
    previous = dispatch.get_kernel_choice()
    yield
    dispatch.kernel_choice(previous)
    dispatch.set_cache_file(None)
    dispatch.clear()
    torch._dynamo.reset()  # no compiled nn.Sequential.forward left for the next test file


class FakeMeasure:
    """Stands in for dispatch.measure: fixed times, counts calls per key bucket, and
    sleeps so that concurrent first calls overlap."""

    def __init__(self, times=None, sleep=0.0):
        self.times = times or {"sparse": 2.3e-3, "dense": 1.8e-3}
        self.sleep, self.calls, self.lock = sleep, 0, threading.Lock()

    def __call__(self, candidates, args, device):
        with self.lock:
            self.calls += 1
        time.sleep(self.sleep)
        assert set(candidates) == set(self.times)
        return dict(self.times)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def tolerance(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]


def sparse_linear(in_features, out_features, dtype, pattern="2:4", bias=True):
    lin = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # values bounded away from 0, so nothing rounds away in bf16
        lin.weight.copy_((torch.rand_like(lin.weight) + 0.5) * torch.sign(torch.randn_like(lin.weight)))
    return sk.SparseLinear.from_dense(lin.to(dtype), pattern)


def forced(layer, mode, where):
    """Runs under `mode`, forced on the module or globally."""
    if where == "module":
        layer.kernel_choice = mode
        return dispatch.kernel_choice("auto")
    return dispatch.kernel_choice(mode)


# -- every choice computes the masked dense layer ---------------------------------------

@pytest.mark.parametrize("where", ["module", "global"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("in_features,out_features,pattern", [
    (37, 5, "2:4"), (64, 33, "2:4"), (130, 17, "1:4"), (45, 9, "3:7")])
def test_linear_every_choice_equals_masked_dense(where, mode, dtype, in_features, out_features,
                                                 pattern):
    torch.manual_seed(0)
    layer = sparse_linear(in_features, out_features, dtype, pattern)
    w64, b64 = layer.dense_weight().double(), layer.bias.detach().double()
    with forced(layer, mode, where), torch.no_grad():
        for shape in [(0, in_features), (1, in_features), (3, 5, in_features), (7, in_features)]:
            x = torch.randn(shape).to(dtype)
            y = layer(x)
            want = nn.functional.linear(x.double(), w64, b64)
            assert y.shape == want.shape and y.dtype == dtype
            if want.numel():
                assert rel_err(y, want) < tolerance(dtype), (shape, mode)
            text = sk.explain(layer, x)
            if mode != "auto":
                assert f"{mode} (" in text and "forced" in text


def conv_layer(in_channels, out_channels, dtype, **kwargs):
    conv = nn.Conv2d(in_channels, out_channels, **kwargs)
    with torch.no_grad():
        conv.weight.copy_((torch.rand_like(conv.weight) + 0.5) * torch.sign(torch.randn_like(conv.weight)))
    return sk.SparseConv2d.from_dense(conv.to(dtype))


CONVS = [dict(kernel_size=1), dict(kernel_size=3, stride=2, padding=1),
         dict(kernel_size=3, dilation=2, padding="same"),
         dict(kernel_size=(3, 5), padding=(1, 2), bias=False)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kwargs", CONVS, ids=["1x1", "3x3s2", "same-dil2", "3x5-nobias"])
@pytest.mark.parametrize("in_channels", [6, 8])
def test_conv_every_choice_equals_masked_dense(mode, dtype, kwargs, in_channels):
    torch.manual_seed(0)
    layer = conv_layer(in_channels, 5, dtype, **kwargs)
    w64 = layer.dense_weight().double()
    b64 = None if layer.bias is None else layer.bias.detach().double()
    with dispatch.kernel_choice(mode), torch.no_grad():
        for batch, channels_last in [(0, False), (1, False), (2, True)]:
            x = torch.randn(batch, in_channels, 11, 9).to(dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            y = layer(x)
            want = nn.functional.conv2d(x.double(), w64, b64, layer.stride, layer.padding,
                                        layer.dilation)
            assert y.shape == want.shape and y.dtype == dtype
            if want.numel():
                assert rel_err(y, want) < tolerance(dtype), (batch, mode)


# -- the decision cache ----------------------------------------------------------------

@pytest.mark.parametrize("stride", [1, 2])
def test_1x1_dense_path_keeps_the_input_memory_format(stride):
    # The 1x1 dense weight is handed to F.conv2d as a standard [out, C_in, 1, 1] tensor: a
    # channels-last view would make torch convert an NCHW input (and its output).
    layer = conv_layer(16, 24, torch.float32, kernel_size=1, stride=stride)
    layer.kernel_choice = "dense"
    x = torch.randn(2, 16, 9, 9)
    want = nn.functional.conv2d(x, layer.dense_weight(), layer.linear.bias.detach(), stride)
    with torch.no_grad():
        y = layer(x)
        y_cl = layer(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous() and rel_err(y, want) < 1e-5
    assert y_cl.is_contiguous(memory_format=torch.channels_last) and rel_err(y_cl, want) < 1e-5


def test_auto_measures_once_per_bucket_and_uses_the_faster(monkeypatch):
    fake = FakeMeasure({"sparse": 2e-3, "dense": 1e-3})
    monkeypatch.setattr(dispatch, "measure", fake)
    layer = sparse_linear(64, 16, torch.float32)
    with torch.no_grad():
        for rows in (5, 7, 8, 6):  # one bucket: 8
            layer(torch.randn(rows, 64))
        assert fake.calls == 1
        layer(torch.randn(9, 64))  # bucket 16
        layer(torch.randn(1, 64))  # bucket 1
        layer(torch.randn(0, 64))  # empty: never measured
        assert fake.calls == 3
    buckets = {key[3]: d.choice for key, d in dispatch.decisions().items()}
    assert buckets == {8: "dense", 16: "dense", 1: "dense"}
    fake.times = {"sparse": 1e-3, "dense": 2e-3}
    with torch.no_grad():
        layer(torch.randn(3, 3, 64))  # bucket 16 again (9 rows): cached, not re-measured
        assert fake.calls == 3
        layer(torch.randn(40, 64))
    assert dispatch.decisions()[layer._kernel_key(torch.randn(40, 64))].choice == "sparse"


class FakeClock:
    """Stands in for dispatch.timed_call: runs the candidate and reports a fixed time per
    candidate name; records the order."""

    def __init__(self, times):
        self.times, self.order = times, []

    def __call__(self, name, fn, args):
        self.order.append(name)
        return fn(*args), self.times[name]


def fake_timing(monkeypatch, isolated, in_place):
    """Decisions from fixed isolated times (seconds per candidate), and fixed in-place
    times; returns the in-place clock."""
    monkeypatch.setattr(dispatch, "measure", FakeMeasure(isolated))
    clock = FakeClock(in_place)
    monkeypatch.setattr(dispatch, "timed_call", clock)
    return clock


def test_remembered_choice_follows_every_change(monkeypatch):
    # A settled call is remembered on the module (dispatch.remembered): the next call with
    # the same input shape skips the key and dispatch.run, until anything that could change
    # the choice happens.
    fake = FakeMeasure({"sparse": 2e-3, "dense": 1e-3})
    monkeypatch.setattr(dispatch, "measure", fake)
    layer = sparse_linear(64, 16, torch.float32)
    ran, runs, real_run = [], [0], dispatch.run

    def counting_run(*args, **kwargs):
        runs[0] += 1
        return real_run(*args, **kwargs)

    monkeypatch.setattr(dispatch, "run", counting_run)
    for name in ("sparse", "dense"):
        def spy(x, real=getattr(layer, f"_{name}_forward"), name=name):
            ran.append(name)
            return real(x)
        object.__setattr__(layer, f"_{name}_forward", spy)
    x = torch.randn(3, 64)

    def call(inp=x):
        ran.clear()
        runs[0] = 0
        with torch.no_grad():
            y = layer(inp)
        want = nn.functional.linear(inp, layer.dense_weight(), layer.bias.detach())
        assert rel_err(y, want) < 1e-5
        return ran[-1], runs[0]

    assert call() == ("dense", 1)  # measured: dense is faster
    assert call() == ("dense", 0)  # remembered: no key, no run
    with dispatch.kernel_choice("sparse"):  # a global setting ends it
        assert call() == ("sparse", 1)
        assert call() == ("sparse", 0)
    assert call() == ("dense", 1)  # and so does restoring it
    layer.kernel_choice = "sparse"  # so does the module's own setting
    assert call() == ("sparse", 1)
    layer.kernel_choice = "auto"
    assert call() == ("dense", 1)
    assert call(torch.randn(4, 64)) == ("dense", 1)  # another shape: through run (cached)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # another thread count: another key
        assert call() == ("dense", 1) and fake.calls == 2
    finally:
        torch.set_num_threads(threads)
    assert call() == ("dense", 1)
    fake.times = {"sparse": 1e-3, "dense": 2e-3}
    dispatch.clear()  # forgotten decisions: measured again
    assert call() == ("sparse", 1) and fake.calls == 3
    assert call() == ("sparse", 0)
    assert "_kernel_memo" in layer.__dict__
    assert "_kernel_memo" not in copy.deepcopy(layer).__dict__  # nor pickled or copied
    layer.to(torch.float64)  # a new weight dtype or device: forgotten
    assert "_kernel_memo" not in layer.__dict__


def test_unsettled_choice_is_not_remembered(monkeypatch):
    # While a close decision is being confirmed in place, every call goes through run.
    fake_timing(monkeypatch, {"sparse": 1.0e-3, "dense": 1.1e-3}, {"sparse": 3e-3, "dense": 1e-3})
    layer = sparse_linear(64, 32, torch.float32)
    runs, real_run = [0], dispatch.run

    def counting_run(*args, **kwargs):
        runs[0] += 1
        return real_run(*args, **kwargs)

    monkeypatch.setattr(dispatch, "run", counting_run)
    x = torch.randn(5, 64)
    with torch.no_grad():
        for _ in range(1 + 2 * dispatch.IN_PLACE_ROUNDS):  # measure, then confirm
            layer(x)
        assert runs[0] == 1 + 2 * dispatch.IN_PLACE_ROUNDS
        assert dispatch.decisions()[layer._kernel_key(x)].choice == "dense"
        layer(x)  # decided: remembered from here
        layer(x)
    assert runs[0] == 2 + 2 * dispatch.IN_PLACE_ROUNDS


def test_close_decision_is_confirmed_in_place(monkeypatch):
    # Isolated: sparse 1.0 ms vs dense 1.1 ms (close). In place: dense is faster.
    clock = fake_timing(monkeypatch, {"sparse": 1.0e-3, "dense": 1.1e-3}, {"sparse": 3e-3, "dense": 1e-3})
    layer = sparse_linear(64, 32, torch.float32)
    x = torch.randn(5, 64)
    want = nn.functional.linear(x, layer.dense_weight(), layer.bias.detach())
    key = layer._kernel_key(x)
    with torch.no_grad():
        y = layer(x)  # measures: sparse, pending confirmation
        assert dispatch.decisions()[key].choice == "sparse"
        assert "being confirmed in place (0 of 6 real calls timed" in sk.explain(layer)
        layer(x)  # grad disabled: timed in place
    y_grad = layer(x)  # autograd on: runs the current choice, not timed
    assert clock.order == ["sparse"] and y_grad.requires_grad
    outputs = [y]
    with torch.no_grad():
        for _ in range(2 * dispatch.IN_PLACE_ROUNDS - 1):
            outputs.append(layer(x))
        assert clock.order == ["sparse", "dense"] * dispatch.IN_PLACE_ROUNDS
        decision = dispatch.decisions()[key]
        assert decision.choice == "dense" and decision.source == "confirmed in place (isolated: sparse)"
        assert decision.times == {"sparse": 3e-3, "dense": 1e-3}
        assert "dense (torch F.linear on the decompressed weight): confirmed in place" in sk.explain(layer)
        outputs.append(layer(x))  # decided: no more timing
    assert len(clock.order) == 2 * dispatch.IN_PLACE_ROUNDS
    for out in outputs:
        assert rel_err(out, want) < 1e-5


def test_clear_decisions_are_not_confirmed_in_place(monkeypatch):
    clock = fake_timing(monkeypatch, {"sparse": 1.0e-3, "dense": 1.5e-3}, {"sparse": 3e-3, "dense": 1e-3})
    layer = sparse_linear(64, 32, torch.float32)
    with torch.no_grad():
        for _ in range(8):
            layer(torch.randn(3, 64))
    assert clock.order == [] and "cached" in sk.explain(layer)
    assert next(iter(dispatch.decisions().values())).source == "measured"


def test_in_place_confirmation_under_concurrent_calls(monkeypatch):
    clock = fake_timing(monkeypatch, {"sparse": 1.0e-3, "dense": 1.05e-3}, {"sparse": 1e-3, "dense": 2e-3})
    layer = sparse_linear(48, 24, torch.float32)
    x = torch.randn(4, 48)
    want = nn.functional.linear(x, layer.dense_weight(), layer.bias.detach())
    barrier, errors, outs = threading.Barrier(6), [], []

    def worker():
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(5):
                    outs.append(layer(x))
        except Exception as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outs) == 30
    assert all(rel_err(y, want) < 1e-5 for y in outs)
    decision = next(iter(dispatch.decisions().values()))
    assert decision.choice == "sparse" and decision.source.startswith("confirmed in place")
    assert clock.order.count("sparse") >= dispatch.IN_PLACE_ROUNDS
    assert clock.order.count("dense") >= dispatch.IN_PLACE_ROUNDS


def test_loading_or_clearing_ends_a_confirmation(monkeypatch, tmp_path):
    clock = fake_timing(monkeypatch, {"sparse": 1.0e-3, "dense": 1.1e-3}, {"sparse": 3e-3, "dense": 1e-3})
    layer = sparse_linear(64, 32, torch.float32)
    x = torch.randn(5, 64)
    with torch.no_grad():
        layer(x)
    path = tmp_path / "choices.json"
    dispatch.save(path)
    assert "being confirmed in place" in sk.explain(layer)
    dispatch.load(path)
    assert "loaded from" in sk.explain(layer) and "confirmed" not in sk.explain(layer)
    with torch.no_grad():
        layer(x)
    assert clock.order == []
    dispatch.clear()
    with torch.no_grad():
        layer(x)  # measured again, pending again
        layer(x)
    assert clock.order == ["sparse"]
    dispatch.clear()
    assert "not decided yet" in sk.explain(layer, x)


def test_measure_times_every_candidate_alternately():
    calls = []
    candidates = {"sparse": lambda x: calls.append("sparse"), "dense": lambda x: calls.append("dense")}
    times = dispatch.measure(candidates, (None,), torch.device("cpu"))
    assert set(times) == {"sparse", "dense"} and all(0 <= t < 1 for t in times.values())
    assert calls[:4] == ["sparse", "dense", "sparse", "dense"]
    assert dispatch.REPEATS + 1 <= len(calls) // 2 <= dispatch.MAX_ROUNDS + 1


def test_concurrent_first_calls_measure_each_key_once(monkeypatch):
    fake = FakeMeasure(sleep=0.05)
    monkeypatch.setattr(dispatch, "measure", fake)
    torch.manual_seed(0)
    layers = [sparse_linear(48, 24, torch.float32), sparse_linear(40, 12, torch.float32)]
    inputs = [torch.randn(rows, layer.in_features) for layer in layers for rows in (3, 4, 17)]
    wants = [nn.functional.linear(x, layer.dense_weight(), layer.bias.detach())
             for layer in layers for x in inputs if x.shape[1] == layer.in_features]
    barrier, errors, results = threading.Barrier(8), [], {}

    def worker(t):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    results[t] = [layer(x) for layer in layers for x in inputs
                                  if x.shape[1] == layer.in_features]
        except Exception as exc:  # pragma: no cover (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # 2 layers x 2 buckets (4 and 32): measured once each, though 8 threads met them at once.
    assert fake.calls == 4 and len(dispatch.decisions()) == 4
    for outputs in results.values():
        for y, want in zip(outputs, wants):
            assert rel_err(y, want) < 1e-5


def test_dense_path_stores_no_weight_and_scratch_is_bounded(monkeypatch):
    dispatch.release_scratch()
    small, big = sparse_linear(32, 8, torch.float32), sparse_linear(64, 48, torch.float32)
    tensors_before = {id(t) for t in (*big.parameters(), *big.buffers())}
    with dispatch.kernel_choice("dense"), torch.no_grad():
        big(torch.randn(3, 64))
        y_small = small(torch.randn(3, 32))
        big(torch.randn(3, 64))
    assert {id(t) for t in (*big.parameters(), *big.buffers())} == tensors_before
    assert not any(isinstance(v, torch.Tensor) for v in vars(big).values())
    buffers = dispatch._SCRATCH.buffers
    assert list(buffers) == [(torch.float32, torch.device("cpu"))]  # one per dtype/device
    assert buffers[torch.float32, torch.device("cpu")].numel() == 64 * 48  # the largest
    assert y_small.data_ptr() != buffers[torch.float32, torch.device("cpu")].data_ptr()


def test_scratch_is_per_thread():
    main = dispatch.scratch((4, 4), torch.float32, torch.device("cpu"))
    other = []
    t = threading.Thread(target=lambda: other.append(
        dispatch.scratch((4, 4), torch.float32, torch.device("cpu"))))
    t.start()
    t.join()
    assert other[0].data_ptr() != main.data_ptr()


def test_bad_modes_name_the_argument():
    layer = sparse_linear(8, 4, torch.float32)
    with pytest.raises(ValueError, match="kernel_choice must be one of"):
        layer.kernel_choice = "fast"
    with pytest.raises(ValueError, match="mode must be one of"):
        sk.kernel_choice("fastest")
    with pytest.raises(ValueError, match="in_features = 8"):
        layer(torch.randn(2, 9))


def test_module_setting_wins_over_global():
    layer = sparse_linear(16, 4, torch.float32)
    layer.kernel_choice = "sparse"
    with sk.kernel_choice("dense"):
        layer(torch.randn(2, 16))
        assert "forced by kernel_choice='sparse' on the module" in sk.explain(layer)
        layer.kernel_choice = "auto"
        assert "forced globally by sparsekit.kernel_choice('dense')" in sk.explain(layer)
    previous = sk.kernel_choice("dense")
    assert previous.previous == "auto" and dispatch.get_kernel_choice() == "dense"
    sk.kernel_choice("auto")


# -- explain -----------------------------------------------------------------------------

def test_explain_names_the_choice_and_why(monkeypatch):
    monkeypatch.setattr(dispatch, "measure", FakeMeasure({"sparse": 2.3e-3, "dense": 1.8e-3}))
    layer = sparse_linear(64, 32, torch.float32)
    with pytest.raises(ValueError, match="has not run yet"):
        sk.explain(layer)
    x = torch.randn(12, 64)
    assert "not decided yet" in sk.explain(layer, x)
    layer(x)
    text = sk.explain(layer)
    assert "dense (torch F.linear on the decompressed weight): measured dense 1.8 ms vs sparse 2.3 ms" in text
    assert "batch bucket 16" in text and text.endswith("cached")
    assert sk.explain(layer, x) == text
    conv = conv_layer(8, 4, torch.float32, kernel_size=3)
    conv(torch.randn(1, 8, 6, 6))
    assert "dense (torch F.conv2d" in sk.explain(conv) and "batch bucket 1" in sk.explain(conv)
    with pytest.raises(TypeError, match="module must be a sparsekit layer"):
        sk.explain(nn.Linear(2, 2))
    # The op form still works.
    assert "nm_compress" in sk.explain("nm_compress", torch.randn(8, 16), 2, 4)


# -- persistence ---------------------------------------------------------------------------

def test_explain_a_whole_model(monkeypatch):
    monkeypatch.setattr(dispatch, "measure", FakeMeasure({"sparse": 1e-3, "dense": 2e-3}))
    model = nn.Sequential(conv_layer(8, 6, torch.float32, kernel_size=3, padding=1), nn.Flatten(),
                          sparse_linear(6 * 36, 4, torch.float32), sparse_linear(4, 4, torch.float32))
    assert sk.explain(model).splitlines()[0] == \
        "Sequential: 3 sparse layers (last calls: 3 not called yet)"
    model[3].kernel_choice = "dense"
    with torch.no_grad():
        model(torch.randn(2, 8, 6, 6))
    lines = sk.explain(model).splitlines()
    assert lines[0] == "Sequential: 3 sparse layers (last calls: 2 sparse, 1 dense)"
    assert len(lines) == 4  # the SparseConv2d's own SparseLinear is not listed apart
    assert lines[1].startswith("  0: SparseConv2d conv2d") and lines[2].startswith("  2: SparseLinear")
    assert lines[3] == "  3: " + sk.explain(model[3]) and "forced by kernel_choice='dense'" in lines[3]
    with pytest.raises(TypeError, match="no SparseLinear or SparseConv2d inside"):
        sk.explain(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="takes no input"):
        sk.explain(model, torch.randn(2, 8, 6, 6))


def test_persistence_round_trip(monkeypatch, tmp_path):
    fake = FakeMeasure({"sparse": 1e-3, "dense": 3e-3})
    monkeypatch.setattr(dispatch, "measure", fake)
    layer, conv = sparse_linear(64, 32, torch.bfloat16), conv_layer(8, 4, torch.float32, kernel_size=3, padding="same")
    xs = [torch.randn(5, 64).to(torch.bfloat16), torch.randn(300, 64).to(torch.bfloat16)]
    xc = torch.randn(2, 8, 7, 7)
    for x in xs:
        layer(x)
    conv(xc)
    before = dispatch.decisions()
    path = tmp_path / "choices.json"
    dispatch.save(path)
    assert json.loads(path.read_text())["format"] == "sparsekit kernel choices"
    dispatch.clear()
    assert dispatch.load(path) == 3
    after = dispatch.decisions()
    assert set(after) == set(before)
    for key, decision in before.items():
        assert after[key].choice == decision.choice and after[key].times == decision.times
        assert after[key].source == f"loaded from {path}"
    for x in xs:
        layer(x)
    conv(xc)
    assert fake.calls == 3  # nothing measured again
    assert "loaded from" in sk.explain(conv)
    # A file from another machine or torch is ignored, with a warning.
    data = json.loads(path.read_text())
    data["machine"]["torch"] = "0.0"
    path.write_text(json.dumps(data))
    dispatch.clear()
    with pytest.warns(RuntimeWarning, match="measured on"):
        assert dispatch.load(path) == 0
    with pytest.raises(ValueError, match="not a sparsekit kernel-choice file"):
        (tmp_path / "other.json").write_text("{}")
        dispatch.load(tmp_path / "other.json")


def test_cache_file_is_written_after_each_measurement(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "measure", FakeMeasure())
    path = tmp_path / "auto.json"
    dispatch.set_cache_file(path)
    layer = sparse_linear(32, 8, torch.float32)
    layer(torch.randn(3, 32))
    assert len(json.loads(path.read_text())["entries"]) == 1
    layer(torch.randn(30, 32))
    assert len(json.loads(path.read_text())["entries"]) == 2
    dispatch.clear()
    dispatch.set_cache_file(path)  # reads it back
    assert len(dispatch.decisions()) == 2


def test_environment_variable_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(dispatch, "measure", FakeMeasure())
    path = tmp_path / "env.json"
    monkeypatch.setenv(dispatch.ENV_FILE, str(path))
    monkeypatch.setattr(dispatch, "_env_loaded", False)
    layer = sparse_linear(32, 8, torch.float32)
    layer(torch.randn(3, 32))
    assert len(json.loads(path.read_text())["entries"]) == 1


# -- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_linear_gradients_reach_kept_values_in_both_paths(mode):
    torch.manual_seed(0)
    layer = sparse_linear(37, 11, torch.float32)
    layer.kernel_choice = mode
    w = layer.dense_weight().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x1 = torch.randn(2, 3, 37, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    layer(x1).square().sum().backward()
    nn.functional.linear(x2, w, b).square().sum().backward()
    got = sk.ops.nm_decompress(layer.values.grad, layer.metadata, 37, 2, 4)
    assert rel_err(got, w.grad * (layer.dense_weight() != 0)) < 1e-5  # kept slots only
    assert rel_err(x1.grad, x2.grad) < 1e-5 and rel_err(layer.bias.grad, b.grad) < 1e-5
    assert layer.values.grad.shape == layer.values.shape


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_conv_gradients_reach_kept_values_in_both_paths(mode):
    torch.manual_seed(0)
    grads = {}
    for run_mode in ("sparse", mode):
        torch.manual_seed(1)
        layer = conv_layer(6, 5, torch.float64, kernel_size=3, stride=2, padding=1)
        layer.kernel_choice = run_mode
        x = torch.randn(2, 6, 7, 8, dtype=torch.float64, requires_grad=True)
        layer(x).square().sum().backward()
        grads[run_mode] = (layer.values.grad, layer.bias.grad, x.grad)
    for got, want in zip(grads[mode], grads["sparse"]):
        assert rel_err(got, want) < 1e-10
    layer.kernel_choice = mode
    x = torch.randn(1, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, values: layer(x), (x, layer.values))


@pytest.mark.parametrize("pattern", ["2:4", "unstructured"])
def test_dense_path_without_grad_uses_scratch_and_with_grad_does_not(pattern):
    layer = sparse_linear(32, 8, torch.float32, pattern=pattern)
    layer.kernel_choice = "dense"
    dispatch.release_scratch()
    x = torch.randn(2, 32)
    want = nn.functional.linear(x, layer.dense_weight(), layer.bias.detach())
    y = layer(x)  # values require grad: autograd path, no scratch
    assert not getattr(dispatch._SCRATCH, "buffers", {})
    y.sum().backward()
    assert layer.values.grad is not None
    with torch.no_grad():
        assert rel_err(layer(x), want) < 1e-5
    assert dispatch._SCRATCH.buffers


# -- torch.compile -------------------------------------------------------------------------

class GraphOps:
    """A dynamo backend that records which sparsekit ops the traced graph calls."""

    def __init__(self):
        self.ops = set()

    def __call__(self, gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "sparsekit" in str(node.target):
                self.ops.add(str(node.target).split("sparsekit.")[1].split(".")[0])
        return gm.forward


def model_and_input(kind):
    torch._dynamo.reset()  # every test compiles nn.Sequential.forward afresh
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(sparse_linear(64, 32, torch.float32), nn.ReLU()), torch.randn(3, 5, 64)
    return nn.Sequential(conv_layer(8, 6, torch.float32, kernel_size=3, padding=1), nn.ReLU()), \
        torch.randn(2, 8, 6, 6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("mode", ["sparse", "dense", "auto-cached-dense", "auto-undecided"])
def test_compile_fullgraph_compiles_the_chosen_path(monkeypatch, kind, mode):
    monkeypatch.setattr(dispatch, "measure", FakeMeasure({"sparse": 2e-3, "dense": 1e-3}))
    model, x = model_and_input(kind)
    if mode in ("sparse", "dense"):
        model[0].kernel_choice = mode
    elif mode == "auto-cached-dense":
        model(x)  # measured (fake): dense
    backend = GraphOps()
    with torch.no_grad():
        out = torch.compile(model, fullgraph=True, backend=backend)(x)
    with sk.kernel_choice("sparse"), torch.no_grad():
        want = model(x)
    assert rel_err(out, want) < 1e-5
    dense = mode in ("dense", "auto-cached-dense")
    assert ("nm_decompress" in backend.ops) == dense
    sparse_op = "nm_linear" if kind == "linear" else "nm_conv2d"  # a 3x3 conv: implicit GEMM
    assert (sparse_op in backend.ops) == (not dense)
    assert "nm_decompress_into" not in backend.ops  # no scratch buffer inside a graph


@pytest.mark.parametrize("mode", ["sparse", "dense", "auto"])
def test_compile_fullgraph_trains_in_every_mode(mode):
    model, x = model_and_input("conv")
    model.append(nn.Flatten())
    model.append(sparse_linear(6 * 36, 4, torch.float32))
    reference = copy.deepcopy(model)
    sk.densify(reference)
    with sk.kernel_choice(mode):
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        out.square().sum().backward()
    reference(x).square().sum().backward()
    assert rel_err(out, reference(x)) < 1e-5
    want = sk.compress(reference[0].weight.grad.permute(0, 2, 3, 1).reshape(6, -1)
                       * (model[0].linear.dense_weight() != 0), 2, 4).values
    assert rel_err(model[0].values.grad, want) < 1e-5


def test_compile_with_dynamic_shapes_keys_each_bucket():
    # The bucket is computed while tracing, which specializes the batch: one graph per size.
    model, _ = model_and_input("linear")
    model[0].kernel_choice = "auto"
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad():
        for rows in (3, 5, 9):
            x = torch.randn(rows, 64)
            assert rel_err(compiled(x), model(x)) < 1e-5


def test_more_rounds_while_close_within_budget():
    more = dispatch.more_rounds
    far = {"sparse": 1.0e-3, "dense": 2.0e-3}
    close = {"sparse": 1.0e-3, "dense": 1.05e-3}
    # REPEATS rounds always; tiny calls continue until MIN_MEASURE_S.
    assert more(far, 0, 0.0) and more(far, dispatch.REPEATS - 1, 1.0)
    assert more(far, dispatch.REPEATS, dispatch.MIN_MEASURE_S / 2)
    assert not more(far, dispatch.MAX_ROUNDS, 0.0)
    assert not more(far, dispatch.REPEATS, 0.1)
    # Close candidates: more rounds, up to CLOSE_ROUNDS and within CLOSE_BUDGET_S.
    assert more(close, dispatch.REPEATS, 0.1)
    assert not more(close, dispatch.CLOSE_ROUNDS, 0.1)
    assert not more(close, dispatch.REPEATS, dispatch.CLOSE_BUDGET_S)
    assert not more({"sparse": 1.0e-3}, dispatch.REPEATS, 0.1)  # one candidate: nothing to split
