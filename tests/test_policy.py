import pytest
import torch

import mpcompile
from mpcompile import Entry, OpClass, Policy, PolicyError
from mpcompile.examples import MLP
from mpcompile.policy import DEFAULT_TABLE, index_table

aten = torch.ops.aten


def test_default_table_is_consistent():
    index = index_table(DEFAULT_TABLE)
    assert index[aten.mm.default].op_class is OpClass.LOWER
    assert index[aten.convolution.default].op_class is OpClass.LOWER
    assert index[aten._log_softmax.default].op_class is OpClass.FP32
    assert index[aten.sum.dim_IntList].op_class is OpClass.FP32
    assert index[aten._softmax.default].op_class is OpClass.FP32_ACCUM
    assert index[aten.view.default].op_class is OpClass.PASSTHROUGH
    assert index[aten.relu.default].op_class is OpClass.FOLLOW
    assert index[aten.binary_cross_entropy.default].op_class is OpClass.BANNED
    for entry in DEFAULT_TABLE:
        assert entry.reason


def test_conflicting_entries_fail():
    with pytest.raises(PolicyError, match="conflicting policy entries for aten.mm.default"):
        index_table([Entry(aten.mm, OpClass.LOWER, "a"), Entry(aten.mm.default, OpClass.FP32,
                                                                "b")])


@pytest.mark.parametrize("bad,match", [
    ("mm", "is a string"),
    (torch.mm, "is not an ATen op"),
    (torch.ops.prims.add.default, "not in the aten namespace"),
])
def test_unknown_entries_fail(bad, match):
    with pytest.raises(PolicyError, match=match):
        Policy(lower=[bad])


def test_entry_validation():
    with pytest.raises(PolicyError, match="needs proven_on"):
        Entry(aten._softmax.default, OpClass.FP32_ACCUM, "x")
    with pytest.raises(PolicyError, match="proven_on only applies"):
        Entry(aten.mm.default, OpClass.LOWER, "x", proven_on=frozenset({("cpu", torch.half)}))
    with pytest.raises(PolicyError, match="not arguments of"):
        Entry(aten.mm.default, OpClass.LOWER, "x", fp32_args=("weight",))
    with pytest.raises(PolicyError, match="give a reason"):
        Entry(aten.mm.default, OpClass.LOWER, " ")


def test_user_lists_conflict():
    with pytest.raises(PolicyError, match=r"in Policy\(lower=...\) and Policy\(fp32=...\)"):
        Policy(lower=[aten.mm.default], fp32=[aten.mm])


def test_user_override_wins_and_says_so():
    p = Policy(fp32=[aten.mm.default], follow=[aten.exp])
    r = p.rule(aten.mm.default, "cpu")
    assert r.op_class is OpClass.FP32 and r.source == "user"
    assert p.rule(aten.exp.default, "cpu").op_class is OpClass.FOLLOW
    assert p.rule(aten.addmm.default, "cpu").op_class is OpClass.LOWER


def test_unknown_op_defaults_to_fp32_with_reason():
    r = Policy().rule(aten.cholesky.default, "cpu")
    assert r.op_class is OpClass.FP32 and r.source == "default"
    assert "not in the policy table" in r.reason


def test_fp32_accum_depends_on_proof_and_strictness():
    assert Policy().rule(aten._softmax.default, "cpu").op_class is OpClass.FP32_ACCUM
    unproven = Policy().rule(aten._softmax.default, "cuda")
    assert unproven.op_class is OpClass.FP32 and "not proven on cuda" in unproven.reason
    strict = Policy(strict_reductions=True).rule(aten._softmax.default, "cpu")
    assert strict.op_class is OpClass.FP32 and strict.source == "strict_reductions"


def test_bad_dtype_strategy_and_pins():
    with pytest.raises(PolicyError, match="torch.float16 or torch.bfloat16"):
        Policy(dtype=torch.int8)
    with pytest.raises(PolicyError, match="strategy"):
        Policy(strategy="greedy")
    with pytest.raises(PolicyError, match="not a valid regular expression"):
        Policy(keep_fp32_modules=["fc("])
    with pytest.raises(PolicyError, match="not an nn.Module class"):
        Policy(keep_fp32_modules=[int])


def test_pin_must_match_a_module():
    model = MLP()
    with pytest.raises(PolicyError, match="matches no module of MLP; module paths are: fc1, fc2"):
        mpcompile.convert(model, torch.randn(2, 32), policy=Policy(keep_fp32_modules=["fc3"]),
                          backend="eager")


def test_policy_is_frozen_and_hashable():
    p = Policy(lower=[aten.exp])
    with pytest.raises(AttributeError):
        p.dtype = torch.bfloat16
    assert hash(p) == hash(Policy(lower=[aten.exp]))
