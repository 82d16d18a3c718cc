"""What the command line works on: a TARGET (a model with example data) and a policy file.

A TARGET is either the name of a built-in example (:data:`mpcompile.examples.EXAMPLES`) or
``package.module:function``: the function is imported and called with no arguments and returns
``(model, example_inputs)``, ``(model, example_inputs, example_targets)`` or ``(model,
example_inputs, example_targets, loss_fn)``. A policy file is TOML or JSON holding
:class:`mpcompile.Policy`'s fields, with dtypes and ATen ops written as strings.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .dtypes import from_name
from .errors import MPCompileError, PolicyError
from .examples import EXAMPLES, batch
from .policy import Policy


class TargetError(MPCompileError, ValueError):
    """A TARGET cannot be resolved: an unknown built-in name, a module that does not import, no
    such function, or a function that does not return (model, example_inputs, ...)."""


@dataclass(frozen=True)
class Target:
    """A resolved TARGET: the FP32 model, its example inputs as a tuple of positional
    arguments, the example targets (None: none given) and the loss function (None: none
    given; the model may return its loss)."""

    name: str
    model: torch.nn.Module
    inputs: tuple
    targets: Any
    loss_fn: Callable | None


FORM = ("package.module:function (returning (model, example_inputs[, example_targets, "
        "loss_fn])) or a built-in example")


def resolve(target: str) -> Target:
    """The model and example data that ``target`` names (see the module docstring)."""
    if ":" not in target:
        example = EXAMPLES.get(target)
        if example is None:
            raise TargetError(f"TARGET {target!r} is not a built-in example "
                              f"({', '.join(sorted(EXAMPLES))}); give {FORM}")
        inputs, targets = batch(example)
        return Target(target, example.build(), tuple(inputs), targets, example.loss)
    module_name, _, func_name = target.partition(":")
    if not module_name or not func_name.isidentifier():
        raise TargetError(f"TARGET {target!r}: write it as {FORM}")
    func = getattr(_import(module_name, target), func_name, None)
    if func is None:
        raise TargetError(f"TARGET {target!r}: module {module_name!r} has no attribute "
                          f"{func_name!r}; give the name of a function defined in it")
    if not callable(func):
        raise TargetError(f"TARGET {target!r}: {func_name} is a {type(func).__name__}, not a "
                          "function; it must return (model, example_inputs[, ...])")
    try:
        result = func()
    except Exception as e:
        raise TargetError(f"TARGET {target!r}: calling {func_name}() raised "
                          f"{type(e).__name__}: {e}") from e
    return _from_result(target, result)


def _import(module_name: str, target: str):
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        raise TargetError(f"TARGET {target!r}: cannot import module {module_name!r} ({e}); is "
                          "it installed or on PYTHONPATH?") from e
    except Exception as e:  # a module that fails while it is imported
        raise TargetError(f"TARGET {target!r}: importing {module_name!r} raised "
                          f"{type(e).__name__}: {e}") from e


def _from_result(target: str, result: Any) -> Target:
    if not (isinstance(result, tuple) and 2 <= len(result) <= 4):
        raise TargetError(f"TARGET {target!r} returned a {type(result).__name__}; it must "
                          "return a tuple (model, example_inputs[, example_targets, loss_fn])")
    model, inputs, targets, loss_fn = (*result, None, None)[:4]
    if not isinstance(model, torch.nn.Module):
        raise TargetError(f"TARGET {target!r}: the first item it returned is a "
                          f"{type(model).__name__}, not a torch.nn.Module")
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if not any(isinstance(x, torch.Tensor) for x in inputs):
        raise TargetError(f"TARGET {target!r}: the example inputs (second item) hold no "
                          "tensor; give a tensor or a tuple of the model's positional inputs")
    if loss_fn is not None and not callable(loss_fn):
        raise TargetError(f"TARGET {target!r}: the fourth item (loss_fn) is a "
                          f"{type(loss_fn).__name__}, not a function")
    return Target(target, model, inputs, targets, loss_fn)


# -- policy files ------------------------------------------------------------------------------

OP_FIELDS = ("lower", "fp32", "follow", "passthrough")


def policy_fields() -> tuple[str, ...]:
    """The field names a policy file may use: Policy's public fields."""
    return tuple(f.name for f in dataclasses.fields(Policy) if f.init)


def load_policy(path: str | Path) -> Policy:
    """A :class:`Policy` from a ``.toml`` or ``.json`` file of its fields. ``dtype``:
    ``"float16"``, ``"fp16"``, ``"bf16"``, ...; op lists: ``"aten.mm.default"`` (one overload),
    ``"aten.mm"`` (all of them), ``"torch.ops."`` prefix optional; ``keep_fp32_modules``:
    regular expressions on module paths. A PolicyError names the file and the bad field."""
    path = Path(path)
    try:
        data = _read(path)
    except OSError as e:
        raise PolicyError(f"policy file {path}: cannot read it ({e.strerror or e})") from e
    if not isinstance(data, dict):
        raise PolicyError(f"policy file {path}: the top level must be a table/object of "
                          f"Policy fields ({', '.join(policy_fields())})")
    try:
        return Policy(**{k: _field(k, v) for k, v in data.items()})
    except PolicyError as e:
        raise PolicyError(f"policy file {path}: {e}") from e


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PolicyError(f"policy file {path} is not valid JSON: {e}") from e
    if suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as e:
                raise PolicyError(f"policy file {path}: reading TOML on Python 3.10 needs "
                                  "tomli (pip install tomli); or write the policy as JSON") from e
        try:
            return tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise PolicyError(f"policy file {path} is not valid TOML: {e}") from e
    raise PolicyError(f"policy file {path}: use a .toml or .json file")


def _field(name: str, value: Any) -> Any:
    """One policy-file value as Policy takes it."""
    if name not in policy_fields():
        raise PolicyError(f"unknown field {name!r}; the fields are "
                          f"{', '.join(policy_fields())}")
    if name == "dtype":
        if not isinstance(value, str):
            raise PolicyError(f"dtype must be a string such as \"float16\" or \"bf16\", got "
                              f"{value!r}")
        try:
            return from_name(value)
        except (KeyError, ValueError, MPCompileError) as e:
            raise PolicyError(f"dtype {value!r} is not a float type: use float16, bfloat16 "
                              "or float32") from e
    if name in OP_FIELDS or name == "keep_fp32_modules":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise PolicyError(f"{name} must be a list of strings, got {value!r}")
        return tuple(_op(name, x) for x in items) if name in OP_FIELDS else tuple(items)
    if name == "strict_reductions" and not isinstance(value, bool):
        raise PolicyError(f"strict_reductions must be true or false, got {value!r}")
    if name in ("strategy", "kernels") and not isinstance(value, str):
        raise PolicyError(f"{name} must be a string, got {value!r}")
    return value


def _op(field: str, text: str):
    """``"aten.mm.default"`` -> torch.ops.aten.mm.default; ``"aten.mm"`` -> the packet."""
    parts = text.removeprefix("torch.ops.").split(".")
    if parts[0] == "aten":
        parts = parts[1:]
    if not 1 <= len(parts) <= 2 or not all(p.isidentifier() for p in parts):
        raise PolicyError(f"{field}: {text!r} is not an ATen op; write it as "
                          "\"aten.<name>.<overload>\" (e.g. \"aten.mm.default\") or "
                          "\"aten.<name>\"")
    try:
        packet = getattr(torch.ops.aten, parts[0])
        return getattr(packet, parts[1]) if len(parts) == 2 else packet
    except (AttributeError, RuntimeError) as e:
        raise PolicyError(f"{field}: {text!r} is not an ATen op (no such op or overload)") \
            from e
