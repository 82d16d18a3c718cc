"""Proof behind every FP32_ACCUM entry of the policy table.

An op may keep low-precision I/O only where its kernel accumulates in FP32. The test runs each
such op on a long reduction (2^16 elements per output) with low-precision inputs and compares it
with a float64 reference computed from the *same* low-precision inputs: FP32 accumulation lands
within a few output ulps; accumulating in FP16/BF16 would be off by hundreds (shown below for a
sequential low-precision sum, so the metric can tell the two apart).

The ulp is taken at max(|ref|, max|ref| / 256): elements far below the output's scale come out of
the cancellation in ``x_hat * w + b`` (exact in FP32, then rounded once), not out of the
accumulation this test is about.
"""

import pytest
import torch

from mpcompile.policy import DEFAULT_TABLE, OpClass, expand

aten = torch.ops.aten
N = 1 << 16
LOW = (torch.float16, torch.bfloat16)
MAX_ULPS = 4.0


def ulps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    ref = ref.double()
    fi = torch.finfo(dtype)
    floor = ref.abs().max() / 256
    scale = torch.maximum(ref.abs(), floor).clamp(min=fi.tiny)
    ulp = torch.exp2(torch.floor(torch.log2(scale))) * fi.eps
    return ((out.double() - ref).abs() / ulp).max().item()


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


DEV = {"device": "cpu"}  # the GPU tests run the same probes on "cuda"


def _x(shape, dt):
    return (torch.randn(shape, generator=_g()) * 3 + 1).to(dt).to(DEV["device"])


def _r(*shape, seed, rand=False):
    t = torch.rand(shape, generator=_g(seed)) if rand else torch.randn(shape, generator=_g(seed))
    return t.to(DEV["device"])


def softmax(op, dt):
    x = _x((2, N), dt)
    return op(x, 1, False), torch.softmax(x.double(), 1)


def layer_norm(op, dt):
    x = _x((2, N), dt)
    w, b = _r(N, seed=1), _r(N, seed=2)
    ref = torch.nn.functional.layer_norm(x.double(), [N], w.double(), b.double(), 1e-5)
    return op(x, [N], w, b, 1e-5)[0], ref


def group_norm(op, dt):
    x = _x((2, 8, 128, 128), dt)  # 4 channels x 16384 = 65536 per group
    w, b = _r(8, seed=1), _r(8, seed=2)
    ref = torch.nn.functional.group_norm(x.double(), 2, w.double(), b.double(), 1e-5)
    return op(x, w, b, 2, 8, 128 * 128, 2, 1e-5)[0], ref


def _bn_inputs(dt):
    x = _x((256, 4, 16, 16), dt)  # N*H*W = 65536 per channel
    w, b = _r(4, seed=1), _r(4, seed=2)
    return x, w, b


def batch_norm_train(op, dt):
    x, w, b = _bn_inputs(dt)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True,
                                         0.1, 1e-5)
    if op is aten._native_batch_norm_legit.no_stats:
        out = op(x, w, b, True, 0.1, 1e-5)
    else:
        rm, rv = torch.zeros(4, device=x.device), torch.ones(4, device=x.device)
        out = op(x, w, b, rm, rv, True, 0.1, 1e-5)
    return out[0], ref


def batch_norm_eval(op, dt):
    x, w, b = _bn_inputs(dt)
    rm, rv = _r(4, seed=3), _r(4, seed=4, rand=True) + 0.5
    ref = torch.nn.functional.batch_norm(x.double(), rm.double(), rv.double(), w.double(),
                                         b.double(), False, 0.1, 1e-5)
    return op(x, w, b, rm, rv, 0.1, 1e-5)[0], ref


def mean(op, dt):
    x = _x((2, N), dt)
    ref = x.double().mean(1)
    if op is aten.mean.default:
        return op(x[0]), x[0].double().mean()
    return op(x, [1]), ref


def adaptive_avg_pool(op, dt):
    x = _x((2, 2, 256, 256), dt)
    return op(x, [1, 1]), x.double().mean((2, 3), keepdim=True)


PROBES = {
    aten._softmax.default: softmax,
    aten.softmax.int: lambda op, dt: (op(_x((2, N), dt), 1), torch.softmax(_x((2, N), dt)
                                                                            .double(), 1)),
    aten._safe_softmax.default: lambda op, dt: (op(_x((2, N), dt), 1),
                                                torch.softmax(_x((2, N), dt).double(), 1)),
    aten.native_layer_norm.default: layer_norm,
    aten.native_group_norm.default: group_norm,
    aten._native_batch_norm_legit_functional.default: batch_norm_train,
    aten.native_batch_norm.default: batch_norm_train,
    aten._native_batch_norm_legit.default: batch_norm_train,
    aten._native_batch_norm_legit.no_stats: batch_norm_train,
    aten._native_batch_norm_legit_no_training.default: batch_norm_eval,
    aten.mean.default: mean,
    aten.mean.dim: mean,
    aten._adaptive_avg_pool2d.default: adaptive_avg_pool,
}

# every (overload, device, dtype) the table claims is proven, for the devices present here
CLAIMS = [
    (ov, dev, dt)
    for e in DEFAULT_TABLE if e.op_class is OpClass.FP32_ACCUM
    for ov in expand(e.op) if not ov.name().endswith(("out", "output")) and "_out" not in
    ov._overloadname
    for dev, dt in sorted(e.proven_on, key=str)
]


def test_every_fp32_accum_claim_has_a_probe():
    missing = sorted({str(ov) for ov, _, _ in CLAIMS if ov not in PROBES})
    assert not missing, f"FP32_ACCUM entries without a proof in PROBES: {missing}"
    assert CLAIMS, "the table claims no FP32_ACCUM op at all"


@pytest.mark.parametrize("op,device,dtype", CLAIMS, ids=lambda v: str(v).replace("torch.", ""))
def test_fp32_accumulation_with_low_precision_io(op, device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("claim is for CUDA")
    out, ref = PROBES[op](op, dtype)
    assert out.dtype == dtype, f"{op} returned {out.dtype} for {dtype} input"
    err = ulps(out, ref, dtype)
    assert err <= MAX_ULPS, f"{op} on {device} {dtype}: {err:.2f} ulps from float64"


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_metric_rejects_low_precision_accumulation(dtype):
    """The same metric on a softmax whose exp-sum is accumulated sequentially in low precision
    fails by a wide margin, so a kernel that did that could not pass the test above."""
    x = _x((2, N // 4), dtype)
    e = torch.exp(x.float() - x.float().amax(1, keepdim=True)).to(dtype)
    acc = torch.zeros(2, dtype=dtype)
    for i in range(e.shape[1]):  # acc = fl(acc + e_i), rounded every step
        acc = acc + e[:, i]
    bad = (e / acc[:, None]).to(dtype)
    assert ulps(bad, torch.softmax(x.double(), 1), dtype) > 10 * MAX_ULPS
