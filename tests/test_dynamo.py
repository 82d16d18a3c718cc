"""torch.compile(model, backend="mpcompile"): every graph Dynamo captures runs in mixed precision.

The model has a graph break between two Linear/ReLU blocks, so Dynamo hands the backend two
graphs; training through them is checked against the same model trained in FP32 eager.
"""

import copy
import importlib.metadata
import logging
import re

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.exc import BackendCompilerFailed
from torch._subclasses.fake_tensor import FakeTensorMode

from mpcompile import CaptureError, MPCompileError, Policy, PolicyError
from mpcompile.backends import inductor_unavailable
from mpcompile.dtypes import unit_roundoff
from mpcompile.dynamo import MPBackend, mpcompile_backend
from mpcompile.fxutil import is_cast, val_dtype

F16, BF16 = torch.float16, torch.bfloat16
aten = torch.ops.aten
STEPS = 4
# 16 u: the bound tests/test_train.py puts on a step against autocast. Against FP32 the updates
# measured <= 0.7 u in FP16 and <= 9.6 u in BF16 over seeds 0-3 (a ReLU input that rounds across
# zero changes that unit's gradient, not by a rounding but by all of it).
BOUND = 16
# and at least u/64 off: a run that stayed in FP32 agrees with FP32 eager to about 2^-24
FLOOR = 1 / 64
SUMMARY = re.compile(r"mpcompile: graph (\S+): (\d+)/(\d+) op nodes in (\w+)")


class TwoBlocks(nn.Module):
    """Linear+ReLU, a graph break, Linear+ReLU, Linear: two graphs for Dynamo's backend."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.out = nn.Linear(32, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        torch._dynamo.graph_break()
        return self.out(torch.relu(self.fc2(h)))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Dynamo caches compiled frames per code object: each test compiles from scratch."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _data(seed: int = 0, batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, generator=g), torch.randn(batch, 4, generator=g)


def _train(model, steps: int, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _trains_like_fp32(model: nn.Module, compiled, dtype: torch.dtype) -> None:
    """Train ``compiled`` (torch.compile of ``model``) and an FP32 eager copy; the losses and
    the parameter updates agree within BOUND unit roundoffs, and are not FP32-exact."""
    ref = copy.deepcopy(model)
    start = {k: p.detach().clone() for k, p in model.named_parameters()}
    x, y = _data()
    losses, ref_losses = _train(compiled, STEPS, x, y), _train(ref, STEPS, x, y)
    u = unit_roundoff(dtype)
    for got, want in zip(losses, ref_losses):
        assert abs(got - want) <= BOUND * u * abs(want), (losses, ref_losses)
    errors = {}
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        ours, theirs = p.detach() - start[name], ref.get_parameter(name).detach() - start[name]
        errors[name] = ((ours - theirs).norm() / theirs.norm()).item() / u
    assert max(errors.values()) <= BOUND, errors
    assert max(errors.values()) >= FLOOR, f"no low-precision rounding seen: {errors}"


def _cast_dtypes(gm: torch.fx.GraphModule) -> set[torch.dtype]:
    return {val_dtype(n) for n in gm.graph.nodes if is_cast(n)}


# --- (a) training through a graph break ------------------------------------------------------


def test_string_backend_trains_like_fp32_and_logs_each_graph(caplog):
    caplog.set_level(logging.INFO, logger="mpcompile")
    model = TwoBlocks()
    compiled = torch.compile(model, backend="mpcompile", options={"backend": "eager"})
    _trains_like_fp32(model, compiled, F16)
    found = [SUMMARY.search(r.getMessage()) for r in caplog.records if r.name == "mpcompile"]
    graphs = {m[1]: m for m in found if m}
    assert len(graphs) == 2, [r.getMessage() for r in caplog.records]  # one line per graph
    for m in graphs.values():
        assert m[4] == "float16" and int(m[2]) >= 2, m[0]  # its addmm and relu, at least


def test_backend_object_keeps_one_report_per_graph():
    model = TwoBlocks()
    backend = MPBackend(dtype=BF16, backend="eager")
    _trains_like_fp32(model, torch.compile(model, backend=backend), BF16)
    assert len(backend.subgraphs) == 2  # one graph each side of the break, no recompiles
    reports = backend.reports()
    assert [r.by_op["aten.addmm.default"] for r in reports] == [{"bfloat16": 1},
                                                                 {"bfloat16": 2}]
    assert all(r.dtype == "bfloat16" and r.casts for r in reports)
    for sub in backend.subgraphs:
        assert sub.module.execution.backend == "eager"
        assert "bfloat16" in sub.summary()


@pytest.mark.skipif(inductor_unavailable("cpu") is not None,
                    reason=f"Inductor cannot compile here: {inductor_unavailable('cpu')}")
def test_inductor_execution_trains_like_fp32():
    model = TwoBlocks()
    backend = MPBackend(backend="inductor")
    compiled = torch.compile(model, backend=backend)
    _trains_like_fp32(model, compiled, F16)
    assert len(backend.subgraphs) == 2
    for sub in backend.subgraphs:
        status = sub.module.execution
        assert status.backend == "inductor" and status.compile_seconds is not None, status
    # the code that ran is Inductor's (AOTAutograd's function), in both graphs, not the fx graph
    out = compiled(_data()[0])
    assert type(out.grad_fn).__name__ == "CompiledFunctionBackward"
    assert "CompiledFunctionBackward" in {type(f).__name__ for f, _ in out.grad_fn.next_functions}


# --- (b) options reach every graph ------------------------------------------------------------


@pytest.mark.parametrize("given,low", [(F16, F16), (BF16, BF16), ("bf16", BF16)],
                         ids=["float16", "bfloat16", "name"])
def test_dtype_option_reaches_every_graph(given, low, capsys):
    other = BF16 if low is F16 else F16
    model = TwoBlocks()
    backend = MPBackend(dtype=given, backend="eager")
    torch.compile(model, backend=backend)(_data()[0])
    assert len(backend.subgraphs) == 2
    for sub in backend.subgraphs:
        assert _cast_dtypes(sub.module.graph_module) == {low, torch.float32}
    torch._dynamo.reset()
    # the same through torch.compile(options=...): each graph's report is printed
    torch.compile(TwoBlocks(), backend="mpcompile",
                  options={"dtype": given, "backend": "eager", "report": True})(_data()[0])
    printed = capsys.readouterr().out
    name, other_name = str(low).removeprefix("torch."), str(other).removeprefix("torch.")
    assert printed.count(f"mpcompile report: GraphModule, {name} on cpu") == 2, printed
    assert not re.search(rf"\b{other_name}\b", printed), printed


def test_policy_options_reach_every_graph(capsys):
    options = {"backend": "eager", "fp32": [aten.relu.default], "strategy": "local",
               "report": True}
    torch.compile(TwoBlocks(), backend="mpcompile", options=options)(_data()[0])
    printed = capsys.readouterr().out
    assert printed.count("strategy local") == 2, printed
    relu_rows = re.findall(r"aten\.relu\.default\s+(\S+)\s+(\S+)", printed)
    assert relu_rows == [("-", "1"), ("-", "1")]  # no float16 relu, one float32 per graph
    backend = MPBackend(policy=Policy(fp32=[aten.relu.default], strategy="local"),
                        backend="eager")
    torch.compile(TwoBlocks(), backend=backend)(_data()[0])
    assert [r.by_op["aten.relu.default"] for r in backend.reports()] == [{"float32": 1}] * 2


# --- (c) bad options --------------------------------------------------------------------------


BAD = [
    ({"dtyp": F16}, MPCompileError, "unknown mpcompile option.*'dtyp'"),
    ({"backend": "tvm"}, MPCompileError, "option 'backend'='tvm'"),
    ({"dtype": "fp8"}, MPCompileError, "option 'dtype'='fp8'"),
    ({"dtype": torch.int8}, PolicyError, r"Policy\(dtype=torch.int8\)"),
    ({"strategy": "greedy"}, PolicyError, r"Policy\(strategy='greedy'\)"),
    ({"report": "yes"}, MPCompileError, "option 'report'='yes'"),
    ({"keep_fp32_modules": ["fc1"]}, MPCompileError, "option 'keep_fp32_modules'"),
    ({"policy": "fp16"}, MPCompileError, "option 'policy' must be an mpcompile.Policy"),
    ({"policy": Policy(), "dtype": BF16}, MPCompileError, "'dtype' conflict with option"),
]


@pytest.mark.parametrize("options,error,match", BAD, ids=[
    "unknown", "backend", "dtype-name", "dtype-int8", "strategy", "report", "module-pins",
    "policy-type", "policy-and-dtype"])
def test_bad_option_is_named(options, error, match):
    with pytest.raises(error, match=match):
        MPBackend(**options)
    compiled = torch.compile(TwoBlocks(), backend="mpcompile", options=dict(options))
    with pytest.raises(BackendCompilerFailed, match=match) as info:
        compiled(_data()[0])
    assert isinstance(info.value.inner_exception, error)


def test_torch_compile_arguments_that_mean_nothing_here_are_refused():
    with pytest.raises(BackendCompilerFailed, match="mode='max-autotune'"):
        torch.compile(TwoBlocks(), backend="mpcompile", mode="max-autotune")(_data()[0])
    torch._dynamo.reset()
    compiled = torch.compile(TwoBlocks(), backend=MPBackend(), options={"dtype": BF16})
    with pytest.raises(BackendCompilerFailed, match=r"MPBackend\(dtype=...\)"):
        compiled(_data()[0])


# --- (d) the entry point -----------------------------------------------------------------------


def test_entry_point_resolves():
    eps = importlib.metadata.entry_points(group="torch_dynamo_backends")
    assert eps["mpcompile"].value == "mpcompile.dynamo:mpcompile_backend"
    assert "mpcompile" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("mpcompile") is mpcompile_backend


# --- what Dynamo hands over: symbolic sizes, fake tensors, lifted buffers ----------------------


def test_dynamic_shapes_capture_each_size_on_its_first_call():
    model = TwoBlocks()
    backend = MPBackend(backend="eager")
    compiled = torch.compile(model, backend=backend)
    for batch in (8, 5, 3):  # 5: Dynamo recompiles with a symbolic batch size (a SymInt input)
        x = _data(batch=batch)[0]
        torch.testing.assert_close(compiled(x), model(x), rtol=BOUND * unit_roundoff(F16),
                                   atol=BOUND * unit_roundoff(F16))
    assert len(backend.subgraphs) == 4  # static graphs, then dynamic ones
    assert [len(s.module.programs) for s in backend.subgraphs] == [1, 1, 2, 2]


def test_fake_example_inputs_wait_for_the_first_call():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(16, 8), nn.ReLU()))
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(8, 16))
    sub = MPBackend(backend="eager")(gm, [fake])
    assert not sub.compiled
    x = _data()[0]
    got = sub(x)
    assert sub.compiled and got.dtype == torch.float32
    torch.testing.assert_close(got, gm(x), rtol=BOUND * unit_roundoff(F16),
                               atol=BOUND * unit_roundoff(F16))


def test_buffer_updated_in_place_is_a_clear_error():
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8)).train()
    compiled = torch.compile(model, backend="mpcompile", options={"backend": "eager"})
    with pytest.raises(CaptureError, match=r"(?s)graph 0/0.*in place.*mpcompile\.convert"):
        compiled(_data()[0])
