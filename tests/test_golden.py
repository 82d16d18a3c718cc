"""Golden graphs for each stage: ``before`` is a small module, ``expected`` a Python function of
ATen calls, compared as canonical (op, dtype) lists."""

import pytest
import torch
import torch.nn as nn
from golden import canonical, classes, labels, stages, stamp, trace

from mpcompile.checks import check
from mpcompile.passes import Context, cleanup
from mpcompile.policy import Policy
from mpcompile.records import record

aten = torch.ops.aten
f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32


def cast(x, dt):
    return aten._to_copy.default(x, dtype=dt)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_classify_two_layer():
    gm = stages(TwoLayer(), torch.randn(2, 4))["classify"]
    assert classes(gm) == sorted([
        ("aten.permute.default", "PASSTHROUGH"), ("aten.addmm.default", "LOWER"),
        ("aten.relu.default", "FOLLOW"),
        ("aten.permute.default", "PASSTHROUGH"), ("aten.addmm.default", "LOWER"),
    ])


@pytest.mark.parametrize("low", [f16, bf16], ids=str)
def test_casts_two_layer(low):
    def expected(w1, b1, w2, b2, x):
        w1, b1, w2, b2, x = (cast(t, low) for t in (w1, b1, w2, b2, x))
        h = aten.relu.default(aten.addmm.default(b1, x, aten.permute.default(w1, [1, 0])))
        y = aten.addmm.default(b2, h, aten.permute.default(w2, [1, 0]))
        return (cast(y, f32),)

    m, x = TwoLayer(), torch.randn(2, 4)
    got = stages(m, x, policy=Policy(dtype=low))["cleanup"]
    want = trace(expected, m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, x)
    assert canonical(got) == canonical(want)


class Broadcast(nn.Module):
    """A small input broadcast 64x before a matmul: where the cast goes matters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(16, 32))

    def forward(self, x):  # x: [4, 16]
        y = x.unsqueeze(1).expand(4, 64, 16) * 2.0
        return y.reshape(256, 16) @ self.w


def test_assign_casts_before_the_broadcast():
    st = stages(Broadcast(), torch.randn(4, 16))
    assert labels(st["assign"]) == sorted([
        ("aten.unsqueeze.default", "float16"), ("aten.expand.default", "float16"),
        ("aten.mul.Tensor", "float16"), ("aten.view.default", "float16"),
        ("aten.mm.default", "float16"),
    ])

    def expected(w, x):
        y = aten.mul.Tensor(aten.expand.default(aten.unsqueeze.default(cast(x, f16), 1),
                                                [4, 64, 16]), 2.0)
        return (cast(aten.mm.default(aten.view.default(y, [256, 16]), cast(w, f16)), f32),)

    m, x = Broadcast(), torch.randn(4, 16)
    assert canonical(st["cleanup"]) == canonical(trace(expected, m.w, x))


def test_local_strategy_casts_after_the_broadcast():
    st = stages(Broadcast(), torch.randn(4, 16), policy=Policy(strategy="local"))
    assert labels(st["assign"]) == sorted([
        ("aten.unsqueeze.default", "float32"), ("aten.expand.default", "float32"),
        ("aten.mul.Tensor", "float32"), ("aten.view.default", "float32"),
        ("aten.mm.default", "float16"),
    ])

    def expected(w, x):
        y = aten.mul.Tensor(aten.expand.default(aten.unsqueeze.default(x, 1), [4, 64, 16]), 2.0)
        y = cast(aten.view.default(y, [256, 16]), f16)
        return (cast(aten.mm.default(y, cast(w, f16)), f32),)

    m, x = Broadcast(), torch.randn(4, 16)
    assert canonical(st["cleanup"]) == canonical(trace(expected, m.w, x))


class Pinned(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def test_pinned_module_runs_fp32():
    m, x = Pinned(), torch.randn(3, 8)
    st = stages(m, x, policy=Policy(keep_fp32_modules=["head"]))

    def expected(wb, bb, wh, bh, x):
        h = aten.addmm.default(cast(bb, f16), cast(x, f16),
                               aten.permute.default(cast(wb, f16), [1, 0]))
        h = aten.relu.default(h)  # min-cut: one cast after relu either way; ties go low
        return (aten.addmm.default(bh, cast(h, f32), aten.permute.default(wh, [1, 0])),)

    got = st["cleanup"]
    assert canonical(got) == canonical(trace(expected, m.body.weight, m.body.bias,
                                             m.head.weight, m.head.bias, x))
    head = [n for n in got.graph.nodes if record(n).module == "head"
            and n.op == "call_function" and record(n).created_by == "capture"]
    assert head and all(record(n).pin == "'head' (module 'head')" for n in head)


class UserCasts(nn.Module):
    """The model's own casts: fp16 input widened then narrowed around a relu."""

    def forward(self, x16):
        return torch.relu(x16.float()).half()


def test_identity_casts_from_retargeting_are_removed():
    x = torch.randn(4, 4).half()
    st = stages(UserCasts(), x)
    # before cleanup: the model's two casts, the first retargeted to float16 (an identity)
    assert [str(n.kwargs["dtype"]) for n in st["casts"].graph.nodes
            if n.target is aten._to_copy.default] == ["torch.float16", "torch.float16"]
    assert canonical(st["cleanup"]) == canonical(trace(lambda x: (aten.relu.default(x),), x))


def _ctx():
    return Context(Policy(), "cpu", nn.Module(), ())


def test_cleanup_folds_exact_chains_only():
    def before(x16, x32):
        exact = cast(cast(x16, f32), f16)  # f16 -> f32 -> f16: identity
        via = cast(cast(x16, f32), bf16)  # f16 -> f32 -> bf16 == f16 -> bf16
        lossy = cast(cast(x32, f16), f32)  # a real rounding: stays
        dup = cast(x32, f16)  # the same cast as inside `lossy`: shared
        unused = cast(x32, bf16)  # noqa: F841 - dead: dropped
        return (aten.mm.default(exact, exact), via, lossy, dup)

    def expected(x16, x32):
        r = cast(x32, f16)
        return (aten.mm.default(x16, x16), cast(x16, bf16), cast(r, f32), r)

    x16, x32 = torch.randn(3, 3).half(), torch.randn(3, 3)
    gm = check(stamp(trace(before, x16, x32)), "test")
    got = check(cleanup.run(gm, _ctx()), "cleanup")
    assert canonical(got) == canonical(trace(expected, x16, x32))
