"""ONNX export: forward models and whole training steps, run by onnxruntime (CPU) and by
``onnx.reference.ReferenceEvaluator`` and compared with mpcompile.

Tolerances.
- Forward: max |onnx - mpcompile| <= 4u * max |mpcompile|. Both compute each op in FP32 and round
  its output, but onnxruntime's CPU provider runs FP16 nodes in FP32 between inserted casts (it
  drops some intermediate roundings) and the reference evaluator computes with numpy; a few
  output ulps apart (measured <= 2.4u).
- Training step: the same FP32 math translates exactly (all-FP32 policy: <= 1e-5 after 10 steps,
  measured 2.5e-6). In mixed precision the runtimes round different intermediates, and gradients
  behind ReLU + batch norm are ill-conditioned (a flipped ReLU mask moves a conv-weight gradient
  by tens of u). The yardstick must not come from the code under test, so each test measures
  eps: how far torch.autocast's first-step gradients (an independent mixed-precision run of the
  same model and batch) are from a float64 run, i.e. how sensitive this model's gradients are to
  rounding in this format. Two correct mixed-precision runs are each about eps from exact, so
  about 2 eps apart, and SGD momentum sums ten such differences into its buffer: the bound is
  3 * max(eps, 8u), the 8u floor for well-conditioned models (eps ~ 1u) where rounding the state
  itself dominates. Measured (worst state tensor after 10 steps / bound): MLP 0.8u/24u (FP16),
  CNN 71u/98u (FP16, eps 33u) and 17u/38u (BF16, eps 12.6u), transformer 2.7u/24u.
"""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from torch.fx.experimental.proxy_tensor import make_fx

import mpcompile
from mpcompile import ExportError, Policy
from mpcompile.dtypes import unit_roundoff
from mpcompile.examples import EXAMPLES, batch
from mpcompile.export import export_graph, metadata
from mpcompile.export.compat import bf16_io_as_float32, emulate_bf16_on_cpu
from mpcompile.policy import OpClass

aten = torch.ops.aten
F16, BF16 = torch.float16, torch.bfloat16
U = {d: unit_roundoff(d) for d in (F16, BF16, torch.float32)}
_ID = lambda v: str(v).replace("torch.", "")  # noqa: E731
ort.set_default_logger_severity(3)


class MaxPool(OpRun):  # the reference evaluator matches new ops by class name
    """MaxPool for the reference evaluator with the spec's indices (flattened over N*C*H*W,
    first maximum). onnx 1.23's own returns wrong indices: kernel 2, stride 1 on a 2x2 plane
    gives [6, 6, 6, 6] instead of [3, 7, 11, 15] (onnxruntime follows the spec)."""

    op_domain = ""

    def _run(self, x, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None,
             pads=None, storage_order=None, strides=None):
        n, c, h, w = x.shape
        kh, kw = kernel_shape
        sh, sw = strides or (1, 1)
        dh, dw = dilations or (1, 1)
        ph0, pw0, ph1, pw1 = pads or (0, 0, 0, 0)
        assert not ceil_mode
        xp = np.pad(x, ((0, 0), (0, 0), (ph0, ph1), (pw0, pw1)), constant_values=-np.inf)
        oh = (h + ph0 + ph1 - dh * (kh - 1) - 1) // sh + 1
        ow = (w + pw0 + pw1 - dw * (kw - 1) - 1) // sw + 1
        y = np.full((n, c, oh, ow), -np.inf, dtype=x.dtype)
        idx = np.zeros((n, c, oh, ow), dtype=np.int64)
        plane = (np.arange(n)[:, None, None, None] * c + np.arange(c)[None, :, None, None]) * h * w
        for i in range(kh):
            for j in range(kw):
                win = xp[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh,
                         j * dw: j * dw + sw * (ow - 1) + 1: sw]
                better = win > y
                rows = np.arange(oh)[:, None] * sh + i * dh - ph0
                cols = np.arange(ow)[None, :] * sw + j * dw - pw0
                y = np.where(better, win, y)
                idx = np.where(better, plane + rows * w + cols, idx)
        return y, idx


class GatherElements(OpRun):  # matched by class name
    """onnx 1.23's falls back to a loop that cannot reshape when the data has a size-1 axis
    (BERT's token_type_ids buffer): ``take_along_axis`` is the spec's definition."""

    op_domain = ""

    def _run(self, data, indices, axis=None):
        axis = axis or 0
        indices = np.where(indices < 0, indices + data.shape[axis], indices)
        return (np.take_along_axis(data, indices, axis=axis),)


def reference(model):
    return ReferenceEvaluator(model, new_ops=[MaxPool, GatherElements])


def cpu_session(model):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    run = emulate_bf16_on_cpu(model) if _has_bf16(model) else model
    return ort.InferenceSession(run.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _has_bf16(model):
    from mpcompile.export.compat import has_bf16

    return has_bf16(model)


def _logits(out):
    return out["logits"] if isinstance(out, dict) else out


# --- forward ------------------------------------------------------------------------------


# default run: each model in one dtype, alternating (both dtypes covered); the rest -m slow
FORWARD = [(n, low) if (i + (low is BF16)) % 2 == 0 else pytest.param(n, low,
                                                                       marks=pytest.mark.slow)
           for i, n in enumerate(sorted(EXAMPLES)) for low in (F16, BF16)]


@pytest.mark.parametrize("name,low", FORWARD, ids=_ID)
def test_forward_export_runs_in_onnxruntime_and_reference(name, low, tmp_path):
    ex = EXAMPLES[name]
    x, _ = batch(ex)
    mp = mpcompile.convert(ex.build().eval(), x, dtype=low, backend="eager")
    path = mpcompile.export_onnx(mp, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert model.ir_version == 10
    onnx.checker.check_model(model, full_check=True)
    with torch.no_grad():
        want = _logits(mp(*x)).numpy()
    feeds = {i.name: t.numpy() for i, t in zip(model.graph.input, x)}
    scale = np.abs(want).max()
    got = cpu_session(model).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 4 * U[low] * scale
    ref = np.asarray(reference(model).run(None, feeds)[0]).astype(np.float32)
    assert np.abs(ref - want).max() <= 4 * U[low] * scale


@pytest.mark.parametrize("low", [pytest.param(F16, marks=pytest.mark.slow), BF16], ids=_ID)
def test_forward_export_of_hugging_face_bert(low):  # FP16 BERT: test_models (default run)
    from models_hf import bert

    model_t, kw, _ = bert()
    mp = mpcompile.convert(model_t.eval(), example_kwargs=kw, dtype=low, backend="eager")
    model = mpcompile.export_onnx(mp)
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    with torch.no_grad():
        want = mp(**kw).logits.numpy()
    feeds = {i.name: kw[i.name].numpy() for i in model.graph.input}
    scale = np.abs(want).max()
    got = cpu_session(model).run(None, feeds)[0]
    assert np.abs(got - want).max() <= 4 * U[low] * scale
    ref = np.asarray(reference(model).run(None, feeds)[0]).astype(np.float32)
    assert np.abs(ref - want).max() <= 4 * U[low] * scale


def _types(model):
    g = onnx.shape_inference.infer_shapes(model).graph
    t = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    t.update({i.name: i.data_type for i in g.initializer})
    return t


ONNX_LOW = {F16: onnx.TensorProto.FLOAT16, BF16: onnx.TensorProto.BFLOAT16}
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


@pytest.mark.parametrize("name,low,strict", [
    ("cnn", F16, False), ("cnn", BF16, False), ("transformer", F16, False),
    ("transformer", BF16, False), ("transformer", F16, True),
], ids=_ID)
def test_forward_structure(name, low, strict):
    """After shape inference: every MatMul/Gemm/Conv computes in the low dtype; every node made
    from an FP32-class mpcompile node computes in FP32; inputs and outputs keep the model's
    dtypes; weights are initializers in the precision the graph uses them in."""
    ex = EXAMPLES[name]
    x, _ = batch(ex)
    mp = mpcompile.convert(ex.build().eval(), x,
                           policy=Policy(dtype=low, strict_reductions=strict), backend="eager")
    model = mpcompile.export_onnx(mp)
    types = _types(model)
    node_map = metadata(model)["node_map"]
    records = {n.name: n.meta["mp"] for n in mp.graph_module.graph.nodes}
    dots = fp32_nodes = 0
    for node in model.graph.node:
        floats = [types[v] for v in node.input if types.get(v) in FLOATS]
        if node.op_type in ("MatMul", "Gemm", "Conv"):
            dots += 1
            assert floats and set(floats) == {ONNX_LOW[low]}, (node.name, floats)
        rec = records.get(node_map.get(node.name))
        if rec is not None and rec.op_class is OpClass.FP32 and node.op_type != "Cast":
            fp32_nodes += 1
            assert set(floats) <= {onnx.TensorProto.FLOAT}, (node.name, node.op_type, floats)
    assert dots > 0
    if strict:
        assert fp32_nodes > 0  # layer norms and softmax, FP32 under strict_reductions
    for vi in (*model.graph.input, *model.graph.output):
        assert vi.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)
    # weights are stored in the precision the graph uses them in: none is cast in the graph
    weights = {i.name for i in model.graph.initializer if len(i.dims) >= 2}
    assert weights and not [n.name for n in model.graph.node
                            if n.op_type == "Cast" and n.input[0] in weights]
    assert any(i.data_type == ONNX_LOW[low] for i in model.graph.initializer)


def test_keep_fp32_weights_as_inputs():
    ex = EXAMPLES["mlp"]
    x, _ = batch(ex)
    model_t = ex.build().eval()
    mp = mpcompile.convert(model_t, x, backend="eager")
    model = mpcompile.export_onnx(mp, keep_fp32_weights=True)
    names = [i.name for i in model.graph.input]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "arg0"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
    sess = cpu_session(model)
    want = mp(*x).detach().numpy()
    got = sess.run(None, {"arg0": x[0].numpy()})[0]  # weights from the stored defaults
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * U[F16] * np.abs(want).max())
    doubled = {n: p.detach().numpy() * 2 for n, p in model_t.named_parameters()}
    got2 = sess.run(None, {"arg0": x[0].numpy(), **doubled})[0]
    assert not np.allclose(got2, got)  # they are real inputs


def test_ir_version_and_opset():
    ex = EXAMPLES["mlp"]
    mp = mpcompile.convert(ex.build().eval(), batch(ex)[0], backend="eager")
    model = mpcompile.export_onnx(mp, ir_version=9, opset=21)
    assert model.ir_version == 9
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    cpu_session(model)


# --- training step ------------------------------------------------------------------------------


def gradient_error(ex, low) -> float:
    """How far mpcompile's first-step gradients are from float64 (relative, worst tensor).
    Not a test tolerance (it is the code under test's own error): benchmarks report it."""
    x, y = batch(ex)
    m64 = ex.build().train().double()
    ex.loss(m64(*(t.double() if t.is_floating_point() else t for t in x)), y).backward()
    model = ex.build().train()
    step = mpcompile.compile_train_step(model, ex.loss, x, y, dtype=low, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.5), backend="eager")
    step.step(x, y)  # after one step the momentum buffer is the (unscaled) gradient
    errs = []
    for name, p in m64.named_parameters():
        g = step.value(f"opt.{name}.momentum_buffer").double()
        errs.append(((g - p.grad).norm() / p.grad.norm().clamp(min=1e-30)).item())
    return max(errs)


def autocast_gradient_error(ex, low) -> float:
    """How far torch.autocast's first-step gradients are from float64 (relative, worst tensor):
    the rounding sensitivity of this model and batch, measured without mpcompile."""
    x, y = batch(ex)
    m64 = ex.build().train().double()
    ex.loss(m64(*(t.double() if t.is_floating_point() else t for t in x)), y).backward()
    model = ex.build().train()
    with torch.autocast("cpu", dtype=low):
        loss = ex.loss(model(*x), y)
    scale = 2.0**10  # a power of two: scaling and unscaling are exact; no FP16 underflow
    (loss.float() * scale).backward()
    errs = []
    for (name, p), q in zip(m64.named_parameters(), model.parameters()):
        g = q.grad.double() / scale
        assert torch.isfinite(g).all(), name
        errs.append(((g - p.grad).norm() / p.grad.norm().clamp(min=1e-30)).item())
    return max(errs)


def _step_tolerance(ex, low) -> float:
    return 3 * max(autocast_gradient_error(ex, low), 8 * U[low])  # see the module docstring


def _compiled(ex, low, **kw):
    model = ex.build().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return mpcompile.compile_train_step(model, ex.loss, *batch(ex), optimizer=opt, dtype=low,
                                        **kw, backend="eager")


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


TRAIN = [(n, low) for n in ("mlp", "cnn", "transformer") for low in (F16, BF16)]
# default run: MLP and CNN in both dtypes, the transformer in BF16 (the emulated path with the
# most op types); transformer FP16 is -m slow
TRAIN[TRAIN.index(("transformer", F16))] = pytest.param("transformer", F16,
                                                        marks=pytest.mark.slow)


@pytest.mark.parametrize("name,low", TRAIN, ids=_ID)
def test_training_step_in_onnxruntime_matches(name, low, tmp_path):
    ex = EXAMPLES[name]
    step = _compiled(ex, low)
    path = mpcompile.export_onnx(step, tmp_path / "step.onnx")
    model = onnx.load(str(path))
    assert metadata(model)["kind"] == "train_step"
    # standard ops only; every piece of state is a graph input, none folded into a constant
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    inputs = [i.name for i in model.graph.input]
    assert inputs[: len(step.layout.names)] == list(step.layout.names)
    consts = [i for i in model.graph.initializer if i.name not in inputs]
    shapes = {tuple(t.shape) for t in step.state_dict().values()
              if isinstance(t, torch.Tensor) and t.numel() > 1}
    assert not [c.name for c in consts if tuple(c.dims) in shapes]
    trainer = mpcompile.OrtTrainer(path)
    tol = _step_tolerance(ex, low)
    for i in range(10):
        got, want = trainer.step(*batch(ex, seed=i)), step.step(*batch(ex, seed=i))
        assert abs(got.loss - want.loss.item()) <= tol * abs(want.loss.item())
        assert got.skipped == want.skipped.item() is False
        assert got.loss_scale == want.loss_scale.item()
    ours = trainer.state_dict()
    init = {f"master.{n}": p.detach() for n, p in ex.build().named_parameters()}
    for key, want in step.state_dict().items():
        if key == "lr_override":
            continue
        got = ours[key]
        assert got.dtype == want.dtype, key
        if not want.is_floating_point():
            assert torch.equal(got, want), key
        elif key in init:  # compare what training changed
            assert _rel(got - init[key], want - init[key]) <= tol, key
        else:
            assert _rel(got, want) <= tol, key


@pytest.mark.parametrize("name", ["cnn", pytest.param("transformer", marks=pytest.mark.slow)])
def test_fp32_training_step_translates_exactly(name):
    ex = EXAMPLES[name]
    step = _compiled(ex, torch.float32, loss_scale=None)
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    for i in range(10):
        got, want = trainer.step(*batch(ex, seed=i)), step.step(*batch(ex, seed=i))
        assert abs(got.loss - want.loss.item()) <= 1e-5 * abs(want.loss.item())
    ours = trainer.state_dict()
    for key, want in step.state_dict().items():
        if isinstance(want, torch.Tensor) and want.is_floating_point():
            assert _rel(ours[key], want) <= 1e-5, key


@pytest.mark.parametrize("name", [pytest.param("mlp", marks=pytest.mark.slow), "cnn",
                                  "transformer"])
def test_reference_evaluator_agrees_on_one_step(name):
    ex = EXAMPLES[name]
    step = _compiled(ex, F16)
    model = mpcompile.export_onnx(step)
    meta = metadata(model)
    x, y = batch(ex)
    feeds = {n: t.numpy() for n, t in zip(meta["state"], step.state)}
    feeds.update({"lr0": np.array(0.05), **dict(zip(meta["batch"], [t.numpy() for t in
                                                                    (*x, y)]))})
    outs = dict(zip(meta["outputs"], reference(model).run(None, feeds)))
    want = step.step(x, y)
    tol = _step_tolerance(ex, F16)
    assert abs(float(outs["loss"]) - want.loss.item()) <= tol * want.loss.item()
    for key in meta["state"]:
        got = torch.from_numpy(np.asarray(outs[f"next.{key}"]))
        if got.is_floating_point():
            assert _rel(got, step.value(key)) <= tol, key


def test_overflow_in_onnxruntime_skips_and_keeps_state():
    ex = EXAMPLES["cnn"]
    step = _compiled(ex, F16)
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    trainer.step(*batch(ex, seed=0))
    before = trainer.state_dict()
    x, y = batch(ex, seed=1)
    r = trainer.step((x[0] * 6e4,), y)  # FP16 activations overflow
    assert r.skipped and r.loss_scale == before["scale"].item() / 2
    after = trainer.state_dict()
    for key, v in before.items():
        if key == "scale":
            continue
        if key == "growth_tracker":
            assert after[key].item() == 0
        else:
            assert torch.equal(after[key], v), key


def test_trained_masters_load_back_into_the_model():
    ex = EXAMPLES["cnn"]
    step = _compiled(ex, BF16)
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    for i in range(3):
        trainer.step(*batch(ex, seed=i))
        step.step(*batch(ex, seed=i))
    model = ex.build()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(trainer.model_state_dict())
    # the model now holds what onnxruntime trained, not the values it was built with: every
    # parameter and buffer moved, as far as mpcompile's own step moved it on the same batches
    params = dict(model.named_parameters())
    tol = _step_tolerance(ex, BF16)
    for name, got in model.state_dict().items():
        want = step.value(f"master.{name}" if name in params else f"buffer.{name}")
        assert got.dtype == init[name].dtype and not torch.equal(got, init[name]), name
        if got.is_floating_point():
            assert _rel(got - init[name], want - init[name]) <= tol, name
        else:
            assert torch.equal(got, want), name
    assert trainer.state_dict()["working.fc.weight"].dtype is BF16


def _bf16_io_graph():
    """bfloat16 inputs (one with a default) and output around data movement, which
    onnxruntime's CPU provider runs in bfloat16, next to a float32 input and output."""
    T, h = onnx.TensorProto, onnx.helper
    default = [0.5, 1.25, -3.0, 7.0, 1 + 2**-7, 2.0**-20]
    g = h.make_graph(
        [h.make_node("Transpose", ["a"], ["at"], perm=[1, 0]),
         h.make_node("Concat", ["at", "b"], ["c"], axis=0),
         h.make_node("Reshape", ["c", "shape"], ["y"]),
         h.make_node("Identity", ["f"], ["f_out"])],
        "bf16_io",
        [h.make_tensor_value_info("a", T.BFLOAT16, [3, 4]),
         h.make_tensor_value_info("b", T.BFLOAT16, [2, 3]),
         h.make_tensor_value_info("f", T.FLOAT, [2])],
        [h.make_tensor_value_info("y", T.BFLOAT16, [3, 6]),
         h.make_tensor_value_info("f_out", T.FLOAT, [2])],
        [h.make_tensor("shape", T.INT64, [2], [3, 6]),
         h.make_tensor("b", T.BFLOAT16, [2, 3], default)])
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model, torch.tensor(default).view(2, 3)


def test_bf16_io_as_float32_runs_in_onnxruntime():
    model, b_default = _bf16_io_graph()
    face = bf16_io_as_float32(model)
    onnx.checker.check_model(face, full_check=True)
    sess = ort.InferenceSession(face.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name: i.type for i in sess.get_inputs()} == {"a": "tensor(float)",
                                                          "f": "tensor(float)"}
    assert [o.type for o in sess.get_outputs()] == ["tensor(float)"] * 2
    g = torch.Generator().manual_seed(0)
    a, b, f = torch.randn(3, 4, generator=g), torch.randn(2, 3, generator=g), torch.randn(2)
    a[0, :2] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8])  # ties: to even, 1 and 1 + 2^-6

    def oracle(a, b):  # torch in bfloat16: round the float32 inputs once, move the data
        return torch.cat([a.to(BF16).T, b.to(BF16)]).reshape(3, 6).float().numpy()

    y, f_out = sess.run(None, {"a": a.numpy(), "f": f.numpy()})  # b from its default
    assert y.dtype == np.float32 and np.array_equal(y, oracle(a, b_default))
    assert np.array_equal(f_out, f.numpy())
    y, _ = sess.run(None, {"a": a.numpy(), "b": b.numpy(), "f": f.numpy()})
    assert np.array_equal(y, oracle(a, b))
    exact = a.to(BF16).float()  # bfloat16 values in, the same values out: nothing lost
    y, _ = sess.run(None, {"a": exact.numpy(), "f": f.numpy()})
    assert np.array_equal(y.reshape(6, 3)[:4], exact.T.numpy())


def test_bf16_io_as_float32_on_an_exported_step():
    ex = EXAMPLES["mlp"]
    model = mpcompile.export_onnx(_compiled(ex, BF16))
    bf16 = {v.name for v in (*model.graph.input, *model.graph.output)
            if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}
    assert "working.fc1.weight" in bf16
    face = bf16_io_as_float32(model)
    kinds = {v.name: v.type.tensor_type.elem_type for v in (*face.graph.input,
                                                            *face.graph.output)}
    assert all(kinds[n] == onnx.TensorProto.FLOAT for n in bf16)
    assert [v.name for v in face.graph.input] == [v.name for v in model.graph.input]
    onnx.checker.check_model(face, full_check=True)


# --- single backward ops the exporter gets wrong without decomposition --------------------------


def _run_graph(fn, *args):
    gm = make_fx(fn)(*args)
    model = export_graph(gm, list(args))
    got = cpu_session(model).run(None, {f"input_{i}": a.numpy() for i, a in enumerate(args)})
    return got, fn(*args)


@pytest.mark.parametrize("stride,padding,dilation,groups", [
    (1, 1, 1, 1), (2, 0, 1, 1), (1, 2, 2, 1), (2, 1, 1, 2), (1, 1, 1, 6),
], ids=lambda v: str(v))
def test_convolution_backward_alone(stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 9, 9, generator=g)
    w = torch.randn(12, 6 // groups, 3, 3, generator=g)
    y = aten.convolution(x, w, None, [stride] * 2, [padding] * 2, [dilation] * 2, False,
                         [0, 0], groups)
    go = torch.randn(y.shape, generator=g)

    def fn(go, x, w):
        return aten.convolution_backward(go, x, w, [12], [stride] * 2, [padding] * 2,
                                         [dilation] * 2, False, [0, 0], groups,
                                         [True, True, True])

    got, want = _run_graph(fn, go, x, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)


def test_batch_norm_training_forward_and_backward_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=g) * 2 + 1
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    go = torch.randn(x.shape, generator=g)

    def fn(x, w, b, rm, rv, go):
        out, mean, invstd, new_rm, new_rv = aten._native_batch_norm_legit_functional(
            x, w, b, rm, rv, True, 0.1, 1e-5)
        gi, gw, gb = aten.native_batch_norm_backward(go, x, w, rm, rv, mean, invstd, True,
                                                     1e-5, [True, True, True])
        return out, new_rm, new_rv, gi, gw, gb

    got, want = _run_graph(fn, x, w, b, rm, rv, go)
    for a, b_ in zip(got, want):
        np.testing.assert_allclose(a, b_.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", [0, 1, 2], ids=["none", "mean", "sum"])
def test_nll_loss_backward_alone(reduction):
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, 5, generator=g), 1)
    target = torch.tensor([0, 4, -100, 2, 2, 1])  # one ignored
    loss, total = aten.nll_loss_forward(logp, target, None, reduction, -100)
    go = torch.randn(loss.shape, generator=g)

    def fn(go, logp, target, total):
        return (aten.nll_loss_backward(go, logp, target, None, reduction, -100, total),)

    got, want = _run_graph(fn, go, logp, target, total)
    np.testing.assert_allclose(got[0], want[0].numpy(), rtol=1e-6, atol=1e-7)


# --- errors -------------------------------------------------------------------------------------


class Cummax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cummax(self.fc(x), 1)[0]


def test_unexportable_op_names_op_and_node():
    mp = mpcompile.convert(Cummax(), torch.randn(3, 4), backend="eager")
    with pytest.raises(ExportError, match=r"aten\.cummax\.default \(node cummax in module "
                                          r"'<model>' \(test_export\.py:\d+"):
        mpcompile.export_onnx(mp)
    with pytest.raises(ExportError, match="takes a MixedPrecisionModule or a TrainStep"):
        mpcompile.export_onnx(Cummax())


def test_readme_onnx_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"<!-- onnx-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert (tmp_path / "step.onnx").exists()
    json.dumps(metadata(onnx.load(str(tmp_path / "step.onnx"))))
