"""The min-cut assignment is exact: on random graphs it matches a brute-force search over every
labelling of the free ops (fewest cast bytes, then most float32 traffic saved), it is never worse
than the local strategy, and strictly better where a cast can move to a smaller tensor."""

import itertools
import random

import pytest
import torch
import torch.nn as nn
from golden import stages
from test_golden import Broadcast

from mpcompile.api import compile_program
from mpcompile.costmodel import F32, CastModel
from mpcompile.examples import EXAMPLES, batch
from mpcompile.fxutil import copy_module, is_cast
from mpcompile.passes import Context, assign
from mpcompile.policy import Policy
from mpcompile.records import record

B, D = 4, 8


class RandomNet(nn.Module):
    """A random DAG over matmuls (LOWER), point-wise ops (FOLLOW), exp (FP32), softmax/mean
    (FP32_ACCUM), cat/slice/expand (PASSTHROUGH), with tensors of different sizes."""

    OPS = ("mm", "relu", "add", "exp", "softmax", "catslice", "wide", "mul")
    WEIGHTS = (4, 1, 2, 3, 1, 1, 2, 1)  # enough LOWER and FP32 ops to make casts matter

    def __init__(self, seed: int, n_ops: int):
        super().__init__()
        rng = random.Random(seed)
        self.recipe = [(rng.choices(self.OPS, self.WEIGHTS)[0], rng.randrange(i + 1),
                        rng.randrange(i + 1)) for i in range(n_ops)]
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(D, D) * 0.3)
        self.outs = sorted({n_ops, rng.randrange(1, n_ops + 1)})

    def forward(self, x):
        vals = [x]
        for op, i, j in self.recipe:
            a, b = vals[i], vals[j]
            if op == "mm":
                v = a @ self.w
            elif op == "relu":
                v = torch.relu(a)
            elif op == "add":
                v = a + b
            elif op == "exp":
                v = torch.exp(a.clamp(max=4))
            elif op == "softmax":
                v = a.softmax(-1)
            elif op == "catslice":
                v = torch.cat([a, b], -1)[:, 1:D + 1]
            elif op == "wide":  # a 16x bigger intermediate, reduced again
                v = (a.unsqueeze(1).expand(B, 16, D) * 0.5).mean(1)
            else:
                v = a * b
            vals.append(v)
        return tuple(vals[k] for k in self.outs)


def _problem(model, x, low=torch.float16):
    st = stages(model, x, policy=Policy(dtype=low))
    gm = copy_module(st["classify"])
    cm = CastModel(gm, low)
    ctx = Context(Policy(dtype=low), "cpu", model, ())
    fixed, free = assign.fix(gm, cm, ctx)
    return cm, {n: d for n, (d, _, _) in fixed.items()}, free


def _saved(cm, labels, free):
    return sum(cm.traffic_saved(v) for v in free if labels[v] is not F32)


@pytest.mark.parametrize("seed", range(12))
def test_mincut_matches_brute_force(seed):
    model = RandomNet(seed, n_ops=9)
    x = torch.randn(B, D)
    cm, fixed, free = _problem(model, x)
    assert len(free) <= 14
    best = None
    for bits in itertools.product((cm.low, F32), repeat=len(free)):
        labels = {**fixed, **dict(zip(free, bits))}
        key = (cm.cast_bytes(labels), -_saved(cm, labels, free))
        best = key if best is None or key < best else best
    labels = {**fixed, **assign.mincut(cm, free, fixed)}
    assert (cm.cast_bytes(labels), -_saved(cm, labels, free)) == best


def _graph_cast_bytes(gm):
    return sum(int(n.meta["val"].numel()) * (n.args[0].meta["val"].dtype.itemsize
                                              + n.meta["val"].dtype.itemsize)
               for n in gm.graph.nodes if is_cast(n) and record(n).created_by == "casts")


def _both(model, args, low=torch.float16):
    out = {}
    for strategy in ("mincut", "local"):
        st = compile_program(model, args, {}, Policy(dtype=low, strategy=strategy)).stages
        out[strategy] = _graph_cast_bytes(st["cleanup"])
    return out


@pytest.mark.parametrize("seed", range(12, 30))
def test_never_worse_than_local_on_random_graphs(seed):
    b = _both(RandomNet(seed, n_ops=10), (torch.randn(B, D),))
    assert b["mincut"] <= b["local"]


# default run: each model in one dtype, alternating (both dtypes covered); -m slow: all
@pytest.mark.parametrize("name,low", [
    (n, low) if (i + k) % 2 == 0 else pytest.param(n, low, marks=pytest.mark.slow)
    for i, n in enumerate(sorted(EXAMPLES))
    for k, low in enumerate((torch.float16, torch.bfloat16))], ids=str)
def test_never_worse_than_local_on_examples(name, low):
    ex = EXAMPLES[name]
    b = _both(ex.build(), batch(ex)[0], low)
    assert b["mincut"] <= b["local"]


def test_strictly_better_where_the_cast_can_move():
    b = _both(Broadcast(), (torch.randn(4, 16),))
    # min-cut casts the [4,16] input (64 elements); local casts the [256,16] broadcast
    assert b["mincut"] < b["local"]
    assert b["local"] - b["mincut"] == (256 * 16 - 4 * 16) * 6


def test_strictly_better_on_the_transformer_residual_stream():
    ex = EXAMPLES["transformer"]
    b = _both(ex.build(), batch(ex)[0])
    assert b["mincut"] < b["local"]


def test_cast_nodes_are_exactly_the_cost_model():
    """The cast pass inserts what the assignment's objective counted, no more."""
    ex = EXAMPLES["cnn"]
    model = ex.build()
    st = stages(model, *batch(ex)[0])
    cm = CastModel(copy_module(st["assign"]), torch.float16)
    labels = {n: record(n).precision for n in cm.gm.graph.nodes
              if n.op == "call_function" and record(n).precision is not None}
    assert cm.cast_bytes(labels) == _graph_cast_bytes(st["cleanup"])
