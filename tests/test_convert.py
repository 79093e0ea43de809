"""Whole-model surgery: sparsify / densify are atomic, skip what they cannot replace safely
(with the reason), keep tied weights tied, and leave torch's transformer layers working."""

import copy

import pytest
import torch
from torch import nn

import sparsekit as sk


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def masked_reference(model, converted, n=2, m=4):
    """A dense copy of `model` with the N:M mask applied to the layers sparsify converted."""
    ref = copy.deepcopy(model)
    for name in converted:
        mod = ref.get_submodule(name)
        with torch.no_grad():
            if isinstance(mod, nn.Conv2d):
                flat = mod.weight.permute(0, 2, 3, 1).reshape(mod.weight.shape[0], -1)
                keep = sk.masks.nm(flat, n, m).view(mod.weight.shape[0], mod.weight.shape[2],
                                                    mod.weight.shape[3], mod.weight.shape[1])
                mod.weight.mul_(keep.permute(0, 3, 1, 2))
            else:
                mod.weight.mul_(sk.masks.nm(mod.weight, n, m))
    return ref


def snapshot(model):
    return ([(name, type(mod)) for name, mod in model.named_modules(remove_duplicate=False)],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, before):
    mods, state = snapshot(model)
    assert mods == before[0]
    assert state.keys() == before[1].keys()
    for k in state:
        assert torch.equal(state[k], before[1][k]) or (state[k].isnan() == before[1][k].isnan()).all()


# -- torch's transformer layers ---------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_layer_equals_masked_dense(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first).eval()
    x = torch.randn(3, 5, 32)
    model = copy.deepcopy(layer)
    report = sk.sparsify(model)
    assert sorted(report.converted) == ["linear1", "linear2"]
    assert "reads self.self_attn.out_proj.weight" in report.skipped["self_attn.out_proj"]
    ref = masked_reference(layer, report.converted)
    for grad in (False, True):  # no_grad is where torch's fused fast path runs
        with torch.set_grad_enabled(grad):
            assert rel_err(model(x), ref(x)) < 1e-5
    out = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first)
    sk.sparsify(out)
    out(x).sum().backward()  # trains
    assert out.linear1.values.grad is not None


def test_transformer_and_encoder_fast_path_equal_masked_dense():
    torch.manual_seed(0)
    model = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    sparse = copy.deepcopy(model)
    report = sk.sparsify(sparse)
    assert len(report.converted) == 8 and len(report.skipped) == 6  # every out_proj stays dense
    assert any("use_nested_tensor" in note for note in report.notes)
    ref = masked_reference(model, report.converted)
    with torch.no_grad():
        assert rel_err(sparse(src, tgt), ref(src, tgt)) < 1e-5
        # the encoder's nested-tensor fast path (eval, padding mask) reads weights directly
        got = sparse.encoder(src, src_key_padding_mask=pad)
        want = ref.encoder(src, src_key_padding_mask=pad)
        assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1, :4], want[1, :4]) < 1e-5
    sk.densify(sparse)
    with torch.no_grad():
        assert rel_err(sparse(src, tgt), ref(src, tgt)) < 1e-5


def test_multihead_attention_and_subclass_keep_out_proj():
    class MyAttention(nn.MultiheadAttention):
        pass

    for kind in (nn.MultiheadAttention, MyAttention):
        model = nn.ModuleDict({"attn": kind(32, 4, batch_first=True), "fc": nn.Linear(32, 32)})
        report = sk.sparsify(model)
        assert report.converted == ["fc"]
        assert "reads self.out_proj.weight directly" in report.skipped["attn.out_proj"]
        x = torch.randn(2, 3, 32)
        model["attn"](x, x, x)


def test_parent_reading_weight_directly_is_skipped():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.other = nn.Linear(16, 16)

        def forward(self, x):
            return x @ self.proj.weight.t() + self.other(x)

    model = nn.Sequential(Head())
    report = sk.sparsify(model)
    assert report.converted == ["0.other"]
    assert "Head 0 reads self.proj.weight directly" in report.skipped["0.proj"]
    model(torch.randn(2, 16))


def test_subclass_with_own_forward_is_skipped():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):  # no forward of its own: a marker subclass converts
        pass

    class Conv(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, w.abs(), b)

    model = nn.Sequential(Scaled(16, 16), Plain(16, 16), Conv(4, 4, 3))
    report = sk.sparsify(model)
    assert report.converted == ["1"]
    assert "overrides Linear's forward" in report.skipped["0"]
    assert "overrides Conv2d's forward" in report.skipped["2"]


def test_hooks_and_instance_forward_are_skipped():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16))
    model[0].register_forward_hook(lambda mod, args, out: out * 2)
    model[1].forward = lambda x: x
    report = sk.sparsify(model)
    assert report.converted == ["2"]
    assert "hooks" in report.skipped["0"] and "instance" in report.skipped["1"]


# -- tied weights ------------------------------------------------------------------------------

def test_tied_linears_become_one_shared_sparse_module():
    torch.manual_seed(0)
    a = nn.Linear(16, 16)
    b = nn.Linear(16, 16)
    b.weight, b.bias = a.weight, a.bias
    model = nn.Sequential(a, nn.ReLU(), b)
    x = torch.randn(3, 16)
    ref = masked_reference(model, ["0"])
    report = sk.sparsify(model)
    assert sorted(report.converted) == ["0", "2"]
    assert model[0] is model[2] and isinstance(model[0], sk.SparseLinear)
    assert rel_err(model(x), ref(x)) < 1e-5
    assert len(list(model.parameters())) == 2  # one values, one bias: still tied


def test_tied_weights_that_cannot_share_one_module_are_refused():
    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight = a.weight  # tied weight, own biases
    model = nn.Sequential(a, b, nn.Linear(16, 16))
    report = sk.sparsify(model)
    assert report.converted == ["2"]
    assert "tied to '1'" in report.skipped["0"] and "tied to '0'" in report.skipped["1"]

    emb = nn.Embedding(10, 16)
    head = nn.Linear(16, 10, bias=False)
    head.weight = emb.weight  # a language-model head tied to its embedding
    model = nn.ModuleDict({"emb": emb, "head": head})
    report = sk.sparsify(model)
    assert not report.converted and "tied to 'emb'" in report.skipped["head"]

    a, b = nn.Linear(16, 16), nn.Linear(16, 16)
    b.weight, b.bias = a.weight, a.bias
    report = sk.sparsify(nn.Sequential(a, b), exclude=["1"])
    assert not report.converted and "tied to '1', which is not converted (excluded)" in report.skipped["0"]


# -- atomic ------------------------------------------------------------------------------------

def model_for_atomicity():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Conv2d(4, 8, 3))


@pytest.mark.parametrize("bad", ["NaN", "inf"])
def test_nonfinite_weight_in_a_later_layer_names_it_and_changes_nothing(bad):
    model = model_for_atomicity()
    with torch.no_grad():
        model[2].weight[3, 5] = float(bad)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"layer '2': its weight has {bad}"):
        sk.sparsify(model)
    assert_unchanged(model, before)


def test_bad_scores_change_nothing():
    model = model_for_atomicity()
    before = snapshot(model)
    with pytest.raises(ValueError, match="scores names layers that are not converted"):
        sk.sparsify(model, scores={"0": torch.rand(32, 16), "nope": torch.rand(3, 3)})
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match="layer '3'"):  # wrong shape, the last layer
        sk.sparsify(model, scores={"0": torch.rand(32, 16), "3": torch.rand(3, 3)})
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"skipped: \{'0': 'excluded'\}"):
        sk.sparsify(model, exclude=["0"], scores={"0": torch.rand(32, 16)})
    assert_unchanged(model, before)
    with pytest.raises(ValueError):
        sk.sparsify(model, pattern="5:4")
    assert_unchanged(model, before)


def test_sparsify_after_pruner_mask_and_twice():
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    sk.prune.attach_mask(model[0], mask=sk.masks.nm(model[0].weight, 2, 4))
    report = sk.sparsify(model)  # a masked layer converts (its masked weight)
    assert report.converted == ["0", "1"]
    again = sk.sparsify(model)  # already sparse: nothing left to convert
    assert not again.converted and not again.skipped


def test_densify_builds_everything_before_changing_anything():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    sk.sparsify(model)
    first = model[0]

    def broken():
        raise RuntimeError("cannot decompress")

    model[2].to_dense = broken  # the last layer fails: the first must not be swapped yet
    with pytest.raises(RuntimeError, match="cannot decompress"):
        sk.densify(model)
    assert model[0] is first


def test_transformer_layer_subclass_reading_linear1_keeps_it():
    class Probe(nn.TransformerEncoderLayer):
        def forward(self, src, *args, **kwargs):
            return super().forward(src, *args, **kwargs) + self.linear1.weight.mean()

    report = sk.sparsify(Probe(32, 4, 64, batch_first=True))
    assert report.converted == ["linear2"] and "reads self.linear1.weight" in report.skipped["linear1"]
