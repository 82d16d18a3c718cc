"""Running BF16 models in onnxruntime, which the exported file itself does not need.

- onnxruntime's Python API cannot take or return bfloat16 arrays, so ``bf16_io_as_float32``
  gives every bfloat16 graph input and output a float32 face (a Cast right inside): bfloat16
  values are exactly float32 values, so nothing is lost.
- onnxruntime's CPU provider has no bfloat16 kernels for arithmetic (MatMul, Add, Relu, ...), and
  unlike float16 it does not insert casts itself. ``emulate_bf16_on_cpu`` does what its float16
  path does: each such node reads its bfloat16 inputs widened to float32 and its outputs are
  rounded back to bfloat16 — the same values as a kernel computing in FP32 and writing bfloat16.
  Data movement (Reshape, Transpose, Gather, Concat, ...) stays bfloat16.

Both are rewrites of a loaded ModelProto in memory, used by :class:`OrtTrainer` and the tests.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from ..errors import ExportError

BF16 = TensorProto.BFLOAT16
F32 = TensorProto.FLOAT
# ops onnxruntime's CPU provider runs in bfloat16 (data movement), seen with onnxruntime 1.32
_BF16_OK = {"Cast", "CastLike", "Identity", "Reshape", "Transpose", "Concat", "Gather",
            "Squeeze", "Unsqueeze", "Flatten", "Shape", "Size", "Constant"}


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
    out.update({t.name: t.data_type for t in g.initializer})
    return out


def has_bf16(model: onnx.ModelProto) -> bool:
    return BF16 in _types(model).values()


def _rewire(g: onnx.GraphProto, old: str, new: str, *, producer: bool = False) -> None:
    """Every node reading ``old`` reads ``new`` (and, with ``producer``, writes it too)."""
    for node in g.node:
        node.input[:] = [new if x == old else x for x in node.input]
        if producer:
            node.output[:] = [new if x == old else x for x in node.output]


def bf16_io_as_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name for t in g.initializer}
    casts_in = []
    for vi in g.input:
        if vi.type.tensor_type.elem_type != BF16:
            continue
        inner = f"{vi.name}__bf16"
        _rewire(g, vi.name, inner)
        for out in g.output:
            if out.name == vi.name:
                raise ExportError(f"{vi.name} is both an input and an output: the bfloat16 face "
                                  "cannot rename it")
        vi.type.tensor_type.elem_type = F32
        casts_in.append(helper.make_node("Cast", [vi.name], [inner], to=BF16,
                                         name=f"in_{vi.name}"))
        if vi.name in inits:  # a default value: store it as float32 too
            t = next(t for t in g.initializer if t.name == vi.name)
            arr = onnx.numpy_helper.to_array(t).astype("float32")
            t.CopyFrom(onnx.numpy_helper.from_array(arr, vi.name))
    for vi in g.output:
        if vi.type.tensor_type.elem_type != BF16:
            continue
        inner = f"{vi.name}__bf16"
        _rewire(g, vi.name, inner, producer=True)
        vi.type.tensor_type.elem_type = F32
        g.node.append(helper.make_node("Cast", [inner], [vi.name], to=F32,
                                       name=f"out_{vi.name}"))
    nodes = casts_in + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    return m


def emulate_bf16_on_cpu(model: onnx.ModelProto) -> onnx.ModelProto:
    m = bf16_io_as_float32(model)
    types = _types(m)
    g = m.graph
    new_nodes = []
    k = 0
    for node in g.node:
        bf_in = [x for x in node.input if x and types.get(x) == BF16]
        bf_out = [x for x in node.output if x and types.get(x) == BF16]
        if node.op_type in _BF16_OK or not (bf_in or bf_out):
            new_nodes.append(node)
            continue
        widened = {}
        for x in dict.fromkeys(bf_in):
            k += 1
            widened[x] = f"{x}__f32_{k}"
            new_nodes.append(helper.make_node("Cast", [x], [widened[x]], to=F32,
                                              name=f"widen_{k}"))
        node.input[:] = [widened.get(x, x) for x in node.input]
        rounds = []
        for i, y in enumerate(node.output):
            if y in bf_out:
                k += 1
                node.output[i] = f"{y}__f32_{k}"
                rounds.append(helper.make_node("Cast", [node.output[i]], [y], to=BF16,
                                               name=f"round_{k}"))
        for a in node.attribute:  # ops whose attribute names an output type
            if a.name in ("to", "dtype") and a.i == BF16:
                a.i = F32
        new_nodes.append(node)
        new_nodes.extend(rounds)
    del g.node[:]
    g.node.extend(new_nodes)
    return m
