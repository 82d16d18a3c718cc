"""What a captured graph is specialised to (the input signature: the compile cache's key), and
how the model's output structure is flattened into tensors and rebuilt."""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree

from .dtypes import dtype_name
from .errors import CaptureError, SignatureError

# --- input signatures -----------------------------------------------------------------------


class TensorSpec(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}{list(self.shape)} on {self.device}"


@dataclass(frozen=True)
class Signature:
    """What a captured graph is specialised to: input structure, each input's shape/dtype/device
    (or value, for non-tensors), and train/eval mode. Cheap to build: it is the cache key of
    every call."""

    structure: pytree.TreeSpec
    leaves: tuple[Any, ...]  # TensorSpec or ("value", repr)
    training: bool

    @staticmethod
    def of(args: tuple, kwargs: dict, training: bool) -> Signature:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        sig = Signature(spec, tuple(
            TensorSpec(tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor)
            else ("value", repr(x)) for x in leaves), training)
        for i, x in enumerate(leaves):  # (names are built only for the message: a hot path)
            if not isinstance(x, (torch.Tensor, *_VALUES)):
                name = sig.names[i]
                raise SignatureError(
                    f"{name} is a {type(x).__qualname__}: mpcompile bakes non-tensor inputs into "
                    "the graph, so only immutable values (numbers, strings, bools, None, enums, "
                    "dtypes, tuples of them) may be passed; a mutable object could change "
                    "between calls and silently reuse a stale graph. Pass tensors, or hold the "
                    "object in the model.")
        return sig

    @property
    def names(self) -> tuple[str, ...]:
        """Where each leaf sits: "args[0]", "kwargs['mask']"."""
        dummy = pytree.tree_unflatten(list(range(len(self.leaves))), self.structure)
        return tuple(_pretty_path(pytree.keystr(p))
                     for p, _ in pytree.tree_flatten_with_path(dummy)[0])

    def mismatch(self, other: Signature) -> str:
        """A sentence naming the first difference between ``other`` and ``self``."""
        if self.training != other.training:
            return f"mode is {'train' if other.training else 'eval'}, captured in " + (
                "train" if self.training else "eval")
        if self.structure != other.structure or len(self.leaves) != len(other.leaves):
            return (f"the inputs' structure is {', '.join(other.names) or '()'}, captured with "
                    f"{', '.join(self.names) or '()'}")
        for name, a, b in zip(self.names, self.leaves, other.leaves):
            if a != b:
                fmt = lambda x: str(x) if isinstance(x, TensorSpec) else x[1]  # noqa: E731
                return f"{name} is {fmt(b)}, captured as {fmt(a)}"
        return "no difference"


# non-tensor inputs that may be baked into a graph: immutable, so their repr is their identity
_VALUES = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype,
           torch.device, torch.layout, torch.memory_format)


def _pretty_path(p: str) -> str:
    # pytree key strings look like "[0][1]" / "[1]['mask']" for (args, kwargs)
    m = re.match(r"\[(\d)\](.*)", p)
    if not m:
        return p
    return ("args" if m.group(1) == "0" else "kwargs") + m.group(2)


# --- output structure ----------------------------------------------------------------------


@dataclass(frozen=True)
class OutSpec:
    """How to rebuild the model's output from a flat list of tensors."""

    kind: str  # "tensor" | "value" | "seq" | "namedtuple" | "dict" | "dataclass"
    type: Any = None
    keys: tuple = ()
    children: tuple[OutSpec, ...] = ()
    value: Any = None

    def unflatten(self, leaves: list[torch.Tensor]) -> Any:
        it = iter(leaves)
        return self._build(it)

    def _build(self, it):
        if self.kind == "tensor":
            return next(it)
        if self.kind == "value":
            return self.value
        items = [c._build(it) for c in self.children]
        if self.kind == "seq":
            return self.type(items)
        if self.kind == "namedtuple":
            return self.type(*items)
        if self.kind == "dict":
            return self.type(zip(self.keys, items))
        init = {k: v for (k, is_init), v in zip(self.keys, items) if is_init}
        obj = self.type(**init)
        for (k, is_init), v in zip(self.keys, items):
            if not is_init:
                object.__setattr__(obj, k, v)
        return obj


def flatten_output(out: Any, where: str = "output") -> tuple[list[torch.Tensor], OutSpec]:
    leaves: list[torch.Tensor] = []

    def go(x, path) -> OutSpec:
        if isinstance(x, torch.Tensor):
            leaves.append(x)
            return OutSpec("tensor")
        if x is None or isinstance(x, (bool, int, float, str, torch.dtype, torch.device)):
            return OutSpec("value", value=x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            fields = dataclasses.fields(x)
            kids = tuple(go(getattr(x, f.name), f"{path}.{f.name}") for f in fields)
            return OutSpec("dataclass", type(x), tuple((f.name, f.init) for f in fields), kids)
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            kids = tuple(go(v, f"{path}.{k}") for k, v in zip(x._fields, x))
            return OutSpec("namedtuple", type(x), tuple(x._fields), kids)
        if isinstance(x, (tuple, list)):
            kids = tuple(go(v, f"{path}[{i}]") for i, v in enumerate(x))
            return OutSpec("seq", type(x), (), kids)
        if isinstance(x, dict):
            kids = tuple(go(v, f"{path}[{k!r}]") for k, v in x.items())
            return OutSpec("dict", type(x), tuple(x.keys()), kids)
        raise CaptureError(
            f"{path} is a {type(x).__qualname__}, which mpcompile cannot flatten into tensors: "
            "return tensors, tuples, lists, dicts or dataclasses (or turn off what produces it, "
            "e.g. use_cache=False for a Hugging Face model)"
        )

    spec = go(out, where)
    return leaves, spec
