import collections
import copy
import dataclasses
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpcompile
from mpcompile import (
    BannedOpError,
    CaptureError,
    MPCompileError,
    Policy,
    PolicyError,
    SignatureError,
    UnknownNodeError,
)
from mpcompile.examples import CNN, EXAMPLES, MLP, batch
from mpcompile.explain import diff_stages
from mpcompile.fxutil import is_cast
from mpcompile.records import record

aten = torch.ops.aten


def _cnn():
    ex = EXAMPLES["cnn"]
    return ex.build(), batch(ex)[0][0]


# --- the module is the FP32 masters ----------------------------------------------------------


def test_parameters_and_state_dict_are_the_originals():
    model, x = _cnn()
    mp = mpcompile.convert(model, x, backend="eager")
    assert [id(p) for p in mp.parameters()] == [id(p) for p in model.parameters()]
    assert list(mp.state_dict()) == list(model.state_dict())
    assert all(p.dtype == torch.float32 for p in mp.parameters())
    fresh = CNN()
    fresh.load_state_dict(mp.state_dict())  # loads into the original class as is
    mp.load_state_dict(fresh.state_dict())


def test_gradients_reach_the_fp32_masters_and_match_fp32():
    model, x = _cnn()
    ref = copy.deepcopy(model)
    mp = mpcompile.convert(model, x, dtype=torch.float16, backend="eager")
    mp(x).square().mean().backward()
    ref(x).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        rel = ((p.grad - q.grad).norm() / q.grad.norm()).item()
        assert rel < 0.02, f"{name}: gradient off by {rel:.4f}"


def test_frozen_submodule_modes_survive_capture():
    model, x = _cnn()
    model.train()
    model.bn1.eval()  # a user's frozen batch norm
    mp = mpcompile.convert(model, x, backend="eager")
    assert model.training and not model.bn1.training and model.bn2.training
    before = model.bn1.running_mean.clone()
    mp(x)
    assert torch.equal(model.bn1.running_mean, before)  # frozen: eval-mode batch norm
    assert model.bn2.num_batches_tracked.item() == 1
    model.bn1.train()  # unfreezing it is a new graph
    mp(x)
    assert not torch.equal(model.bn1.running_mean, before)  # recaptured, replacing the old


def test_batchnorm_running_stats_follow_train_and_eval():
    model, x = _cnn()
    ref = copy.deepcopy(model)
    mp = mpcompile.convert(model, x, backend="eager")
    mp.train(), ref.train()
    for _ in range(3):
        mp(x), ref(x)
    assert model.bn1.num_batches_tracked.item() == 3
    torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean, rtol=2e-3,
                               atol=2e-3)
    torch.testing.assert_close(model.bn1.running_var, ref.bn1.running_var, rtol=2e-3,
                               atol=2e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mp.eval()
    assert not model.training and not model.bn1.training
    with torch.no_grad():
        out = mp(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"eval changed {k}"
    torch.testing.assert_close(out, ref.eval()(x), rtol=0.02, atol=0.02)
    assert len(mp.programs) == 2  # one graph for train, one for eval


# --- signatures and recapture --------------------------------------------------------------


def test_lazy_capture_and_recapture_on_new_shapes():
    model = MLP()
    mp = mpcompile.convert(model, backend="eager")
    with pytest.raises(MPCompileError, match="nothing is compiled yet"):
        _ = mp.graph_module
    mp(torch.randn(4, 32))
    mp(torch.randn(6, 32))
    mp(torch.randn(4, 32))
    assert len(mp.programs) == 2


def test_cache_is_bounded():
    mp = mpcompile.convert(MLP(), cache_size=1, backend="eager")
    for b in (2, 3, 4):
        mp(torch.randn(b, 32))
    assert len(mp.programs) == 1


def test_signature_mismatch_without_recapture_names_the_argument():
    mp = mpcompile.convert(MLP(), torch.randn(4, 32), recapture=False, backend="eager")
    with pytest.raises(SignatureError, match=r"args\[0\] is float32\[5, 32\] on cpu, captured as "
                                             r"float32\[4, 32\]"):
        mp(torch.randn(5, 32))
    with pytest.raises(SignatureError, match="mode is eval, captured in train"):
        mp.eval()(torch.randn(4, 32))
    with pytest.raises(SignatureError, match="structure"):
        mp.train()(torch.randn(4, 32), torch.randn(4, 32))


class ShapeBranch(nn.Module):
    """Fine for one shape, uncapturable for another (data-dependent branch)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 2 and x.sum() > 0:
            return self.fc(x)
        return self.fc(x) * 2


def test_recapture_failure_is_a_signature_error():
    mp = mpcompile.convert(ShapeBranch(), torch.randn(2, 4), backend="eager")
    with pytest.raises(SignatureError, match=r"got new inputs \(args\[0\] is float32\[3, 4\]"):
        mp(torch.randn(3, 4))


# --- output structures -----------------------------------------------------------------------


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: tuple
    step: int = 3


Pair = collections.namedtuple("Pair", "a b")


class Structured(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = self.fc(x) * scale
        if mask is not None:
            h = h * mask
        return Out(h, (Pair(h.relu(), None), {"sum": h.sum(-1)}))


def test_output_structure_and_dtypes_are_kept():
    m = Structured()
    x, mask = torch.randn(3, 4), torch.ones(3, 4)
    mp = mpcompile.convert(m, x, example_kwargs={"mask": mask, "scale": 2.0}, backend="eager")
    got, ref = mp(x, mask=mask, scale=2.0), m(x, mask=mask, scale=2.0)
    assert isinstance(got, Out) and isinstance(got.hidden[0], Pair)
    assert got.step == 3 and got.hidden[0].b is None and set(got.hidden[1]) == {"sum"}
    assert got.logits.dtype == got.hidden[1]["sum"].dtype == torch.float32
    torch.testing.assert_close(got.logits, ref.logits, rtol=5e-3, atol=5e-3)
    # a new kwargs signature (no mask, default scale): a second program, the same output type
    # and the model's values for that call, not the first program's
    got2, ref2 = mp(x), m(x)
    assert len(mp.programs) == 2
    assert isinstance(got2, Out) and isinstance(got2.hidden[0], Pair) and got2.step == 3
    torch.testing.assert_close(got2.logits, ref2.logits, rtol=5e-3, atol=5e-3)
    torch.testing.assert_close(got2.hidden[1]["sum"], ref2.hidden[1]["sum"], rtol=5e-3,
                               atol=5e-3)


# --- errors ----------------------------------------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.mean() > 0:  # a branch on a tensor's value
            return y
        return -y


def test_data_dependent_control_flow_is_a_capture_error_and_changes_nothing():
    m = DataDependent().train()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(CaptureError, match=r"(?s)could not capture DataDependent at test_api.py:"
                                           r"\d+ in forward: `if y.mean\(\) > 0:.*torch\.where"):
        mpcompile.convert(m, torch.randn(2, 4), backend="eager")
    assert m.training
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


class MutatesInput(nn.Module):
    def forward(self, x):
        x.mul_(2)
        return x + 1


def test_input_mutation_is_a_capture_error():
    with pytest.raises(CaptureError, match="modifies its input"):
        mpcompile.convert(MutatesInput(), torch.randn(2, 2), backend="eager")


class OddOutput(nn.Module):
    def forward(self, x):
        return {"a": x + 1, "b": object()}


def test_unflattenable_output_names_its_path():
    with pytest.raises(CaptureError, match=r"output\['b'\] is a object"):
        mpcompile.convert(OddOutput(), torch.randn(2, 2), backend="eager")


class Probabilities(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 1)

    def forward(self, x, y):
        return F.binary_cross_entropy(torch.sigmoid(self.head(x)), y)


def test_banned_op_names_node_module_and_fix():
    x, y = torch.randn(5, 4), torch.rand(5, 1)
    with pytest.raises(BannedOpError, match=r"(?s)binary_cross_entropy.*module '<model>'.*"
                                            r"BCEWithLogitsLoss"):
        mpcompile.convert(Probabilities(), (x, y), backend="eager")
    # the user moves it to FP32: allowed, and it runs in FP32
    mp = mpcompile.convert(Probabilities(), (x, y),
                           policy=Policy(fp32=[aten.binary_cross_entropy.default]), backend="eager")
    (bce,) = [n for n in mp.graph_module.graph.nodes
              if n.target is aten.binary_cross_entropy.default]
    assert record(bce).precision == torch.float32


def test_policy_errors_through_convert():
    with pytest.raises(PolicyError, match="is a string"):
        mpcompile.convert(MLP(), torch.randn(2, 32), policy=Policy(lower=["addmm"]),
                          backend="eager")
    with pytest.raises(PolicyError, match="conflicts with policy.dtype"):
        mpcompile.convert(MLP(), torch.randn(2, 32), dtype=torch.bfloat16, policy=Policy(),
                          backend="eager")
    mp = mpcompile.convert(MLP(), backend="eager")
    with pytest.raises(MPCompileError, match="already converted"):
        mpcompile.convert(mp, backend="eager")


# --- policy knobs ------------------------------------------------------------------------------


def test_fp32_policy_matches_fp32_model():
    model, x = _cnn()
    mp = mpcompile.convert(copy.deepcopy(model).eval(), x, dtype=torch.float32, backend="eager")
    assert not [n for n in mp.graph_module.graph.nodes if is_cast(n)]
    with torch.no_grad():
        torch.testing.assert_close(mp(x), model.eval()(x), rtol=1e-5, atol=1e-6)


def test_strict_reductions_and_class_pins():
    ex = EXAMPLES["transformer"]
    model, (tokens,) = ex.build(), batch(ex)[0]
    mp = mpcompile.convert(model, tokens, policy=Policy(strict_reductions=True,
                                                        keep_fp32_modules=[nn.LayerNorm]),
                                                        backend="eager")
    lns = [n for n in mp.graph_module.graph.nodes if n.target is aten.native_layer_norm.default]
    assert len(lns) == 3 and all(record(n).precision == torch.float32 for n in lns)
    assert all(record(n).pin == "LayerNorm (module 'ln1')" for n in lns[:1])


class UsesHypot(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.hypot(self.fc(x), x)


def test_ops_missing_from_the_table_run_fp32_and_are_reported():
    mp = mpcompile.convert(UsesHypot(), torch.randn(3, 4), backend="eager")
    (h,) = [n for n in mp.graph_module.graph.nodes if n.target is aten.hypot.default]
    assert record(h).precision == torch.float32 and record(h).class_source == "default"
    rep = mp.report(measure=False)
    assert rep.defaulted == {"aten.hypot.default": ["hypot"]}
    assert "aten.hypot.default: hypot" in str(rep)


# --- inspection --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cnn", "transformer"])
def test_report_cast_bytes_not_above_local_or_autocast(name):
    ex = EXAMPLES[name]
    mp = mpcompile.convert(ex.build().train(), batch(ex)[0], backend="eager")
    rep = mp.report()
    m = rep.measured
    ours, local, auto = m["mpcompile (min-cut)"], m["local strategy"], m["torch.autocast"]
    for part in ("forward_bytes", "backward_bytes"):
        assert getattr(ours, part) <= getattr(local, part)
        assert getattr(ours, part) <= getattr(auto, part)
    assert ours.forward_bytes == rep.cast_bytes  # the graph's casts are what runs
    text = str(rep)
    assert "torch.autocast" in text and "local strategy" in text
    assert text.splitlines()[1].startswith("Converted ")
    d = rep.as_dict()
    assert d["cast_bytes"] == rep.cast_bytes and "measured" in d and "by_op" in d


def test_explain_every_kind_of_node():
    ex = EXAMPLES["transformer"]
    mp = mpcompile.convert(ex.build(), batch(ex)[0],
                           policy=Policy(keep_fp32_modules=["head"]), backend="eager")
    nodes = {n.name: n for n in mp.graph_module.graph.nodes}
    # the attention's projections on a 3-D input came as bmm of an expanded weight: one mm now
    lower = next(n for n in nodes.values() if n.target is aten.mm.default
                 and record(n).created_by == "fold_matmuls")
    assert "LOWER (table): dot product" in mp.explain(lower.name)
    assert "created by: fold_matmuls" in mp.explain(lower.name)
    ln = next(n for n in nodes.values() if n.target is aten.native_layer_norm.default)
    text = mp.explain(ln.name)
    assert "min-cut chose float16" in text and " B as float32" in text
    assert "kept FP32:  arguments weight, bias" in text and "module:     ln1" in text
    cast = next(n for n in nodes.values() if is_cast(n))
    assert "created by: casts" in mp.explain(cast.name)
    head = next(n for n in nodes.values() if record(n).module == "head"
                and n.target is aten.addmm.default)
    assert "pinned to FP32 by keep_fp32_modules 'head'" in mp.explain(head.name)
    assert "parameter tok.weight" in mp.explain("p_tok_weight")
    with pytest.raises(UnknownNodeError, match="Did you mean: .*native_layer_norm"):
        mp.explain("native_layer_nrm")


def test_dot_and_stage_diff(tmp_path):
    mp = mpcompile.convert(MLP(), torch.randn(2, 32), backend="eager")
    dot = mp.to_dot(tmp_path / "g.dot")
    assert dot.startswith('digraph "MLP"') and "#9fd89f" in dot and "#ffe08a" in dot
    assert (tmp_path / "g.dot").read_text() == dot
    if shutil.which("dot"):
        assert (tmp_path / "g.svg").exists()
    assert list(mp.stages) == ["capture", "fold_matmuls", "classify", "assign", "casts",
                               "cleanup", "kernels", "run_views"]
    diff = diff_stages(mp.program, "assign", "casts")
    assert "+" in diff and "_to_copy" in diff


def test_to_png_draws_every_node_and_use_coloured_by_precision(tmp_path):
    pytest.importorskip("matplotlib")
    from mpcompile.explain import to_graph
    from mpcompile.fxutil import arg_slots

    ex = EXAMPLES["cnn"]
    x, _ = batch(ex)
    mp = mpcompile.convert(ex.build(), x, dtype=torch.float16, backend="eager")
    path = mp.to_png(tmp_path / "g.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    g = to_graph(mp.program)
    nodes = list(mp.graph_module.graph.nodes)
    assert set(g.nodes) == {n.name for n in nodes}
    assert g.number_of_edges() == len({(a.name, n.name) for n in nodes
                                       for _, _, a in arg_slots(n)})
    # a float16 convolution is green, a cast yellow, an input blue (to_dot's colours)
    colour = {n: g.nodes[n]["colour"] for n in g}
    import re

    dot_colour = dict(re.findall(r'^  "([^"]+)" \[label=.*fillcolor="([^"]+)"\];$', mp.to_dot(),
                                 re.M))
    assert dot_colour == colour
    conv = next(n for n in nodes if "convolution" in str(n.target))
    assert colour[conv.name] == "#9fd89f"
