"""The paper's claims in miniature (mpcompile.reproduce), tiny versions: each asserts the
paper's qualitative outcome from real runs through the pipeline, against independent oracles
(eager FP32 torch, exact rational arithmetic, floating-point error bounds)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mpcompile.errors import MPCompileError
from mpcompile.reproduce import accumulation, claims, loss_scaling, masters, run, run_claim

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


@pytest.fixture(autouse=True)
def one_thread():
    """Small models: one thread is faster than two on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# every finite FP16 value, sorted, as exact float64: the oracle's rounding table
FP16_VALUES = np.unique(np.arange(0, 2**16, dtype=np.uint16).view(np.float16)
                        .astype(np.float64))
FP16_VALUES = FP16_VALUES[np.isfinite(FP16_VALUES)]


def round_exact(x: Fraction) -> Fraction:
    """The FP16 value nearest the rational ``x``, ties to the even significand."""
    i = int(np.searchsorted(FP16_VALUES, float(x)))
    cands = [Fraction(float(v)) for v in FP16_VALUES[max(0, i - 2): i + 2]]
    best = min(abs(c - x) for c in cands)
    near = [c for c in cands if abs(c - x) == best]
    if len(near) == 1:
        return near[0]
    even = [c for c in near if not np.float16(float(c)).view(np.uint16) & 1]
    return even[0]


def test_fp16_accumulator_is_exact_sequential_rounding():
    """fp16_accumulate == acc <- round16(acc + a_k b_k) computed with exact rationals."""
    g = torch.Generator().manual_seed(3)
    a = torch.cat([torch.rand(3, 64, generator=g), torch.randn(3, 64, generator=g) * 30])
    b = torch.cat([torch.rand(3, 64, generator=g), torch.randn(3, 64, generator=g)])
    a, b = a.half().double().numpy(), b.half().double().numpy()
    got = accumulation.fp16_accumulate(a, b)
    for row in range(a.shape[0]):
        acc = Fraction(0)
        for k in range(a.shape[1]):
            acc = round_exact(acc + Fraction(a[row, k]) * Fraction(b[row, k]))
        assert Fraction(got[row]) == acc, row


def test_fp16_rounding_is_single_and_ties_follow_the_remainder():
    # 1 + 2^-11 + 2^-40 is just above the midpoint of 1 and 1 + 2^-10: one rounding gives
    # 1 + 2^-10 (a detour through float32 would land on the midpoint and round to 1)
    assert accumulation.round_fp16(np.array([1 + 2**-11 + 2**-40]))[0] == 1 + 2**-10
    s = np.array([1 + 2**-11, 1 + 2**-11, 1 + 2**-11 + 2**-30])
    e = np.array([2**-60, -(2**-60), 2**-60])
    r = accumulation.round_fp16(s)
    out = accumulation._break_ties(s, e, r, np.ones(3, dtype=bool))
    assert out.tolist() == [1 + 2**-10, 1.0, 1 + 2**-10]


def test_fp16_accumulate_rejects_values_that_are_not_fp16():
    with pytest.raises(MPCompileError, match="FP16 values"):
        accumulation.fp16_accumulate(np.full((1, 4), 0.1), np.ones((1, 4)))


def test_d_fp32_accumulation_beats_fp16_and_stays_within_its_bound(tmp_path):
    result, files = run_claim("d", tmp_path, tiny=True)
    assert {f.name for f in files} == {"d.md", "d.png"}
    assert "| 2^16 | uniform[0,1) |" in (tmp_path / "d.md").read_text()
    lengths = sorted({r.length for r in result.rows})
    assert lengths[-1] == 2**16
    for r in result.rows:
        # Higham's bound for any FP32 summation order: |error| <= gamma_K * sum|a b|
        gamma = r.length * 2**-24 / (1 - r.length * 2**-24)
        assert r.fp32_contract <= gamma
        # the compiled dot adds one rounding of the result to FP16 (half an ulp: 2^-11)
        assert r.fp32_pipeline <= gamma + 2**-11
    uniform = [result.row(k, "uniform[0,1)").fp16_accumulator for k in lengths]
    assert uniform == sorted(uniform) and uniform[-1] > 100 * uniform[0]
    # a positive FP16 sum stalls once 2^11 times its addends (~0.25): far from the true sum
    assert uniform[-1] > 0.5
    for dist in accumulation.DISTRIBUTIONS:
        assert result.row(2**16, dist).ratio > 10
    if not torch.cuda.is_available():
        assert all(r.gpu_kernel is None for r in result.rows)
        assert result.gpu.startswith("not run")


def test_c_small_gradients_stall_without_scaling_and_train_with_it(tmp_path):
    r = loss_scaling.measure(epochs=1, profile_steps=1,
                             scales=(1.0, loss_scaling.OVERSIZED, "dynamic"))
    fp32 = r.fp32
    n = 3
    s1 = r.run(1.0)
    assert s1.flushed_activation_grads > 0.5
    assert s1.moved == 0.0 and s1.curve.skips == 0
    assert abs(s1.curve.mean_loss(last=n) - s1.curve.mean_loss(first=n)) \
        < 0.1 * s1.curve.mean_loss(first=n)
    assert fp32.mean_loss(last=n) < 0.5 * fp32.mean_loss(first=n)  # the oracle trains
    dynamic = r.run("dynamic")
    assert dynamic.curve.skips == 0
    assert abs(dynamic.curve.test_accuracy - fp32.test_accuracy) <= 3
    assert dynamic.curve.mean_loss(last=n) < 0.5 * dynamic.curve.mean_loss(first=n)
    big = r.run(loss_scaling.OVERSIZED)
    assert big.overflowed_grads > 0 and big.curve.skips == len(big.curve.skipped)
    assert big.moved == 0.0
    # the profiler's FP16 range excludes both the stalling and the overflowing scale
    lo, hi = r.recommended
    assert 1.0 < lo <= hi < loss_scaling.OVERSIZED
    assert r.profile.flushed(torch.float16, lo) < 0.01 < s1.flushed_activation_grads


def test_b_without_masters_small_updates_are_lost():
    r = masters.measure((1e-1, 1e-3), epochs=1)
    small, large = r.at(1e-3), r.at(1e-1)
    assert small.lost_no_masters > 0.3
    assert small.lost_masters < 0.05
    assert large.lost_no_masters < small.lost_no_masters
    assert large.lost_masters < 0.01
    # with masters the run follows the FP32 oracle
    assert abs(large.masters.test_accuracy - large.fp32.test_accuracy) <= 3


def test_a_fp16_and_bf16_match_fp32_accuracy(tmp_path):
    result, files = run_claim("a", tmp_path, tiny=True)
    assert {f.name for f in files} == {"a.md", "a.png"}
    fp32 = result.of(torch.float32)
    assert min(fp32.accuracy) > 50  # it learned (10 classes)
    for dtype in (torch.float16, torch.bfloat16):
        assert abs(result.gap(dtype)) <= 1.5, dtype
        assert len(result.of(dtype).accuracy) == 2


def test_bad_claim_and_bad_output_folder(tmp_path):
    with pytest.raises(MPCompileError, match="unknown claim 'e'.*a, b, c, d or all"):
        run("e", tmp_path)
    assert claims("all") == ("a", "b", "c", "d")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MPCompileError, match="is a file"):
        run("d", f, tiny=True)
    with pytest.raises(MPCompileError, match="threads must be a positive integer"):
        run("d", tmp_path, threads=0)


def test_module_entry_point_reports_a_bad_output_folder_in_one_line(tmp_path, capsys):
    from mpcompile.reproduce import main

    f = tmp_path / "file"
    f.write_text("x")
    assert main(["d", "--out", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert math.isfinite(accumulation.Row(1, "x", 0.0, 0.0, 0.0, None).ratio)


@pytest.mark.gpu
def test_d_generated_kernels_accumulate_in_fp32():
    """On a GPU: the compiled dot runs the generated kernel, within the FP32 bound plus one
    FP16 rounding of the result, far better than an FP16 accumulator at 2^16."""
    result = accumulation.measure((2**6, 2**16), trials=8)
    assert not result.gpu.startswith("not run"), result.gpu
    for r in result.rows:
        gamma = r.length * 2**-24 / (1 - r.length * 2**-24)
        assert r.gpu_kernel is not None and r.gpu_kernel <= gamma + 2**-11
    for dist in accumulation.DISTRIBUTIONS:
        row = result.row(2**16, dist)
        assert row.fp16_accumulator > 10 * row.gpu_kernel
