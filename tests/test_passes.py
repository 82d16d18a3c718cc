"""The pass interface: declared pipelines, the runner's checks after every pass (common invariants
and each pass's ``ensures``), ``requires`` before a pass, and every stage's graph recorded."""

import subprocess
import sys

import pytest
import torch
import torch.fx as fx

import mpcompile
from mpcompile import passes
from mpcompile.capture import capture
from mpcompile.errors import PassError
from mpcompile.examples import EXAMPLES, batch
from mpcompile.fxutil import copy_module
from mpcompile.passes import Context, Pass
from mpcompile.passes.conditions import PRECISIONS_APPLIED
from mpcompile.policy import Policy
from mpcompile.records import NodeRecord, update

aten = torch.ops.aten
MLP = EXAMPLES["mlp"]


def _captured():
    model = MLP.build()
    x, _ = batch(MLP)
    captured = capture(model, x, {})
    return captured, Context(Policy(), "cpu", model, captured.inputs)


def _noop(gm: fx.GraphModule, ctx: Context) -> fx.GraphModule:
    return copy_module(gm)


def test_pipelines_are_declared_lists():
    assert [p.name for p in passes.FORWARD] == ["fold_matmuls", "classify", "assign", "casts",
                                                "cleanup"]
    assert [p.name for p in passes.TRAINING] == ["working_copies", "reshape_views"]
    assert [p.name for p in passes.EXECUTION] == ["kernels", "run_views"]
    assert [p.name for p in passes.EXPORT_STEP] == ["reshape_views", "decompose", "legalize"]
    assert PRECISIONS_APPLIED in passes.CASTS.ensures
    assert all(isinstance(p, Pass) and p.doc for p in (*passes.FORWARD, *passes.EXPORT_STEP))


def test_a_noop_pass_is_checked_and_recorded():
    captured, ctx = _captured()
    noop = Pass("noop", _noop, "does nothing", requires=(PRECISIONS_APPLIED,),
                ensures=(PRECISIONS_APPLIED,))
    done = passes.run((*passes.FORWARD, noop), captured.gm, ctx, first="capture")
    assert list(done.graphs) == ["capture", "fold_matmuls", "classify", "assign", "casts",
                                 "cleanup", "noop"]
    assert done.gm is done.graphs["noop"]
    assert done.gm is not done.graphs["cleanup"]
    assert [str(n.target) for n in done.gm.graph.nodes] == \
        [str(n.target) for n in done.graphs["cleanup"].graph.nodes]


def test_a_pass_that_drops_provenance_fails_naming_it():
    captured, ctx = _captured()

    def orphan(gm, ctx):
        gm = copy_module(gm)
        x = next(iter(gm.graph.find_nodes(op="placeholder")))
        with gm.graph.inserting_after(x):
            gm.graph.call_function(aten.relu.default, (x,))
        return gm

    with pytest.raises(PassError, match="stage 'orphan' created node relu.* without a provenance"):
        passes.run((*passes.FORWARD, Pass("orphan", orphan, "adds a node, no record")),
                   captured.gm, ctx)


def test_a_pass_that_breaks_its_ensures_fails_naming_pass_and_node():
    """The graph stays valid (every op accepts its dtypes), so only the pass's declared
    post-condition can catch this: a matmul (LOWER) whose record says it runs in FP32."""
    captured, ctx = _captured()

    def mislabel(gm, ctx):
        gm = copy_module(gm)
        mm = next(n for n in gm.graph.nodes if n.target is aten.addmm.default)
        update(mm, precision=torch.float32)
        return gm

    bad = Pass("mislabel", mislabel, "breaks the precision invariant",
               ensures=(PRECISIONS_APPLIED,))
    want = r"after stage 'mislabel': LOWER node addmm.* runs in float32"
    with pytest.raises(PassError, match=want):
        passes.run((*passes.FORWARD, bad), captured.gm, ctx)
    # the same pass without the declared post-condition goes through: the check is the pass's
    passes.run((*passes.FORWARD, Pass("mislabel", mislabel, "unchecked")), captured.gm, ctx)


def test_requires_is_checked_before_the_pass():
    captured, ctx = _captured()
    with pytest.raises(PassError, match="at stage 'casts'.*no precision decision"):
        passes.run((passes.CLASSIFY, passes.CASTS), captured.gm, ctx)


def test_a_stage_name_twice_is_refused():
    captured, ctx = _captured()
    with pytest.raises(PassError, match="names a stage twice"):
        passes.run((passes.CLASSIFY, passes.CLASSIFY), captured.gm, ctx)
    with pytest.raises(PassError, match="identifier"):
        Pass("no spaces", _noop, "x")


def test_the_runner_leaves_its_input_graph_alone():
    captured, ctx = _captured()
    before = captured.gm.code
    records = {n.name: n.meta["mp"] for n in captured.gm.graph.nodes}
    passes.run(passes.FORWARD, captured.gm, ctx, first="capture")
    assert captured.gm.code == before
    assert {n.name: n.meta["mp"] for n in captured.gm.graph.nodes} == records
    assert all(isinstance(r, NodeRecord) for r in records.values())


def test_convert_and_train_step_record_every_stage():
    model = MLP.build()
    x, y = batch(MLP)
    mp = mpcompile.convert(model, x, backend="eager")
    assert list(mp.stages) == ["capture", "fold_matmuls", "classify", "assign", "casts",
                               "cleanup", "kernels", "run_views"]
    assert mp.graph_module is mp.stages["cleanup"]
    assert mp.executable is mp.stages["run_views"]
    step = mpcompile.compile_train_step(model, MLP.loss, x, y,
                                        optimizer=mpcompile.optim.SGD(lr=0.1), backend="eager")
    assert list(step.stages) == ["capture", "fold_matmuls", "classify", "assign", "casts",
                                 "cleanup", "working_copies", "reshape_views", "train_step",
                                 "kernels", "run_views", "state_in_place"]
    assert step.graph_module is step.stages["train_step"]
    assert step.executable is step.stages["state_in_place"]
    assert len(step.input_names) == len(step.example_args())
    assert step.output_names[-3:] == ("loss", "loss_scale", "skipped")


def test_convert_works_without_onnx_installed():
    """``import mpcompile`` must not import onnx: a `convert` user does not need the extra."""
    code = """
import sys
for name in ("onnx", "onnxscript", "onnxruntime"):
    sys.modules[name] = None  # as if not installed: import fails, find_spec gives None
import torch, mpcompile
from mpcompile.examples import EXAMPLES, batch
MLP = EXAMPLES["mlp"]
x, y = batch(MLP)
mp = mpcompile.convert(MLP.build(), x)
mp(*x).sum().backward()
step = mpcompile.compile_train_step(MLP.build(), MLP.loss, x, y,
                                    optimizer=mpcompile.optim.SGD(lr=0.1))
step(x, y)
try:
    mpcompile.export_onnx
except ImportError as e:
    print("lazy:", e)
assert all(sys.modules[m] is None for m in ("onnx", "onnxscript", "onnxruntime"))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pip install 'mpcompile[onnx]'" in out.stdout


class _SeqFirstAttention(torch.nn.Module):
    """batch_first attention: its in-projection runs on a transposed 3-D tensor, which capture
    records as a bmm of the weight expanded over the sequence."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def test_fold_matmuls_turns_a_broadcast_weight_bmm_into_one_mm():
    """The folded graph computes the captured graph's values (FP32, float64 oracle of both)
    with no weight expanded over the batch left, and the step's backward has no bmm of it."""
    torch.manual_seed(0)
    model = _SeqFirstAttention().eval()
    x = torch.randn(3, 16, 32)
    captured = capture(model, (x,), {})
    ctx = Context(Policy(), "cpu", model, captured.inputs)
    before = captured.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default)
    assert before, "the model no longer produces the pattern this test is about"
    done = passes.run((passes.FOLD_MATMULS,), captured.gm, ctx, first="capture")
    folded = done.gm
    assert not folded.graph.find_nodes(op="call_function", target=torch.ops.aten.bmm.default)
    for e in folded.graph.find_nodes(op="call_function", target=torch.ops.aten.expand.default):
        assert e.meta["val"].numel() == e.args[0].meta["val"].numel()  # no broadcast left
    feed = [p.detach() for p in model.parameters()] + [x]
    assert len(feed) == len(captured.gm.graph.find_nodes(op="placeholder"))
    want = captured.gm(*[t.double() for t in feed])[0]
    got = folded(*[t.double() for t in feed])[0]
    assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()
    assert (folded(*feed)[0] - model(x)).abs().max().item() <= 1e-5
    step = mpcompile.compile_train_step(_SeqFirstAttention(), lambda o, t: (o - t).pow(2).mean(),
                                        x, torch.zeros(3, 16, 32),
                                        optimizer=mpcompile.optim.SGD(lr=0.1), backend="eager")
    assert not step.graph_module.graph.find_nodes(op="call_function",
                                                  target=torch.ops.aten.bmm.default)
