"""scripts/gpu_check.py without a GPU: its checking functions fed right and wrong outputs, its
checks driven end to end through the NumPy model of the kernels, and the script itself run as CI
runs it (``--compile-only`` in a subprocess: NVRTC, ptxas, cuobjdump), including its handling of
a case that crashes, times out or is skipped by the budget."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpcompile.codegen.model import ModelLauncher
from mpcompile.codegen.spec import Conv, Kind
from mpcompile.runtime import nvrtc, sass, verify

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check as gc  # noqa: E402

needs_nvrtc = pytest.mark.skipif(not (nvrtc.available() and sass.available()),
                                 reason="NVRTC / cuobjdump wheels not installed")
CPU = torch.device("cpu")
F16, BF16 = torch.float16, torch.bfloat16


# --- the shared checks (mpcompile/runtime/verify.py), as gpu_check uses them --------------------


@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_integer_inputs_make_fp32_sums_exact_in_any_order(dtype):
    """The premise of the bit-exact check: FP32 sums of those products, in whatever order (here
    torch's CPU matmul, and a reversed sequential sum), equal the float64 result."""
    k = 100352
    v = verify.integer_limit(k, str(dtype).removeprefix("torch."), "float32")
    assert v == 12  # the res2 weight gradient
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-v, v + 1, (4, k), generator=g).to(dtype)
    b = torch.randint(-v, v + 1, (k, 3), generator=g).to(dtype)
    exact = a.double() @ b.double()
    assert exact.abs().max() > 1000  # not trivially small
    assert torch.equal((a.float() @ b.float()).double(), exact)
    prods = (a[0].float() * b[:, 0].float()).flip(0)
    assert torch.cumsum(prods, 0)[-1].double() == exact[0, 0]
    assert torch.tensor(2.0 ** 24 + 1, dtype=torch.float32).item() != 2 ** 24 + 1  # the limit


def test_exact_mismatches_counts_every_wrong_bit():
    ref = torch.tensor([3.0, -2049.0, 0.0, 1e-8, 70000.0], dtype=torch.float64)
    out = ref.to(F16)  # rounded once (2049 -> 2048, 1e-8 -> 0, 70000 -> inf), as the kernel does
    assert verify.exact_mismatches(out, ref) == 0
    up = torch.tensor(math.inf, dtype=F16)
    for i in range(ref.numel()):
        wrong = out.clone()
        wrong[i] = torch.nextafter(wrong[i], up) if wrong[i].isfinite() else 0
        assert verify.exact_mismatches(wrong, ref) == 1, i
    nan = out.clone()
    nan[0] = math.nan
    assert verify.exact_mismatches(nan, ref) == 1
    assert verify.exact_mismatches(torch.tensor([2050.0], dtype=F16),  # rounded the wrong way
                                   torch.tensor([2049.0], dtype=torch.float64)) == 1


# --- the sqrt(K) bound --------------------------------------------------------------------------


def _long_k(k=100352, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, k, generator=g).to(F16)
    b = torch.randn(k, 8, generator=g).to(F16)
    ref = a.double() @ b.double()
    absprod = a.double().abs() @ b.double().abs()
    return a, b, ref, absprod


def _tol(ref, absprod, k, u, out):
    return verify.tolerance(ref, verify.accumulation_bound(absprod, k), u, out)


def test_sqrt_k_bound_passes_fp32_accumulation_and_rejects_a_missing_slice():
    """K = 100352 (the res2 weight gradient), FP32 output. An honest FP32 sum stays well inside
    the bound; a result missing one k-slice of 32 products does not, although the old K*u bound
    accepted it (the issue: the old bound was vacuous for long K)."""
    k = 100352
    a, b, ref, absprod = _long_k(k)
    tol = _tol(ref, absprod, k, verify.U32, "float32")
    honest = a.float() @ b.float()
    assert verify.bound_ratio(honest, ref, tol) < 0.2
    sequential = torch.cumsum(a[:1].float() * b[:, :1].float().T, 1)[:, -1:]  # worst order
    assert verify.bound_ratio(sequential, ref[:1, :1], tol[:1, :1]) <= 1
    missing = a[:, 32:].float() @ b[32:].float()
    assert verify.bound_ratio(missing, ref, tol) > 1
    old_tol = verify.U32 * ref.abs() + k * verify.U32 * absprod  # the previous script's bound
    assert verify.bound_ratio(missing, ref, old_tol) < 1


def test_sqrt_k_bound_is_elementwise_and_covers_output_rounding():
    a, b, ref, absprod = _long_k(4096)
    u16 = 2.0 ** -11
    tol = _tol(ref, absprod, 4096, u16, "float16")
    out = (a.float() @ b.float()).to(F16)  # FP32 sum rounded to FP16: the kernel's output
    assert verify.bound_ratio(out, ref, tol) <= 1
    off = out.clone()
    off[3, 5] *= 1.01  # one element 1 % off
    assert verify.bound_ratio(off, ref, tol) > 1
    off = out.clone()
    off[0, 0] = math.nan
    assert verify.bound_ratio(off, ref, tol) == math.inf
    # elementwise: a small element's tolerance is its own, not the largest one's
    assert tol.min() < 0.5 * tol.max()


# --- canaries -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F16, BF16, torch.float32], ids=str)
def test_canaries_catch_writes_outside_the_output(dtype):
    buf = verify.guarded_buffer(100, dtype, CPU)
    verify.arm(buf)
    out = verify.output_region(buf)
    assert out.numel() == 100 and torch.isnan(out).all()
    assert (out.data_ptr() - buf.data_ptr()) % 16 == 0  # the output keeps 16-byte alignment
    out.fill_(1.0)  # a kernel writing exactly its output
    assert verify.canary_damage(buf) == 0
    edge = verify.CANARY_ELEMS
    for where in (edge - 1, edge + 100, buf.numel() - 1):
        verify.arm(buf)
        buf[where] = 0.0
        assert verify.canary_damage(buf) == 1, where
    verify.arm(buf)
    buf[edge + 100] = math.nan  # even a NaN store changes the payload bits
    assert verify.canary_damage(buf) == 1
    guard = verify.Guarded()  # the alloc the checks hand to the launch path
    c = guard((2, 50), dtype, CPU)
    assert c.shape == (2, 50) and torch.isnan(c).all() and guard.damage() == 0
    torch.as_strided(c, (101,), (1,))[-1] = 0
    assert guard.damage() == 1


# --- the checks end to end, through the NumPy model of the kernel ---------------------------------


def _specs():
    cv = Conv(2, 9, 9, 8, 16, 3, 3, (2, 2), (1, 1))
    wgrad = gc.conv_spec(Kind.CONV_WGRAD, "float16", cv)
    wgrad = dataclasses.replace(wgrad, split_k=3,
                                epilogue=dataclasses.replace(wgrad.epilogue, out="float32"))
    return {
        "gemm rc bias relu": gc.gemm_spec("float16", 70, 45, 40, "row", "col",
                                          ("bias_n", "relu")),
        "gemm cc bias gelu": gc.gemm_spec("bfloat16", 72, 48, 40, "col", "col",
                                          ("bias_n", "gelu")),
        "gemm cr round scale f32": gc.gemm_spec("float16", 64, 80, 96, "col", "row",
                                                ("round", "scale"), "float32"),
        "bmm padded": gc.gemm_spec("float16", 40, 24, 16, batch=3, pad=8),
        "fprop": gc.conv_spec(Kind.CONV_FPROP, "float16", cv),
        "dgrad": gc.conv_spec(Kind.CONV_DGRAD, "float16", cv),
        "wgrad split 3": wgrad,
    }


@pytest.mark.parametrize("name", list(_specs()))
def test_every_check_passes_a_correct_kernel(name):
    row = gc.check_spec(_specs()[name], CPU, ModelLauncher)
    assert row["ok"], row
    assert row["int_mismatches"] == row["canary_damage"] == row["unwritten"] == 0
    assert row["err_bound"] <= 1


class _Scaled(ModelLauncher):  # 1 % off everywhere
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        c.mul_(1.01)


class _OneOff(ModelLauncher):  # one element one unit of the output dtype off
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        raw = torch.as_strided(c, (8,), (1,))  # the kernel's 8th store
        raw[7] = torch.nextafter(raw[7], torch.tensor(math.inf, dtype=c.dtype))


class _Overrun(ModelLauncher):  # also stores one element past the end of its output
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a, b, c, bias, scale)
        torch.as_strided(c, (c.numel() + 1,), (1,))[-1] = 0


class _Demoted(ModelLauncher):  # reads its FP16 operands as BF16 (8 significant bits)
    def __call__(self, a, b, c, bias=None, scale=None):
        super().__call__(a.to(BF16).to(a.dtype), b.to(BF16).to(b.dtype), c, bias, scale)


class _Idle(ModelLauncher):  # writes nothing
    def __call__(self, *args):
        pass


@pytest.mark.parametrize("name", ["gemm rc bias relu", "gemm cr round scale f32",
                                  "wgrad split 3"])
def test_each_check_rejects_its_fault(name):
    spec = _specs()[name]
    row = gc.check_spec(spec, CPU, _Scaled)
    assert not row["ok"] and row["err_bound"] > 1 and row["int_mismatches"] > 0, row
    row = gc.check_spec(spec, CPU, _OneOff)
    assert not row["ok"] and row["int_mismatches"] >= 1, row
    row = gc.check_spec(spec, CPU, _Overrun)
    assert not row["ok"] and row["canary_damage"] == 2, row  # one per launch (int, random)
    assert row["int_mismatches"] == 0 and row["err_bound"] <= 1  # the output itself is right
    row = gc.check_spec(spec, CPU, _Demoted)  # small integers survive BF16: only the random
    assert not row["ok"] and row["err_bound"] > 1, row  # check sees it
    if row["int_limit"] <= 256:
        assert row["int_mismatches"] == 0, row
    row = gc.check_spec(spec, CPU, _Idle)
    assert not row["ok"] and row["unwritten"] > 0, row


def test_a_case_fails_if_any_candidate_fails():
    """No best-of: ``kernel_case`` checks every preset tile, and one bad tile fails the case
    while the others pass; its partial results are emitted after each candidate."""
    case = gc.Case("gemm rc bias relu", _specs()["gemm rc bias relu"])
    emitted = []

    def load(bad):
        def f(cand, device, arch):
            launcher = _Scaled if bad and cand.spec.tile == gc.TILES[bad] else ModelLauncher
            return launcher(cand.spec), {"arch": arch}
        return f

    good = gc.kernel_case(case, CPU, 1, lambda r: emitted.append(len(r["candidates"])),
                          load=load(None))
    assert good["ok"] and len(good["candidates"]) == len(gc.TILES)
    assert [r["candidate"] for r in good["candidates"]] == [f"sm80 {t}" for t in gc.TILES]
    assert emitted[-1] == len(gc.TILES)
    bad_tile = list(gc.TILES)[-1]
    bad = gc.kernel_case(case, CPU, 1, lambda r: None, load=load(bad_tile))
    assert not bad["ok"]
    assert [r["ok"] for r in bad["candidates"]] == [t != bad_tile for t in gc.TILES]


def test_kernel_call_case_on_cpu_checks_forward_and_backward():
    """The end-to-end case's plumbing on CPU (KernelCall runs its reference there): output and
    both gradients within the sqrt(K) bound; a KernelCall without autograd would raise."""
    case = gc.Case("kc", gc.gemm_spec("float16", 96, 64, 80), runner="kernel_call")
    result = gc.kernel_call_case(case, CPU, 1, lambda r: None)
    row = result["candidates"][0]
    assert result["ok"] and isinstance(row["backend"], str), row
    assert all(row[f"err_bound_{k}"] <= 1 for k in ("out", "grad_a", "grad_b"))


class _OffCall(torch.nn.Module):  # a KernelCall 1 % off, with autograd
    def forward(self, a, b):
        return ((a.float() @ b.float()) * 1.01).to(a.dtype)


class _DetachedCall(torch.nn.Module):  # a KernelCall whose output has no autograd
    def forward(self, a, b):
        return (a @ b).detach()


def test_kernel_call_case_rejects_wrong_results_and_missing_autograd(monkeypatch):
    case = gc.Case("kc", gc.gemm_spec("float16", 96, 64, 80), runner="kernel_call")
    monkeypatch.setattr(gc, "kernel_call", lambda spec: _OffCall())
    result = gc.kernel_call_case(case, CPU, 1, lambda r: None)
    row = result["candidates"][0]
    assert not result["ok"] and row["err_bound_out"] > 1 and row["err_bound_grad_a"] > 1
    monkeypatch.setattr(gc, "kernel_call", lambda spec: _DetachedCall())
    with pytest.raises(RuntimeError, match="does not require grad"):
        gc.kernel_call_case(case, CPU, 1, lambda r: None)


def test_convert_case_on_cpu_compares_gradients():
    """The training check's plumbing (on CPU ``kernels="on"`` runs the reference through the same
    KernelCalls): every gradient matches ``kernels="off"`` and every call is counted."""
    case = next(c for c in gc.catalog() if c.runner == "convert")
    result = gc.convert_case(case, CPU, 1, lambda r: None, kernels="on", shape=(4, 3, 8, 8))
    row = result["candidates"][0]
    assert result["ok"] and row["kernel_calls"] >= 4 and row["grad_err_u"] <= gc.CONVERT_UNITS


def test_convert_case_rejects_different_gradients(monkeypatch):
    """The same check with the second model's classifier 20 % off: its gradients differ."""
    built = []

    class Drifting(gc.SmallCNN):
        def __init__(self):
            super().__init__()
            built.append(self)
            if len(built) == 2:
                with torch.no_grad():
                    self.fc.weight.mul_(1.2)

    monkeypatch.setattr(gc, "SmallCNN", Drifting)
    case = next(c for c in gc.catalog() if c.runner == "convert")
    result = gc.convert_case(case, CPU, 1, lambda r: None, kernels="on", shape=(4, 3, 8, 8))
    assert not result["ok"] and result["candidates"][0]["grad_err_u"] > gc.CONVERT_UNITS


# --- the script as CI runs it -------------------------------------------------------------------


def _run(tmp_path, *args, timeout=300):
    env_cache = tmp_path / "cache"
    env_cache.mkdir(exist_ok=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**_env(), "MPCOMPILE_CACHE": str(env_cache)})
    data = json.loads((out / "gpu_check.json").read_text()) if \
        (out / "gpu_check.json").exists() else None
    md = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    return proc, data, md


def _env():
    return dict(os.environ)


SMALL = "fprop_f16_res2_1x1,wgrad_f16_res2_3x3,kernelcall*"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """``--compile-only`` of a ResNet conv, the long-K weight gradient, the KernelCall case and
    (when the Hopper codegen is there) the 4096^3 GEMM with its Hopper kernel, for sm_80 (and
    sm_90a): run once, read by the tests below."""
    hopper = gc.hopper_api()[0] is not None
    cases = SMALL + (",gemm_f16_4096" if hopper else "")
    archs = ["--arch", "sm_80"] + (["--arch", "sm_90a"] if hopper else [])
    proc, data, md = _run(tmp_path_factory.mktemp("small"), "--compile-only", "--cases", cases,
                          *archs)
    return cases, hopper, proc, data, md


@needs_nvrtc
def test_compile_only_reports_every_candidate_consistently(small_run):
    """One JSON entry per case, one table row per compiled (candidate, arch) with its registers
    and tensor-core SASS, verdicts that agree with the problems found, and an exit status that
    agrees with the verdicts."""
    cases, hopper, proc, data, md = small_run
    names = [c["name"] for c in data["cases"]]
    assert names == [c.name for c in gc.select(gc.catalog(), cases)]
    assert data["meta"]["mode"] == "compile-only"
    failed = [c["name"] for c in data["cases"] if c["status"] != "ok"]
    assert proc.returncode == (1 if failed else 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    assert data["meta"]["summary"] == {"cases": len(names), "passed": len(names) - len(failed),
                                       "failed": len(failed), "skipped": 0}
    for c in data["cases"]:
        assert c["status"] == ("ok" if all(r["ok"] for r in c["candidates"]) else "FAIL")
        for r in c["candidates"]:
            assert r["ok"] == (not r["problems"]) and r["registers"] > 0
            assert not (r["ok"] and (r["spills"] or r["stack"]))  # never a spilling kernel
    wgrad = next(c for c in data["cases"] if c["name"] == "wgrad_f16_res2_3x3")
    assert "K=100352" in wgrad["shape"]
    assert [r["candidate"] for r in wgrad["candidates"]] == [f"sm80 {t}" for t in gc.TILES]
    assert all(r["arch"] == "sm_80" and r["mma"] == "HMMA.16816.F32" for r in wgrad["candidates"])
    if hopper:
        gemm = next(c for c in data["cases"] if c["name"] == "gemm_f16_4096")
        hop = [r for r in gemm["candidates"] if r["candidate"].startswith("hopper")]
        assert hop and all(r["arch"] == "sm_90a" and "HGMMA" in r["mma"] and ".F32" in r["mma"]
                           for r in hop)
    rows = [r for c in data["cases"] for r in c["candidates"]]
    table = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0].startswith("| case | kind | shape | dtype | candidate | arch | registers")
    assert len(table) - 1 == len(rows)
    for line, r in zip(table[1:], rows):
        verdict = line.split(" | ")[-1]
        assert verdict.startswith("compiled") == r["ok"], line
        assert verdict.startswith("**FAIL**") != r["ok"], line
    assert f"{len(names) - len(failed)} passed, {len(failed)} failed, 0 skipped" in md
    assert md in proc.stdout  # the table is printed too


@needs_nvrtc
def test_compile_only_is_green_on_the_small_selection(small_run):
    """The acceptance check CI runs: every candidate compiles without spills or stack, with
    FP32-accumulating tensor-core instructions only."""
    _, _, proc, data, md = small_run
    assert proc.returncode == 0, md
    assert all(r["ok"] for c in data["cases"] for r in c["candidates"])


@needs_nvrtc
def test_compile_only_reports_a_failing_candidate(tmp_path):
    """A kernel that does not compile fails its row and its case (exit 1), and the rest still
    runs: the renderer is made to emit broken C++ for one tile through a sitecustomize hook in
    the child processes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import mpcompile.codegen.render as r\n"
        "_orig = r.render_source\n"
        "def _broken(spec):\n"
        "    src = _orig(spec)\n"
        "    return src + '\\n#error broken on purpose\\n' if spec.tile.bm == 64 and "
        "spec.tile.bn == 64 else src\n"
        "r.render_source = _broken\n")
    env = {**_env(), "PYTHONPATH": str(hook), "MPCOMPILE_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--compile-only", "--arch", "sm_80",
                           "--cases", "fprop_f16_res2_1x1,kernelcall*", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:]
    data = json.loads((out / "gpu_check.json").read_text())
    fprop, kcall = data["cases"]
    assert fprop["status"] == "FAIL" and kcall["status"] == "ok"
    bad = [r for r in fprop["candidates"] if not r["ok"]]
    assert [r["candidate"] for r in bad] == \
        [f"sm80 {n}" for n, t in gc.TILES.items() if (t.bm, t.bn) == (64, 64)]
    assert "CompileError" in bad[0]["problems"][0]
    md = (out / "gpu_check.md").read_text()
    assert "**FAIL** CompileError" in md and "1 passed, 1 failed, 0 skipped" in md


SPILLING = r"""
extern "C" __global__ void spilling(float* out, const int* idx) {
    float local[64];  // written and read at run-time indices: a stack frame, not registers
    for (int i = 0; i < 64; ++i) local[(idx[i] + threadIdx.x) & 63] = out[i];
    out[threadIdx.x] = local[idx[threadIdx.x] & 63];
}
"""


@needs_nvrtc
def test_a_cubin_with_a_stack_frame_or_without_hmma_fails_its_row(tmp_path, monkeypatch):
    """The compile-only verdict on real cubins: a kernel with a stack frame and no tensor-core
    instruction is refused on both counts; the generated kernel of a small GEMM passes."""
    monkeypatch.setenv("MPCOMPILE_CACHE", str(tmp_path))
    spec = gc.gemm_spec("float16", 128, 128, 64, tile=gc.TILES["small"])
    cand = gc.Candidate("sm80 small", spec)
    c = nvrtc.compile_cubin(SPILLING, "spilling", "sm_80")
    row = gc.judge_cubin(c, cand, "sm_80")
    assert row["stack"] > 0 and len(row["problems"]) == 2, row
    assert row["problems"][0].startswith("spills/stack")
    assert row["problems"][1] == "tensor-core instructions none"
    good = gc.cubin_report(cand, "sm_80")
    assert good["problems"] == [] and good["mma"] == "HMMA.16816.F32", good


def test_budget_skips_instead_of_overrunning(tmp_path):
    proc, data, md = _run(tmp_path, "--compile-only", "--cases", "fprop_*,convert*",
                          "--budget", "0")
    assert proc.returncode == 3, proc.stdout
    assert {c["status"] for c in data["cases"]} == {"skipped"}
    assert len(data["cases"]) == len(gc.select(gc.catalog(), "fprop_*,convert*"))
    n = len(data["cases"])
    assert "**skipped**: time budget" in md and f"0 passed, 0 failed, {n} skipped" in md


def test_a_case_that_times_out_does_not_stop_the_run(tmp_path):
    """Each case has its own process and timeout: both cases time out (the child cannot even
    import torch in 0.05 s), both are reported, the JSON is complete, exit 1."""
    proc, data, md = _run(tmp_path, "--compile-only", "--cases", "convert*,kernelcall*",
                          "--case-timeout", "0.05")
    assert proc.returncode == 1
    assert [c["status"] for c in data["cases"]] == ["timeout", "timeout"]
    assert md.count("**timeout**") == 2


def test_a_crashed_child_keeps_its_partial_result(tmp_path):
    """A child that dies (here: abort) after reporting one candidate: the case is a crash, the
    candidate it finished is kept, the log tail explains."""
    out = tmp_path / "r.json"
    partial = {"name": "x", "candidates": [{"candidate": "sm80 large", "ok": True}],
               "done": False}
    code = (f"import json, os, sys; open({str(out)!r}, 'w').write({json.dumps(partial)!r}); "
            "print('about to fault', flush=True); os.abort()")
    r = gc.run_child([sys.executable, "-c", code], out, 60, tmp_path / "x.log")
    assert r["status"] == "crash" and not r["ok"]
    assert r["candidates"] == partial["candidates"]
    assert "about to fault" in r["error"] and "-6" in r["error"]
    meta = {"mode": "gpu", "device": "d", "torch": "t", "date": "today", "budget_s": 1,
            "elapsed_s": 0.0}
    gc.write_outputs(tmp_path / "o", meta, [{**r, "name": "x"}], 1)
    md = (tmp_path / "o" / "gpu_check.md").read_text()
    assert "**crash**" in md and "0 passed, 1 failed" in md


@pytest.mark.slow
@needs_nvrtc
def test_compile_only_all_cases(tmp_path):
    proc, data, md = _run(tmp_path, "--compile-only", "--budget", "3000", timeout=3600)
    assert proc.returncode == 0, md
    assert len(data["cases"]) == len(gc.catalog())
